"""QEMU's `isa-debug-exit` device: a write of v to its port ends the VM with exit status
(v << 1) | 1, so a test kernel's status can never be mistaken for a clean 0.

boite puts it where kvm-unit-tests and most x86 test kernels expect it, QEMU's
`-device isa-debug-exit,iobase=0xf4,iosize=4` (QEMU's own default port is 0x501). Any
access size up to `iosize` bytes is accepted and the value is what was written, masked
to the access size. Reads return 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from boite.machine.device import StatelessDevice

if TYPE_CHECKING:
    from boite.machine.machine import Machine

DEBUG_EXIT_PORT = 0xF4


class IsaDebugExit(StatelessDevice):
    name = "isa-debug-exit"

    def __init__(self, machine: Machine, iosize: int = 4) -> None:
        if iosize not in (1, 2, 4):
            raise ValueError(f"isa-debug-exit iosize {iosize}: expected 1, 2 or 4")
        self.machine = machine
        self.iosize = iosize

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.machine.request_poweroff((value << 1) | 1, "isa-debug-exit")
