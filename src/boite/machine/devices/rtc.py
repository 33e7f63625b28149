"""CMOS RTC and NVRAM (Motorola MC146818A, as on every PC at ports 0x70/0x71, IRQ 8).

The time runs from a host wall clock plus an offset the guest can move (by writing the
time registers); periodic, alarm and update-ended interrupts are computed from a
monotonic clock: whoever runs the CPUs calls `advance()` when `next_deadline_ns()` has
passed (reading register C advances too, so polling guests see the flags).

The 128 CMOS bytes come in as `cmos_bytes` (the box's `.nvram`) and go out through
`cmos_bytes()` and the `persist` callback, called when the guest has changed a byte that
is not a clock register: at once, or with `persist_delay` at most once per that many
seconds (a guest rewriting CMOS in a loop must not turn into a stream of fsyncs);
`close()` writes what is still pending. The memory size bytes are rewritten from the RAM size on
every reset, as a BIOS would at POST.
"""

from __future__ import annotations

import calendar
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from boite.errors import ConfigError
from boite.machine.device import Device
from boite.machine.irq import IrqLine
from boite.machine.state import I64, Real, StateRecord, checked, data, flag, optional, real, span

CMOS_SIZE = 128
RTC_PORT = 0x70  # index at 0x70, data at 0x71
RTC_IRQ = 8

SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, WEEKDAY, DAY, MONTH, YEAR = range(10)
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
CHECKSUM_FIRST, CHECKSUM_LAST, CHECKSUM_HI = 0x10, 0x2D, 0x2E

A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_NORMAL = 0x20  # 32.768 kHz time base, oscillator running
A_RS_MASK = 0x0F

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10

D_VRT = 0x80

NS = 1_000_000_000
UIP_NS = 244_000  # UIP rises 244 us before each update
CLOCK_REGS = frozenset(range(0, 10)) | {REG_A, REG_B, REG_C, REG_D, CENTURY}


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """The vCPU threads reach the registers while a timer thread may call advance()."""

    @functools.wraps(method)
    def wrapper(self: CmosRtc, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


# Guest time is Unix seconds; the MC146818 counts to 2099 (with the century byte, 9999):
# anything beyond +-2**40 s (35,000 years) is not a time a guest set.
TIME_LIMIT = float(1 << 40)


@dataclass(frozen=True)
class RtcState(StateRecord):
    VERSION = 1
    cmos: bytes = data(max_len=CMOS_SIZE, exact=CMOS_SIZE)
    index: int = span(0, 0x7F)
    nmi_masked: bool = flag()
    offset: float = real(TIME_LIMIT)  # guest time - host wall clock, seconds
    frozen: float | None = optional(Real(TIME_LIMIT))  # guest time held by B.SET
    since_last_ns: int = checked(I64)


class CmosRtc(Device):
    name = "cmos-rtc"

    def __init__(
        self,
        irq: IrqLine,
        ram_size: int = 0,
        *,
        cmos_bytes: bytes | None = None,
        persist: Callable[[bytes], None] | None = None,
        persist_delay: float = 0.0,
        base_time: float | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        below_4g_ram: int | None = None,
        num_cpus: int = 1,
    ) -> None:
        """`base_time` (Unix seconds) starts the guest clock there instead of host time.
        `ram_size`/`below_4g_ram` fill the BIOS memory size bytes, `num_cpus` the CPU
        count byte (0x5f, CPUs - 1, as QEMU: SeaBIOS waits for that many to answer)."""
        self.num_cpus = max(1, min(num_cpus, 256))
        if cmos_bytes is not None and len(cmos_bytes) not in (CMOS_SIZE, 2 * CMOS_SIZE):
            raise ConfigError(
                f"CMOS contents are {len(cmos_bytes)} bytes; expected {CMOS_SIZE} (or 256)"
            )
        self.irq = irq
        self.ram_size = ram_size
        self.below_4g_ram = min(ram_size, 0xC000_0000) if below_4g_ram is None else below_4g_ram
        self.persist = persist
        self.persist_delay = persist_delay
        self._dirty = False
        self._persist_timer: threading.Timer | None = None
        self.wall_clock = wall_clock
        self.clock_ns = clock_ns
        self._initial = bytes(cmos_bytes[:CMOS_SIZE]) if cmos_bytes else bytes(CMOS_SIZE)
        self._lock = threading.RLock()
        self._base_time = base_time
        self.reset()

    # -- state -------------------------------------------------------------------------

    @_locked
    def reset(self) -> None:
        self.cmos = bytearray(self._initial)
        self.index = 0
        self.nmi_masked = False
        # Guest time = wall clock + offset; `base_time` pins the start.
        now = self.wall_clock()
        self.offset = 0.0 if self._base_time is None else self._base_time - now
        self.frozen: float | None = None  # guest time while B.SET holds the clock
        self.cmos[REG_A] = A_DV_NORMAL | 0x06  # 1024 Hz periodic rate, as BIOSes leave it
        self.cmos[REG_B] = B_24H
        self.cmos[REG_C] = 0
        self.cmos[REG_D] = D_VRT
        for i in (SEC_ALARM, MIN_ALARM, HOUR_ALARM):
            self.cmos[i] = 0
        self._set_memory_size()
        self._last_ns = self.clock_ns()
        self._last_gt = self.guest_time()
        self._quiet_until = 0  # see advance()
        self.irq.lower()

    def _set_memory_size(self) -> None:
        c = self.cmos
        base_kb = 640
        c[0x15], c[0x16] = base_kb & 0xFF, base_kb >> 8
        ext_kb = min(max(self.below_4g_ram - (1 << 20), 0) // 1024, 0xFFFF)
        c[0x17], c[0x18] = ext_kb & 0xFF, ext_kb >> 8
        c[0x30], c[0x31] = ext_kb & 0xFF, ext_kb >> 8
        above_16m = min(max(self.below_4g_ram - (16 << 20), 0) // 65536, 0xFFFF)
        c[0x34], c[0x35] = above_16m & 0xFF, above_16m >> 8
        above_4g = max(self.ram_size - self.below_4g_ram, 0) // 65536
        above_4g = min(above_4g, 0xFFFFFF)
        c[0x5B], c[0x5C], c[0x5D] = above_4g & 0xFF, (above_4g >> 8) & 0xFF, above_4g >> 16
        c[0x5F] = self.num_cpus - 1
        csum = sum(c[CHECKSUM_FIRST : CHECKSUM_LAST + 1])
        c[CHECKSUM_HI], c[CHECKSUM_HI + 1] = (csum >> 8) & 0xFF, csum & 0xFF

    @_locked
    def save_state(self) -> dict[str, Any]:
        return RtcState(
            cmos=bytes(self.cmos),
            index=self.index,
            nmi_masked=self.nmi_masked,
            offset=self.offset,
            frozen=self.frozen,
            # Interrupt phase is relative to the monotonic clock, which does not survive a
            # restore: store how far past the last check we were.
            since_last_ns=self.clock_ns() - self._last_ns,
        ).to_dict()

    def check_state(self, state: Any) -> RtcState:
        return RtcState.from_dict(state)

    @_locked
    def apply_state(self, rec: RtcState) -> None:
        self.cmos = bytearray(rec.cmos)
        self.index = rec.index
        self.nmi_masked = rec.nmi_masked
        self.offset = rec.offset
        self.frozen = rec.frozen
        self._last_ns = self.clock_ns() - rec.since_last_ns
        self._last_gt = self.guest_time()
        self._quiet_until = 0
        self.irq.set(bool(self.cmos[REG_C] & C_IRQF))

    @_locked
    def cmos_bytes(self) -> bytes:
        """The 128 bytes for the box's .nvram, clock registers as they read now."""
        self._refresh_clock_regs()
        return bytes(self.cmos)

    # -- time --------------------------------------------------------------------------

    def guest_time(self) -> float:
        """Guest wall-clock time in Unix seconds."""
        if self.frozen is not None:
            return self.frozen
        return self.wall_clock() + self.offset

    @property
    def _running(self) -> bool:
        return (self.cmos[REG_A] & A_DV_MASK) == A_DV_NORMAL and not self.cmos[REG_B] & B_SET

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _unbcd(v)

    def _encode_hour(self, h: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(h)
        pm = 0x80 if h >= 12 else 0
        h12 = h % 12 or 12
        return self._encode(h12) | pm

    def _decode_hour(self, v: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._decode(v)
        h = self._decode(v & 0x7F) % 12
        return h + 12 if v & 0x80 else h

    def _refresh_clock_regs(self) -> None:
        if self.frozen is not None:
            return  # while SET holds the clock the registers are the guest's
        tm = time.gmtime(int(self.guest_time()))
        c = self.cmos
        c[SEC] = self._encode(tm.tm_sec % 60)
        c[MIN] = self._encode(tm.tm_min)
        c[HOUR] = self._encode_hour(tm.tm_hour)
        c[WEEKDAY] = self._encode((tm.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        c[DAY] = self._encode(tm.tm_mday)
        c[MONTH] = self._encode(tm.tm_mon)
        c[YEAR] = self._encode(tm.tm_year % 100)
        c[CENTURY] = _bcd(tm.tm_year // 100)  # century byte is BCD by convention

    def _time_from_regs(self) -> float:
        c = self.cmos
        year = _unbcd(c[CENTURY]) * 100 + self._decode(c[YEAR])
        try:
            t = calendar.timegm(
                (
                    year,
                    self._decode(c[MONTH]),
                    self._decode(c[DAY]),
                    self._decode_hour(c[HOUR]),
                    self._decode(c[MIN]),
                    self._decode(c[SEC]),
                )
            )
        except (ValueError, OverflowError):
            return self.guest_time()  # nonsense date: keep the clock as it was
        return float(t)

    # -- interrupts --------------------------------------------------------------------

    def _period_ns(self) -> int | None:
        rs = self.cmos[REG_A] & A_RS_MASK
        if rs == 0:
            return None
        if rs <= 2:
            rs += 7  # with a 32.768 kHz base, rates 1 and 2 repeat rates 8 and 9
        return NS * (1 << (rs - 1)) // 32768

    @_locked
    def next_deadline_ns(self) -> int | None:
        """Monotonic time of the next event that sets a flag in register C."""
        b = self.cmos[REG_B]
        if not b & (B_PIE | B_UIE | B_AIE):
            return None  # no interrupt source enabled (the usual case)
        deadlines = []
        period = self._period_ns()
        if b & B_PIE and period:
            deadlines.append(self._last_ns - self._last_ns % period + period)
        if b & (B_UIE | B_AIE) and self._running:
            frac = self.guest_time() % 1.0
            deadlines.append(self.clock_ns() + int((1.0 - frac) * NS))
        return min(deadlines) if deadlines else None

    def advance(self, now_ns: int | None = None) -> None:
        """Set the register C flags for the events since the last call; raise IRQ 8."""
        with self._lock:
            now = self.clock_ns() if now_ns is None else now_ns
            gt = self.guest_time()
            if now < self._quiet_until and int(gt) == int(self._last_gt):
                # No periodic boundary and no second since the last call: it would set
                # no flag. (The runner calls this between chunks of guest code: a cheap
                # call keeps those gaps short.)
                self._last_ns, self._last_gt = now, gt
                return
            self._advance(now, gt)

    def _advance(self, now: int, gt: float) -> None:
        last, self._last_ns = self._last_ns, now
        flags = 0
        period = self._period_ns()
        if period and now // period != last // period:
            flags |= C_PF
        # The next periodic boundary (or never); a write to register A looks again.
        self._quiet_until = (now // period + 1) * period if period else 1 << 63
        prev, self._last_gt = self._last_gt, gt
        if self._running:
            if int(gt) > int(prev):  # one or more second updates happened
                flags |= C_UF
                if self._alarm_matches(int(gt)):
                    flags |= C_AF
        if flags:
            self._set_flags(flags)

    def _alarm_matches(self, t: int) -> bool:
        tm = time.gmtime(t)
        c = self.cmos

        def match(alarm: int, value: int, hour: bool = False) -> bool:
            if alarm & 0xC0 == 0xC0:
                return True  # "don't care"
            got = self._decode_hour(alarm) if hour else self._decode(alarm)
            return got == value

        return (
            match(c[SEC_ALARM], tm.tm_sec % 60)
            and match(c[MIN_ALARM], tm.tm_min)
            and match(c[HOUR_ALARM], tm.tm_hour, hour=True)
        )

    def _set_flags(self, flags: int) -> None:
        c = self.cmos
        c[REG_C] |= flags
        enabled = c[REG_B] & (B_PIE | B_AIE | B_UIE)
        # PIE/AIE/UIE are bits 6/5/4 of B, as PF/AF/UF are of C
        if c[REG_C] & enabled & 0x70 and not c[REG_C] & C_IRQF:
            c[REG_C] |= C_IRQF
            self.irq.raise_()

    # -- bus ---------------------------------------------------------------------------

    @_locked
    def bus_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        idx = self.index
        c = self.cmos
        if idx < 10 or idx == CENTURY:
            self._refresh_clock_regs()
            return c[idx]
        if idx == REG_A:
            value = c[REG_A] & ~A_UIP
            if self._running and self.frozen is None:
                frac_ns = int((self.guest_time() % 1.0) * NS)
                if frac_ns >= NS - UIP_NS:
                    value |= A_UIP
            return value
        if idx == REG_C:
            self.advance()
            value = c[REG_C]
            c[REG_C] = 0
            self.irq.lower()
            return value
        if idx == REG_D:
            return D_VRT
        return c[idx]

    @_locked
    def bus_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        self._quiet_until = 0  # maybe another rate or time: advance() looks again
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
            return
        idx = self.index
        c = self.cmos
        if idx < 10 or idx == CENTURY:
            self._refresh_clock_regs()
            c[idx] = value
            if idx in (SEC_ALARM, MIN_ALARM, HOUR_ALARM):
                return
            if self.frozen is not None:
                self.frozen = self._time_from_regs()
            else:
                self.offset = self._time_from_regs() + (self.guest_time() % 1.0) - self.wall_clock()
            return
        if idx == REG_A:
            c[REG_A] = (value & ~A_UIP) & 0xFF
            return
        if idx == REG_B:
            old = c[REG_B]
            if value & B_SET and not old & B_SET:
                self._refresh_clock_regs()
                self.frozen = self.guest_time()
            if value & B_SET:
                value &= ~B_UIE  # setting SET clears UIE (datasheet)
            mode_changed = (old ^ value) & (B_DM_BINARY | B_24H)
            if mode_changed and self.frozen is None:
                c[REG_B] = value
                self._refresh_clock_regs()
            c[REG_B] = value
            if old & B_SET and not value & B_SET:
                assert self.frozen is not None
                self.frozen = None
                self.offset = self._time_from_regs() - self.wall_clock()
            # Newly enabled sources whose flags are already set interrupt now.
            self._set_flags(0)
            return
        if idx in (REG_C, REG_D):
            return  # read-only
        if c[idx] == value:
            return
        c[idx] = value
        if self.persist is None:
            return
        self._dirty = True
        if self.persist_delay <= 0:
            self.flush()
        elif self._persist_timer is None:
            self._persist_timer = threading.Timer(self.persist_delay, self.flush)
            self._persist_timer.daemon = True
            self._persist_timer.start()

    def flush(self) -> None:
        """Hand pending CMOS changes to `persist`."""
        with self._lock:
            self._persist_timer = None
            if not self._dirty or self.persist is None:
                return
            self._dirty = False
            data = bytes(self.cmos)
        self.persist(data)

    def close(self) -> None:
        timer = self._persist_timer
        if timer is not None:
            timer.cancel()
        self.flush()
