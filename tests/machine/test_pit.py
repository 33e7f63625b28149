"""8254 counting modes, latching, read-back and IRQ 0, driven by a fake clock."""

from __future__ import annotations

from boite.machine.devices.pit import PIT_HZ, Pit8254, PitSpeakerPort, ticks_to_ns
from boite.machine.irq import IrqLine


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def ticks(self, n: int) -> None:
        """Advance by exactly n PIT clocks (relative to a tick boundary)."""
        self.ns += ticks_to_ns(n)


def make():
    clock = FakeClock()
    edges: list[bool] = []
    line = IrqLine(0, lambda g, level: edges.append(level))
    return Pit8254(line, clock), clock, line, edges


def program(pit: Pit8254, ch: int, mode: int, count: int, rw: int = 3, bcd: bool = False):
    pit.bus_write(3, 1, (ch << 6) | (rw << 4) | (mode << 1) | int(bcd))
    if rw in (1, 3):
        pit.bus_write(ch, 1, count & 0xFF)
    if rw in (2, 3):
        pit.bus_write(ch, 1, count >> 8)


def read_count(pit: Pit8254, ch: int) -> int:
    pit.bus_write(3, 1, ch << 6)  # counter latch command
    return pit.bus_read(ch, 1) | (pit.bus_read(ch, 1) << 8)


def test_mode0_interrupt_on_terminal_count():
    pit, clock, line, _ = make()
    program(pit, 0, 0, 1000)
    assert not pit.out(0)
    clock.ticks(400)
    assert read_count(pit, 0) == 600
    assert (
        pit.next_deadline_ns() == clock.ns + ticks_to_ns(600)
        or abs(pit.next_deadline_ns() - (clock.ns + ticks_to_ns(600))) <= 1
    )
    assert not pit.advance()
    clock.ticks(600)
    assert pit.out(0) and pit.advance() and line.level
    assert pit.next_deadline_ns() is None  # mode 0 fires once
    clock.ticks(100)
    assert read_count(pit, 0) == (1000 - 1100) & 0xFFFF  # keeps counting down, wraps


def test_mode2_rate_generator_period_and_deadlines():
    pit, clock, _, _ = make()
    program(pit, 0, 2, 100)
    start = clock.ns
    fired = 0
    for _ in range(5):
        deadline = pit.next_deadline_ns()
        assert deadline is not None and deadline > clock.ns
        clock.ns = deadline
        fired += pit.advance()
    assert fired == 5
    assert abs((clock.ns - start) - 5 * 100 * 1_000_000_000 / PIT_HZ) < 5
    clock.ticks(99)  # the one clock at count 1 is when OUT is low
    assert not pit.out(0)
    clock.ticks(1)
    assert pit.out(0)


def test_mode3_square_wave_counts_by_two():
    pit, clock, _, _ = make()
    program(pit, 0, 3, 10)
    assert pit.out(0)
    clock.ticks(2)
    assert read_count(pit, 0) == 6
    clock.ticks(3)  # half the period: OUT low
    assert not pit.out(0)
    clock.ticks(5)
    assert pit.out(0)


def test_advance_sees_a_whole_pulse_between_calls():
    pit, clock, _, edges = make()
    program(pit, 0, 2, 50)
    pit.advance()
    edges.clear()
    clock.ticks(120)  # two periods passed while nobody looked
    assert pit.advance()
    assert edges[-2:] == [False, True]


def test_mode4_software_strobe():
    pit, clock, _, _ = make()
    program(pit, 0, 4, 20)
    assert pit.out(0)
    clock.ticks(20)
    assert not pit.out(0)  # one clock low at terminal count
    clock.ticks(1)
    assert pit.out(0)
    assert pit.next_deadline_ns() is None


def test_mode1_and_mode5_wait_for_gate_trigger_on_channel2():
    pit, clock, _, _ = make()
    port61 = PitSpeakerPort(pit)
    program(pit, 2, 1, 30)
    assert pit.out(2)  # waits for a trigger
    port61.bus_write(0, 1, 0x01)  # gate 2 rises: trigger
    assert not pit.out(2)
    clock.ticks(30)
    assert pit.out(2)
    assert port61.bus_read(0, 1) & 0x21 == 0x21  # OUT2 and gate readable
    port61.bus_write(0, 1, 0x00)
    program(pit, 2, 5, 10)
    port61.bus_write(0, 1, 0x01)
    clock.ticks(10)
    assert not pit.out(2)
    clock.ticks(1)
    assert pit.out(2)


def test_mode0_gate_low_suspends_counting():
    pit, clock, _, _ = make()
    port61 = PitSpeakerPort(pit)
    port61.bus_write(0, 1, 0x01)
    program(pit, 2, 0, 0xFFFF)
    clock.ticks(100)
    port61.bus_write(0, 1, 0x00)
    held = read_count(pit, 2)
    clock.ticks(5000)
    assert read_count(pit, 2) == held == 0xFFFF - 100
    port61.bus_write(0, 1, 0x01)
    clock.ticks(10)
    assert read_count(pit, 2) == held - 10


def test_lsb_msb_access_and_latch_holds_value():
    pit, clock, _, _ = make()
    program(pit, 1, 2, 0x1234)
    clock.ticks(0x34)
    pit.bus_write(3, 1, 0x40)  # latch channel 1
    clock.ticks(0x100)
    assert pit.bus_read(1, 1) == 0x00 and pit.bus_read(1, 1) == 0x12
    program(pit, 1, 2, 0x56, rw=1)  # LSB only
    assert pit.channels[1].count == 0x56
    program(pit, 1, 2, 0x7800, rw=2)  # MSB only
    assert pit.channels[1].count == 0x7800
    assert pit.bus_read(1, 1) == 0x78  # unlatched read in MSB mode


def test_count_zero_means_65536_and_bcd():
    pit, clock, _, _ = make()
    program(pit, 0, 2, 0)
    assert pit.channels[0].count == 0x10000
    program(pit, 0, 0, 0x1000, bcd=True)  # BCD 1000
    clock.ticks(1)
    assert read_count(pit, 0) == 0x0999


def test_read_back_status_and_count():
    pit, clock, _, _ = make()
    pit.bus_write(3, 1, 0x34)  # ch0, word, mode 2: null count until loaded
    pit.bus_write(3, 1, 0xE2)  # read-back status of ch0
    assert pit.bus_read(0, 1) == 0x40 | 0x30 | 0x04 | 0x80
    pit.bus_write(0, 1, 0x00)
    pit.bus_write(0, 1, 0x01)  # 256
    clock.ticks(6)
    pit.bus_write(3, 1, 0xC2)  # read-back count and status
    assert pit.bus_read(0, 1) == 0xB4  # status first: OUT high, word, mode 2
    assert pit.bus_read(0, 1) | (pit.bus_read(0, 1) << 8) == 250


def test_new_count_in_mode2_waits_for_period_end():
    pit, clock, _, _ = make()
    program(pit, 0, 2, 100)
    clock.ticks(30)
    program_count = 50
    pit.bus_write(0, 1, program_count)
    pit.bus_write(0, 1, 0)
    assert read_count(pit, 0) in (70, 71)  # still the old period


def test_speaker_port_and_state_round_trip():
    pit, clock, _, _ = make()
    port61 = PitSpeakerPort(pit)
    port61.bus_write(0, 1, 0x03)
    assert port61.bus_read(0, 1) & 0x03 == 0x03
    program(pit, 0, 3, 1000)
    clock.ticks(123)
    state = pit.save_state()
    other = Pit8254(IrqLine(0), clock)
    other.load_state(state)
    assert read_count(other, 0) == read_count(pit, 0)
    assert other.save_state() == pit.save_state()
    pit.reset()  # back to the firmware state: mode 3, count 65536, running
    assert pit.channels[0].mode == 3
    assert pit.next_deadline_ns() == clock.ns + ticks_to_ns(0x10000)


def _out_changes(pit: Pit8254, clock: FakeClock, ch: int, ticks: int) -> list[int]:
    """The clocks (from now) at which OUT changes, found by looking at every clock."""
    start, was, seen = clock.ns, pit.out(ch), []
    for t in range(1, ticks + 1):
        clock.ns = start + ticks_to_ns(t)
        now = pit.out(ch)
        if now != was:
            seen.append(t)
        was = now
    clock.ns = start
    return seen


def test_next_change_is_where_out_next_changes_in_every_mode():
    """next_change (what lets advance() skip its work) against OUT looked at on every
    clock: each mode, odd and even counts, from several points of the period."""
    for mode in (0, 1, 2, 3, 4, 5):
        for count in (2, 3, 7, 10):
            for skip in (0, 1, count - 1, count, count + 1, 3 * count + 2):
                pit, clock, _, _ = make()
                port61 = PitSpeakerPort(pit)
                program(pit, 2, mode, count)
                port61.bus_write(0, 1, 0x01)  # gate 2 high (modes 1 and 5: the trigger)
                clock.ticks(skip)
                ch = pit.channels[2]
                changes = _out_changes(pit, clock, 2, 4 * count + 4)
                at = ch.next_change(clock.ns)
                if not changes:
                    assert at is None, (mode, count, skip)
                else:
                    assert at == clock.ns + ticks_to_ns(changes[0]) or (
                        # ticks_to_ns rounds up; the clock stepped from a rounded time
                        abs(at - (clock.ns + ticks_to_ns(changes[0]))) <= 1
                    ), (mode, count, skip, changes[0])


def test_next_change_none_while_out_holds():
    pit, clock, _, _ = make()
    port61 = PitSpeakerPort(pit)
    program(pit, 2, 2, 100)
    assert pit.channels[2].next_change(clock.ns) is None  # gate low: OUT held high
    port61.bus_write(0, 1, 0x01)
    program(pit, 2, 0, 50)
    clock.ticks(60)
    assert pit.channels[2].next_change(clock.ns) is None  # mode 0 past terminal count
    program(pit, 2, 1, 50)
    assert pit.channels[2].next_change(clock.ns) is None  # mode 1 waits for a trigger


def test_quiet_advance_matches_a_full_look_at_every_call():
    """advance() skips its work until OUT0 next changes: the edges it reports, the IRQ
    line and next_deadline_ns stay those of a PIT that looks at every call, through
    reprogramming and a count that takes over at the end of a period."""
    import random

    rnd = random.Random(11)
    a, clock, line_a, edges_a = make()
    edges_b: list[bool] = []
    line_b = IrqLine(0, lambda g, level: edges_b.append(level))
    b = Pit8254(line_b, clock)
    for step in range(3000):
        if step % 500 == 0:
            mode = rnd.choice((0, 2, 3, 4))
            count = rnd.choice((2, 3, 50, 301, 0))
            program(a, 0, mode, count)
            program(b, 0, mode, count)
        elif step % 500 == 250:
            for pit in (a, b):  # a new count in mode 2/3 takes over at the period end
                pit.bus_write(0, 1, 40)
                pit.bus_write(0, 1, 0)
        clock.ns += rnd.choice((1, 100, 838, 5_000, 40_000, 300_000))
        b._quiet_until = 0  # b looks every time
        assert a.advance() == b.advance(), step
        assert line_a.level == line_b.level, step
        b._quiet_until = 0
        assert a.next_deadline_ns() == b.next_deadline_ns(), step

    # The full look sets the line to its level at every call; the levels it went
    # through (what the 8259 and the IOAPIC act on) are the same.
    def levels(calls: list[bool]) -> list[bool]:
        return [v for i, v in enumerate(calls) if i == 0 or calls[i - 1] != v]

    assert levels(edges_a) == levels(edges_b) and len(levels(edges_a)) > 100
