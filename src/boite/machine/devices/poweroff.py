"""Ways out of a machine that has no ACPI: boite's power-off port and the 0xCF9 reset.

Power-off port (`PowerOffPort`, port 0x0505 by default, 1 to 4 bytes wide):
  - a read returns the signature 0x544F4F42 ("BOOT" little-endian: 'B','O','O','T' from
    the low byte up) so a guest can check the port exists before using it;
  - a write of v powers the machine off with exit status v & 0xFF (0 = a clean
    power-off). boite's guest-kit init writes 0 here after `sync`.

A Linux guest without ACPI has no such device driver: `reboot(RB_POWER_OFF)` ends in
`machine_halt()`, a `cli; hlt` loop on every CPU. The accelerators therefore treat "all
vCPUs halted with IF=0" as a power-off (StopReason.HALTED, exit status 0): nothing can
wake such a machine, as no maskable interrupt can arrive.

Reset Control Register (`ResetControl`, port 0xCF9, as on Intel chipsets): bit 1 selects a
hard reset, and writing bit 2 (RST_CPU) set resets the machine. Linux's `reboot=pci`
writes 0x02 then 0x06; both kinds reset the whole machine here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boite.machine.device import Device, StatelessDevice
from boite.machine.state import RegisterState, bits

if TYPE_CHECKING:
    from boite.machine.machine import Machine

POWEROFF_PORT = 0x0505
POWEROFF_SIGNATURE = int.from_bytes(b"BOOT", "little")
RESET_CONTROL_PORT = 0x0CF9

RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04
RCR_FULL_RST = 0x08


class PowerOffPort(StatelessDevice):
    name = "poweroff"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def bus_read(self, offset: int, size: int) -> int:
        return (POWEROFF_SIGNATURE >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.machine.request_poweroff(value & 0xFF, "boite's power-off port")


@dataclass(frozen=True)
class ResetControlState(RegisterState):
    """Port 0xcf9 keeps only its SYS_RST and FULL_RST bits."""

    value: int = bits(RCR_SYS_RST | RCR_FULL_RST)


class ResetControl(Device):
    name = "reset-control"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.reset()

    def reset(self) -> None:
        self.value = 0

    def save_state(self) -> dict[str, Any]:
        return ResetControlState(self.value).to_dict()

    def check_state(self, state: Any) -> RegisterState:
        return ResetControlState.from_dict(state)

    def apply_state(self, rec: RegisterState) -> None:
        self.value = rec.value

    def bus_read(self, offset: int, size: int) -> int:
        return self.value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.value = value & (RCR_SYS_RST | RCR_FULL_RST)
        if value & RCR_RST_CPU:
            self.machine.request_reset()
