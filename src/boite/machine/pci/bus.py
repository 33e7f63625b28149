"""PCI bus 0, its host bridge (an i440FX-like northbridge) and configuration mechanism #1.

Configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): a 32-bit write to 0xCF8 selects
enable(31) bus(23:16) device(15:11) function(10:8) register(7:2); 0xCFC-0xCFF then read
or write that dword's bytes. Only bus 0 exists; an empty slot reads all ones.

The bus maps each function's BARs onto the machine's port / MMIO bus when the function's
configuration says so (address programmed, space enabled) and unmaps them when it
changes. An address that collides with something already there is left unmapped and
logged: a guest's choice must not take down the machine.

INTx: a function's wire goes to `intx_sink(slot, pin, level)`, which the ISA bridge
(PIIX3, PIRQ routing) provides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.machine.bus import Bus
from boite.machine.pci.function import BAR_IO, INTERRUPT_PIN, PciFunction
from boite.machine.state import StateRecord, uint

log = logging.getLogger("boite.pci")

CONFIG_ADDRESS = 0xCF8  # one dword register; 0xCF9 is the PIIX reset control register
CONFIG_DATA = 0xCFC

I440FX_PAM0 = 0x59  # PAM registers 0x59-0x5f: which of 0xC0000-0xFFFFF is RAM
I440FX_SMRAM = 0x72


class PciBus:
    """Bus 0: slot (0-31) x function (0-7) -> PciFunction."""

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self.pio = pio
        self.mmio = mmio
        self.functions: dict[tuple[int, int], PciFunction] = {}
        self._mapped: dict[tuple[int, int], tuple[Bus, int]] = {}  # (id(fn), bar) -> where
        self.intx_sink: Callable[[int, int, bool], None] | None = None
        self._slots: dict[int, tuple[int, int]] = {}

    def add(self, slot: int, function: int, fn: Any) -> None:
        if not isinstance(fn, PciFunction):
            raise ValueError(f"{type(fn).__name__} is not a PCI function")
        if not (0 <= slot < 32 and 0 <= function < 8):
            raise ValueError(f"PCI address 00:{slot:02x}.{function} is out of range")
        if (slot, function) in self.functions:
            raise ValueError(f"PCI address 00:{slot:02x}.{function} is taken")
        self.functions[(slot, function)] = fn
        self._slots[id(fn)] = (slot, function)
        fn.on_mapping_change = self._remap
        fn.on_intx = self._intx

    def free_slot(self, first: int = 3) -> int:
        """The lowest slot from `first` with no function in it."""
        for slot in range(first, 32):
            if not any(s == slot for s, _ in self.functions):
                return slot
        raise ValueError("PCI bus 0 has no free slot")

    def address_of(self, fn: PciFunction) -> tuple[int, int]:
        return self._slots[id(fn)]

    # -- configuration space -------------------------------------------------------------
    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        fn = self.functions.get((slot, function))
        if fn is None:
            return (1 << (8 * size)) - 1
        return fn.config_read(offset, size)

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        fn = self.functions.get((slot, function))
        if fn is not None:
            fn.config_write(offset, size, value)

    # -- BAR mapping -------------------------------------------------------------------------
    def _remap(self, fn: PciFunction) -> None:
        for n, bar in fn.bars.items():
            key = (id(fn), n)
            want = fn.bar_address(n)
            bus = self.pio if bar.kind == BAR_IO else self.mmio
            have = self._mapped.get(key)
            if have == (bus, want):
                continue
            if have is not None:
                have[0].unregister(have[1])
                del self._mapped[key]
            if want is None:
                continue
            try:
                bus.register(want, bar.size, bar.handler)
            except ValueError as e:
                slot, func = self.address_of(fn)
                log.warning("PCI 00:%02x.%d BAR%d at %#x left unmapped: %s", slot, func, n, want, e)
                continue
            self._mapped[key] = (bus, want)

    def _intx(self, fn: PciFunction, level: bool) -> None:
        if self.intx_sink is not None:
            slot, _ = self.address_of(fn)
            self.intx_sink(slot, fn.config[INTERRUPT_PIN], level)


class ConfigAddress:
    """Port 0xCF8: the dword that selects what 0xCFC-0xCFF reach."""

    def __init__(self) -> None:
        self.value = 0

    def bus_read(self, offset: int, size: int) -> int:
        return self.value if size == 4 else (1 << (8 * size)) - 1

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if size == 4:  # byte writes to 0xCF8 are not configuration cycles
            self.value = value & 0x80FF_FFFC


class ConfigData:
    """Ports 0xCFC-0xCFF: the selected register's bytes."""

    def __init__(self, bus: PciBus, address: ConfigAddress) -> None:
        self.bus = bus
        self.address = address

    def _target(self, offset: int) -> tuple[int, int, int] | None:
        a = self.address.value
        if not a & 0x8000_0000 or (a >> 16) & 0xFF:
            return None  # disabled, or a bus behind a bridge we do not have
        return (a >> 11) & 0x1F, (a >> 8) & 7, (a & 0xFC) + offset

    def bus_read(self, offset: int, size: int) -> int:
        t = self._target(offset)
        if t is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_read(t[0], t[1], t[2], size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        t = self._target(offset)
        if t is not None:
            self.bus.config_write(t[0], t[1], t[2], size, value)


class PciHostBridge(PciFunction):
    """00:00.0, the i440FX PMC (8086:1237). Its PAM and SMRAM registers keep what the
    firmware writes; the region they describe is always RAM here (see firmware/seabios.py
    for why SeaBIOS is content with that)."""

    name = "pci-host"

    def __init__(self, bus: PciBus) -> None:
        super().__init__(0x8086, 0x1237, 0x060000, revision=0x02)
        self.bus = bus
        self.address = ConfigAddress()
        self.data = ConfigData(bus, self.address)

    def _defaults(self) -> None:
        super()._defaults()
        # PAM0 with RAM read/write enabled: SeaBIOS then takes its shadow copy (already
        # in RAM) as made and does not copy it from the high alias.
        self.config[I440FX_PAM0] = 0x30
        self.writable(I440FX_PAM0, b"\xff" * 7)
        self.writable(I440FX_SMRAM, b"\xff")

    def port_ranges(self) -> list[Any]:
        from boite.machine.machine import IoRange

        # 0xCF9 between them is the reset control register, a separate device.
        return [
            IoRange(CONFIG_ADDRESS, 1, handler=self.address),
            IoRange(CONFIG_ADDRESS + 2, 2, offset=2, handler=self.address),
            IoRange(CONFIG_DATA, 4, handler=self.data),
        ]

    extra_record = None  # set below (the record is defined after the class)

    def extra_state(self) -> StateRecord:
        return HostBridgeState(self.address.value)

    def apply_extra(self, rec: Any) -> None:
        self.address.value = rec.config_address & 0x80FF_FFFC


@dataclass(frozen=True)
class HostBridgeState(StateRecord):
    config_address: int = uint(32)  # what the last 32-bit write to 0xCF8 selected


PciHostBridge.extra_record = HostBridgeState
