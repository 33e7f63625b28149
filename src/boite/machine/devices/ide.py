"""The PIIX IDE function (00:01.1, 8086:7010) around the two legacy ATA channels.

In compatibility mode (programming interface 0x80: both channels at their legacy ports,
bus mastering offered), the channels keep 0x1f0/0x3f6 on IRQ 14 and 0x170/0x376 on IRQ
15 whatever the BARs say, as on every PIIX; BAR4 is the 16-byte bus-master block
(command, status, PRD table address, per channel at +0 and +8). The bus-master block
keeps what the guest writes, and its status never says "DMA capable": the drives offer
no DMA modes in IDENTIFY, so firmware and drivers (SeaBIOS, Linux's ata_piix) move data
by PIO through the channels' data registers.

Boot paths for SeaBIOS's bootorder: `/pci@i0cf8/ide@1,1/drive@C/disk@U`.
"""

from __future__ import annotations

from typing import Any

from boite.machine.devices.ata import PRIMARY, SECONDARY, AtaChannel
from boite.machine.machine import IoRange
from boite.machine.pci.function import BAR_IO, Bar, PciFunction

IDE_SLOT, IDE_FUNCTION = 1, 1
BM_SIZE = 16


class BusMasterRegisters:
    """BAR4: per channel a command byte (+0), status byte (+2), PRD address (+4)."""

    def __init__(self) -> None:
        self.regs = bytearray(BM_SIZE)

    def bus_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset : offset + size].ljust(size, b"\xff"), "little")

    def bus_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            at = offset + i
            if at >= BM_SIZE:
                return
            byte = (value >> (8 * i)) & 0xFF
            if at & 7 == 2:  # status: interrupt and error are write-1-to-clear
                self.regs[at] = self.regs[at] & ~(byte & 0x06) & 0x07
            elif at & 7 == 0:
                self.regs[at] = byte & 0x09
            elif at & 7 >= 4:
                self.regs[at] = byte & (0xFC if at & 7 == 4 else 0xFF)


class PiixIde(PciFunction):
    name = "piix-ide"

    def __init__(self, channels: list[AtaChannel | None]) -> None:
        self.channels = channels
        self.busmaster = BusMasterRegisters()
        super().__init__(0x8086, 0x7010, 0x010180, bars={4: Bar(BAR_IO, BM_SIZE, self.busmaster)})

    def legacy_ranges(self) -> list[IoRange]:
        out: list[IoRange] = []
        for ch in self.channels:
            if ch is not None:
                out += ch.port_ranges()
        return out

    @staticmethod
    def boot_path(channel: int, unit: int) -> str:
        return f"/pci@i0cf8/ide@{IDE_SLOT},{IDE_FUNCTION}/drive@{channel}/disk@{unit}"

    def save_state(self) -> dict[str, Any]:
        return {**super().save_state(), "busmaster": self.busmaster.regs.hex()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        raw = bytes.fromhex(str(state.get("busmaster", "")) or "00" * BM_SIZE)
        self.busmaster.regs[:] = raw[:BM_SIZE].ljust(BM_SIZE, b"\0")


CHANNEL_PORTS = (PRIMARY, SECONDARY)
