"""A small x86-64 encoder: the few host instruction forms the native tier emits.

Written here rather than taken from iced-x86 (whose Python encoder is a compiled wheel of
a whole-ISA library): the translator needs about twenty forms, all spelled out below, and
every byte the tier can produce is then in this file, which is what a safety review of
generated code has to read.

Registers are numbered as the hardware does (0 RAX .. 7 RDI, 8 R8 .. 15 R15). Memory
operands are [base + disp32] or [base + index*scale + disp32]; RIP-relative and
base-less forms are never produced.
"""

from __future__ import annotations

import struct

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)


_CACHE_MAX = 1 << 14
_MEM: dict[tuple, bytes] = {}
_RR: dict[tuple, bytes] = {}
_REL32 = struct.Struct("<i")


def clear_encodings() -> None:
    """Forget the memoized encodings (benchmarks of a first translation)."""
    _MEM.clear()
    _RR.clear()


def _s32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def encode_mem(op: bytes, reg: int, base: int, disp: int, w: bool = False,
               index: int | None = None, scale: int = 0, pre: bytes = b"") -> bytes:  # fmt: skip
    """[pre] REX op ModRM(mod=10) [SIB] disp32 for [base (+ index<<scale) + disp]: the
    displacement is always the last four bytes (templates patch it)."""
    rex = 0x40 | (8 if w else 0) | (4 if reg & 8 else 0) | (1 if base & 8 else 0)
    if index is not None:
        assert index & 7 != RSP or index & 8  # RSP cannot index
        rex |= 2 if index & 8 else 0
    out = bytearray(pre)
    if rex != 0x40:
        out.append(rex)
    out += op
    if index is None and base & 7 != RSP:
        out.append(0x80 | (reg & 7) << 3 | (base & 7))
    else:
        idx = RSP if index is None else index & 7  # 100: no index
        out.append(0x80 | (reg & 7) << 3 | 4)
        out.append(scale << 6 | idx << 3 | (base & 7))
    out += _s32(disp)
    return bytes(out)


def encode_rr(op: bytes, reg: int, rm: int, w: bool = False) -> bytes:
    rex = 0x40 | (8 if w else 0) | (4 if reg & 8 else 0) | (1 if rm & 8 else 0)
    return (bytes((rex,)) if rex != 0x40 else b"") + op + bytes((0xC0 | (reg & 7) << 3 | (rm & 7),))


class Asm:
    """Emits into a bytearray, with labels and rel32 fix-ups."""

    __slots__ = ("buf", "labels", "fixups")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []  # (offset of a rel32, label)

    # -- encoding helpers ------------------------------------------------------------
    # Translation is Python building bytes, so the encodings are memoized: most of them
    # repeat (state fields, TLB and chain code) and a translated block is rarely built
    # twice, so a lookup is about all an instruction form costs.
    def _mem(self, op: bytes, reg: int, base: int, disp: int, w: bool = False,
             index: int | None = None, scale: int = 0, pre: bytes = b"") -> None:  # fmt: skip
        """[pre] REX op ModRM(mod=10) [SIB] disp32 for [base (+ index<<scale) + disp]."""
        key = (op, reg, base, disp, w, index, scale, pre)
        code = _MEM.get(key)
        if code is None:
            code = _MEM[key] = encode_mem(op, reg, base, disp, w, index, scale, pre)
            if len(_MEM) > _CACHE_MAX:
                _MEM.clear()  # bounded: guest displacements make keys without end
        self.buf += code

    def _rr(self, op: bytes, reg: int, rm: int, w: bool = False) -> None:
        key = (op, reg, rm, w)
        code = _RR.get(key)
        if code is None:
            code = _RR[key] = encode_rr(op, reg, rm, w)
        self.buf += code

    # -- moves -----------------------------------------------------------------------
    def load32(self, reg: int, base: int, disp: int) -> None:
        self._mem(b"\x8b", reg, base, disp)

    def store32(self, base: int, disp: int, reg: int) -> None:
        self._mem(b"\x89", reg, base, disp)

    def load64(self, reg: int, base: int, disp: int) -> None:
        self._mem(b"\x8b", reg, base, disp, w=True)

    def load64_index8(self, reg: int, base: int, index: int) -> None:
        """reg = [base + index*8] (a TLB entry)."""
        self._mem(b"\x8b", reg, base, 0, w=True, index=index, scale=3)

    def store_imm32(self, base: int, disp: int, imm: int) -> None:
        self._mem(b"\xc7", 0, base, disp)
        self.buf += _s32(imm)

    def mov_rr32(self, dst: int, src: int) -> None:
        self._rr(b"\x89", src, dst)

    def mov_rr64(self, dst: int, src: int) -> None:
        self._rr(b"\x89", src, dst, w=True)

    def mov_imm32(self, reg: int, imm: int) -> None:
        if reg & 8:
            self.buf.append(0x41)
        self.buf.append(0xB8 | (reg & 7))
        self.buf += _s32(imm)

    def lea32(self, reg: int, base: int, disp: int, index: int | None = None) -> None:
        """reg32 = base + index + disp (flags untouched)."""
        self._mem(b"\x8d", reg, base, disp, index=index)

    # -- arithmetic (these change the host flags) -------------------------------------
    def shr32(self, reg: int, n: int) -> None:
        self._rr(b"\xc1", 5, reg)
        self.buf.append(n)

    def shl32(self, reg: int, n: int) -> None:
        self._rr(b"\xc1", 4, reg)
        self.buf.append(n)

    def xor_rr32(self, dst: int, src: int) -> None:
        self._rr(b"\x31", src, dst)

    def cmp_mem_imm32(self, base: int, disp: int, imm: int) -> None:
        self._mem(b"\x81", 7, base, disp)
        self.buf += _s32(imm)

    def and32(self, reg: int, imm: int) -> None:
        self._rr(b"\x81", 4, reg)
        self.buf += _s32(imm)

    def cmp32(self, reg: int, imm: int) -> None:
        self._rr(b"\x81", 7, reg)
        self.buf += _s32(imm)

    def test64(self, a: int, b: int) -> None:
        self._rr(b"\x85", b, a, w=True)

    def add64(self, dst: int, src: int) -> None:
        self._rr(b"\x01", src, dst, w=True)

    def add_mem_imm32(self, base: int, disp: int, imm: int) -> None:
        self._mem(b"\x81", 0, base, disp)
        self.buf += _s32(imm)

    def sub_mem_imm32(self, base: int, disp: int, imm: int) -> None:
        self._mem(b"\x81", 5, base, disp)
        self.buf += _s32(imm)

    # -- stack and flags ---------------------------------------------------------------
    def push(self, reg: int) -> None:
        if reg & 8:
            self.buf.append(0x41)
        self.buf.append(0x50 | (reg & 7))

    def pop(self, reg: int) -> None:
        if reg & 8:
            self.buf.append(0x41)
        self.buf.append(0x58 | (reg & 7))

    def pushfq(self) -> None:
        self.buf.append(0x9C)

    def popfq(self) -> None:
        self.buf.append(0x9D)

    # -- control flow ------------------------------------------------------------------
    def label(self, name: str) -> None:
        assert name not in self.labels, name
        self.labels[name] = len(self.buf)

    def jmp(self, label: str) -> None:
        self.buf.append(0xE9)
        self.fixups.append((len(self.buf), label))
        self.buf += b"\0\0\0\0"

    def jcc(self, cc: int, label: str) -> None:
        self.buf += bytes((0x0F, 0x80 | cc))
        self.fixups.append((len(self.buf), label))
        self.buf += b"\0\0\0\0"

    def jmp_reg(self, reg: int) -> None:
        self._rr(b"\xff", 4, reg)

    def ret(self) -> None:
        self.buf.append(0xC3)

    def raw(self, data: bytes) -> None:
        self.buf += data

    def finish(self) -> bytes:
        """The code with every rel32 resolved."""
        buf, labels, pack = self.buf, self.labels, _REL32.pack_into
        for at, name in self.fixups:
            pack(buf, at, labels[name] - (at + 4))
        return bytes(buf)
