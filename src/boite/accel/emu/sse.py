"""MMX and SSE/SSE2 semantics as pure functions over Python ints (no decoding, no state).

A 64-bit MMX or 128-bit XMM value is one int; packed operations split it into lanes of
`w` bits, work lane by lane and join the lanes back. The same function serves the MMX
form (`width` 64) and the SSE2 form with the 66 prefix (`width` 128). Floating-point
lanes go through softfloat.py with MXCSR's rounding mode, DAZ/FTZ and flags.
"""

from __future__ import annotations

from collections.abc import Callable

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


# Packed integer operations by 0F opcode (MMX with no prefix, SSE2 with 66).
PACKED: dict[int, Packed] = {
    0x60: _unpack(8, False), 0x61: _unpack(16, False), 0x62: _unpack(32, False),
    0x63: _pack(16, True), 0x64: _cmpgt(8), 0x65: _cmpgt(16), 0x66: _cmpgt(32),
    0x67: _pack(16, False), 0x68: _unpack(8, True), 0x69: _unpack(16, True),
    0x6A: _unpack(32, True), 0x6B: _pack(32, True),
    0x6C: _unpack(64, False), 0x6D: _unpack(64, True),  # 66 only
    0x74: _cmpeq(8), 0x75: _cmpeq(16), 0x76: _cmpeq(32),
    0xD4: _add(64), 0xD5: lanewise(16, lambda x, y: x * y),
    0xD8: _subus(8), 0xD9: _subus(16), 0xDA: lanewise(8, min),
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


def pmovmskb(a: int, width: int) -> int:
    return sum(((x >> 7) & 1) << i for i, x in enumerate(lanes(a, 8, width)))


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
