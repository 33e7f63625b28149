"""MC146818 RTC/CMOS: time formats, SET, UIP, interrupts, memory size bytes, NVRAM."""

from __future__ import annotations

import calendar

import pytest

from boite.errors import ConfigError
from boite.machine.devices.rtc import CmosRtc
from boite.machine.irq import IrqLine

BASE = calendar.timegm((2024, 2, 29, 23, 59, 58))  # a Thursday


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.25
        self.mono = 5_000_000_000

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += int(seconds * 1e9)


def make(**kw):
    c = Clocks()
    line = IrqLine(8)
    rtc = CmosRtc(
        line,
        kw.pop("ram", 256 << 20),
        base_time=kw.pop("base", BASE),
        wall_clock=lambda: c.wall,
        clock_ns=lambda: c.mono,
        **kw,
    )
    return rtc, c, line


def rd(rtc: CmosRtc, idx: int) -> int:
    rtc.bus_write(0, 1, idx)
    return rtc.bus_read(1, 1)


def wr(rtc: CmosRtc, idx: int, value: int) -> None:
    rtc.bus_write(0, 1, idx)
    rtc.bus_write(1, 1, value)


def test_bcd_24h_time_from_base():
    rtc, _, _ = make()
    assert [rd(rtc, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20,
    ]  # fmt: skip
    assert rd(rtc, 0x0D) == 0x80  # valid RAM and time


def test_time_runs_and_rolls_over_leap_day():
    rtc, c, _ = make()
    c.advance(3)
    assert (rd(rtc, 0), rd(rtc, 7), rd(rtc, 8)) == (0x01, 0x01, 0x03)


def test_binary_and_12h_modes():
    rtc, _, _ = make()
    wr(rtc, 0x0B, 0x04)  # binary, 12-hour
    assert rd(rtc, 4) == 0x80 | 11  # 11 PM
    assert rd(rtc, 2) == 59 and rd(rtc, 9) == 24
    wr(rtc, 0x0B, 0x00)  # BCD 12-hour
    assert rd(rtc, 4) == 0x80 | 0x11


def test_set_bit_freezes_and_guest_sets_time():
    rtc, c, _ = make()
    wr(rtc, 0x0B, 0x82)  # SET, 24h BCD
    for idx, v in ((0, 0x30), (2, 0x15), (4, 0x08), (7, 0x01), (8, 0x06), (9, 0x31)):
        wr(rtc, idx, v)
    c.advance(10)
    assert rd(rtc, 0) == 0x30  # held while SET
    wr(rtc, 0x0B, 0x02)
    c.advance(2)
    assert rd(rtc, 0) == 0x32 and rd(rtc, 8) == 0x06 and rd(rtc, 9) == 0x31
    assert int(rtc.guest_time()) == calendar.timegm((2031, 6, 1, 8, 15, 32))


def test_update_in_progress_window():
    rtc, c, _ = make()
    c.wall = float(int(c.wall)) + 0.5
    rtc.offset = BASE - int(c.wall)
    assert not rd(rtc, 0x0A) & 0x80
    c.wall = float(int(c.wall)) + 0.9999
    assert rd(rtc, 0x0A) & 0x80
    wr(rtc, 0x0A, 0x70)  # divider held in reset: no updates, no UIP
    assert not rd(rtc, 0x0A) & 0x80


def test_periodic_interrupt_and_register_c_clears():
    rtc, c, line = make()
    wr(rtc, 0x0A, 0x26)  # 1024 Hz
    wr(rtc, 0x0B, 0x42)  # PIE
    deadline = rtc.next_deadline_ns()
    assert deadline is not None and 0 < deadline - c.mono <= 1_000_000_000 // 1024 + 1
    c.mono = deadline
    rtc.advance()
    assert line.level
    assert rd(rtc, 0x0C) == 0xC0  # IRQF | PF
    assert not line.level
    assert rd(rtc, 0x0C) == 0x00


def test_update_and_alarm_interrupts():
    rtc, c, line = make()
    wr(rtc, 0x01, 0x00)  # alarm at 00:00:00
    wr(rtc, 0x03, 0x00)
    wr(rtc, 0x05, 0x00)
    wr(rtc, 0x0B, 0x22)  # AIE only
    c.advance(1)  # 23:59:59: update, no alarm
    rtc.advance()
    assert not line.level and rd(rtc, 0x0C) & 0xB0 == 0x10  # UF set but not enabled
    c.advance(1)  # 00:00:00
    rtc.advance()
    assert line.level and rd(rtc, 0x0C) & 0xB0 == 0xB0
    wr(rtc, 0x0B, 0x12)  # UIE
    wr(rtc, 0x01, 0xC0)  # don't-care seconds
    c.advance(1)
    rtc.advance()
    assert rd(rtc, 0x0C) & 0x90 == 0x90


def test_nmi_mask_bit_and_index():
    rtc, _, _ = make()
    rtc.bus_write(0, 1, 0x80 | 0x0D)
    assert rtc.nmi_masked and rtc.bus_read(1, 1) == 0x80
    rtc.bus_write(0, 1, 0x0D)
    assert not rtc.nmi_masked


def test_memory_size_bytes():
    rtc, _, _ = make(ram=8 << 30, below_4g_ram=3 << 30)
    kb = lambda lo, hi: rd(rtc, lo) | (rd(rtc, hi) << 8)  # noqa: E731
    assert kb(0x15, 0x16) == 640
    assert kb(0x17, 0x18) == 0xFFFF and kb(0x30, 0x31) == 0xFFFF
    assert kb(0x34, 0x35) == ((3 << 30) - (16 << 20)) // 65536
    above = rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16
    assert above == (5 << 30) // 65536
    small, _, _ = make(ram=32 << 20)
    assert rd(small, 0x17) | rd(small, 0x18) << 8 == 31 * 1024
    csum = sum(rd(small, i) for i in range(0x10, 0x2E))
    assert rd(small, 0x2E) << 8 | rd(small, 0x2F) == csum


def test_nvram_load_persist_and_state():
    saved: list[bytes] = []
    initial = bytearray(128)
    initial[0x40] = 0x99
    rtc, _, _ = make(cmos_bytes=bytes(initial), persist=saved.append)
    assert rd(rtc, 0x40) == 0x99
    wr(rtc, 0x41, 0x12)
    assert saved and saved[-1][0x41] == 0x12 and len(saved[-1]) == 128
    out = rtc.cmos_bytes()
    assert out[0x41] == 0x12 and out[0x09] == 0x24
    state = rtc.save_state()
    other, _, _ = make()
    other.load_state(state)
    assert rd(other, 0x41) == 0x12
    with pytest.raises(ConfigError, match="expected 128"):
        make(cmos_bytes=b"\0" * 100)


def test_persist_only_changes_and_batches_with_a_delay():
    saved: list[bytes] = []
    rtc, _, _ = make(persist=saved.append)
    wr(rtc, 0x40, 0x00)  # unchanged: nothing to save
    assert saved == []
    wr(rtc, 0x40, 0x01)
    assert len(saved) == 1
    batched: list[bytes] = []
    slow, _, _ = make(persist=batched.append, persist_delay=3600)
    for v in range(1, 200):
        wr(slow, 0x41, v)  # a guest hammering CMOS
    assert batched == []  # the first save waits for the delay
    slow.close()  # power-off writes what is pending, once
    assert len(batched) == 1 and batched[0][0x41] == 199
    slow.close()
    assert len(batched) == 1


def test_rtc_state_round_trip_keeps_clock_and_flags():
    rtc, c, line = make()
    wr(rtc, 0x0B, 0x42)
    c.advance(0.01)
    rtc.advance()
    state = rtc.save_state()
    other, _, oline = make()
    other.load_state(state)
    assert oline.level and other.save_state()["cmos"] == state["cmos"]
    assert abs(other.guest_time() - rtc.guest_time()) < 1


def test_quiet_advance_matches_a_full_look_at_every_call():
    """advance() skips its work until the next periodic boundary or guest second: the
    register C flags, IRQ 8 and the deadlines stay those of an RTC that looks at every
    call, through rate changes, enables and a clock set."""
    import random

    rnd = random.Random(8)
    c = Clocks()
    lines = [IrqLine(8), IrqLine(8)]
    rtcs = [
        CmosRtc(
            line, 256 << 20, base_time=BASE, wall_clock=lambda: c.wall, clock_ns=lambda: c.mono
        )  # fmt: skip
        for line in lines
    ]
    quick, full = rtcs
    flags_seen = 0
    for step in range(4000):
        roll = rnd.random()
        if roll < 0.01:
            rate = rnd.choice((0, 3, 6, 0xF))
            for r in rtcs:
                wr(r, 0x0A, 0x20 | rate)
        elif roll < 0.02:
            b = rnd.choice((0x02, 0x42, 0x12, 0x22, 0x72))
            for r in rtcs:
                wr(r, 0x0B, b)
        elif roll < 0.025:
            for r in rtcs:
                wr(r, 0x00, 0x30)  # seconds: the clock is set
        elif roll < 0.1:
            values = [rd(r, 0x0C) for r in rtcs]
            assert values[0] == values[1], step
            flags_seen |= values[0]
        step_s = rnd.choice((1e-6, 3e-5, 2e-4, 1e-3, 0.05, 0.4))
        c.advance(step_s)
        full._quiet_until = 0  # this one looks every time
        quick.advance()
        full.advance()
        assert quick.cmos[0x0C] == full.cmos[0x0C], step
        assert lines[0].level == lines[1].level, step
        assert quick.next_deadline_ns() == full.next_deadline_ns(), step
    assert flags_seen & 0xF0 == 0xF0  # IRQF, PF, AF, UF all came up
