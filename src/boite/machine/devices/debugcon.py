"""QEMU's debug console port (0x402), where SeaBIOS writes its debug log.

SeaBIOS reads the port first and logs to it only if it reads back 0xE9 (QEMU's
"debugcon present" answer). Lines go to the `boite.firmware` logger; the last
`keep` bytes stay in `text` for tests and for `boite` to show when a boot fails.
"""

from __future__ import annotations

import logging

from boite.machine.device import Device
from boite.machine.state import KeepsNoState

DEBUGCON_PORT = 0x402
READBACK = 0xE9

log = logging.getLogger("boite.firmware")


class DebugCon(KeepsNoState, Device):
    name = "debugcon"

    def __init__(self, keep: int = 64 * 1024) -> None:
        self.keep = keep
        self.buffer = bytearray()
        self.line = bytearray()

    @property
    def text(self) -> str:
        return self.buffer.decode("latin-1")

    def reset(self) -> None:
        self.line.clear()

    def bus_read(self, offset: int, size: int) -> int:
        return READBACK

    def bus_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            self.buffer.append(byte)
            if byte == 0x0A:
                log.debug("%s", self.line.decode("latin-1").rstrip("\r"))
                self.line.clear()
            elif len(self.line) < 4096:
                self.line.append(byte)
        if len(self.buffer) > self.keep:
            del self.buffer[: len(self.buffer) - self.keep]
