"""The machine: guest RAM, the two buses, IRQ lines and the devices on them.

A Machine knows nothing of the accelerator that will run it. Boot loaders put the
initial CPU state in `boot_state`; the accelerator loads it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from boite.accel.cpustate import CpuState
from boite.errors import CheckpointError
from boite.machine.bus import Bus
from boite.machine.device import Device
from boite.machine.irq import IrqRouter
from boite.machine.memory import GuestMemory
from boite.machine.state import StateRecord, check_all

E820_RAM = 1
E820_RESERVED = 2


@dataclass
class E820Entry:
    addr: int
    size: int
    type: int


@dataclass
class Machine:
    memory: GuestMemory
    num_vcpus: int = 1
    pio: Bus = field(default_factory=lambda: Bus("pio"))
    mmio: Bus = field(default_factory=lambda: Bus("mmio"))
    irqs: IrqRouter = field(default_factory=IrqRouter)
    devices: dict[str, Device] = field(default_factory=dict)
    boot_state: list[CpuState] = field(default_factory=list)
    # How the loader treated the kernel, for the log ("unpacked on the host ..."); "" if
    # there is nothing to say.
    kernel_note: str = ""
    e820: list[E820Entry] = field(default_factory=list)
    # Set by a power-off path / debug-exit device; the run loop stops when it is not None.
    exit_status: int | None = None
    reset_requested: bool = False

    def add_device(self, name: str, device: Device) -> Device:
        if name in self.devices:
            raise ValueError(f"device name {name!r} is already used")
        self.devices[name] = device
        return device

    def request_poweroff(self, status: int = 0) -> None:
        if self.exit_status is None:
            self.exit_status = status

    def request_reset(self) -> None:
        self.reset_requested = True

    def save_device_state(self) -> dict[str, Any]:
        return {name: dev.save_state() for name, dev in self.devices.items()}

    def check_device_state(self, state: Any) -> dict[str, StateRecord]:
        """Every device's saved state checked (nothing changes): exactly this machine's
        devices, each record valid for it. CheckpointError names the device and field."""
        if not isinstance(state, dict):
            raise CheckpointError("device state is not a dictionary of devices")
        unknown = sorted(str(n) for n in state if n not in self.devices)
        if unknown:
            raise CheckpointError(
                f"saved state for device(s) {', '.join(unknown)} which this machine does "
                "not have (was the .vmx changed?)"
            )
        missing = sorted(n for n in self.devices if n not in state)
        if missing:
            raise CheckpointError(
                f"no saved state for device(s) {', '.join(missing)} of this machine "
                "(was the .vmx changed?)"
            )
        return check_all(
            {
                name: functools.partial(dev.check_state, state[name])
                for name, dev in self.devices.items()
            }
        )

    def apply_device_state(self, records: dict[str, StateRecord]) -> None:
        """Put records from `check_device_state` in place."""
        for name, rec in records.items():
            self.devices[name].apply_state(rec)

    def load_device_state(self, state: Any) -> None:
        """All or nothing: every device is checked before the first one changes."""
        self.apply_device_state(self.check_device_state(state))

    def reset_devices(self) -> None:
        for dev in self.devices.values():
            dev.reset()
