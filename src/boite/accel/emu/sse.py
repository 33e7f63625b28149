"""MMX and SSE/SSE2 semantics as pure functions over Python ints (no decoding, no state).

A 64-bit MMX or 128-bit XMM value is one int; packed operations split it into lanes of
`w` bits, work lane by lane and join the lanes back. The same function serves the MMX
form (`width` 64) and the SSE2 form with the 66 prefix (`width` 128). Floating-point
lanes go through softfloat.py with MXCSR's rounding mode, DAZ/FTZ and flags.
"""

from __future__ import annotations

from collections.abc import Callable

from boite.accel.emu import softfloat as sf

Packed = Callable[[int, int, int], int]


def lanes(v: int, w: int, width: int) -> list[int]:
    m = (1 << w) - 1
    return [(v >> i) & m for i in range(0, width, w)]


def join(vals: list[int], w: int) -> int:
    m = (1 << w) - 1
    out = 0
    for i, x in enumerate(vals):
        out |= (x & m) << (i * w)
    return out


def _s(x: int, w: int) -> int:
    return x - (1 << w) if x >> (w - 1) else x


def _sat_s(x: int, w: int) -> int:
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    return (lo if x < lo else hi if x > hi else x) & ((1 << w) - 1)


def _sat_u(x: int, w: int) -> int:
    hi = (1 << w) - 1
    return 0 if x < 0 else hi if x > hi else x


def lanewise(w: int, f: Callable[[int, int], int]) -> Packed:
    def op(a: int, b: int, width: int) -> int:
        return join(
            [f(x, y) for x, y in zip(lanes(a, w, width), lanes(b, w, width), strict=True)], w
        )

    return op


def _add(w: int) -> Packed:
    return lanewise(w, lambda x, y: x + y)


def _sub(w: int) -> Packed:
    return lanewise(w, lambda x, y: x - y)


def _adds(w: int) -> Packed:
    return lanewise(w, lambda x, y: _sat_s(_s(x, w) + _s(y, w), w))


def _subs(w: int) -> Packed:
    return lanewise(w, lambda x, y: _sat_s(_s(x, w) - _s(y, w), w))


def _addus(w: int) -> Packed:
    return lanewise(w, lambda x, y: _sat_u(x + y, w))


def _subus(w: int) -> Packed:
    return lanewise(w, lambda x, y: _sat_u(x - y, w))


def _cmpeq(w: int) -> Packed:
    m = (1 << w) - 1
    return lanewise(w, lambda x, y: m if x == y else 0)


def _cmpgt(w: int) -> Packed:
    m = (1 << w) - 1
    return lanewise(w, lambda x, y: m if _s(x, w) > _s(y, w) else 0)


def _unpack(w: int, high: bool) -> Packed:
    def op(a: int, b: int, width: int) -> int:
        la, lb = lanes(a, w, width), lanes(b, w, width)
        half = len(la) // 2
        sel = slice(half, None) if high else slice(0, half)
        out: list[int] = []
        for x, y in zip(la[sel], lb[sel], strict=True):
            out += [x, y]
        return join(out, w)

    return op


def _pack(w: int, signed: bool) -> Packed:
    """Narrow lanes of w bits from a then b to w/2 bits with saturation."""
    h = w // 2

    def op(a: int, b: int, width: int) -> int:
        vals = [_s(x, w) for x in lanes(a, w, width) + lanes(b, w, width)]
        return join([_sat_s(v, h) if signed else _sat_u(v, h) for v in vals], h)

    return op


def _mulhw(signed: bool) -> Packed:
    def f(x: int, y: int) -> int:
        p = _s(x, 16) * _s(y, 16) if signed else x * y
        return (p >> 16) & 0xFFFF

    return lanewise(16, f)


def _madd(a: int, b: int, width: int) -> int:
    la = [_s(x, 16) for x in lanes(a, 16, width)]
    lb = [_s(x, 16) for x in lanes(b, 16, width)]
    return join([la[i] * lb[i] + la[i + 1] * lb[i + 1] for i in range(0, len(la), 2)], 32)


def _muludq(a: int, b: int, width: int) -> int:
    la, lb = lanes(a, 64, width), lanes(b, 64, width)
    return join([(x & 0xFFFFFFFF) * (y & 0xFFFFFFFF) for x, y in zip(la, lb, strict=True)], 64)


def _sad(a: int, b: int, width: int) -> int:
    out = []
    for i in range(0, width, 64):
        la, lb = lanes(a >> i, 8, 64), lanes(b >> i, 8, 64)
        out.append(sum(abs(x - y) for x, y in zip(la, lb, strict=True)))
    return join(out, 64)


def _avg(w: int) -> Packed:
    return lanewise(w, lambda x, y: (x + y + 1) >> 1)


def shift(kind: str, w: int, a: int, count: int, width: int) -> int:
    """PSRL/PSRA/PSLL with a count (a count of w or more clears, or fills with the sign)."""
    if kind == "sra":
        c = min(count, w - 1)
        return join([_s(x, w) >> c for x in lanes(a, w, width)], w)
    if count >= w:
        return 0
    if kind == "srl":
        return join([x >> count for x in lanes(a, w, width)], w)
    return join([x << count for x in lanes(a, w, width)], w)


# Fast paths for what string functions use most (PCMPEQB, PMINUB, PMOVMSKB): byte lanes
# through bytes.translate and one multiply instead of a Python loop per lane.
_ZERO_TO_FF = bytes([0xFF] + [0] * 255)
_TOP_BIT = bytes(b >> 7 for b in range(256))
_GATHER = 0x0102040810204080  # 8 bytes of 0/1 -> their bits, in the top byte


def pcmpeqb(a: int, b: int, width: int) -> int:
    n = width // 8
    return int.from_bytes((a ^ b).to_bytes(n, "little").translate(_ZERO_TO_FF), "little")


def pminub(a: int, b: int, width: int) -> int:
    n = width // 8
    return int.from_bytes(
        bytes(map(min, a.to_bytes(n, "little"), b.to_bytes(n, "little"))), "little"
    )


def pmovmskb(a: int, width: int) -> int:
    ones = int.from_bytes(a.to_bytes(width // 8, "little").translate(_TOP_BIT), "little")
    # each byte of `ones` is its lane's top bit; the multiply gathers 8 of them in order
    lo = ((ones & M64_) * _GATHER) >> 56 & 0xFF
    if width == 64:
        return lo
    return lo | (((ones >> 64) * _GATHER) >> 56 & 0xFF) << 8


M64_ = (1 << 64) - 1


# Packed integer operations by 0F opcode (MMX with no prefix, SSE2 with 66).
PACKED: dict[int, Packed] = {
    0x60: _unpack(8, False), 0x61: _unpack(16, False), 0x62: _unpack(32, False),
    0x63: _pack(16, True), 0x64: _cmpgt(8), 0x65: _cmpgt(16), 0x66: _cmpgt(32),
    0x67: _pack(16, False), 0x68: _unpack(8, True), 0x69: _unpack(16, True),
    0x6A: _unpack(32, True), 0x6B: _pack(32, True),
    0x6C: _unpack(64, False), 0x6D: _unpack(64, True),  # 66 only
    0x74: pcmpeqb, 0x75: _cmpeq(16), 0x76: _cmpeq(32),
    0xD4: _add(64), 0xD5: lanewise(16, lambda x, y: x * y),
    0xD8: _subus(8), 0xD9: _subus(16), 0xDA: pminub,
    0xDB: lambda a, b, width: a & b, 0xDC: _addus(8), 0xDD: _addus(16),
    0xDE: lanewise(8, max), 0xDF: lambda a, b, width: ~a & b & ((1 << width) - 1),
    0xE0: _avg(8), 0xE3: _avg(16), 0xE4: _mulhw(False), 0xE5: _mulhw(True),
    0xE8: _subs(8), 0xE9: _subs(16),
    0xEA: lanewise(16, lambda x, y: x if _s(x, 16) < _s(y, 16) else y),
    0xEB: lambda a, b, width: a | b, 0xEC: _adds(8), 0xED: _adds(16),
    0xEE: lanewise(16, lambda x, y: x if _s(x, 16) > _s(y, 16) else y),
    0xEF: lambda a, b, width: a ^ b,
    0xF4: _muludq, 0xF5: _madd, 0xF6: _sad,
    0xF8: _sub(8), 0xF9: _sub(16), 0xFA: _sub(32), 0xFB: _sub(64),
    0xFC: _add(8), 0xFD: _add(16), 0xFE: _add(32),
}  # fmt: skip
# The shifts by a register/memory count: opcode -> (kind, lane width).
SHIFTS = {
    0xD1: ("srl", 16), 0xD2: ("srl", 32), 0xD3: ("srl", 64),
    0xE1: ("sra", 16), 0xE2: ("sra", 32),
    0xF1: ("sll", 16), 0xF2: ("sll", 32), 0xF3: ("sll", 64),
}  # fmt: skip
# Those in the original MMX set (the rest came with SSE or SSE2).
MMX_ONLY = frozenset(
    [*range(0x60, 0x6C), 0x74, 0x75, 0x76, 0xD5, 0xD8, 0xD9, 0xDB, 0xDC, 0xDD, 0xDF,
     0xE5, 0xE8, 0xE9, 0xEB, 0xEC, 0xED, 0xEF, 0xF5, 0xF8, 0xF9, 0xFA, 0xFC, 0xFD, 0xFE,
     0xD1, 0xD2, 0xD3, 0xE1, 0xE2, 0xF1, 0xF2, 0xF3]
)  # fmt: skip


def pshufd(a: int, imm: int) -> int:
    la = lanes(a, 32, 128)
    return join([la[(imm >> (2 * i)) & 3] for i in range(4)], 32)


def pshufw(a: int, imm: int, base: int = 0) -> int:
    la = lanes(a, 16, 64)
    return join([la[(imm >> (2 * i)) & 3] for i in range(4)], 16)


def byte_shift(a: int, count: int, left: bool) -> int:
    """PSLLDQ/PSRLDQ: the whole register by bytes."""
    if count > 15:
        return 0
    return (a << (8 * count)) & ((1 << 128) - 1) if left else a >> (8 * count)


# ------------------------------------------------------------------ MXCSR and floats
MXCSR_DAZ, MXCSR_FTZ = 0x40, 0x8000


def mxcsr_rc(mxcsr: int) -> int:
    return (mxcsr >> 13) & 3


def _fmt(double: bool):
    return sf.DOUBLE if double else sf.SINGLE


def _daz(fmt, x: int, daz: bool) -> tuple[int, int]:
    """(class, bits) with DAZ applied (a denormal input read as a zero of its sign)."""
    c = sf.ieee_class(fmt, x)
    if c == sf.DENORMAL and daz:
        return sf.ZERO, x & ~((1 << (fmt.fbits + fmt.ebits)) - 1)
    return c, x


def _quiet(fmt, x: int) -> int:
    return x | (1 << (fmt.fbits - 1))


def _nan2(fmt, a: int, b: int, ca: int, cb: int) -> tuple[int, int] | None:
    """SSE's NaN rule: the first operand if it is a NaN, else the second (quieted)."""
    nans = (sf.QNAN, sf.SNAN)
    if ca in nans or cb in nans:
        flags = sf.IE if sf.SNAN in (ca, cb) else 0
        return _quiet(fmt, a if ca in nans else b), flags
    return None


def fp_arith(op: str, double: bool, a: int, b: int, mxcsr: int) -> tuple[int, int]:
    """ADD SUB MUL DIV MIN MAX SQRT (of b) on one lane: (bits, flags)."""
    fmt = _fmt(double)
    daz = bool(mxcsr & MXCSR_DAZ)
    ca, a = _daz(fmt, a, daz)
    cb, b = _daz(fmt, b, daz)
    rc = mxcsr_rc(mxcsr)
    masks = (mxcsr >> 7) & 0x3F
    ftz = bool(mxcsr & MXCSR_FTZ)
    sbit = fmt.fbits + fmt.ebits
    indef = sf.ieee_indefinite(fmt)
    if op in ("min", "max"):
        if ca in (sf.QNAN, sf.SNAN) or cb in (sf.QNAN, sf.SNAN):
            return b, sf.IE  # MIN/MAX: the second operand, and #I for any NaN
        flags = sf.DE if sf.DENORMAL in (ca, cb) else 0
        va, vb = _ieee_exact(fmt, a, ca), _ieee_exact(fmt, b, cb)
        if op == "min":
            return (a if va < vb else b), flags
        return (a if va > vb else b), flags
    if op == "sqrt":
        if cb in (sf.QNAN, sf.SNAN):
            return _quiet(fmt, b), sf.IE if cb == sf.SNAN else 0
        flags = sf.DE if cb == sf.DENORMAL else 0
        if cb == sf.ZERO:
            return b, 0
        if b >> sbit:
            return indef, sf.IE
        if cb == sf.INF:
            return b, 0
        _, m, e = sf.ieee_value(fmt, b)
        m, e, sticky = sf.sqrt_exact(m, e)
        v, f = sf.round_pack(fmt, 0, m, e, rc, sticky, masks=masks, daz_ftz=ftz)
        return v, flags | (f & 0x3F)
    r = _nan2(fmt, a, b, ca, cb)
    if r is not None:
        return r
    flags = sf.DE if sf.DENORMAL in (ca, cb) else 0
    sa, sb = a >> sbit, b >> sbit
    if op == "sub":
        sb ^= 1
        b ^= 1 << sbit
    if op in ("add", "sub"):
        if ca == sf.INF or cb == sf.INF:
            if ca == cb == sf.INF and sa != sb:
                return indef, sf.IE
            return (a if ca == sf.INF else b), flags
        if ca == sf.ZERO and cb == sf.ZERO:
            return (sa if sa == sb else int(rc == sf.RD)) << sbit, flags
        _, ma, ea = sf.ieee_value(fmt, a)
        _, mb, eb = sf.ieee_value(fmt, b)
        if ma == 0 or mb == 0:
            m, e = ((-ma if sa else ma), ea) if mb == 0 else ((-mb if sb else mb), eb)
        else:
            m, e = sf.add_exact(sa, ma, ea, sb, mb, eb)
        if m == 0:
            return int(rc == sf.RD) << sbit, flags
        v, f = sf.round_pack(fmt, int(m < 0), abs(m), e, rc, masks=masks, daz_ftz=ftz)
        return v, flags | (f & 0x3F)
    s = sa ^ sb
    if op == "mul":
        if ca == sf.INF or cb == sf.INF:
            if sf.ZERO in (ca, cb):
                return indef, sf.IE
            return sf.ieee_inf(fmt, s), flags
        if sf.ZERO in (ca, cb):
            return s << sbit, flags
        _, ma, ea = sf.ieee_value(fmt, a)
        _, mb, eb = sf.ieee_value(fmt, b)
        v, f = sf.round_pack(fmt, s, ma * mb, ea + eb, rc, masks=masks, daz_ftz=ftz)
        return v, flags | (f & 0x3F)
    # div
    if ca == sf.INF:
        return (indef, sf.IE) if cb == sf.INF else (sf.ieee_inf(fmt, s), flags)
    if cb == sf.INF:
        return s << sbit, flags
    if cb == sf.ZERO:
        if ca == sf.ZERO:
            return indef, sf.IE
        return sf.ieee_inf(fmt, s), sf.ZE  # a denormal dividend is not reported
    if ca == sf.ZERO:
        return s << sbit, flags
    _, ma, ea = sf.ieee_value(fmt, a)
    _, mb, eb = sf.ieee_value(fmt, b)
    m, e, sticky = sf.div_exact(ma, ea, mb, eb)
    v, f = sf.round_pack(fmt, s, m, e, rc, sticky, masks=masks, daz_ftz=ftz)
    return v, flags | (f & 0x3F)


class _Exact:
    """A finite or infinite IEEE value, ordered exactly (no Fraction, no float)."""

    __slots__ = ("inf", "v")

    def __init__(self, fmt, x: int, c: int) -> None:
        neg = x >> (fmt.fbits + fmt.ebits)
        self.inf = (-1 if neg else 1) if c == sf.INF else 0
        self.v = (0, 0, 0) if c in (sf.INF, sf.ZERO) else sf.ieee_value(fmt, x)

    def _cmp(self, o: _Exact) -> int:
        if self.inf or o.inf:
            return (self.inf > o.inf) - (self.inf < o.inf)
        return sf.cmp_values(*self.v, *o.v)

    def __lt__(self, o: _Exact) -> bool:
        return self._cmp(o) < 0

    def __gt__(self, o: _Exact) -> bool:
        return self._cmp(o) > 0

    def __eq__(self, o: object) -> bool:
        return isinstance(o, _Exact) and self._cmp(o) == 0

    __hash__ = None  # type: ignore[assignment]


def _ieee_exact(fmt, x: int, c: int) -> _Exact:
    return _Exact(fmt, x, c)


def fp_compare(double: bool, a: int, b: int, mxcsr: int, signalling: bool) -> tuple[int, int]:
    """(UCOMIS/COMIS) -> (relation 0 gt 1 lt 2 eq 3 unordered, flags)."""
    fmt = _fmt(double)
    daz = bool(mxcsr & MXCSR_DAZ)
    ca, a = _daz(fmt, a, daz)
    cb, b = _daz(fmt, b, daz)
    if ca in (sf.QNAN, sf.SNAN) or cb in (sf.QNAN, sf.SNAN):
        return 3, sf.IE if (signalling or sf.SNAN in (ca, cb)) else 0
    flags = sf.DE if sf.DENORMAL in (ca, cb) else 0
    va, vb = _ieee_exact(fmt, a, ca), _ieee_exact(fmt, b, cb)
    return (2 if va == vb else 0 if va > vb else 1), flags


# CMPPS/CMPSS predicates 0-7: EQ LT LE UNORD NEQ NLT NLE ORD; signalling on QNaN: LT LE NLT NLE
def fp_cmp_pred(double: bool, a: int, b: int, pred: int, mxcsr: int) -> tuple[bool, int]:
    rel, flags = fp_compare(double, a, b, mxcsr, signalling=pred in (1, 2, 5, 6))
    unord = rel == 3
    res = {
        0: rel == 2, 1: rel == 1, 2: rel in (1, 2), 3: unord,
        4: rel != 2, 5: rel not in (1,), 6: rel not in (1, 2), 7: not unord,
    }[pred & 7]  # fmt: skip
    return res, flags


def fp_convert(src_double: bool, x: int, mxcsr: int) -> tuple[int, int]:
    """CVTSS2SD / CVTSD2SS of one lane."""
    sfmt, dfmt = _fmt(src_double), _fmt(not src_double)
    c, x = _daz(sfmt, x, bool(mxcsr & MXCSR_DAZ))
    sbit = sfmt.fbits + sfmt.ebits
    s = x >> sbit
    if c in (sf.QNAN, sf.SNAN):
        f = x & ((1 << sfmt.fbits) - 1)
        f = (
            f << (dfmt.fbits - sfmt.fbits)
            if dfmt.fbits > sfmt.fbits
            else f >> (sfmt.fbits - dfmt.fbits)
        )
        return sf.ieee_inf(dfmt, s) | f | (1 << (dfmt.fbits - 1)), sf.IE if c == sf.SNAN else 0
    if c == sf.INF:
        return sf.ieee_inf(dfmt, s), 0
    if c == sf.ZERO:
        return s << (dfmt.fbits + dfmt.ebits), 0
    flags = sf.DE if c == sf.DENORMAL else 0
    _, m, e = sf.ieee_value(sfmt, x)
    v, f = sf.round_pack(dfmt, s, m, e, mxcsr_rc(mxcsr), masks=(mxcsr >> 7) & 0x3F,
                         daz_ftz=bool(mxcsr & MXCSR_FTZ))  # fmt: skip
    return v, flags | (f & 0x3F)


def fp_from_int(double: bool, n: int, mxcsr: int) -> tuple[int, int]:
    """CVTSI2SS/SD, CVTDQ2PS/PD of a signed integer."""
    fmt = _fmt(double)
    if n == 0:
        return 0, 0
    v, f = sf.round_pack(fmt, int(n < 0), abs(n), 0, mxcsr_rc(mxcsr), masks=0x3F)
    return v, f & sf.PE


def fp_to_int(double: bool, x: int, mxcsr: int, trunc: bool, bits: int = 32) -> tuple[int, int]:
    """CVT(T)SS2SI/SD2SI, CVT(T)PS2DQ/PD2DQ: (integer bits, flags); the integer
    indefinite (0x80000000) with #I for NaN, infinity or out of range."""
    fmt = _fmt(double)
    c, x = _daz(fmt, x, bool(mxcsr & MXCSR_DAZ))
    indef = 1 << (bits - 1)
    if c in (sf.QNAN, sf.SNAN, sf.INF):
        return indef, sf.IE
    if c == sf.ZERO:
        return 0, 0
    flags = 0  # conversions to integers report no #D (SDM: Invalid, Precision)
    s, m, e = sf.ieee_value(fmt, x)
    if e >= 0:
        n, inexact = m << e, False
    else:
        q, inexact, _ = sf._round_at(s, m, e, False, 0, sf.RZ if trunc else mxcsr_rc(mxcsr))
        n = q
    n = -n if s else n
    if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
        return indef, sf.IE | flags
    return n & ((1 << bits) - 1), flags | (sf.PE if inexact else 0)


def approx_recip(double: bool, x: int, sqrt: bool) -> int:
    """RCPSS/RSQRTSS (single only): 1/x or 1/sqrt(x) to 12 significant bits (the SDM's
    |relative error| <= 1.5 * 2**-12; real CPUs use their own tables, so only that bound
    is comparable)."""
    fmt = sf.SINGLE
    c = sf.ieee_class(fmt, x)
    s = x >> 31
    if c in (sf.QNAN, sf.SNAN):
        return x | (1 << 22)
    if c in (sf.ZERO, sf.DENORMAL):  # denormals are treated as zeros here
        return sf.ieee_inf(fmt, s)
    if c == sf.INF:
        return s << 31 if not (sqrt and s) else sf.ieee_indefinite(fmt)
    if sqrt and s:
        return sf.ieee_indefinite(fmt)
    _, m, e = sf.ieee_value(fmt, x)
    if sqrt:
        if e & 1:
            m, e = m << 1, e - 1
        r, re, _ = sf.sqrt_exact(m, e, 40)
        q, qe, _ = sf.div_exact(1, 0, r, re, 40)
    else:
        q, qe, _ = sf.div_exact(1, 0, m, e, 40)
    # keep 12 significant bits (truncated), then pack as a single
    lead = q.bit_length()
    q = q >> (lead - 12) << (lead - 12)
    v, _ = sf.round_pack(fmt, s, q, qe, sf.RZ, masks=0x3F, daz_ftz=True)
    return v
