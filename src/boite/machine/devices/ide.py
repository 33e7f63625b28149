"""The PIIX IDE function (00:01.1, 8086:7010) around the two legacy ATA channels.

In compatibility mode (programming interface 0x80: both channels at their legacy ports,
bus mastering offered), the channels keep 0x1f0/0x3f6 on IRQ 14 and 0x170/0x376 on IRQ
15 whatever the BARs say, as on every PIIX; BAR4 is the 16-byte bus-master block
(command, status, PRD table address, per channel at +0 and +8). ATA disks on it offer
multiword DMA 0-2 and Ultra DMA 0-5: after READ/WRITE DMA (EXT) the host starts the
engine (command bit 0, bit 3 = toward memory), which moves the sectors through the PRD
table at once, then sets the interrupt bit and raises the channel's IRQ. ATAPI drives
stay PIO. SeaBIOS uses PIO; Linux's ata_piix uses DMA.

The function's own registers, kept as written for the drivers that program them (the
timings mean nothing here): IDETIM per channel (0x40, 0x42; bit 15 enables the channel's
decode), SIDETIM (0x44), and PIIX4's UDMACTL/UDMATIM (0x48, 0x4A). IDETIM starts with
both channels enabled, since boite decodes the legacy ports from reset whatever it says
(SeaBIOS writes the same; Linux's ata_piix skips a channel whose bit is clear, "port
disabled").

Boot paths for SeaBIOS's bootorder: `/pci@i0cf8/ide@1,1/drive@C/disk@U`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from boite.machine.devices.ata import PRIMARY, SECONDARY, AtaChannel, _is_atapi
from boite.machine.machine import IoRange
from boite.machine.pci.function import BAR_IO, Bar, PciFunction
from boite.machine.state import StateRecord, data

IDE_SLOT, IDE_FUNCTION = 1, 1
BM_SIZE = 16
IDETIM, SIDETIM, UDMACTL, UDMATIM = 0x40, 0x44, 0x48, 0x4A
IDETIM_DECODE_ENABLE = 0x8000


class BusMasterRegisters:
    """BAR4: per channel a command byte (+0), status byte (+2), PRD address (+4)."""

    def __init__(self, channels: list[AtaChannel | None], memory: Any) -> None:
        self.regs = bytearray(BM_SIZE)
        self.channels = channels
        self.memory = memory

    def bus_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset : offset + size].ljust(size, b"\xff"), "little")

    def bus_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            at = offset + i
            if at >= BM_SIZE:
                return
            byte = (value >> (8 * i)) & 0xFF
            if at & 7 == 2:  # interrupt, error: write 1 to clear; bits 5-6 kept as written
                self.regs[at] = (self.regs[at] & ~(byte & 0x06) & 0x07) | (byte & 0x60)
            elif at & 7 == 0:
                was = self.regs[at]
                self.regs[at] = byte & 0x09
                if byte & 1 and not was & 1:
                    self._start(at >> 3)
            elif at & 7 >= 4:
                self.regs[at] = byte & (0xFC if at & 7 == 4 else 0xFF)

    def _start(self, n: int) -> None:
        channel = self.channels[n] if n < len(self.channels) else None
        base = 8 * n
        if channel is None or self.memory is None:
            return
        self.regs[base + 2] |= 0x01  # active
        prd = int.from_bytes(self.regs[base + 4 : base + 8], "little")
        ok, longer = channel.run_dma(self.memory, prd, bool(self.regs[base] & 0x08))
        status = self.regs[base + 2] | 0x04  # interrupt
        if not ok:
            status |= 0x02
        if not longer:
            status &= ~0x01
        self.regs[base + 2] = status


class PiixIde(PciFunction):
    name = "piix-ide"

    def __init__(self, channels: list[AtaChannel | None], memory: Any = None) -> None:
        self.channels = channels
        self.busmaster = BusMasterRegisters(channels, memory)
        for ch in channels:
            for d in ch.drives if ch is not None and memory is not None else ():
                if d is not None and not _is_atapi(d):
                    d.dma_capable = True
        super().__init__(0x8086, 0x7010, 0x010180, bars={4: Bar(BAR_IO, BM_SIZE, self.busmaster)})

    def _defaults(self) -> None:
        super()._defaults()
        for reg in (IDETIM, IDETIM + 2):
            self.config[reg : reg + 2] = IDETIM_DECODE_ENABLE.to_bytes(2, "little")
        self.writable(IDETIM, b"\xff" * 4)
        self.writable(SIDETIM, b"\xff")
        self.writable(UDMACTL, b"\x0f")
        self.writable(UDMATIM, b"\xff\xff")

    def legacy_ranges(self) -> list[IoRange]:
        out: list[IoRange] = []
        for ch in self.channels:
            if ch is not None:
                out += ch.port_ranges()
        return out

    @staticmethod
    def boot_path(channel: int, unit: int) -> str:
        return f"/pci@i0cf8/ide@{IDE_SLOT},{IDE_FUNCTION}/drive@{channel}/disk@{unit}"

    def extra_state(self) -> StateRecord:
        return IdeState(bytes(self.busmaster.regs))

    def apply_extra(self, rec: Any) -> None:
        self.busmaster.regs[:] = rec.busmaster


@dataclass(frozen=True)
class IdeState(StateRecord):
    busmaster: bytes = data(max_len=BM_SIZE, exact=BM_SIZE)  # the BAR4 registers


PiixIde.extra_record = IdeState

CHANNEL_PORTS = (PRIMARY, SECONDARY)
