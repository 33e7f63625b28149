"""The machine: guest RAM, the two buses, IRQ lines and the devices on them.

A Machine knows nothing of the accelerator that will run it. Boot loaders put the
initial CPU state in `boot_state`; the accelerator loads it.

Devices come in through one call, `attach(name, device, ports=, mmio=, pci=, irq=,
timer=, interrupt_controller=)`, which names every role the device plays: the port and
MMIO ranges it answers, its PCI address, the IRQ lines it drives, whether the CPU's
runner must advance it as a timer, and whether it is the CPU's INTR source. The record of
each attachment stays in `wiring`, so nothing has to scan devices for what they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from boite.accel.cpustate import CpuState
from boite.errors import CheckpointError
from boite.machine.bus import Bus, BusDevice
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


@dataclass(frozen=True)
class IoRange:
    """A port or MMIO range a device answers. `offset` is what the device sees at `base`
    (the i8042's lone status port 0x64 is offset 4); `handler` answers instead of the
    device itself where one device has several register blocks (the 8259 pair's views)."""

    base: int
    length: int
    offset: int = 0
    handler: BusDevice | None = None


class Timer(Protocol):
    """A device whose time the CPU's runner advances (PIT, RTC, ACPI PM timer)."""

    def next_deadline_ns(self) -> int | None: ...

    def advance(self, now_ns: int) -> Any: ...


class InterruptController(Protocol):
    """The CPU's INTR source as the emulator sees it (the 8259 pair)."""

    on_intr: Any

    def pending(self) -> bool: ...

    def acknowledge(self) -> int: ...


@dataclass
class Attachment:
    """How one device is wired: what `Machine.attach` was told."""

    name: str
    device: Any
    ports: tuple[IoRange, ...] = ()
    mmio: tuple[IoRange, ...] = ()
    pci: tuple[int, int] | None = None  # (slot, function) on bus 0
    irqs: tuple[int, ...] = ()


def _ranges(items: Iterable[IoRange | tuple[int, int]]) -> tuple[IoRange, ...]:
    return tuple(r if isinstance(r, IoRange) else IoRange(r[0], r[1]) for r in items)


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
    # Which way the guest powered off ("ACPI S5 via PM1a_CNT", "isa-debug-exit at
    # 0xf4" ...), for the log and `boite stop`; "" until it does.
    poweroff_route: str = ""
    reset_requested: bool = False
    wiring: list[Attachment] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    interrupt_controller: InterruptController | None = None
    pci: Any = None  # boite.machine.pci.PciBus once the builder adds the host bridge
    # The ACPI power button (the PIIX4 PM block's); None on a machine without ACPI.
    power_button: Callable[[], bool] | None = None
    # What the firmware may boot (boite.machine.firmware.pc.BootDevice), in attach order.
    boot_devices: list[Any] = field(default_factory=list)
    firmware: str | None = None  # "seabios" when the machine starts in its BIOS
    virtio_transport: str = "mmio"  # "pci" for a machine that boots through its BIOS

    def press_power_button(self) -> bool:
        """Press the ACPI power button. True when the guest has enabled the button's
        event (an ACPI OS is there to act on it); False when nothing will."""
        return self.power_button() if self.power_button is not None else False

    def attach(
        self,
        name: str,
        device: Any,
        *,
        ports: Iterable[IoRange | tuple[int, int]] = (),
        mmio: Iterable[IoRange | tuple[int, int]] = (),
        pci: tuple[int, int] | None = None,
        irq: int | Sequence[int] = (),
        timer: bool = False,
        interrupt_controller: bool = False,
    ) -> Any:
        """Put `device` in the machine under `name` in every role given; returns it.

        `ports`/`mmio`: IoRange (or (base, length)) on the port / MMIO bus. `pci`: (slot,
        function) on bus 0 for a PCI function (its BARs are mapped when the firmware or
        the OS programs them). `irq`: the IRQ lines (GSIs) it drives, for the record and
        for `irq_users`. `timer`: the runner advances it. `interrupt_controller`: it is
        the CPU's INTR source.
        """
        if any(a.name == name for a in self.wiring) or name in self.devices:
            raise ValueError(f"device name {name!r} is already used")
        port_ranges, mmio_ranges = _ranges(ports), _ranges(mmio)
        for bus, ranges in ((self.pio, port_ranges), (self.mmio, mmio_ranges)):
            for r in ranges:
                bus.register(r.base, r.length, r.handler or device, r.offset)
        if pci is not None:
            if self.pci is None:
                raise ValueError(f"{name}: a PCI function needs the machine's PCI host bridge")
            self.pci.add(pci[0], pci[1], device)
        irqs = (irq,) if isinstance(irq, int) else tuple(irq)
        self.wiring.append(Attachment(name, device, port_ranges, mmio_ranges, pci, irqs))
        if isinstance(device, Device):
            self.devices[name] = device
        if timer:
            self.timers.append(device)
        if interrupt_controller:
            if self.interrupt_controller is not None:
                raise ValueError(f"{name}: the machine already has an interrupt controller")
            self.interrupt_controller = device
        return device

    def irq_users(self, gsi: int) -> list[str]:
        """Names of the attached devices that drive IRQ line `gsi`."""
        return [a.name for a in self.wiring if gsi in a.irqs]

    def add_device(self, name: str, device: Device) -> Device:
        """A device with state but no bus role of its own (its parent registered it)."""
        if name in self.devices:
            raise ValueError(f"device name {name!r} is already used")
        self.devices[name] = device
        return device

    def request_poweroff(self, status: int = 0, route: str = "") -> None:
        """The guest powered the machine off (`route`: how, for people); the first
        request wins."""
        if self.exit_status is None:
            self.exit_status = status
            self.poweroff_route = route

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
