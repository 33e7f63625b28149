"""Intel 8254 programmable interval timer (datasheet 231164) at ports 0x40-0x43, and the
PC's port 0x61 (channel 2 gate, speaker enable, OUT2, refresh toggle).

The counters run from a clock that the caller passes in (monotonic nanoseconds): each
counter's value and output are computed from the time since its count was loaded, so
nothing ticks in the background. Channel 0's output drives IRQ 0: whoever runs the CPUs
calls `advance()` when `next_deadline_ns()` has passed (an idle CPU in HLT sleeps until
then), and each rising edge of OUT0 since the previous call raises the line (edges that
were missed in between coalesce into one, as the 8259's single IRR bit would).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from boite.machine.device import Device, StatelessDevice
from boite.machine.irq import IrqLine
from boite.machine.state import (
    I64,
    U8,
    Int,
    Items,
    Nested,
    StateRecord,
    bits,
    checked,
    flag,
    items,
    optional,
    span,
    uint,
)

PIT_HZ = 1_193_182
NS = 1_000_000_000
PIT_PORT = 0x40
SPEAKER_PORT = 0x61

RW_LATCH, RW_LSB, RW_MSB, RW_WORD = 0, 1, 2, 3
QUIET_FOREVER = 1 << 63  # advance()'s "no transition coming" (monotonic ns)


def ns_to_ticks(ns: int) -> int:
    return ns * PIT_HZ // NS


def ticks_to_ns(ticks: int) -> int:
    return -(-ticks * NS // PIT_HZ)  # round up: the tick has happened by then


def _to_bcd(v: int) -> int:
    return int(str(v % 10000), 16)


def _from_bcd(v: int) -> int:
    d = [(v >> s) & 0xF for s in (12, 8, 4, 0)]
    return min(d[0], 9) * 1000 + min(d[1], 9) * 100 + min(d[2], 9) * 10 + min(d[3], 9)


@dataclass
class PitChannel:
    mode: int = 0
    rw_mode: int = RW_WORD
    bcd: bool = False
    count: int = 0x10000  # the reload value, 1..0x10000 (0 written means the maximum)
    load_ns: int = 0  # when counting (re)started from `count`
    armed: bool = False  # a count has been loaded (modes 1/5: and triggered by the gate)
    gate: bool = True
    frozen_ticks: int | None = None  # modes 0/4 with the gate low: elapsed ticks held
    write_lsb_next: bool = True
    write_lsb: int = 0
    read_lsb_next: bool = True
    latched: list[int] | None = None  # latched count bytes still to be read
    status_latched: int | None = None
    null_count: bool = True
    last_out: bool = False  # OUT as of the last advance(), for edge detection
    count_written: bool = False  # a count arrived since the control word
    # Modes 2/3: a count written while counting takes over at the end of the period.
    pending_count: int | None = None
    pending_at_ns: int = 0

    def settle(self, now: int) -> None:
        if self.pending_count is not None and now >= self.pending_at_ns:
            self.count, self.load_ns = self.pending_count, self.pending_at_ns
            self.pending_count = None

    def elapsed(self, now: int) -> int:
        if self.frozen_ticks is not None:
            return self.frozen_ticks
        return ns_to_ticks(max(now - self.load_ns, 0))

    def counter(self, now: int) -> int:
        """The counting element as the 8254 would show it (binary, 0..0xffff)."""
        self.settle(now)
        if not self.armed:
            return self.count & 0xFFFF
        d = self.elapsed(now)
        n = self.count
        if self.mode in (2, 6):
            v = n - d % n
        elif self.mode in (3, 7):
            v = n - (2 * d) % n  # counts down by two
        else:
            v = n - d
        return v % (10000 if self.bcd else 0x10000)

    def out(self, now: int) -> bool:
        self.settle(now)
        m = self.mode
        if not self.armed:
            return m != 0  # mode 0 output goes low on the control word, others high
        d = self.elapsed(now)
        n = self.count
        if m == 0:
            return d >= n
        if m == 1:
            return d >= n  # low from the trigger until terminal count
        if m in (2, 6):
            return not self.gate or d % n != n - 1  # low for the one clock at count 1
        if m in (3, 7):
            return not self.gate or d % n < (n + 1) // 2
        return d != n  # 4, 5: one clock low at terminal count

    def next_change(self, now: int) -> int | None:
        """Time (ns) of OUT's next transition either way after `now` (a pending count
        taking over counts as one), or None while OUT holds: nothing can change what
        out() says before it unless the counter is programmed or gated."""
        self.settle(now)
        at = None
        m = self.mode
        if self.armed and self.frozen_ticks is None and (self.gate or m in (1, 5)):
            d = self.elapsed(now)
            n = self.count
            r = d % n
            t: int | None
            if m in (0, 1):
                t = n if d < n else None
            elif m in (2, 6):  # low for the clock at count 1, high again at the reload
                t = d - r + (n - 1 if r < n - 1 else n)
            elif m in (3, 7):  # high for the first (n + 1) // 2 clocks of each period
                half = (n + 1) // 2
                t = d - r + (half if r < half else n)
            else:  # 4, 5: low for the one clock at terminal count
                t = n if d < n else (n + 1 if d == n else None)
            if t is not None:
                at = self.load_ns + ticks_to_ns(t)
        if self.pending_count is not None and (at is None or self.pending_at_ns < at):
            at = self.pending_at_ns
        return at

    def next_rising_edge(self, now: int) -> int | None:
        """Time (ns) of OUT's next low-to-high transition after `now`, if one is coming."""
        self.settle(now)
        if not self.armed or not self.gate and self.mode in (0, 2, 3, 4, 6, 7):
            return None
        d = self.elapsed(now)
        n = self.count
        if self.mode in (0, 1):
            edge = n if d < n else None
        elif self.mode in (2, 3, 6, 7):
            edge = (d // n + 1) * n  # the reload at each period's end
        else:
            edge = n + 1 if d <= n else None
        if edge is None:
            return None
        return self.load_ns + ticks_to_ns(edge)


@dataclass(frozen=True)
class PitChannelState(StateRecord):
    """A PitChannel with its times relative to the moment of saving (`load_ns`: how long
    ago counting started; `pending_at_ns`: how far ahead a pending count takes over)."""

    mode: int = span(0, 7)
    rw_mode: int = span(RW_LSB, RW_WORD)
    bcd: bool = flag()
    count: int = span(1, 0x10000)  # a divisor: 0 would divide by zero
    load_ns: int = checked(I64)
    armed: bool = flag()
    gate: bool = flag()
    frozen_ticks: int | None = optional(Int(0, 1 << 62))
    write_lsb_next: bool = flag()
    write_lsb: int = uint(8)
    read_lsb_next: bool = flag()
    latched: tuple[int, ...] | None = optional(Items(U8, max_len=2))
    status_latched: int | None = optional(U8)
    null_count: bool = flag()
    last_out: bool = flag()
    count_written: bool = flag()
    pending_count: int | None = optional(Int(1, 0x10000))
    pending_at_ns: int = checked(I64)

    def validate(self) -> None:
        if self.latched is not None and not self.latched:
            raise self.invalid("latched", "an empty latch (no latch is null)")


@dataclass(frozen=True)
class PitState(StateRecord):
    VERSION = 1
    channels: tuple[PitChannelState, ...] = items(Nested(PitChannelState), max_len=3, exact=3)
    speaker_enabled: bool = flag()
    port61_bits: int = bits(0x0C)
    since_advance_ns: int | None = optional(I64)


class Pit8254(Device):
    name = "pit"

    def __init__(
        self, irq: IrqLine | None = None, clock_ns: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self.irq = irq
        self.clock_ns = clock_ns
        self._lock = threading.RLock()
        self.reset()

    # -- state -------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            # As firmware leaves it (and QEMU resets it): every counter in mode 3 with the
            # maximum count, running; channel 0 thus ticks IRQ 0 at 18.2 Hz.
            now = self.clock_ns()
            self.channels = [
                PitChannel(mode=3, armed=True, load_ns=now, count_written=True, null_count=False)
                for _ in range(3)
            ]
            self.channels[2].gate = False  # port 0x61 bit 0 starts clear
            self.channels[0].last_out = self.channels[0].out(now)
            if self.irq is not None:
                self.irq.set(self.channels[0].last_out)
            self.speaker_enabled = False
            self.port61_bits = 0  # bits 2-3 of port 0x61 (parity/IOCHK enables) as written
            self._last_advance: int | None = None
            self._quiet_until = 0  # see advance()
            self._deadline: int | None = None

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock_ns()
            chans = []
            for ch in self.channels:
                d = {f.name: getattr(ch, f.name) for f in fields(PitChannel)}
                d["load_ns"] = now - ch.load_ns  # relative: the clock does not survive
                d["pending_at_ns"] = ch.pending_at_ns - now
                d["latched"] = None if ch.latched is None else tuple(ch.latched)
                chans.append(PitChannelState(**d))
            return PitState(
                channels=tuple(chans),
                speaker_enabled=self.speaker_enabled,
                port61_bits=self.port61_bits,
                since_advance_ns=None if self._last_advance is None else now - self._last_advance,
            ).to_dict()

    def check_state(self, state: Any) -> PitState:
        return PitState.from_dict(state)

    def apply_state(self, rec: PitState) -> None:
        with self._lock:
            now = self.clock_ns()
            self.channels = []
            for cs in rec.channels:
                ch = PitChannel(**{f.name: getattr(cs, f.name) for f in fields(PitChannel)})
                ch.load_ns = now - cs.load_ns
                ch.pending_at_ns = now + cs.pending_at_ns
                ch.latched = None if cs.latched is None else list(cs.latched)
                self.channels.append(ch)
            self.speaker_enabled = rec.speaker_enabled
            self.port61_bits = rec.port61_bits
            since = rec.since_advance_ns
            self._last_advance = None if since is None else now - since
            self._quiet_until = 0

    # -- time --------------------------------------------------------------------------

    def next_deadline_ns(self) -> int | None:
        """When IRQ 0 next rises (monotonic ns), or None if channel 0 is quiet."""
        with self._lock:
            now = self.clock_ns()
            if now < self._quiet_until:
                return self._deadline  # no transition since advance() computed it
            return self.channels[0].next_rising_edge(now)

    def advance(self, now_ns: int | None = None) -> bool:
        """Raise IRQ 0 for a rising edge of OUT0 since the last call. Returns whether one
        happened."""
        with self._lock:
            now = self.clock_ns() if now_ns is None else now_ns
            if now < self._quiet_until:
                # OUT0 has not changed since the last call: it would find no edge and
                # set the line to the level it has. The runner calls this between
                # chunks of guest code, and a cheap call keeps those gaps short (the
                # guest's TSC calibration against the PIT fails on an uneven loop).
                self._last_advance = now
                return False
            ch = self.channels[0]
            since = ch.load_ns if self._last_advance is None else self._last_advance
            self._last_advance = now
            out = ch.out(now)
            edge = out and not ch.last_out
            if not edge and ch.armed:
                # A whole pulse (low then high again) may fit between two calls.
                nxt = ch.next_rising_edge(since)
                edge = nxt is not None and nxt <= now
            ch.last_out = out
            if self.irq is not None:
                if edge:
                    self.irq.lower()
                    self.irq.raise_()
                    if not out:
                        self.irq.lower()
                else:
                    self.irq.set(out)
            change = ch.next_change(now)
            self._quiet_until = QUIET_FOREVER if change is None else change
            self._deadline = ch.next_rising_edge(now)
            return edge

    def out(self, channel: int) -> bool:
        with self._lock:
            return self.channels[channel].out(self.clock_ns())

    def set_gate(self, channel: int, level: bool) -> None:
        with self._lock:
            self._quiet_until = 0
            ch = self.channels[channel]
            now = self.clock_ns()
            if level and not ch.gate:
                if ch.mode in (1, 5):
                    if ch.count_written:
                        ch.load_ns, ch.armed = now, True  # trigger
                elif ch.mode in (2, 3, 6, 7):
                    ch.load_ns = now  # counting restarts from the reload value
                elif ch.frozen_ticks is not None:
                    ch.load_ns = now - ticks_to_ns(ch.frozen_ticks)
                    ch.frozen_ticks = None
            elif not level and ch.gate and ch.mode in (0, 4) and ch.armed:
                ch.frozen_ticks = ch.elapsed(now)  # counting suspends while the gate is low
            ch.gate = level

    # -- bus ---------------------------------------------------------------------------

    def bus_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 3:
                return 0xFF  # the control word register is write-only
            return self._read_counter(self.channels[offset])

    def _read_counter(self, ch: PitChannel) -> int:
        if ch.status_latched is not None:
            value, ch.status_latched = ch.status_latched, None
            return value
        if ch.latched:
            return ch.latched.pop(0) if len(ch.latched) > 1 else self._last_latched(ch)
        v = ch.counter(self.clock_ns())
        if ch.bcd:
            v = _to_bcd(v)
        if ch.rw_mode == RW_LSB:
            return v & 0xFF
        if ch.rw_mode == RW_MSB:
            return v >> 8
        lsb_next, ch.read_lsb_next = ch.read_lsb_next, not ch.read_lsb_next
        return v & 0xFF if lsb_next else v >> 8

    @staticmethod
    def _last_latched(ch: PitChannel) -> int:
        assert ch.latched is not None
        value = ch.latched.pop(0)
        ch.latched = None
        return value

    def _latch(self, ch: PitChannel) -> None:
        if ch.latched is not None:
            return  # a second latch before the first is read is ignored
        v = ch.counter(self.clock_ns())
        if ch.bcd:
            v = _to_bcd(v)
        if ch.rw_mode == RW_LSB:
            ch.latched = [v & 0xFF]
        elif ch.rw_mode == RW_MSB:
            ch.latched = [v >> 8]
        else:
            first_lsb = ch.read_lsb_next
            ch.latched = [v & 0xFF, v >> 8] if first_lsb else [v >> 8, v & 0xFF]
            ch.read_lsb_next = True

    def _status(self, ch: PitChannel) -> int:
        return (
            (0x80 if ch.out(self.clock_ns()) else 0)
            | (0x40 if ch.null_count else 0)
            | (ch.rw_mode << 4)
            | (ch.mode << 1)
            | int(ch.bcd)
        )

    def bus_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            self._quiet_until = 0  # a reprogrammed counter: advance() looks again
            if offset == 3:
                self._control(value)
            else:
                self._write_counter(self.channels[offset], value)

    def _control(self, value: int) -> None:
        sc = value >> 6
        if sc == 3:  # read-back command
            for i in range(3):
                if value & (2 << i):
                    ch = self.channels[i]
                    if not value & 0x20:
                        self._latch(ch)
                    if not value & 0x10 and ch.status_latched is None:
                        ch.status_latched = self._status(ch)
            return
        ch = self.channels[sc]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            self._latch(ch)
            return
        ch.rw_mode = rw
        ch.mode = (value >> 1) & 7
        ch.bcd = bool(value & 1)
        ch.armed = False
        ch.pending_count = None
        ch.count_written = False
        ch.frozen_ticks = None
        ch.null_count = True
        ch.write_lsb_next = ch.read_lsb_next = True
        ch.latched = None
        ch.status_latched = None
        if sc == 0 and self.irq is not None:
            ch.last_out = ch.out(self.clock_ns())
            self.irq.set(ch.last_out)

    def _write_counter(self, ch: PitChannel, value: int) -> None:
        if ch.rw_mode == RW_LSB:
            self._load(ch, value)
        elif ch.rw_mode == RW_MSB:
            self._load(ch, value << 8)
        elif ch.write_lsb_next:
            ch.write_lsb = value
            ch.write_lsb_next = False
            if ch.mode == 0:
                ch.armed = False  # writing the first byte stops a mode 0 count
        else:
            ch.write_lsb_next = True
            self._load(ch, ch.write_lsb | (value << 8))

    def _load(self, ch: PitChannel, raw: int) -> None:
        n = _from_bcd(raw) if ch.bcd else raw
        if n == 0:
            n = 10000 if ch.bcd else 0x10000
        if ch.mode in (2, 3, 6, 7) and n == 1:
            n = 2  # a count of 1 is illegal in modes 2 and 3
        now = self.clock_ns()
        periodic_running = ch.mode in (2, 3, 6, 7) and ch.armed
        ch.count_written = True
        ch.null_count = False
        if periodic_running:
            # A new count in modes 2/3 takes effect at the end of the current period.
            d = ch.elapsed(now)
            ch.pending_count = n
            ch.pending_at_ns = ch.load_ns + ticks_to_ns((d // ch.count + 1) * ch.count)
            return
        ch.count = n
        ch.load_ns = now
        ch.pending_count = None
        ch.frozen_ticks = None
        if ch.mode in (1, 5):
            return  # waits for a gate trigger
        ch.armed = True
        if not ch.gate and ch.mode in (0, 4):
            ch.frozen_ticks = 0


class PitSpeakerPort(StatelessDevice):
    """Port 0x61 (NMI status and control) as far as the PIT is concerned: bit 0 gates
    channel 2, bit 1 enables the speaker, bit 4 toggles with DRAM refresh (every 15 us),
    bit 5 reads OUT2. The PIT holds (and saves) this port's state."""

    name = "port61"

    def __init__(self, pit: Pit8254) -> None:
        self.pit = pit

    def bus_read(self, offset: int, size: int) -> int:
        pit = self.pit
        with pit._lock:
            now = pit.clock_ns()
            return (
                int(pit.channels[2].gate)
                | (0x02 if pit.speaker_enabled else 0)
                | pit.port61_bits
                | (0x10 if (now // 15_085) & 1 else 0)
                | (0x20 if pit.channels[2].out(now) else 0)
            )

    def bus_write(self, offset: int, size: int, value: int) -> None:
        pit = self.pit
        with pit._lock:
            pit.speaker_enabled = bool(value & 0x02)
            pit.port61_bits = value & 0x0C
            pit.set_gate(2, bool(value & 0x01))
