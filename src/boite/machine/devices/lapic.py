"""Local APICs (xAPIC, Intel SDM vol. 3 ch. 10) for the emulator: one per vCPU, all at
0xFEE00000, joined by an `ApicBus` that carries interrupt messages between them and from
the IOAPIC.

Per APIC: ID, version 0x14 with 6 LVT entries, TPR/PPR, the 256-bit IRR/ISR/TMR, EOI
(a level-triggered vector's EOI goes on to the IOAPIC), SVR (software enable, spurious
vector), LDR/DFR (flat and cluster logical destinations), ESR, the ICR (fixed, lowest
priority, NMI, INIT, start-up; shorthands self / all / all-but-self), the LVT timer
(one-shot and periodic, divide 1-128, a 1 GHz bus clock: `next_deadline_ns` / `advance`
as the other timers) and LINT0/LINT1 (LINT0 in ExtINT mode, or a disabled APIC, passes
the 8259's INTR through: "virtual wire").

The MMIO page is banked: `ApicBus.current` names the vCPU whose accesses the bus is
serving (the emulator sets it before running that vCPU). A CPU takes an interrupt with
`pending()` / `acknowledge()`; INIT and start-up IPIs reach it through `on_init` /
`on_sipi(vector)` hooks the emulator sets.

The emulator gives each vCPU of a machine with several one (accel/emu/smp.py); a machine
with one vCPU has none. The CPU asks `pending()` only when told to look (`ApicBus.wake`):
whatever may raise the APIC's request (a vector accepted, and an EOI, TPR, SVR or LINT0
write that may let one held back through) says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.machine.device import Device
from boite.machine.state import Int, StateRecord, bits, flag, items, span, uint

LAPIC_BASE = 0xFEE0_0000
LAPIC_SIZE = 0x1000
BUS_HZ = 1_000_000_000

ID, VERSION, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
)  # fmt: skip
ISR_BASE, TMR_BASE, IRR_BASE, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LOW, ICR_HIGH = 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370,
)  # fmt: skip
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
LVTS = (LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)

MASKED = 1 << 16
TIMER_PERIODIC = 1 << 17
SVR_ENABLE = 1 << 8
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
DIVIDES = {0: 2, 1: 4, 2: 8, 3: 16, 8: 32, 9: 64, 10: 128, 11: 1}


class LocalApic(Device):
    name = "lapic"

    def __init__(self, apic_id: int, bus: ApicBus, clock_ns: Callable[[], int]) -> None:
        self.apic_id = apic_id
        self.bus = bus
        self.clock_ns = clock_ns
        self.on_init: Callable[[], None] | None = None
        self.on_sipi: Callable[[int], None] | None = None
        self.on_nmi: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.id = self.apic_id
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFF_FFFF
        self.svr = 0xFF
        self.irr = self.isr = self.tmr = 0
        self.esr = 0
        self.icr = 0
        self.lvt = dict.fromkeys(LVTS, MASKED)
        self.divide = 0
        self.initial = 0
        self.timer_start = 0  # clock_ns when the count was (re)loaded
        self.timer_armed = False

    @property
    def enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    # -- interrupts in ----------------------------------------------------------------------
    def accept(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt for this CPU (from the IOAPIC, an IPI or the LVT)."""
        if vector < 16:
            self.esr |= 1 << 6  # received illegal vector
            return
        bit = 1 << vector
        self.irr |= bit
        self.tmr = self.tmr | bit if level else self.tmr & ~bit
        self.bus.wake(self)

    def _ppr(self) -> int:
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        return self.tpr if (self.tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def pending(self) -> bool:
        """An interrupt above the processor priority is waiting (the INTR pin, for the
        APIC's part; see `extint` for the 8259's)."""
        if not self.enabled or not self.irr:
            return False
        return (self.irr.bit_length() - 1) >> 4 > self._ppr() >> 4

    def acknowledge(self) -> int:
        """The CPU takes the highest pending vector: IRR -> ISR."""
        if not self.pending():
            return self.svr & 0xFF  # spurious
        v = self.irr.bit_length() - 1
        self.irr &= ~(1 << v)
        self.isr |= 1 << v
        return v

    def extint(self) -> bool:
        """Does the 8259's INTR reach the CPU (virtual wire through LINT0, or no APIC)?"""
        lint0 = self.lvt[LVT_LINT0]
        return not self.enabled or (not lint0 & MASKED and (lint0 >> 8) & 7 == DM_EXTINT)

    def _eoi(self) -> None:
        if not self.isr:
            return
        v = self.isr.bit_length() - 1
        self.isr &= ~(1 << v)
        if self.tmr & (1 << v):
            self.bus.ioapic_eoi(v)

    # -- timer ------------------------------------------------------------------------------
    def _timer_period_ns(self) -> int:
        return max(1, self.initial * DIVIDES.get(self.divide & 0xB, 1) * 1_000_000_000 // BUS_HZ)

    def current_count(self) -> int:
        if not self.initial or not self.timer_armed:
            return 0
        elapsed = self.clock_ns() - self.timer_start
        period = self._timer_period_ns()
        if self.lvt[LVT_TIMER] & TIMER_PERIODIC:
            elapsed %= period
        elif elapsed >= period:
            return 0
        return self.initial - elapsed * self.initial // period

    def next_deadline_ns(self) -> int | None:
        if not self.timer_armed or not self.initial:
            return None
        return self.timer_start + self._timer_period_ns()

    def advance(self, now_ns: int) -> None:
        while (
            self.timer_armed
            and self.initial
            and now_ns >= self.timer_start + self._timer_period_ns()
        ):
            lvt = self.lvt[LVT_TIMER]
            if not lvt & MASKED:
                self.accept(lvt & 0xFF)
            if lvt & TIMER_PERIODIC:
                self.timer_start += self._timer_period_ns()
            else:
                self.timer_armed = False

    # -- registers --------------------------------------------------------------------------
    def read(self, offset: int) -> int:
        reg = offset & 0xFF0
        if reg == ID:
            return self.id << 24
        if reg == VERSION:
            return 0x0005_0014
        if reg in (TPR, APR):
            return self.tpr if reg == TPR else 0
        if reg == PPR:
            return self._ppr()
        if reg == LDR:
            return self.ldr
        if reg == DFR:
            return self.dfr
        if reg == SVR:
            return self.svr
        for base, value in ((ISR_BASE, self.isr), (TMR_BASE, self.tmr), (IRR_BASE, self.irr)):
            if base <= reg < base + 0x80:
                return (value >> (32 * ((reg - base) >> 4))) & 0xFFFF_FFFF
        if reg == ESR:
            return self.esr
        if reg == ICR_LOW:
            return self.icr & 0xFFFF_EFFF  # delivery status: always idle
        if reg == ICR_HIGH:
            return self.icr >> 32
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == TIMER_INITIAL:
            return self.initial
        if reg == TIMER_CURRENT:
            return self.current_count()
        if reg == TIMER_DIVIDE:
            return self.divide
        return 0

    def write(self, offset: int, value: int) -> None:
        reg = offset & 0xFF0
        value &= 0xFFFF_FFFF
        self._write(reg, value)
        if reg in (EOI, TPR, SVR, LVT_LINT0) and (self.pending() or self.extint()):
            # The processor priority went down (EOI, TPR) or the APIC or the 8259's
            # virtual wire came on: a vector held back in the IRR (or the 8259's INTR)
            # may now reach the CPU, which had found nothing to take when it last looked.
            self.bus.wake(self)

    def _write(self, reg: int, value: int) -> None:
        if reg == ID:
            self.id = value >> 24
        elif reg == TPR:
            self.tpr = value & 0xFF
        elif reg == EOI:
            self._eoi()
        elif reg == LDR:
            self.ldr = value & 0xFF00_0000
        elif reg == DFR:
            self.dfr = value | 0x0FFF_FFFF
        elif reg == SVR:
            self.svr = value & 0x3FF
            if not self.enabled:  # a software-disabled APIC masks every LVT entry
                for r in self.lvt:
                    self.lvt[r] |= MASKED
        elif reg == ESR:
            self.esr = 0
        elif reg == ICR_HIGH:
            self.icr = (self.icr & 0xFFFF_FFFF) | (value << 32)
        elif reg == ICR_LOW:
            self.icr = (self.icr & ~0xFFFF_FFFF) | value
            self.bus.send_ipi(self, self.icr)
        elif reg in self.lvt:
            mask = 0x3_17FF if reg == LVT_TIMER else 0x1_B7FF
            self.lvt[reg] = value & mask | (0 if self.enabled else MASKED)
        elif reg == TIMER_INITIAL:
            self.initial = value
            self.timer_start = self.clock_ns()
            self.timer_armed = value != 0
        elif reg == TIMER_DIVIDE:
            self.divide = value & 0xB

    def matches(self, dest: int, logical: bool) -> bool:
        if not logical:
            return dest == 0xFF or dest == self.id
        if self.dfr >> 28 == 0xF:  # flat model: a bit per APIC
            return bool((self.ldr >> 24) & dest)
        return (self.ldr >> 28) == (dest >> 4) and bool((self.ldr >> 24) & dest & 0xF)

    # -- state ------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return LapicState(
            self.id, self.tpr, self.ldr, self.dfr, self.svr, self.irr, self.isr, self.tmr,
            self.esr, self.icr, self.divide, self.initial, self.timer_armed,
            tuple(self.lvt[r] for r in LVTS), max(0, self.clock_ns() - self.timer_start),
        ).to_dict()  # fmt: skip

    def check_state(self, state: Any) -> LapicState:
        return LapicState.from_dict(state)

    def apply_state(self, rec: LapicState) -> None:
        rec.put(self, "lvt", "timer_elapsed_ns")
        self.lvt = dict(zip(LVTS, rec.lvt, strict=True))
        self.timer_start = self.clock_ns() - rec.timer_elapsed_ns


VECTORS = (1 << 256) - 1


@dataclass(frozen=True)
class LapicState(StateRecord):
    VERSION = 1
    id: int = uint(8)
    tpr: int = uint(8)
    ldr: int = uint(32)
    dfr: int = uint(32)
    svr: int = bits(0x3FF)
    irr: int = span(0, VECTORS)
    isr: int = span(0, VECTORS)
    tmr: int = span(0, VECTORS)
    esr: int = uint(32)
    icr: int = uint(64)
    divide: int = bits(0xB)
    initial: int = uint(32)
    timer_armed: bool = flag()
    lvt: tuple[int, ...] = items(Int(0, 0x3_FFFF), max_len=6, exact=6)
    timer_elapsed_ns: int = uint(63)


class ApicBus:
    """The APICs of one machine: the banked MMIO page and the message fabric."""

    def __init__(self, num_cpus: int, clock_ns: Callable[[], int]) -> None:
        self.lock = threading.RLock()
        self.apics = [LocalApic(i, self, clock_ns) for i in range(num_cpus)]
        self.current = 0
        self.on_ioapic_eoi: Callable[[int], None] | None = None
        self.on_wake: Callable[[LocalApic], None] | None = None

    # the MMIO page of whichever CPU is running
    def bus_read(self, offset: int, size: int) -> int:
        with self.lock:
            value = self.apics[self.current].read(offset & ~3)
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3:
            return  # the APIC's registers are 32-bit, aligned
        with self.lock:
            self.apics[self.current].write(offset, value)

    def wake(self, apic: LocalApic) -> None:
        if self.on_wake is not None:
            self.on_wake(apic)

    def ioapic_eoi(self, vector: int) -> None:
        if self.on_ioapic_eoi is not None:
            self.on_ioapic_eoi(vector)

    def targets(self, sender: LocalApic | None, dest: int, logical: bool, shorthand: int):
        if shorthand == 1 and sender is not None:
            return [sender]
        if shorthand == 2:
            return list(self.apics)
        if shorthand == 3:
            return [a for a in self.apics if a is not sender]
        return [a for a in self.apics if a.matches(dest, logical)]

    def deliver(self, mode: int, vector: int, targets: list[LocalApic], level: bool) -> None:
        if mode == DM_LOWEST and targets:
            targets = [min(targets, key=lambda a: (a.tpr, a.id))]
        for a in targets:
            if mode in (DM_FIXED, DM_LOWEST):
                a.accept(vector, level)
            elif mode == DM_NMI and a.on_nmi is not None:
                a.on_nmi()
            elif mode == DM_INIT and a.on_init is not None:
                a.on_init()
            elif mode == DM_SIPI and a.on_sipi is not None:
                a.on_sipi(vector)

    def send_ipi(self, sender: LocalApic, icr: int) -> None:
        mode = (icr >> 8) & 7
        if mode == DM_INIT and not icr & (1 << 14) and icr & (1 << 15):
            return  # INIT level de-assert: no effect on modern CPUs
        dest = icr >> 56
        self.deliver(mode, icr & 0xFF, self.targets(sender, dest, bool(icr & (1 << 11)),
                                                    (icr >> 18) & 3), False)  # fmt: skip

    def from_ioapic(self, message: Any) -> None:
        """IoApic.deliver hook: an IoApicMessage to the APICs it names."""
        with self.lock:
            targets = self.targets(None, message.dest, message.logical, 0)
            self.deliver(message.delivery_mode, message.vector, targets, message.level_triggered)
