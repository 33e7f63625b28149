"""I/O APIC (Intel 82093AA datasheet, version 0x20 as on ICH chipsets) at 0xFEC00000:
24 pins, each with a 64-bit redirection table entry.

MMIO registers: IOREGSEL at +0x00, IOWIN at +0x10, EOI at +0x40. Indirect registers:
0x00 ID, 0x01 version, 0x02 arbitration, 0x10 + 2n / 0x11 + 2n the low / high halves of
pin n's redirection entry.

An interrupt leaves as an `IoApicMessage` through the `deliver` hook (the emulator's
local APIC model takes it from there). Level-triggered pins set Remote IRR when
delivered and are delivered again after the local APIC's EOI (`eoi(vector)`) or a write
to the EOI register if the line is still asserted. A pin's polarity bit is stored, not
applied: the lines carry assertion (`_asserted`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.machine.device import Device
from boite.machine.state import U64, Flag, StateRecord, bits, items, uint

IOAPIC_BASE = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
NUM_PINS = 24
VERSION = 0x20

IOREGSEL = 0x00
IOWIN = 0x10
EOI_REG = 0x40

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE = 0x700
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_ACTIVE_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_RO_BITS = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR


@dataclass(frozen=True)
class IoApicMessage:
    """One interrupt message to the local APICs."""

    vector: int
    delivery_mode: int  # 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT
    dest: int  # APIC ID (physical) or logical destination
    logical: bool
    level_triggered: bool
    pin: int


@dataclass(frozen=True)
class IoApicState(StateRecord):
    VERSION = 1
    id: int = bits(0x0F)
    regsel: int = uint(8)
    redir: tuple[int, ...] = items(U64, max_len=NUM_PINS, exact=NUM_PINS)
    levels: tuple[bool, ...] = items(Flag(), max_len=NUM_PINS, exact=NUM_PINS)
    irr: int = bits((1 << NUM_PINS) - 1)

    def validate(self) -> None:
        for pin, rte in enumerate(self.redir):
            if rte & RTE_REMOTE_IRR and not rte & RTE_LEVEL:
                raise self.invalid(
                    f"redir[{pin}]", f"{rte:#x} has Remote IRR on an edge-triggered pin"
                )


class IoApic(Device):
    name = "ioapic"

    def __init__(
        self, deliver: Callable[[IoApicMessage], None] | None = None, apic_id: int = 0
    ) -> None:
        self.deliver = deliver
        self._lock = threading.RLock()
        self._apic_id_reset = apic_id
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.id = self._apic_id_reset
            self.regsel = 0
            self.redir = [RTE_MASKED] * NUM_PINS
            self.levels = [False] * NUM_PINS  # input pin levels as the wire shows them
            self.irr = 0  # latched edge requests not yet delivered (masked pins)

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return IoApicState.of(
                self, redir=tuple(self.redir), levels=tuple(self.levels)
            ).to_dict()

    def check_state(self, state: Any) -> IoApicState:
        return IoApicState.from_dict(state)

    def apply_state(self, rec: IoApicState) -> None:
        with self._lock:
            self.id, self.regsel, self.irr = rec.id, rec.regsel, rec.irr
            self.redir = list(rec.redir)
            self.levels = list(rec.levels)

    # -- pins ---------------------------------------------------------------------------

    def _asserted(self, pin: int) -> bool:
        # boite's IRQ lines carry "asserted", not the electrical level: the polarity bit
        # is kept for the guest to read back but never inverts a pin, as in QEMU's and
        # KVM's IOAPICs. Linux programs a PCI INTx it finds no _PRT entry for as level,
        # active low ("PCI INT A: no GSI - using ISA IRQ 11"); inverting it made an idle
        # line look asserted, an endless storm of that vector (issue 12, 2 vCPUs).
        return self.levels[pin]

    def set_irq(self, gsi: int, level: bool) -> None:
        """IrqRouter sink: pin `gsi` (0-23) asserted or not (see `_asserted`)."""
        if not 0 <= gsi < NUM_PINS:
            return
        with self._lock:
            was = self._asserted(gsi)
            self.levels[gsi] = level
            now = self._asserted(gsi)
            rte = self.redir[gsi]
            if rte & RTE_LEVEL:
                if now:
                    self._service(gsi)
            elif now and not was:
                # An edge: kept only while unmasked (a masked edge is lost on the 82093AA).
                if not rte & RTE_MASKED:
                    self.irr |= 1 << gsi
                    self._service(gsi)

    def _service(self, pin: int) -> None:
        rte = self.redir[pin]
        if rte & RTE_MASKED:
            return
        level = bool(rte & RTE_LEVEL)
        if level:
            if rte & RTE_REMOTE_IRR or not self._asserted(pin):
                return
            self.redir[pin] = rte | RTE_REMOTE_IRR
        else:
            if not self.irr & (1 << pin):
                return
            self.irr &= ~(1 << pin)
        if self.deliver is not None:
            self.deliver(
                IoApicMessage(
                    vector=rte & RTE_VECTOR,
                    delivery_mode=(rte & RTE_DELIVERY_MODE) >> 8,
                    dest=(rte >> 56) & 0xFF,
                    logical=bool(rte & RTE_DEST_LOGICAL),
                    level_triggered=level,
                    pin=pin,
                )
            )

    def eoi(self, vector: int) -> None:
        """The local APIC's EOI broadcast for a level-triggered vector."""
        with self._lock:
            for pin in range(NUM_PINS):
                rte = self.redir[pin]
                if rte & RTE_REMOTE_IRR and rte & RTE_VECTOR == vector:
                    self.redir[pin] = rte & ~RTE_REMOTE_IRR
                    self._service(pin)

    # -- registers ----------------------------------------------------------------------

    def _read_reg(self, index: int) -> int:
        if index == 0x00:
            return (self.id & 0x0F) << 24
        if index == 0x01:
            return ((NUM_PINS - 1) << 16) | VERSION
        if index == 0x02:
            return (self.id & 0x0F) << 24
        if 0x10 <= index < 0x10 + 2 * NUM_PINS:
            rte = self.redir[(index - 0x10) >> 1]
            return (rte >> 32) & 0xFFFF_FFFF if index & 1 else rte & 0xFFFF_FFFF
        return 0

    def _write_reg(self, index: int, value: int) -> None:
        if index == 0x00:
            self.id = (value >> 24) & 0x0F
            return
        if not 0x10 <= index < 0x10 + 2 * NUM_PINS:
            return  # version and arbitration are read-only
        pin = (index - 0x10) >> 1
        rte = self.redir[pin]
        if index & 1:
            new = (rte & 0xFFFF_FFFF) | (value << 32)
        else:
            new = (rte & ~0xFFFF_FFFF) | (value & ~RTE_RO_BITS) | (rte & RTE_RO_BITS)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR
        self.redir[pin] = new
        if not new & RTE_MASKED and new & RTE_LEVEL:
            self._service(pin)  # unmasking an asserted level pin delivers it

    def bus_read(self, offset: int, size: int) -> int:
        with self._lock:
            base = offset & ~3
            if base == IOREGSEL:
                value = self.regsel
            elif base == IOWIN:
                value = self._read_reg(self.regsel)
            else:
                value = 0
            return value >> (8 * (offset & 3))

    def bus_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == IOREGSEL:
                self.regsel = value & 0xFF
            elif offset == IOWIN and size == 4:
                self._write_reg(self.regsel, value & 0xFFFF_FFFF)
            elif offset == EOI_REG:
                self.eoi(value & 0xFF)
