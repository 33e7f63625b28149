"""The x87 floating-point unit (and the XMM registers/MXCSR that FXSAVE stores with it).

State: eight physical 80-bit registers (raw ints), an empty bit per register (the tag
word's other values are derived from the contents, as on every CPU since the P6), TOP,
control and status words, the last instruction/operand pointers and opcode.

The methods here are the x87's instruction semantics over that state, without decoding
or memory access: the decoder reads memory operands first (so a fault leaves the FPU
untouched), calls a method, and for stores writes what the method returns before it
calls `commit_store`. Exceptions follow SDM vol. 1, 8.5: an unmasked invalid-operation,
denormal or divide-by-zero exception leaves the destination and TOP as they were; an
unmasked overflow/underflow stores the result with its exponent adjusted by 24576 to a
register (not to memory); every unmasked exception sets ES and B, and the *next* waiting
x87 instruction raises #MF (CR0.NE) or asserts FERR# (IRQ 13 through the PIC, the PC's
legacy path) -- see `pending`.
"""

from __future__ import annotations

from boite.accel.emu import softfloat as sf
from boite.accel.emu.softfloat import (
    C1,
    DE,
    DENORMAL,
    DOUBLE,
    EXT,
    EXT_INDEFINITE,
    EXT_PC,
    IE,
    INF,
    M64,
    NORMAL,
    OE,
    PE,
    QNAN,
    RN,
    RZ,
    SINGLE,
    SNAN,
    UE,
    UNSUPPORTED,
    ZE,
    ZERO,
    ext_class,
    ext_inf,
    ext_pack,
    ext_propagate,
    ext_quiet,
    ext_value,
    ext_zero,
    round_pack,
)

# Status word bits besides the exception flags.
SF, ES, C0, C2, C3, B = 0x40, 0x80, 0x100, 0x400, 0x4000, 0x8000
CC = C0 | C1 | C2 | C3
TOP_SHIFT = 11
NANS = (QNAN, SNAN)
SPECIAL_TAG = (DENORMAL, INF, QNAN, SNAN, UNSUPPORTED)
SIGN = 1 << 79
ONE = ext_pack(0, 16383, 1 << 63)
# The CPUID features of what is implemented here and in sse.py, by cpumodel.py's names
# (cpumodel.FEATURES takes them from here: the one place). Not SSE3 and later (FISTTP
# exists, as on every CPU with SSE3, but MONITOR/HADDPS/... do not). CLFSH brings
# CLFLUSH's line size (64 bytes) in CPUID.1:EBX.
FPU_FEATURES = frozenset({"fpu", "clfsh", "mmx", "fxsr", "sse", "sse2"})
MXCSR_MASK = 0xFFFF  # DAZ supported (FXSAVE's MXCSR_MASK field)
MXCSR_DEFAULT = 0x1F80


# Constants, rounded by RC when loaded (SDM vol. 1, 8.3.8). The SDM speaks of 66-bit
# internal values, but FLDLG2 rounds as the exact log10(2) does (its 66-bit value ends
# in a tie that the hardware breaks upwards): {name: (128-bit significand, lsb exponent)}.
def _const66(v: int, f: int) -> tuple[int, int]:
    """v / 2**f truncated to 128 significant bits (an irrational value: sticky below)."""
    sh = v.bit_length() - 128
    return v >> sh, sh - f


def _constants() -> dict[str, tuple[int, int]]:
    f = 300
    ln2 = sf.fix(sf.LN2_FIXED, 512, f)
    l2t = (3 << f) + sf.log2_fixed_1p(1 << (f - 2), f)  # log2(10) = 3 + log2(1.25)
    return {
        "l2t": _const66(l2t, f),
        "l2e": _const66((1 << (2 * f)) // ln2, f),  # log2(e) = 1 / ln 2
        "pi": _const66(sf.PI_FIXED, 512),
        "lg2": _const66((1 << (2 * f)) // l2t, f),  # log10(2) = 1 / log2(10)
        "ln2": _const66(ln2, f),
    }


_CONSTS = _constants()


class FpuState:
    """Everything FXSAVE stores: the x87, MXCSR and the eight XMM registers."""

    __slots__ = (
        "regs", "empty", "top", "cw", "sw", "fip", "fcs", "fdp", "fds", "fop",
        "xmm", "mxcsr", "ferr", "ignne",
    )  # fmt: skip

    def __init__(self) -> None:
        self.regs = [0] * 8
        self.xmm = [0] * 8
        self.mxcsr = MXCSR_DEFAULT
        self.ferr = False  # FERR# asserted (CR0.NE=0 path)
        self.ignne = False  # IGNNE# asserted by a write to port 0xF0
        self.finit()
        self.cw = 0x40  # power-on/RESET value (FINIT makes it 0x37F)

    # ------------------------------------------------------------ control
    def finit(self) -> None:
        self.cw = 0x37F
        self.sw = 0
        self.top = 0
        self.empty = 0xFF
        self.fip = self.fcs = self.fdp = self.fds = self.fop = 0

    def reset(self) -> None:
        """Power-on/RESET (SDM vol. 3, table 9-1): like FINIT but CW 0x40, registers and
        XMM zeroed, MXCSR 0x1F80."""
        self.finit()
        self.cw = 0x40
        self.regs = [0] * 8
        self.xmm = [0] * 8
        self.mxcsr = MXCSR_DEFAULT
        self.ferr = self.ignne = False

    def status(self) -> int:
        return (self.sw & ~0x3800) | (self.top << TOP_SHIFT)

    def set_status(self, v: int) -> None:
        self.top = (v >> TOP_SHIFT) & 7
        self.sw = v & ~0x3800 & 0xFFFF

    def fnclex(self) -> None:
        self.sw &= ~(0x3F | SF | ES | B)

    def fldcw(self, v: int) -> None:
        self.cw = v & 0x1F7F | 0x40
        self._update_es()

    def _update_es(self) -> None:
        """ES and B follow the unmasked exception flags (FLDCW/FLDENV/FRSTOR can set or
        clear them)."""
        if self.sw & ~self.cw & 0x3F:
            self.sw |= ES | B
        else:
            self.sw &= ~(ES | B)

    def pending(self) -> bool:
        """An unmasked exception waits for the next waiting instruction (#MF/FERR#)."""
        return bool(self.sw & ES)

    def tag_word(self) -> int:
        t = 0
        for i in range(8):
            if self.empty >> i & 1:
                tag = 3
            else:
                c = ext_class(self.regs[i])
                tag = 1 if c == ZERO else 2 if c in SPECIAL_TAG else 0
            t |= tag << (2 * i)
        return t

    def set_tag_word(self, t: int) -> None:
        self.empty = 0
        for i in range(8):
            if (t >> (2 * i)) & 3 == 3:
                self.empty |= 1 << i

    def abridged_tags(self) -> int:
        return ~self.empty & 0xFF

    # ------------------------------------------------------------ stack
    def phys(self, i: int) -> int:
        return (self.top + i) & 7

    def is_empty(self, i: int) -> bool:
        return bool(self.empty >> ((self.top + i) & 7) & 1)

    def st(self, i: int) -> int:
        return self.regs[(self.top + i) & 7]

    def set_st(self, i: int, v: int) -> None:
        p = (self.top + i) & 7
        self.regs[p] = v
        self.empty &= ~(1 << p)

    def pop(self) -> None:
        self.empty |= 1 << self.top
        self.top = (self.top + 1) & 7

    def push(self, v: int) -> None:
        self.top = (self.top - 1) & 7
        self.regs[self.top] = v
        self.empty &= ~(1 << self.top)

    # ------------------------------------------------------------ flag delivery
    def _suppressed(self, flags: int) -> bool:
        """Record flags; True when an unmasked IE/DE/ZE suppresses the result."""
        unmasked = flags & ~self.cw & 0x3F
        if unmasked & (IE | DE | ZE):
            # nothing was computed: only the pre-computation flags are reported
            c1 = flags & C1 if flags & SF else 0  # stack overflow's C1; no rounding happened
            self.sw = (self.sw & ~C1) | (flags & (IE | DE | ZE | SF)) | c1 | ES | B
            return True
        self.sw = (self.sw & ~C1) | (flags & (0x3F | SF | C1))
        if unmasked:
            self.sw |= ES | B
        return False

    def _stack_underflow(self) -> int:
        return IE | SF  # C1 = 0

    def _result(self, flags: int, dest: int, value: int, pop: bool = False) -> None:
        if self._suppressed(flags):
            return
        self.set_st(dest, value)
        if pop:
            self.pop()

    def _push_result(self, flags: int, value: int, post_de: bool = False) -> None:
        """Push with the stack-overflow check (the new top must be empty)."""
        if not self.empty >> ((self.top - 1) & 7) & 1:
            flags = (flags & ~(0x3F | C1)) | IE | SF | C1
            value = EXT_INDEFINITE
        if post_de and flags & DE and not flags & IE:
            self.sw = (self.sw & ~C1) | (flags & 0x3F)
            if flags & ~self.cw & 0x3F:
                self.sw |= ES | B
            self.push(value)
            return
        if self._suppressed(flags):
            return
        self.push(value)

    @property
    def rc(self) -> int:
        return (self.cw >> 10) & 3

    # ------------------------------------------------------------ arithmetic
    def arith_value(self, op: int, x: int, y: int) -> tuple[int, int]:
        """op (the ModRM reg field of D8): 0 x+y, 1 x*y, 4 x-y, 5 y-x, 6 x/y, 7 y/x."""
        fmt = EXT_PC[(self.cw >> 8) & 3]
        rc = self.rc
        masks = self.cw
        if op == 5 or op == 7:
            x, y = y, x
        if op <= 1 or op == 4 or op == 5:
            return (mul if op == 1 else add)(x, y, op >= 4, fmt, rc, masks)
        return div(x, y, fmt, rc, masks)

    def arith_st(self, op: int, i: int, dest_i: bool, pop: bool) -> None:
        """ST(0) op ST(i) into ST(0), or into ST(i) when dest_i (DC/DE forms)."""
        if self.is_empty(0) or self.is_empty(i):
            self._result(self._stack_underflow(), i if dest_i else 0, EXT_INDEFINITE, pop)
            return
        v, flags = self.arith_value(op, self.st(0), self.st(i))
        self._result(flags, i if dest_i else 0, v, pop)

    def arith_mem(self, op: int, y: int, load_flags: int = 0) -> None:
        """ST(0) op a memory operand already widened to 80 bits (load_flags: IE for a
        signalling NaN source, DE for a denormal one)."""
        if self.is_empty(0):
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        x = self.st(0)
        if load_flags & IE and ext_class(x) not in NANS:
            # the SNaN operand, quieted, is the result (unless ST(0) is a NaN too)
            v, flags = y, IE
            if ext_class(x) == UNSUPPORTED:
                v = EXT_INDEFINITE
        else:
            v, flags = self.arith_value(op, x, y)
            if load_flags & IE:
                flags |= IE
                v = ext_propagate(x, y & ~sf.QUIET)  # the source was signalling
            elif ext_class(x) not in (QNAN, SNAN, UNSUPPORTED) and not flags & ZE:
                flags |= load_flags & DE  # the source was a denormal single/double
        self._result(flags, 0, v)

    def sqrt(self) -> None:
        if self.is_empty(0):
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        v, flags = sqrt(self.st(0), EXT_PC[(self.cw >> 8) & 3], self.rc, self.cw)
        self._result(flags, 0, v)

    # ------------------------------------------------------------ compares
    def compare(
        self, y: int | None, quiet: bool, pops: int, eflags: bool = False, load_flags: int = 0
    ) -> int | None:
        """FCOM/FUCOM/FICOM (y=None: ST(1) is not used by the caller; pass its value).
        Sets C3/C2/C0 (or returns ZF/PF/CF for FCOMI); returns the EFLAGS bits or None."""
        if self.is_empty(0) or y is None:
            rel, flags = 3, self._stack_underflow()
        else:
            rel, flags = compare(self.st(0), y, quiet)
            if ext_class(self.st(0)) in (QNAN, SNAN, UNSUPPORTED):
                load_flags &= ~DE  # a NaN compare does not look at the other operand
            flags |= load_flags
            if load_flags & IE:
                rel = 3
        unmasked = flags & ~self.cw & 0x3F
        keep_c1 = eflags and not flags & SF  # FCOMI leaves C1 alone but on underflow
        c1 = self.sw & C1 if keep_c1 else 0
        # The condition codes (or EFLAGS) are set even when an unmasked exception is
        # raised (unordered for IE, the real relation for DE); nothing is popped then.
        self.sw = (self.sw & ~C1) | (flags & 0x7F) | c1
        if unmasked:
            self.sw |= ES | B
        popping = not unmasked & (IE | DE)
        if eflags:
            if popping:
                for _ in range(pops):
                    self.pop()
            return (0, 1, 0x40, 0x45)[rel]  # ZF=0x40 PF=4 CF=1
        self.sw = (self.sw & ~(C0 | C2 | C3)) | (0, C0, C3, C0 | C2 | C3)[rel]
        if popping:
            for _ in range(pops):
                self.pop()
        return None

    def ftst(self) -> None:
        self.compare(ext_zero(0) if not self.is_empty(0) else None, False, 0)

    def fxam(self) -> None:
        p = self.phys(0)
        v = self.regs[p]
        sign = C1 if v >> 79 else 0
        if self.empty >> p & 1:
            cc = C3 | C0
        else:
            c = ext_class(v)
            cc = {UNSUPPORTED: 0, QNAN: C0, SNAN: C0, NORMAL: C2, INF: C2 | C0,
                  ZERO: C3, DENORMAL: C3 | C2}[c]  # fmt: skip
        self.sw = (self.sw & ~CC) | cc | sign

    # ------------------------------------------------------------ loads
    def load(self, v: int, flags: int = 0) -> None:
        """FLD of an 80-bit value (register or m80) or a widened m32/m64/integer/BCD.
        A denormal single/double is loaded even with DE unmasked (the hardware's
        behaviour): DE is then reported like a post-computation exception."""
        self._push_result(flags, v, post_de=True)

    def load_st(self, i: int) -> None:
        if self.is_empty(i):
            self._push_result(self._stack_underflow(), EXT_INDEFINITE)
        else:
            self._push_result(0, self.st(i))

    def load_const(self, name: str) -> None:
        if name == "one":
            v = ONE
        elif name == "zero":
            v = 0
        else:
            m, e = _CONSTS[name]
            # rounded from 66 bits by RC, never flagged inexact
            v, _ = round_pack(EXT, 0, m, e, self.rc, sticky=True, masks=0x3F)
        self._push_result(0, v)

    # ------------------------------------------------------------ stores
    def store_value(self, kind: str, trunc: bool = False) -> tuple[int | None, int]:
        """The bits to store for FST/FIST/FISTTP/FBSTP of ST(0) (kind: m32 m64 m80 i16
        i32 i64 bcd): (bits or None when an unmasked exception suppresses the store,
        flags). Commit with commit_store(flags, pop) after the memory write."""
        if self.is_empty(0):
            flags = self._stack_underflow()
            if ~self.cw & IE:
                return None, flags
            return store_indefinite(kind), flags
        x = self.st(0)
        bits, flags = convert_out(x, kind, self.rc if not trunc else RZ, self.cw)
        unmasked = flags & ~self.cw & 0x3F
        if unmasked & (IE | DE | OE | UE):
            return None, flags
        return bits, flags

    def commit_store(self, flags: int, pop: bool) -> None:
        unmasked = flags & ~self.cw & 0x3F
        if unmasked & (IE | DE | OE | UE):
            self.sw = (self.sw & ~C1) | (flags & (0x3F | SF | C1)) | ES | B
            return
        self.sw = (self.sw & ~C1) | (flags & (0x3F | SF | C1))
        if unmasked:
            self.sw |= ES | B
        if pop:
            self.pop()

    def store_st(self, i: int, pop: bool) -> None:
        """FST/FSTP ST(i)."""
        if self.is_empty(0):
            self._result(self._stack_underflow(), i, EXT_INDEFINITE, pop)
            return
        self._result(0, i, self.st(0), pop)

    # ------------------------------------------------------------ register ops
    def fxch(self, i: int) -> None:
        flags = 0
        a = self.st(0) if not self.is_empty(0) else None
        b = self.st(i) if not self.is_empty(i) else None
        if a is None or b is None:
            flags = self._stack_underflow()
            if self._suppressed(flags):
                return
            a = EXT_INDEFINITE if a is None else a
            b = EXT_INDEFINITE if b is None else b
        else:
            self.sw &= ~C1
        self.set_st(0, b)
        self.set_st(i, a)

    def fchs_fabs(self, abs_: bool) -> None:
        if self.is_empty(0):
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        v = self.st(0)
        self.sw &= ~C1
        self.set_st(0, v & ~SIGN if abs_ else v ^ SIGN)

    def ffree(self, i: int, pop: bool) -> None:
        self.sw &= ~C1
        self.empty |= 1 << self.phys(i)
        if pop:
            self.pop()

    def incdec_top(self, d: int) -> None:
        self.sw &= ~C1
        self.top = (self.top + d) & 7

    def fcmov(self, cond: bool, i: int) -> None:
        if self.is_empty(0) or self.is_empty(i):
            flags = self._stack_underflow()
            if self._suppressed(flags):
                return
            self.set_st(0, EXT_INDEFINITE)  # whatever the condition
            return
        if cond:
            self.set_st(0, self.st(i))

    # ------------------------------------------------------------ one-operand math
    def unary(self, fn) -> None:
        """ST(0) = fn(ST(0)) for FRNDINT, F2XM1 (fn returns (value, flags))."""
        if self.is_empty(0):
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        v, flags = fn(self.st(0), self.rc, self.cw)
        self._result(flags, 0, v)

    def binary_pop(self, fn) -> None:
        """ST(1) = fn(ST(0), ST(1)), pop (FYL2X, FYL2XP1, FPATAN)."""
        if self.is_empty(0) or self.is_empty(1):
            self._result(self._stack_underflow(), 1, EXT_INDEFINITE, True)
            return
        v, flags = fn(self.st(0), self.st(1), self.rc, self.cw)
        self._result(flags, 1, v, True)

    def fscale(self) -> None:
        if self.is_empty(0) or self.is_empty(1):
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        v, flags = fscale(self.st(0), self.st(1), self.rc, self.cw)
        self._result(flags, 0, v)

    def fxtract(self) -> None:
        if self.is_empty(0):
            flags = self._stack_underflow()
            if self._suppressed(flags):
                return
            self.set_st(0, EXT_INDEFINITE)
            self._push_result(flags, EXT_INDEFINITE)
            return
        if not self.empty >> ((self.top - 1) & 7) & 1:  # overflow: both indefinite
            flags = IE | SF | C1
            if self._suppressed(flags):
                return
            self.set_st(0, EXT_INDEFINITE)
            self.push(EXT_INDEFINITE)
            return
        exp, sig, flags = fxtract(self.st(0))
        if self._suppressed(flags):
            return
        self.set_st(0, exp)
        self.push(sig)

    def fprem(self, ieee: bool) -> None:
        if self.is_empty(0) or self.is_empty(1):
            self.sw &= ~C2
            self._result(self._stack_underflow(), 0, EXT_INDEFINITE)
            return
        v, flags, cc = fprem(self.st(0), self.st(1), ieee, self.cw)
        if self._suppressed(flags):
            self.sw &= ~C2
            return
        if cc is None:  # NaN/invalid/special operands: C2 = C1 = 0, C0 and C3 kept
            self.sw = self.sw & ~(C2 | C1)
        else:
            self.sw = (self.sw & ~(C0 | C2 | C3 | C1)) | cc
        self.set_st(0, v)

    def trig(self, which: str) -> None:
        """FSIN, FCOS, FPTAN, FSINCOS: C2=1 (and nothing else changes) when |ST(0)| >= 2**63."""
        pushes = which in ("tan", "sincos")
        self.sw &= ~C2
        if self.is_empty(0):
            flags = self._stack_underflow()
            if self._suppressed(flags):
                return
            self.set_st(0, EXT_INDEFINITE)
            if pushes:
                self._push_result(flags, EXT_INDEFINITE)
            return
        if pushes and not self.empty >> ((self.top - 1) & 7) & 1:
            flags = IE | SF | C1
            if self._suppressed(flags):
                return
            self.set_st(0, EXT_INDEFINITE)
            self.push(EXT_INDEFINITE)
            return
        res = trig(self.st(0), which, self.rc, self.cw)
        if res is None:
            self.sw = (self.sw & ~C1) | C2
            return
        a, b, flags = res
        if self._suppressed(flags):
            return
        self.sw &= ~C2
        self.set_st(0, a)
        if pushes:
            self.push(b)

    # ------------------------------------------------------------ environment
    def env_bytes(self, size32: bool, protected: bool) -> bytes:
        """FNSTENV's 14/28-byte image (SDM vol. 1, figures 8-9 to 8-12)."""
        cw, sw, tw = self.cw, self.status(), self.tag_word()
        fip, fdp, fop = self.fip, self.fdp, self.fop & 0x7FF
        if not protected:  # real mode: 20-bit linear pointers (selector * 16 + offset)
            fip = (self.fcs << 4) + fip
            fdp = (self.fds << 4) + fdp
        if size32:
            if protected:
                words = (cw, sw, tw, fip, self.fcs | (fop << 16), fdp, self.fds)
            else:
                words = (cw, sw, tw, fip & 0xFFFF, ((fip >> 16) << 12) | fop,
                         fdp & 0xFFFF, (fdp >> 16) << 12)  # fmt: skip
            out = b""
            for i, w in enumerate(words):
                hi = 0xFFFF0000 if i < 3 or (not protected and i in (3, 5)) else 0
                if protected and i == 6:
                    hi = 0xFFFF0000
                out += ((w & 0xFFFFFFFF) | hi).to_bytes(4, "little")
            return out
        if protected:
            words = (cw, sw, tw, fip & 0xFFFF, self.fcs, fdp & 0xFFFF, self.fds)
        else:
            words = (cw, sw, tw, fip & 0xFFFF, ((fip >> 16) & 0xF) << 12 | fop,
                     fdp & 0xFFFF, ((fdp >> 16) & 0xF) << 12)  # fmt: skip
        return b"".join((w & 0xFFFF).to_bytes(2, "little") for w in words)

    def load_env(self, data: bytes, size32: bool, protected: bool) -> None:
        n = 4 if size32 else 2
        w = [int.from_bytes(data[i * n : i * n + n], "little") for i in range(7)]
        self.cw = w[0] & 0x1F7F | 0x40
        self.set_status(w[1] & 0xFFFF)
        self.set_tag_word(w[2] & 0xFFFF)
        if protected:
            self.fip, self.fdp = w[3], w[5]
            self.fcs = w[4] & 0xFFFF
            self.fop = (w[4] >> 16) & 0x7FF if size32 else 0
            self.fds = w[6] & 0xFFFF
        else:
            self.fop = w[4] & 0x7FF
            hi_bits = 16 if size32 else 4
            self.fip = (w[3] & 0xFFFF) | (((w[4] >> 12) & ((1 << hi_bits) - 1)) << 16)
            self.fdp = (w[5] & 0xFFFF) | (((w[6] >> 12) & ((1 << hi_bits) - 1)) << 16)
            self.fcs = self.fds = 0
        self._update_es()

    def save_bytes(self, size32: bool, protected: bool) -> bytes:
        """FNSAVE's image: the environment, then ST(0)..ST(7) as 10 bytes each."""
        regs = b"".join(self.st(i).to_bytes(10, "little") for i in range(8))
        return self.env_bytes(size32, protected) + regs

    def restore(self, data: bytes, size32: bool, protected: bool) -> None:
        n = 28 if size32 else 14
        self.load_env(data[:n], size32, protected)
        for i in range(8):
            self.regs[(self.top + i) & 7] = int.from_bytes(
                data[n + 10 * i : n + 10 * i + 10], "little"
            )

    # ------------------------------------------------------------ FXSAVE
    def fxsave_image(self, with_xmm: bool = True) -> bytearray:
        """The 512-byte FXSAVE image (32-bit format, SDM vol. 2, table 3-53)."""
        b = bytearray(512)
        b[0:2] = self.cw.to_bytes(2, "little")
        b[2:4] = self.status().to_bytes(2, "little")
        b[4] = self.abridged_tags()
        b[6:8] = (self.fop & 0x7FF).to_bytes(2, "little")
        b[8:12] = (self.fip & 0xFFFFFFFF).to_bytes(4, "little")
        b[12:14] = self.fcs.to_bytes(2, "little")
        b[16:20] = (self.fdp & 0xFFFFFFFF).to_bytes(4, "little")
        b[20:22] = self.fds.to_bytes(2, "little")
        b[24:28] = self.mxcsr.to_bytes(4, "little")
        b[28:32] = MXCSR_MASK.to_bytes(4, "little")
        for i in range(8):
            b[32 + 16 * i : 42 + 16 * i] = self.st(i).to_bytes(10, "little")
        if with_xmm:
            for i in range(8):
                b[160 + 16 * i : 176 + 16 * i] = self.xmm[i].to_bytes(16, "little")
        return b

    def fxrstor_image(self, b: bytes, with_xmm: bool = True) -> None:
        """Load a 512-byte image (the caller has checked MXCSR's reserved bits)."""
        self.cw = int.from_bytes(b[0:2], "little") & 0x1F7F | 0x40
        self.set_status(int.from_bytes(b[2:4], "little"))
        self.fop = int.from_bytes(b[6:8], "little") & 0x7FF
        self.fip = int.from_bytes(b[8:12], "little")
        self.fcs = int.from_bytes(b[12:14], "little")
        self.fdp = int.from_bytes(b[16:20], "little")
        self.fds = int.from_bytes(b[20:22], "little")
        tags = b[4]
        for i in range(8):
            self.regs[(self.top + i) & 7] = int.from_bytes(b[32 + 16 * i : 42 + 16 * i], "little")
        self.empty = ~tags & 0xFF
        self.mxcsr = int.from_bytes(b[24:28], "little")
        if with_xmm:
            for i in range(8):
                self.xmm[i] = int.from_bytes(b[160 + 16 * i : 176 + 16 * i], "little")
        self._update_es()


def mxcsr_valid(v: int) -> bool:
    return not v & ~MXCSR_MASK & 0xFFFFFFFF


# ====================================================================== value functions
def _nan_result(a: int, b: int, ca: int, cb: int) -> tuple[int, int] | None:
    """The NaN/unsupported outcome of a two-operand operation, if any."""
    if ca == UNSUPPORTED or cb == UNSUPPORTED:
        return EXT_INDEFINITE, IE
    if ca in NANS or cb in NANS:
        return ext_propagate(a, b), IE if SNAN in (ca, cb) else 0
    return None


def _one_nan(a: int, ca: int) -> tuple[int, int] | None:
    if ca == UNSUPPORTED:
        return EXT_INDEFINITE, IE
    if ca in NANS:
        return ext_quiet(a), IE if ca == SNAN else 0
    return None


def _denormal(*classes: int) -> int:
    return DE if DENORMAL in classes else 0


def add(a: int, b: int, sub: bool, fmt, rc: int, masks: int) -> tuple[int, int]:
    ca, cb = ext_class(a), ext_class(b)
    r = _nan_result(a, b, ca, cb)
    if r is not None:
        return r
    if sub:
        b ^= SIGN
    flags = _denormal(ca, cb)
    sa, sb = a >> 79, b >> 79
    if ca == INF or cb == INF:
        if ca == INF and cb == INF and sa != sb:
            return EXT_INDEFINITE, IE | flags
        return (a if ca == INF else b), flags
    if ca == ZERO and cb == ZERO:
        return ext_zero(sa if sa == sb else int(rc == sf.RD)), flags
    _, ma, ea = ext_value(a)
    _, mb, eb = ext_value(b)
    if ma == 0 or mb == 0:  # a zero and a pseudo/denormal nonzero: nothing to align
        m, e = ((-ma if sa else ma), ea) if mb == 0 else ((-mb if sb else mb), eb)
    else:
        m, e = sf.add_exact(sa, ma, ea, sb, mb, eb)
    if m == 0:
        return ext_zero(int(rc == sf.RD)), flags
    v, f = round_pack(fmt, int(m < 0), abs(m), e, rc, masks=masks, scale_unmasked=True)
    return v, flags | f


def mul(a: int, b: int, _sub: bool, fmt, rc: int, masks: int) -> tuple[int, int]:
    ca, cb = ext_class(a), ext_class(b)
    r = _nan_result(a, b, ca, cb)
    if r is not None:
        return r
    flags = _denormal(ca, cb)
    s = (a ^ b) >> 79
    if ca == INF or cb == INF:
        if ca == ZERO or cb == ZERO:
            return EXT_INDEFINITE, IE | flags
        return ext_inf(s), flags
    if ca == ZERO or cb == ZERO:
        return ext_zero(s), flags
    _, ma, ea = ext_value(a)
    _, mb, eb = ext_value(b)
    v, f = round_pack(fmt, s, ma * mb, ea + eb, rc, masks=masks, scale_unmasked=True)
    return v, flags | f


def div(a: int, b: int, fmt, rc: int, masks: int) -> tuple[int, int]:
    ca, cb = ext_class(a), ext_class(b)
    r = _nan_result(a, b, ca, cb)
    if r is not None:
        return r
    flags = _denormal(ca, cb)
    s = (a ^ b) >> 79
    if ca == INF:
        return (EXT_INDEFINITE, IE | flags) if cb == INF else (ext_inf(s), flags)
    if cb == INF:
        return ext_zero(s), flags
    if cb == ZERO:
        if ca == ZERO:
            return EXT_INDEFINITE, IE | flags
        return ext_inf(s), ZE  # a denormal dividend is not reported (as the hardware)
    if ca == ZERO:
        return ext_zero(s), flags
    _, ma, ea = ext_value(a)
    _, mb, eb = ext_value(b)
    m, e, sticky = sf.div_exact(ma, ea, mb, eb)
    v, f = round_pack(fmt, s, m, e, rc, sticky, masks=masks, scale_unmasked=True)
    return v, flags | f


def sqrt(a: int, fmt, rc: int, masks: int) -> tuple[int, int]:
    ca = ext_class(a)
    r = _one_nan(a, ca)
    if r is not None:
        return r
    if ca == ZERO:
        return a, 0
    if a >> 79:
        return EXT_INDEFINITE, IE  # checked before the denormal operand
    flags = _denormal(ca)
    if ca == INF:
        return a, 0
    _, m, e = ext_value(a)
    m, e, sticky = sf.sqrt_exact(m, e)
    v, f = round_pack(fmt, 0, m, e, rc, sticky, masks=masks, scale_unmasked=True)
    return v, flags | f


def compare(a: int, b: int, quiet: bool) -> tuple[int, int]:
    """(relation, flags): 0 a>b, 1 a<b, 2 equal, 3 unordered."""
    ca, cb = ext_class(a), ext_class(b)
    if ca == UNSUPPORTED or cb == UNSUPPORTED:
        return 3, IE
    if ca in NANS or cb in NANS:
        return 3, IE if (not quiet or SNAN in (ca, cb)) else 0
    flags = _denormal(ca, cb)
    if ca == INF or cb == INF:
        ia = (-1 if a >> 79 else 1) if ca == INF else 0
        ib = (-1 if b >> 79 else 1) if cb == INF else 0
        if ia == ib:
            return 2, flags
        if ia or ib:
            return (0 if ia > ib else 1), flags
    r = sf.cmp_values(*ext_value(a), *ext_value(b))
    return (2 if r == 0 else 0 if r > 0 else 1), flags


def fxtract(x: int) -> tuple[int, int, int]:
    """(exponent as a value, significand with exponent 0, flags)."""
    c = ext_class(x)
    r = _one_nan(x, c)
    if r is not None:
        return r[0], r[0], r[1]
    if c == ZERO:
        return ext_inf(1), x, ZE
    if c == INF:
        return ext_inf(0), x, 0
    s, m, e = ext_value(x)
    flags = _denormal(c)
    lead = e + m.bit_length() - 1
    sig = ext_pack(s, EXT_BIAS_, (m << (64 - m.bit_length())) & M64)
    expv, _ = int_to_ext(lead)
    return expv, sig, flags


EXT_BIAS_ = sf.EXT_BIAS


def int_to_ext(n: int) -> tuple[int, int]:
    if n == 0:
        return 0, 0
    s = int(n < 0)
    m = abs(n)
    n_bits = m.bit_length()
    sig = m << (64 - n_bits) if n_bits <= 64 else m >> (n_bits - 64)  # exact: low bits are 0
    return ext_pack(s, n_bits - 1 + sf.EXT_BIAS, sig), 0


def round_int(x: int, rc: int) -> tuple[int, int, bool, bool]:
    """Round a finite x to an integer: (n, sign, inexact, incremented)."""
    s, m, e = ext_value(x)
    if e >= 0:
        return (-(m << e) if s else m << e), s, False, False
    q, inexact, inc = sf._round_at(s, m, e, False, 0, rc)
    return (-q if s else q), s, inexact, inc


def frndint(x: int, rc: int, masks: int) -> tuple[int, int]:
    c = ext_class(x)
    r = _one_nan(x, c)
    if r is not None:
        return r
    if c in (ZERO, INF):
        return x, 0
    flags = _denormal(c)
    if ext_value(x)[2] >= 0:
        return x, flags
    n, s, inexact, inc = round_int(x, rc)
    if n == 0:
        return ext_zero(s), flags | (PE if inexact else 0) | (C1 if inc else 0)
    v, _ = int_to_ext(n)
    return v, flags | (PE if inexact else 0) | (C1 if inc else 0)


def fscale(x: int, y: int, rc: int, masks: int) -> tuple[int, int]:
    cx, cy = ext_class(x), ext_class(y)
    r = _nan_result(x, y, cx, cy)
    if r is not None:
        return r
    flags = _denormal(cx, cy)
    sy = y >> 79
    if cy == INF:
        if cx == ZERO and not sy or cx == INF and sy:
            return EXT_INDEFINITE, IE | flags
        if cx in (ZERO, INF):
            return x, flags
        return (ext_zero(x >> 79) if sy else ext_inf(x >> 79)), flags
    if cx in (ZERO, INF):
        return x, flags
    n, _, _, _ = round_int(y, RZ)
    n = max(-(1 << 20), min(1 << 20, n))
    s, m, e = ext_value(x)
    v, f = round_pack(EXT, s, m, e + n, rc, masks=masks, scale_unmasked=True)
    return v, flags | f


def fprem(x: int, y: int, ieee: bool, masks: int) -> tuple[int, int, int | None]:
    """FPREM/FPREM1: (ST(0) result, flags, condition codes C0 C3 C1 = Q2 Q1 Q0, C2)."""
    cx, cy = ext_class(x), ext_class(y)
    r = _nan_result(x, y, cx, cy)
    if r is not None:
        return r[0], r[1], None
    if cx == INF or cy == ZERO:
        return EXT_INDEFINITE, IE, None  # checked before the denormal operand
    flags = _denormal(cx, cy)
    if cy == INF or cx == ZERO:
        if cx == DENORMAL and x >> 63 & 1:  # a pseudo-denormal comes back normalised
            x |= 1 << 64
        return x, flags, 0
    sx, mx, ex = ext_value(x)
    _, my, ey = ext_value(y)
    lx = ex + mx.bit_length() - 1
    ly = ey + my.bit_length() - 1
    d = lx - ly
    if d >= 64:
        # partial remainder: reduce the exponent difference by 32..63 (Intel: n = 32 +
        # (d mod 32)); C2 = 1 asks the program to loop
        n = 32 + d % 32
        shift = d - n
        # q = trunc((x / y) / 2**shift), r = x - q * y * 2**shift: exact on Python ints
        e = min(ex, ey + shift)
        xi = mx << (ex - e)
        yi = my << (ey + shift - e)
        q = xi // yi
        rem = xi - q * yi
        v, f = _exact_pack(sx, rem, e, masks)
        return v, flags | f, C2
    e = min(ex, ey)
    xi = mx << (ex - e)
    yi = my << (ey - e)
    q, rem = divmod(xi, yi)
    if ieee and (2 * rem > yi or (2 * rem == yi and q & 1)):
        q += 1
        rem -= yi
    s = sx if rem >= 0 else sx ^ 1
    v, f = _exact_pack(s, abs(rem), e, masks) if rem else (ext_zero(sx), 0)
    cc = (C0 if q & 4 else 0) | (C3 if q & 2 else 0) | (C1 if q & 1 else 0)
    return v, flags | f, cc


def _exact_pack(s: int, m: int, e: int, masks: int) -> tuple[int, int]:
    """A remainder: exact in 80 bits, but a denormal one is an underflow (scaled by
    24576 when UE is unmasked, flagged only then since it is exact)."""
    if m == 0:
        return ext_zero(s), 0
    v, f = round_pack(EXT, s, m, e, RN, masks=masks, scale_unmasked=True)
    return v, f & UE


# ------------------------------------------------------------------ conversions out
def store_indefinite(kind: str) -> int:
    return {
        "m32": sf.ieee_indefinite(SINGLE),
        "m64": sf.ieee_indefinite(DOUBLE),
        "m80": EXT_INDEFINITE,
        "i16": 0x8000,
        "i32": 0x80000000,
        "i64": 1 << 63,
        "bcd": 0xFFFFC000000000000000,
    }[kind]


def convert_out(x: int, kind: str, rc: int, masks: int) -> tuple[int, int]:
    """ST(0) converted for a store to memory: (bits, flags)."""
    if kind == "m80":
        return x, 0
    c = ext_class(x)
    if kind in ("m32", "m64"):
        fmt = SINGLE if kind == "m32" else DOUBLE
        if c == UNSUPPORTED:
            return sf.ieee_indefinite(fmt), IE
        s = x >> 79
        if c in NANS:
            f = ((x & M64) >> (63 - fmt.fbits)) & ((1 << fmt.fbits) - 1)
            f |= 1 << (fmt.fbits - 1)
            return sf.ieee_inf(fmt, s) | f, IE if c == SNAN else 0
        if c == INF:
            return sf.ieee_inf(fmt, s), 0
        if c == ZERO:
            return s << (fmt.fbits + fmt.ebits), 0
        _, m, e = ext_value(x)
        v, f = round_pack(fmt, s, m, e, rc, masks=masks)
        return v, f  # a denormal source is not reported by FST (as the hardware)
    if c in (UNSUPPORTED, QNAN, SNAN, INF):
        return store_indefinite(kind), IE
    if c == ZERO:
        return (x >> 79 << 79 if kind == "bcd" else 0), 0  # BCD keeps the sign of -0
    n, _, inexact, inc = round_int(x, rc)
    if kind == "bcd":
        if abs(n) >= 10**18:
            return store_indefinite(kind), IE
        digits = 0
        for i, ch in enumerate(reversed(str(abs(n)))):
            digits |= int(ch) << (4 * i)
        return digits | ((1 << 79) if x >> 79 else 0), (PE if inexact else 0) | (C1 if inc else 0)
    bits = {"i16": 16, "i32": 32, "i64": 64}[kind]
    if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
        return store_indefinite(kind), IE
    return n & ((1 << bits) - 1), (PE if inexact else 0) | (C1 if inc else 0)


def bcd_to_ext(v: int) -> int:
    n = 0
    for i in range(17, -1, -1):
        n = n * 10 + ((v >> (4 * i)) & 0xF)
    if v >> 79:
        return int_to_ext(-n)[0] if n else ext_zero(1)
    return int_to_ext(n)[0]


def load_converted(kind: str, bits: int) -> tuple[int, int]:
    """A memory operand widened to 80 bits: (value, flags)."""
    if kind == "m32":
        return sf.ieee_to_ext(SINGLE, bits)
    if kind == "m64":
        return sf.ieee_to_ext(DOUBLE, bits)
    if kind == "m80":
        return bits, 0
    if kind == "bcd":
        return bcd_to_ext(bits), 0
    size = {"i16": 16, "i32": 32, "i64": 64}[kind]
    if bits >> (size - 1):
        bits -= 1 << size
    return int_to_ext(bits)


# ------------------------------------------------------------------ transcendentals
_F = 256  # fixed-point fraction bits for the series (relative precision is kept by scaling)


def _to_fixed(x: int, f: int) -> int:
    s, m, e = ext_value(x)
    v = sf.fix(m, -e, f)
    return -v if s else v


def _from_fixed(v: int, f: int, rc: int, masks: int, exact: bool = False) -> tuple[int, int]:
    s = int(v < 0)
    r, flags = round_pack(EXT, s, abs(v), -f, rc, sticky=not exact, masks=masks,
                          scale_unmasked=True)  # fmt: skip
    return r, flags


def _lead(x: int) -> int:
    _, m, e = ext_value(x)
    return e + m.bit_length() - 1


def trig(x: int, which: str, rc: int, masks: int) -> tuple[int, int, int] | None:
    """FSIN/FCOS/FPTAN/FSINCOS values: (ST(0), pushed, flags), None if out of range."""
    c = ext_class(x)
    r = _one_nan(x, c)
    if r is not None:
        return r[0], r[0], r[1]
    if c == INF:
        return EXT_INDEFINITE, EXT_INDEFINITE, IE
    flags = _denormal(c)
    if c == ZERO:
        z = x
        return {"sin": (z, 0, flags), "cos": (sf.ext_pack(0, 16383, 1 << 63), 0, flags),
                "tan": (z, ONE, flags), "sincos": (z, ONE, flags)}[which]  # fmt: skip
    if _lead(x) >= 63:
        return None
    s, m, e = ext_value(x)
    lead = e + m.bit_length() - 1
    # ~_F significant bits, and for tiny arguments enough that the x**3 term still shows
    # (it decides the rounding direction when sin x rounds to x)
    f = _F + 3 * max(0, -lead)
    # reduce by the 66-bit pi/2: x = k * pi66/2 + r, exactly
    pio2_m, pio2_e = sf.PI66, -65  # pi66/2 = PI66 * 2**-65
    xm = m << (e - pio2_e) if e >= pio2_e else None
    if xm is None or lead < -1:
        k = 0
        rfix = sf.fix(m, -e, f)
    else:
        k, rem = divmod(xm + (pio2_m >> 1), pio2_m)
        rem -= pio2_m >> 1
        # rem * 2**pio2_e is the reduced argument, |rem| <= pio2_m/2
        rfix = sf.fix(rem, -pio2_e, f)
    if s:
        rfix = -rfix
        k = -k
        if k and not (xm is None or lead < -1):
            pass
    sn, cs = sf.sin_cos_fixed(rfix, f)
    q = k & 3
    sinv = (sn, cs, -sn, -cs)[q]
    cosv = (cs, -sn, -cs, sn)[q]
    one_exact = sf.pack(EXT, 0, 1, 0)
    if which == "sin":
        v, fl = _from_fixed(sinv, f, rc, masks)
        return v, 0, flags | fl | PE
    if which == "cos":
        v, fl = _from_fixed(cosv, f, rc, masks)
        return v, 0, flags | fl | PE
    if which == "sincos":
        sv, fl1 = _from_fixed(sinv, f, rc, masks)
        cv, fl2 = _from_fixed(cosv, f, rc, masks)
        # ST(1) = sin, ST(0) = cos; C1 from the cosine (the top result)
        return sv, cv, flags | fl1 | fl2 | PE
    # tan = sin/cos at f fraction bits
    t = (sinv << f) // cosv if cosv else 0
    v, fl = _from_fixed(t, f, rc, masks)
    return v, one_exact, flags | fl | PE


def f2xm1(x: int, rc: int, masks: int) -> tuple[int, int]:
    c = ext_class(x)
    r = _one_nan(x, c)
    if r is not None:
        return r
    flags = _denormal(c)
    if c == ZERO:
        return x, flags
    if c == INF:
        return (ext_pack(1, 16383, 1 << 63) if x >> 79 else x), flags
    lead = _lead(x)
    if lead >= 0:  # outside -1..+1 the SDM leaves the result undefined; exact at +-1
        n, _, inexact, _ = round_int(x, RZ)
        if not inexact and n in (1, -1):
            return (ONE if n == 1 else ext_pack(1, 16382, 1 << 63)), flags
        if lead >= 15:  # 2**x - 1 is -1 or overflows
            if x >> 79:
                return ext_pack(1, 16383, 1 << 63), flags | PE
            v, fl = round_pack(EXT, 0, 1, 1 << 15, rc, masks=masks, scale_unmasked=True)
            return v, flags | fl
        # 2**x - 1 = 2**n * (1 + (2**frac - 1)) - 1, frac in [0, 1)
        s, m, e = ext_value(x)
        f = _F + 32
        xf = sf.fix(m, -e, f)
        xf = -xf if s else xf
        n = xf >> f
        frac = xf - (n << f)
        v = sf.exp2m1_fixed(frac, f) + (1 << f)
        v = (v << n if n >= 0 else v >> -n) - (1 << f)
        res, fl = _from_fixed(v, f, rc, masks)
        return res, flags | fl | PE
    f = _F + max(0, -lead)
    v = sf.exp2m1_fixed(_to_fixed(x, f), f)
    res, fl = _from_fixed(v, f, rc, masks)
    return res, flags | fl | PE


def _log2_fixed(x: int, f: int) -> tuple[int, bool]:
    """log2(x) * 2**f for positive finite x; (value, exact)."""
    _, m, e = ext_value(x)
    return _log2_me(m, e, f)


def _log2_me(m: int, e: int, f: int) -> tuple[int, bool]:
    """log2(m * 2**e) * 2**f for m > 0; (value, exact)."""
    lead = e + m.bit_length() - 1
    norm = (
        m << (f - (m.bit_length() - 1))
        if m.bit_length() - 1 <= f
        else m >> (m.bit_length() - 1 - f)
    )
    # norm / 2**f in [1, 2): log2 = lead + log2(norm)
    t = norm - (1 << f)
    if t == 0:
        return lead << f, True
    if t > (1 << f) >> 1:  # use 1 + t' with t' = norm/2 - 1 < 0
        t2 = (norm >> 1) - (1 << f)
        return ((lead + 1) << f) + sf.log2_fixed_1p(t2, f), False
    return (lead << f) + sf.log2_fixed_1p(t, f), False


def fyl2x(x: int, y: int, rc: int, masks: int) -> tuple[int, int]:
    """ST(1) * log2(ST(0))."""
    cx, cy = ext_class(x), ext_class(y)
    r = _nan_result(x, y, cx, cy)
    if r is not None:
        return r
    sx, sy = x >> 79, y >> 79
    if sx and cx != ZERO:
        return EXT_INDEFINITE, IE  # checked before the denormal operand
    flags = _denormal(cx, cy)
    if cx == ZERO:
        if cy == ZERO:
            return EXT_INDEFINITE, IE
        if cy == INF:
            return ext_inf(sy ^ 1), 0  # -inf * inf: no #Z (the hardware's answer)
        return ext_inf(sy ^ 1), ZE  # -inf * y, checked before the denormal operand
    if cx == INF:
        if cy == ZERO:
            return EXT_INDEFINITE, IE | flags
        return ext_inf(sy), flags
    is_one = x == ONE
    if cy == INF:
        if is_one:
            return EXT_INDEFINITE, IE | flags
        return ext_inf(sy ^ int(_lead(x) < 0)), flags
    if is_one:
        return ext_zero(sy), flags  # log2(1) = +0, times y
    if cy == ZERO:
        return ext_zero(sy ^ int(_lead(x) < 0)), flags
    f = _F + 64
    lg, exact = _log2_fixed(x, f)
    v, fl = _times(y, lg, f, rc, masks, exact)
    return v, flags | fl | PE  # the hardware reports #P even for an exact log2


def _times(y: int, lg: int, f: int, rc: int, masks: int, exact: bool = False) -> tuple[int, int]:
    """y * (lg / 2**f), rounded once (FYL2X, FYL2XP1)."""
    sy, my, ey = ext_value(y)
    prod = lg * my
    return round_pack(EXT, sy ^ int(prod < 0), abs(prod), ey - f, rc, sticky=not exact,
                      masks=masks, scale_unmasked=True)  # fmt: skip


def fyl2xp1(x: int, y: int, rc: int, masks: int) -> tuple[int, int]:
    """ST(1) * log2(ST(0) + 1), |ST(0)| < 1 - sqrt(2)/2."""
    cx, cy = ext_class(x), ext_class(y)
    r = _nan_result(x, y, cx, cy)
    if r is not None:
        return r
    sx, sy = x >> 79, y >> 79
    if cx == INF:  # beyond the SDM's domain: what the hardware does
        if sx or cy == ZERO:
            return EXT_INDEFINITE, IE
        return ext_inf(sy), _denormal(cy)
    flags = _denormal(cx, cy)
    if cx == ZERO:
        if cy == INF:
            return EXT_INDEFINITE, IE | flags
        return ext_zero(sx ^ sy), flags
    if cy == INF:
        return ext_inf(sy ^ sx), flags
    if cy == ZERO:
        return ext_zero(sx ^ sy), flags
    lead = _lead(x)
    if lead >= -2:  # |x| >= 1/4: beyond the series' range (and beyond the SDM's domain)
        s, m, e = ext_value(x)
        e1 = min(e, 0)
        one_plus = (1 << -e1) + (-(m << (e - e1)) if s else (m << (e - e1)))
        if one_plus <= 0:
            return EXT_INDEFINITE, IE | flags
        f = _F + 64
        lg, _exact = _log2_me(one_plus, e1, f)
    else:
        f = _F + max(0, -lead)
        lg = sf.log2_fixed_1p(_to_fixed(x, f), f)
    v, fl = _times(y, lg, f, rc, masks)
    return v, flags | fl | PE


def fpatan(x: int, y: int, rc: int, masks: int) -> tuple[int, int]:
    """atan(ST(1) / ST(0)) with the quadrant of (ST(0), ST(1)); x = ST(0), y = ST(1)."""
    cx, cy = ext_class(x), ext_class(y)
    r = _nan_result(x, y, cx, cy)
    if r is not None:
        return r
    flags = _denormal(cx, cy)
    sx, sy = x >> 79, y >> 79
    f = _F
    pi = sf.pi_fixed(f)

    def const(v: int) -> tuple[int, int]:
        res, fl = _from_fixed(-v if sy else v, f, rc, masks)
        return res, flags | fl | PE

    if cy == ZERO:
        if sx:
            return const(pi)
        return ext_zero(sy), flags
    if cx == ZERO:
        return const(pi >> 1)
    if cx == INF and cy == INF:
        return const(3 * pi >> 2) if sx else const(pi >> 2)
    if cx == INF:
        return const(pi) if sx else (ext_zero(sy), flags)
    if cy == INF:
        return const(pi >> 1)
    _, mx, ex = ext_value(x)
    _, my, ey = ext_value(y)
    # ratio = |y| / |x| as fixed point with relative precision
    swap = _gt(my, ey, mx, ex)
    if swap:
        num, en, den, ed = mx, ex, my, ey
    else:
        num, en, den, ed = my, ey, mx, ex
    # t = num/den <= 1
    lead_t = (num.bit_length() + en) - (den.bit_length() + ed)
    ff = f + 3 * max(0, -lead_t) + 2  # atan t = t - t**3/3: keep the t**3 term visible
    sh = ff + en - ed
    t = (num << sh) // den if sh >= 0 else (num // (den << -sh))
    a = sf.atan_fixed(t, ff) if t else 0
    pi_ff = sf.pi_fixed(ff)
    if swap:
        a = (pi_ff >> 1) - a
    if sx:
        a = pi_ff - a
    if sy:
        a = -a
    res, fl = _from_fixed(a, ff, rc, masks)
    return res, flags | fl | PE


def _gt(ma: int, ea: int, mb: int, eb: int) -> bool:
    e = min(ea, eb)
    return (ma << (ea - e)) > (mb << (eb - e))
