"""The local APIC model: priorities, EOI to the IOAPIC, the timer, IPIs (INIT/SIPI)."""

from __future__ import annotations

import pytest

from boite.errors import CheckpointError
from boite.machine.devices.ioapic import IoApic
from boite.machine.devices.lapic import (
    EOI,
    ICR_HIGH,
    ICR_LOW,
    LDR,
    LVT_LINT0,
    LVT_TIMER,
    SVR,
    TIMER_CURRENT,
    TIMER_DIVIDE,
    TIMER_INITIAL,
    TPR,
    ApicBus,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def bus(n: int = 2) -> tuple[ApicBus, Clock]:
    clock = Clock()
    b = ApicBus(n, clock)
    for i in range(n):
        b.current = i
        b.bus_write(SVR, 4, 0x1FF)  # software enable
    b.current = 0
    return b, clock


def test_ioapic_level_interrupt_priority_and_eoi() -> None:
    b, _ = bus()
    eois: list[int] = []
    ioapic = IoApic(deliver=b.from_ioapic)
    b.on_ioapic_eoi = lambda v: (eois.append(v), ioapic.eoi(v))
    ioapic.bus_write(0, 4, 0x10 + 2 * 11)
    ioapic.bus_write(0x10, 4, 0x41 | (1 << 15))  # pin 11 -> vector 0x41, level, APIC 0
    ioapic.set_irq(11, True)
    a = b.apics[0]
    assert a.pending() and not b.apics[1].pending()
    b.bus_write(TPR, 4, 0x50)  # priority class 5 blocks vector 0x41
    assert not a.pending()
    b.bus_write(TPR, 4, 0)
    assert a.acknowledge() == 0x41 and not a.pending()
    ioapic.set_irq(11, False)
    b.bus_write(EOI, 4, 0)
    assert eois == [0x41] and a.isr == 0


def test_timer_one_shot_and_periodic() -> None:
    b, clock = bus(1)
    a = b.apics[0]
    b.bus_write(TIMER_DIVIDE, 4, 0xB)  # divide by 1: 1 ns per count
    b.bus_write(LVT_TIMER, 4, 0x30)
    b.bus_write(TIMER_INITIAL, 4, 1000)
    assert a.next_deadline_ns() == clock.now + 1000
    clock.now += 400
    assert b.bus_read(TIMER_CURRENT, 4) == 600
    clock.now += 600
    a.advance(clock.now)
    assert a.acknowledge() == 0x30 and a.next_deadline_ns() is None
    b.bus_write(EOI, 4, 0)
    b.bus_write(LVT_TIMER, 4, 0x31 | (1 << 17))  # periodic
    b.bus_write(TIMER_INITIAL, 4, 100)
    clock.now += 250
    a.advance(clock.now)
    assert a.irr >> 0x31 & 1 and a.next_deadline_ns() == clock.now + 50


def test_init_and_startup_ipis_to_all_but_self() -> None:
    b, _ = bus(3)
    seen: list[tuple[int, str, int]] = []
    for a in b.apics:
        a.on_init = lambda a=a: seen.append((a.id, "init", 0))
        a.on_sipi = lambda v, a=a: seen.append((a.id, "sipi", v))
    b.bus_write(ICR_LOW, 4, (3 << 18) | (5 << 8) | (1 << 14))  # INIT, all excluding self
    b.bus_write(ICR_LOW, 4, (3 << 18) | (6 << 8) | 0x9F)  # SIPI, vector 0x9f
    assert seen == [(1, "init", 0), (2, "init", 0), (1, "sipi", 0x9F), (2, "sipi", 0x9F)]
    # a fixed IPI to APIC 2 by physical ID, and one by flat logical destination
    b.bus_write(ICR_HIGH, 4, 2 << 24)
    b.bus_write(ICR_LOW, 4, 0x55)
    assert b.apics[2].irr >> 0x55 & 1
    b.current = 1
    b.bus_write(LDR, 4, 0x02 << 24)
    b.current = 0
    b.bus_write(ICR_HIGH, 4, 0x02 << 24)
    b.bus_write(ICR_LOW, 4, (1 << 11) | 0x66)
    assert b.apics[1].irr >> 0x66 & 1 and not b.apics[2].irr >> 0x66 & 1


def test_virtual_wire_and_disabled_apic_pass_the_8259_through() -> None:
    b, _ = bus(1)
    a = b.apics[0]
    assert not a.extint()  # enabled, LINT0 masked
    b.bus_write(LVT_LINT0, 4, 7 << 8)  # ExtINT
    assert a.extint()
    b.bus_write(SVR, 4, 0xFF)  # software disabled: masks every LVT, INTR passes through
    assert a.extint() and a.lvt[LVT_LINT0] & (1 << 16)


def test_state_round_trip_and_bounds() -> None:
    b, clock = bus(1)
    a = b.apics[0]
    a.accept(0x70, level=True)
    state = a.save_state()
    b2, _ = bus(1)
    b2.apics[0].load_state(state)
    assert b2.apics[0].irr == 1 << 0x70 and b2.apics[0].tmr == 1 << 0x70
    state["irr"] = (1 << 300) | state["irr"]  # hostile: a vector past 255
    with pytest.raises(CheckpointError, match="irr"):
        b2.apics[0].load_state(state)


def test_a_vector_held_back_wakes_the_cpu_when_the_priority_drops() -> None:
    """A CPU looks at its APIC only when woken (the emulator's vCPUs sleep in HLT until
    then): a vector held back by the ISR or the TPR must wake it again once an EOI or a
    TPR write lets it through, or it is lost until some other interrupt comes."""
    b, _ = bus()
    woken: list[int] = []
    b.on_wake = lambda apic: woken.append(apic.apic_id)
    a = b.apics[1]
    b.current = 1
    a.accept(0x60)
    assert woken == [1] and a.acknowledge() == 0x60
    a.accept(0x45)  # below the ISR's 0x60: held back
    assert not a.pending()
    woken.clear()
    b.bus_write(EOI, 4, 0)
    assert woken == [1] and a.pending() and a.acknowledge() == 0x45
    b.bus_write(EOI, 4, 0)
    b.bus_write(TPR, 4, 0x50)
    a.accept(0x46)
    assert not a.pending()
    woken.clear()
    b.bus_write(TPR, 4, 0x40)  # class 4 still holds back 0x46: nothing to wake for
    assert woken == [] and not a.pending()
    b.bus_write(TPR, 4, 0)
    assert woken == [1] and a.acknowledge() == 0x46
