"""Exact binary floating point over Python ints: the x87 80-bit extended format and the
IEEE single/double formats SSE uses.

Why our own softfloat instead of the host's `long double` (numpy.longdouble, ctypes
c_longdouble): the host's x87 cannot be told, from Python, which rounding mode and
precision to use, its exception flags cannot be read portably, numpy on aarch64 has a
128-bit `long double` with other rounding, and denormal/pseudo-denormal/unnormal operands
and the x87's own NaN rules would pass through C library code we do not control. Here a
value is an exact integer significand times a power of two; an operation computes the
exact result (or enough bits of it plus a "sticky" bit) and `round_pack` rounds it once,
for any precision, rounding mode and exponent range, reporting every IEEE flag, the x87's
C1 (rounded up), and the masked/unmasked underflow and overflow responses.

Transcendental functions are evaluated in fixed point with ~200 guard bits (series over
Python ints) and then rounded like any other result: correctly rounded for the argument
as reduced, which is within the one ulp the SDM promises. FSIN/FCOS/FPTAN reduce their
argument with the x87's 66-bit approximation of pi (SDM vol. 2, FSIN), as the hardware
does, so large arguments give the hardware's answers rather than the mathematically exact
ones.
"""

from __future__ import annotations

# Exception flag bits, in the x87 status word / MXCSR order.
IE, DE, ZE, OE, UE, PE = 1, 2, 4, 8, 0x10, 0x20
C1 = 0x200  # x87: the result was rounded up (magnitude increased)

# Rounding control values (x87 CW.RC and MXCSR.RC agree).
RN, RD, RU, RZ = 0, 1, 2, 3

M64 = (1 << 64) - 1
EXT_BIAS = 16383
EXT_INDEFINITE = (1 << 79) | (0x7FFF << 64) | 0xC000000000000000
QUIET = 1 << 62

# Operand classes of an 80-bit value.
ZERO, DENORMAL, NORMAL, INF, QNAN, SNAN, UNSUPPORTED = range(7)


class Fmt:
    """A binary format: exponent range, precision, field widths."""

    __slots__ = ("name", "p", "emin", "emax", "ebits", "fbits", "explicit", "bias")

    def __init__(self, name: str, p: int, ebits: int, explicit: bool) -> None:
        self.name = name
        self.p = p
        self.ebits = ebits
        self.bias = (1 << (ebits - 1)) - 1
        self.emin = 1 - self.bias
        self.emax = self.bias
        self.explicit = explicit
        self.fbits = 64 if explicit else p - 1  # significand field width


SINGLE = Fmt("single", 24, 8, False)
DOUBLE = Fmt("double", 53, 11, False)
EXT = Fmt("ext", 64, 15, True)
# The x87's precision control: significand rounded to 24/53/64 bits, 15-bit exponent.
EXT24 = Fmt("ext24", 24, 15, True)
EXT53 = Fmt("ext53", 53, 15, True)
EXT_PC = (EXT24, EXT, EXT53, EXT)  # PC field 00, 01 (reserved: acts as 64), 10, 11
EXT_SCALE = 24576  # unmasked x87 overflow/underflow: exponent adjusted by this


# ------------------------------------------------------------------ 80-bit fields
def ext_fields(x: int) -> tuple[int, int, int]:
    return x >> 79, (x >> 64) & 0x7FFF, x & M64


def ext_pack(sign: int, exp: int, sig: int) -> int:
    return (sign << 79) | (exp << 64) | sig


def ext_class(x: int) -> int:
    e = (x >> 64) & 0x7FFF
    sig = x & M64
    if e == 0:
        return ZERO if sig == 0 else DENORMAL  # pseudo-denormals (J=1) too
    if not sig >> 63:
        return UNSUPPORTED  # unnormal, pseudo-infinity, pseudo-NaN
    if e == 0x7FFF:
        if sig == 1 << 63:
            return INF
        return QNAN if sig & QUIET else SNAN
    return NORMAL


def ext_value(x: int) -> tuple[int, int, int]:
    """(sign, m, e) with value m * 2**e of a finite 80-bit value."""
    e = (x >> 64) & 0x7FFF
    return x >> 79, x & M64, (e or 1) - EXT_BIAS - 63


def ext_inf(sign: int) -> int:
    return ext_pack(sign, 0x7FFF, 1 << 63)


def ext_zero(sign: int) -> int:
    return sign << 79


# ------------------------------------------------------------------ IEEE formats
def ieee_fields(fmt: Fmt, x: int) -> tuple[int, int, int]:
    f = fmt.fbits
    return x >> (f + fmt.ebits), (x >> f) & ((1 << fmt.ebits) - 1), x & ((1 << f) - 1)


def ieee_to_ext(fmt: Fmt, x: int) -> tuple[int, int]:
    """Widen a single/double to 80 bits exactly: (value, flags). SNaN -> IE (quieted);
    a denormal sets DE (the x87 reports it on load)."""
    s, e, f = ieee_fields(fmt, x)
    emax = (1 << fmt.ebits) - 1
    if e == emax:
        if f == 0:
            return ext_inf(s), 0
        sig = (1 << 63) | (f << (63 - fmt.fbits))
        if not f >> (fmt.fbits - 1):
            return ext_pack(s, 0x7FFF, sig | QUIET), IE
        return ext_pack(s, 0x7FFF, sig), 0
    if e == 0:
        if f == 0:
            return ext_zero(s), 0
        n = f.bit_length()
        # value = f * 2**(emin - fbits); leading bit at emin - fbits + n - 1
        lead = fmt.emin - fmt.fbits + n - 1
        return ext_pack(s, lead + EXT_BIAS, f << (64 - n)), DE
    return ext_pack(s, e - fmt.bias + EXT_BIAS, (1 << 63) | (f << (63 - fmt.fbits))), 0


def ieee_class(fmt: Fmt, x: int) -> int:
    _, e, f = ieee_fields(fmt, x)
    if e == (1 << fmt.ebits) - 1:
        if f == 0:
            return INF
        return QNAN if f >> (fmt.fbits - 1) else SNAN
    if e == 0:
        return ZERO if f == 0 else DENORMAL
    return NORMAL


def ieee_value(fmt: Fmt, x: int) -> tuple[int, int, int]:
    s, e, f = ieee_fields(fmt, x)
    if e == 0:
        return s, f, fmt.emin - fmt.fbits
    return s, f | (1 << fmt.fbits), e - fmt.bias - fmt.fbits


def ieee_inf(fmt: Fmt, sign: int) -> int:
    return (sign << (fmt.fbits + fmt.ebits)) | (((1 << fmt.ebits) - 1) << fmt.fbits)


def ieee_indefinite(fmt: Fmt) -> int:
    return ieee_inf(fmt, 1) | (1 << (fmt.fbits - 1))


# ------------------------------------------------------------------ rounding
def _round_at(sign: int, m: int, e: int, sticky: bool, lsb: int, rc: int) -> tuple[int, bool, bool]:
    """Round m*2**e (+ a sticky amount below it) to a multiple of 2**lsb: (q, inexact,
    incremented), value q * 2**lsb."""
    sh = lsb - e
    if sh <= 0:
        q, rem, half = m << -sh, 0, 1
        rem_gt_half = False
        rem_eq_half = False
    else:
        q = m >> sh
        rem = m & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        rem_gt_half = rem > half or (rem == half and sticky)
        rem_eq_half = rem == half and not sticky
    inexact = rem != 0 or sticky
    if not inexact:
        return q, False, False
    if rc == RN:
        inc = rem_gt_half or (rem_eq_half and q & 1 == 1)
    elif rc == RD:
        inc = sign == 1
    elif rc == RU:
        inc = sign == 0
    else:
        inc = False
    return q + inc, True, inc


def pack(fmt: Fmt, sign: int, q: int, lead: int) -> int:
    """Pack a significand q (at most p+1 bits, normalised or denormal) whose leading bit
    has weight 2**lead (lead >= emin, or q's lsb at emin-(p-1) for denormals)."""
    if q.bit_length() > fmt.p:  # a carry out of rounding: q is a power of two
        q >>= q.bit_length() - fmt.p
    if fmt.explicit:
        if q == 0:
            return ext_zero(sign)
        if lead < fmt.emin:  # denormal: the field holds value / 2**(emin-63)
            lsb = lead - q.bit_length() + 1
            sig = q << (lsb - (fmt.emin - 63))
            return ext_pack(sign, 1 if sig >> 63 else 0, sig)
        sig = q << (64 - q.bit_length())
        return ext_pack(sign, lead + EXT_BIAS, sig & M64)
    top = sign << (fmt.fbits + fmt.ebits)
    if q == 0:
        return top
    if lead < fmt.emin:
        lsb = lead - q.bit_length() + 1
        f = q << (lsb - (fmt.emin - fmt.fbits))
        return top | f  # f == 1 << fbits is the smallest normal, which packs the same
    f = (q << (fmt.p - q.bit_length())) & ((1 << fmt.fbits) - 1)
    return top | ((lead + fmt.bias) << fmt.fbits) | f


def max_finite(fmt: Fmt, sign: int) -> int:
    q = (1 << fmt.p) - 1
    return pack(fmt, sign, q, fmt.emax)


def round_pack(
    fmt: Fmt,
    sign: int,
    m: int,
    e: int,
    rc: int,
    sticky: bool = False,
    masks: int = 0x3F,
    scale_unmasked: bool = False,
    daz_ftz: bool = False,
) -> tuple[int, int]:
    """Round the value (-1)**sign * (m*2**e + sticky) to fmt: (bits, flags).

    flags holds IE..PE and C1 (rounded up). An unmasked overflow/underflow with
    `scale_unmasked` (x87 register destination) delivers the result with its exponent
    adjusted by 24576; without it the caller must not store (flags tell why).
    Tininess is detected after rounding, as x86 does. `daz_ftz`: SSE's FTZ (a tiny
    result becomes zero, UE|PE, when underflow is masked)."""
    if m == 0:
        if not sticky:
            return pack(fmt, sign, 0, 0), 0
        m, e = 1, e - 256  # "a tiny bit more than zero"; only the sticky matters
        sticky = False
        sticky_only = True
    else:
        sticky_only = False
    p = fmt.p
    lead = e + m.bit_length() - 1
    q, inexact, inc = _round_at(sign, m, e, sticky, lead - (p - 1), rc)
    rlead = lead - (p - 1) + q.bit_length() - 1
    flags = 0
    if rlead > fmt.emax:
        if not masks & OE and scale_unmasked:
            rlead -= EXT_SCALE
            flags = OE | (PE | (C1 if inc else 0) if inexact else 0)
            if rlead > fmt.emax:  # still too big: the SDM's infinity
                return ext_inf(sign), OE | PE | C1
            return pack(fmt, sign, q, rlead), flags
        if not masks & OE:
            return 0, OE  # memory destination: nothing stored, no #P reported
        flags = OE | PE
        if rc == RN or (rc == RU and not sign) or (rc == RD and sign):
            return (ext_inf(sign) if fmt.explicit else ieee_inf(fmt, sign)), flags | C1
        return max_finite(fmt, sign), flags
    if rlead < fmt.emin:
        if not masks & UE:
            if scale_unmasked:
                if rlead + EXT_SCALE < fmt.emin:  # still tiny after the adjustment: 0
                    return pack(fmt, sign, 0, 0), UE | PE
                flags = UE | (PE | (C1 if inc else 0) if inexact else 0)
                return pack(fmt, sign, q, rlead + EXT_SCALE), flags
            return 0, UE
        if daz_ftz:
            return pack(fmt, sign, 0, 0), UE | PE
        q, inexact, inc = _round_at(sign, m, e, sticky, fmt.emin - (p - 1), rc)
        if not inexact:
            return pack(fmt, sign, q, fmt.emin - (p - 1) + q.bit_length() - 1), 0
        flags = UE | PE | (C1 if inc else 0)
        if q == 0:
            return pack(fmt, sign, 0, 0), flags
        return pack(fmt, sign, q, fmt.emin - (p - 1) + q.bit_length() - 1), flags
    if sticky_only:  # unreachable in practice: a sticky-only value is always tiny
        return pack(fmt, sign, 0, 0), UE | PE
    return pack(fmt, sign, q, rlead), (PE | (C1 if inc else 0)) if inexact else 0


def add_exact(sa: int, ma: int, ea: int, sb: int, mb: int, eb: int) -> tuple[int, int]:
    """(m, e) with m signed: the sum of two nonzero finite values, exact where it matters:
    an operand more than 70 binary places below the other only decides rounding by its
    sign (it is below a quarter ulp at any precision here), so it becomes the smallest
    value of that sign 72 places down instead of a shift by thousands of bits."""
    la = ea + ma.bit_length()
    lb = eb + mb.bit_length()
    if lb < la - 70:
        mb, eb = 1, la - 72
    elif la < lb - 70:
        ma, ea = 1, lb - 72
    e = min(ea, eb)
    m = (-ma if sa else ma) << (ea - e)
    m += (-mb if sb else mb) << (eb - e)
    return m, e


def cmp_values(sa: int, ma: int, ea: int, sb: int, mb: int, eb: int) -> int:
    """-1, 0, 1 comparing (-1)**sa * ma * 2**ea with the other (finite, zeros included)."""
    if ma == 0 and mb == 0:
        return 0
    va = -ma if sa else ma
    vb = -mb if sb else mb
    if (va < 0) != (vb < 0) or va == 0 or vb == 0:
        return (va > vb) - (va < vb)
    la, lb = ea + ma.bit_length(), eb + mb.bit_length()
    if la != lb:  # same sign: the larger magnitude is the one with the higher leading bit
        r = 1 if la > lb else -1
        return -r if sa else r
    e = min(ea, eb)
    va <<= ea - e
    vb <<= eb - e
    return (va > vb) - (va < vb)


# ------------------------------------------------------------------ NaN rules
def ext_quiet(x: int) -> int:
    return x | QUIET


def ext_propagate(a: int, b: int) -> int:
    """The x87's choice between two NaN operands (SDM vol. 1, table 4-7): a QNaN over an
    SNaN, else the larger significand, quieted."""
    ca, cb = ext_class(a), ext_class(b)
    an = ca in (QNAN, SNAN)
    bn = cb in (QNAN, SNAN)
    if an and not bn:
        return ext_quiet(a)
    if bn and not an:
        return ext_quiet(b)
    if ca == SNAN and cb == QNAN:
        return b
    if cb == SNAN and ca == QNAN:
        return a
    qa, qb = ext_quiet(a), ext_quiet(b)
    sa, sb = qa & M64, qb & M64
    if sa != sb:
        return qa if sa > sb else qb
    return qa if not qa >> 79 else qb  # equal significands: the positive one


# ------------------------------------------------------------------ exact operations
def isqrt_rem(n: int) -> tuple[int, bool]:
    from math import isqrt

    r = isqrt(n)
    return r, r * r != n


def div_exact(ma: int, ea: int, mb: int, eb: int, bits: int = 72) -> tuple[int, int, bool]:
    """m*2**e ~ (ma*2**ea)/(mb*2**eb) with at least `bits` quotient bits and a sticky."""
    k = max(0, mb.bit_length() - ma.bit_length() + bits)
    q, r = divmod(ma << k, mb)
    return q, ea - eb - k, r != 0


def sqrt_exact(m: int, e: int, bits: int = 72) -> tuple[int, int, bool]:
    k = max(0, 2 * bits - m.bit_length())
    if (e - k) & 1:
        k += 1
    r, sticky = isqrt_rem(m << k)
    return r, (e - k) // 2, sticky


# ------------------------------------------------------------------ fixed-point math
# Arguments and results of the series below are (X, F): value X / 2**F, X an int.
GUARD = 200


def _atan_inv(n: int, f: int) -> int:
    """atan(1/n) * 2**f."""
    total = term = (1 << f) // n
    n2 = n * n
    k = 1
    sign = -1
    while term:
        term //= n2
        total += sign * (term // (2 * k + 1))
        sign = -sign
        k += 1
    return total


def _pi_fixed(f: int) -> int:
    g = f + 16
    return (16 * _atan_inv(5, g) - 4 * _atan_inv(239, g)) >> 16


def _ln2_fixed(f: int) -> int:
    g = f + 16
    # ln 2 = 2 atanh(1/3)
    t = (1 << g) // 3
    total = t
    k = 1
    while t:
        t //= 9
        total += t // (2 * k + 1)
        k += 1
    return (2 * total) >> 16


_PI_F = 512
PI_FIXED = _pi_fixed(_PI_F)  # pi * 2**512
LN2_FIXED = _ln2_fixed(_PI_F)
# The x87's internal pi: 66 significant bits (SDM vol. 2, FSIN/FCOS/FPTAN/FSINCOS).
PI66 = (0xC90FDAA22168C234 << 2) | 3  # value PI66 * 2**-64


def mulf(a: int, b: int, f: int) -> int:
    """a * b / 2**f truncated toward zero (so every series below reaches 0)."""
    p = a * b
    return p >> f if p >= 0 else -(-p >> f)


def divi(a: int, k: int) -> int:
    return a // k if a >= 0 else -(-a // k)


def fix(x: int, f_from: int, f_to: int) -> int:
    d = f_to - f_from
    return x << d if d >= 0 else x >> -d


def sin_cos_fixed(x: int, f: int) -> tuple[int, int]:
    """sin and cos of x/2**f for |x/2**f| <= 1, both scaled by 2**f (f >= GUARD)."""
    x2 = (x * x) >> f
    s = term = x
    k = 1
    while term:
        term = -divi(mulf(term, x2, f), (2 * k) * (2 * k + 1))
        s += term
        k += 1
    c = term = 1 << f
    k = 1
    while term:
        term = -divi(mulf(term, x2, f), (2 * k - 1) * (2 * k))
        c += term
        k += 1
    return s, c


def atan_fixed(x: int, f: int) -> int:
    """atan(x/2**f) * 2**f for 0 <= x/2**f <= 1."""
    one = 1 << f
    from math import isqrt

    # atan(t) = 2 atan(t / (1 + sqrt(1 + t^2))): twice brings t below tan(pi/16)
    halvings = 0
    for _ in range(3):
        if x < one >> 3:
            break
        s = isqrt((one << f) + x * x)
        x = (x << f) // (one + s)
        halvings += 1
    x2 = (x * x) >> f
    total = term = x
    k = 1
    while term:
        term = -mulf(term, x2, f)
        total += divi(term, 2 * k + 1)
        k += 1
    return total << halvings


def log2_fixed_1p(t: int, f: int) -> int:
    """log2(1 + t/2**f) * 2**f for |t/2**f| < 0.5: 2 atanh(u)/ln 2, u = t / (2 + t)."""
    u = divi(t << f, (2 << f) + t)
    u2 = (u * u) >> f
    total = term = u
    k = 1
    while term:
        term = mulf(term, u2, f)
        total += divi(term, 2 * k + 1)
        k += 1
    ln2 = fix(LN2_FIXED, _PI_F, f)
    return divi((2 * total) << f, ln2)


def exp2m1_fixed(x: int, f: int) -> int:
    """2**(x/2**f) - 1, scaled by 2**f, for |x/2**f| <= 1 (relative precision kept for
    tiny x when f is large)."""
    t = mulf(x, fix(LN2_FIXED, _PI_F, f), f)  # x ln 2
    total = term = t
    k = 2
    while term:
        term = divi(mulf(term, t, f), k)
        total += term
        k += 1
    return total


def pi_fixed(f: int) -> int:
    return fix(PI_FIXED, _PI_F, f)
