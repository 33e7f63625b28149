"""The PC's two Intel 8259A programmable interrupt controllers (datasheet 231468), cascaded
on master IRQ 2, with the PIIX/ICH edge/level control registers (ELCR, 0x4d0/0x4d1).

The emulator asks `pending()` (the INTR pin) before each instruction and, when it takes
the interrupt, `acknowledge()` (the two INTA cycles) for the vector. Devices reach it as
the IrqRouter sink `set_irq(gsi, level)`. Register layout per chip: offset 0 takes ICW1,
OCW2 and OCW3 and reads IRR/ISR (or the poll word); offset 1 takes ICW2-4 and OCW1 and
reads the IMR.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from boite.errors import CheckpointError
from boite.machine.device import Device
from boite.machine.state import StateRecord, bits, flag, record, span, uint

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
CASCADE_IRQ = 2
# IRQ 0, 1, 2 (master) and 8, 13 (slave) are always edge-triggered on a PC.
ELCR_MASK = (0xF8, 0xDE)


@dataclass
class Pic8259:
    """One 8259A's registers. Priority is kept as `priority_add`: the IRQ with the
    highest priority is `priority_add`, then the next ones in order (rotation)."""

    irr: int = 0
    imr: int = 0
    isr: int = 0
    last_irr: int = 0  # input levels, for edge detection
    priority_add: int = 0
    irq_base: int = 0
    read_isr: bool = False
    poll: bool = False
    special_mask: bool = False
    init_state: int = 0  # 0 = operational, 1..3 = waiting for ICW2..ICW4
    auto_eoi: bool = False
    rotate_on_auto_eoi: bool = False
    special_fully_nested: bool = False
    init4: bool = False
    single_mode: bool = False
    ltim: bool = False  # ICW1 level-triggered mode for every input
    elcr: int = 0
    elcr_mask: int = 0
    is_master: bool = True

    @property
    def level_mask(self) -> int:
        return 0xFF if self.ltim else self.elcr

    def init_reset(self) -> None:
        """What ICW1 does: everything but ELCR back to power-on values."""
        keep = (self.elcr, self.elcr_mask, self.is_master)
        for f in fields(self):
            setattr(self, f.name, f.default)
        self.elcr, self.elcr_mask, self.is_master = keep

    def set_input(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        if self.level_mask & mask:
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask  # rising edge
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask

    def _priority(self, mask: int) -> int:
        """Rotated priority (0 = highest) of the highest-priority bit in mask; 8 if none."""
        if not mask & 0xFF:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def highest_request(self) -> int:
        """The IRQ this chip would signal now, or -1."""
        p = self._priority(self.irr & ~self.imr)
        if p == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr  # masked levels don't block lower ones
        if self.special_fully_nested and self.is_master:
            in_service &= ~(1 << CASCADE_IRQ)  # the slave may nest over itself
        if p < self._priority(in_service):
            return (p + self.priority_add) & 7
        return -1

    def intack(self, irq: int) -> None:
        mask = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= mask
        if not self.level_mask & mask:
            self.irr &= ~mask  # a level request stays until the device drops it

    def write(self, offset: int, value: int) -> None:
        if offset == 0:
            if value & 0x10:  # ICW1
                self.init_reset()
                self.init_state = 1
                self.init4 = bool(value & 0x01)
                self.single_mode = bool(value & 0x02)
                self.ltim = bool(value & 0x08)
            elif value & 0x08:  # OCW3
                if value & 0x04:
                    self.poll = True
                if value & 0x02:
                    self.read_isr = bool(value & 0x01)
                if value & 0x40:
                    self.special_mask = bool(value & 0x20)
            else:  # OCW2
                cmd = value >> 5
                if cmd in (0, 4):  # clear / set rotate in automatic EOI mode
                    self.rotate_on_auto_eoi = cmd == 4
                elif cmd in (1, 5):  # non-specific EOI (and rotate)
                    p = self._priority(self.isr)
                    if p != 8:
                        irq = (p + self.priority_add) & 7
                        self.isr &= ~(1 << irq)
                        if cmd == 5:
                            self.priority_add = (irq + 1) & 7
                elif cmd in (3, 7):  # specific EOI (and rotate)
                    irq = value & 7
                    self.isr &= ~(1 << irq)
                    if cmd == 7:
                        self.priority_add = (irq + 1) & 7
                elif cmd == 6:  # set priority: IRQ value&7 becomes the lowest
                    self.priority_add = (value + 1) & 7
            return
        if self.init_state == 0:
            self.imr = value  # OCW1
        elif self.init_state == 1:
            self.irq_base = value & 0xF8  # ICW2
            if self.single_mode:
                self.init_state = 3 if self.init4 else 0
            else:
                self.init_state = 2
        elif self.init_state == 2:
            self.init_state = 3 if self.init4 else 0  # ICW3: cascade wiring is fixed
        else:
            self.special_fully_nested = bool(value & 0x10)  # ICW4
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def read(self, offset: int) -> int:
        if self.poll:
            self.poll = False
            irq = self.highest_request()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if offset == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr


@dataclass(frozen=True)
class PicChipState(StateRecord):
    """One 8259A's registers; its wiring (master or slave, which IRQs ELCR may make
    level-triggered) is configuration and not saved."""

    irr: int = uint(8)
    imr: int = uint(8)
    isr: int = uint(8)
    last_irr: int = uint(8)
    priority_add: int = span(0, 7)
    irq_base: int = bits(0xF8)
    read_isr: bool = flag()
    poll: bool = flag()
    special_mask: bool = flag()
    init_state: int = span(0, 3)
    auto_eoi: bool = flag()
    rotate_on_auto_eoi: bool = flag()
    special_fully_nested: bool = flag()
    init4: bool = flag()
    single_mode: bool = flag()
    ltim: bool = flag()
    elcr: int = uint(8)


@dataclass(frozen=True)
class PicState(StateRecord):
    VERSION = 1
    master: PicChipState = record(PicChipState)
    slave: PicChipState = record(PicChipState)

    def chips(self) -> tuple[PicChipState, PicChipState]:
        return self.master, self.slave


class DualPic(Device):
    """The master/slave pair. Registered on three bus ranges: 0x20 (2 ports), 0xa0
    (2 ports) and the ELCR at 0x4d0 (2 ports) — `bus_view(...)` gives each one."""

    name = "pic"

    def __init__(self, on_intr: Callable[[bool], None] | None = None) -> None:
        """`on_intr(level)` is called when the INTR pin changes (an idle CPU wakes)."""
        self.on_intr = on_intr
        self._lock = threading.RLock()
        self.chips = (Pic8259(is_master=True), Pic8259(is_master=False))
        self.reset()

    def reset(self) -> None:
        with self._lock:
            for i, chip in enumerate(self.chips):
                chip.init_reset()
                chip.elcr = 0
                chip.elcr_mask = ELCR_MASK[i]
            self._intr = False
            self._update()

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return PicState(*(PicChipState.of(c) for c in self.chips)).to_dict()

    def check_state(self, state: Any) -> PicState:
        rec = PicState.from_dict(state)
        for key, chip_state, mask in zip(("master", "slave"), rec.chips(), ELCR_MASK, strict=True):
            if chip_state.elcr & ~mask:
                raise CheckpointError(
                    f"{key}.elcr: {chip_state.elcr:#x} sets IRQs that are always edge-triggered "
                    f"(allowed {mask:#x})"
                )
        return rec

    def apply_state(self, rec: PicState) -> None:
        with self._lock:
            for chip, chip_state in zip(self.chips, rec.chips(), strict=True):
                chip_state.put(chip)
            self._update()

    # -- the CPU side -------------------------------------------------------------------

    def _update(self) -> None:
        master, slave = self.chips
        master.set_input(CASCADE_IRQ, slave.highest_request() >= 0)
        intr = master.highest_request() >= 0
        if intr != self._intr:
            self._intr = intr
            if self.on_intr is not None:
                self.on_intr(intr)

    def pending(self) -> bool:
        """The INTR pin: a request the CPU should take when IF=1."""
        with self._lock:
            return self._intr

    def acknowledge(self) -> int:
        """INTA: the vector to deliver. With no request left (it went away between INTR
        and INTA) the 8259 answers IRQ 7 of the chip asked, without setting ISR."""
        with self._lock:
            master, slave = self.chips
            irq = master.highest_request()
            if irq < 0:
                vector = master.irq_base + 7  # spurious IRQ 7
            elif irq == CASCADE_IRQ and not master.single_mode:
                master.intack(irq)
                irq2 = slave.highest_request()
                if irq2 >= 0:
                    slave.intack(irq2)
                    vector = slave.irq_base + irq2
                else:
                    vector = slave.irq_base + 7  # spurious IRQ 15
            else:
                master.intack(irq)
                vector = master.irq_base + irq
            self._update()
            return vector

    # -- the device side ----------------------------------------------------------------

    def set_irq(self, gsi: int, level: bool) -> None:
        """IrqRouter sink: ISA IRQ 0-15. Other GSIs are the IOAPIC's alone."""
        if not 0 <= gsi < 16:
            return
        with self._lock:
            self.chips[gsi >> 3].set_input(gsi & 7, level)
            self._update()

    # -- the bus ----------------------------------------------------------------------

    def bus_view(self, which: str) -> _PicPorts:
        return _PicPorts(self, which)

    def port_read(self, which: str, offset: int) -> int:
        with self._lock:
            if which == "elcr":
                return self.chips[offset & 1].elcr
            value = self.chips[0 if which == "master" else 1].read(offset & 1)
            self._update()
            return value

    def port_write(self, which: str, offset: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if which == "elcr":
                chip = self.chips[offset & 1]
                chip.elcr = value & chip.elcr_mask
            else:
                self.chips[0 if which == "master" else 1].write(offset & 1, value)
            self._update()


class _PicPorts:
    """One of the PIC pair's port ranges, as a bus device."""

    def __init__(self, pic: DualPic, which: str) -> None:
        self.pic = pic
        self.which = which

    def bus_read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self.pic.port_read(self.which, offset + i) << (8 * i)
        return value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self.pic.port_write(self.which, offset + i, value >> (8 * i))
