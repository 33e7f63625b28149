"""Block compiler: a hot basic block becomes one Python function built from source.

The common 32-bit-code forms (MOV, ALU with ADC/SBB, TEST, NOT/NEG, INC/DEC, SHL/SHR/SAR
by an immediate or CL, ROL/ROR, BT/BTS/BTR/BTC, MUL/IMUL, PUSH/POP, LEA, MOVZX/MOVSX,
XCHG, BSWAP, CMOVcc/SETcc, Jcc, JMP, CALL, RET, LEAVE, LOOP), with 8/16/32-bit operands
and segment overrides, are re-decoded here from the instruction bytes and emitted
inline: the opcode table (optable.py, column `jit`) names the Emitter method of each
opcode and the ModRM extensions it inlines. Everything else calls the instruction's
closure from decode/.

Inside a block the guest's registers live in Python locals (e0..e7; segment bases in
g0..g5) and the lazy-flag state stays in the locals of the instruction that set it:
nothing is stored on the CPU object until the block ends, a closure runs, or a fault
leaves the block. A condition (Jcc, SETcc, ADC's carry) is computed straight from the
setter's operands. Closures see an exact CPU: dirty registers and the live flag state
are written back before each call and the locals reloaded after it.

A fault inside the block leaves EIP at the faulting instruction: `_i` holds the index of
the instruction running, and the handler writes back the registers, the flag state live
at that instruction (table LIVE), and that instruction's address. Inline code does all
of an instruction's memory accesses before it changes a register, so a faulting
instruction leaves no trace. A closure that faults has the exact CPU state (written back
before its call, and what it did before the fault, as REP MOVS's progress): the handler
then writes back nothing but EIP.

A block whose last jump leads back to its own first instruction loops inside its
function (up to LOOP_LIMIT instructions per call) without returning to the dispatcher.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from boite.accel.emu.arch import DS, MASK, PARITY, SEG_PREFIX, SEGCHK, SIGN, SS, STACK16, CpuFault
from boite.accel.emu.optable import BY_OPCODE, reg_mask

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

M = 0xFFFFFFFF
_DEBUG = os.environ.get("BOITE_EMU_JIT_DEBUG") == "1"
LOOP_LIMIT = 512  # guest instructions one call of a self-looping block may run
# ALU group: symbol, lazy kind. ADC (2) and SBB (3) add the carry in.
_ALU = {0: ("+", "add"), 1: ("|", "logic"), 2: ("+", "add"), 3: ("-", "sbb"),
        4: ("&", "logic"), 5: ("-", "sub"), 6: ("^", "logic"), 7: ("-", "sub")}  # fmt: skip
_LOP = {"add": 1, "sub": 2, "sbb": 2, "logic": 3, "inc": 4, "dec": 5}
_RELOAD = "\x00reload"  # placeholder: reload the locals after a closure call
_SYNC = "\x00sync"  # placeholder: write back the dirty registers before a closure call
_EXIT = "\x00exit"  # placeholder: return from a side exit, after N instructions


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def u8(self) -> int:
        v = self.d[self.p]
        self.p += 1
        return v

    def s8(self) -> int:
        v = self.u8()
        return v - 256 if v & 0x80 else v

    def imm(self, size: int) -> int:
        """A little-endian immediate of `size` bytes (IndexError past the end)."""
        if self.p + size > len(self.d):
            raise IndexError
        v = int.from_bytes(self.d[self.p : self.p + size], "little")
        self.p += size
        return v

    def u16(self) -> int:
        return self.imm(2)

    def u32(self) -> int:
        return self.imm(4)


class Setter:
    """The flag state of an inline instruction, held in its locals."""

    __slots__ = ("kind", "a", "b", "res", "size", "cf", "idx", "base", "pmask")

    def __init__(self, kind: str, a: str, b: str, res: str, size: int, cf: str, idx: int):
        self.kind = kind  # add sub sbb logic inc dec eager part
        # eager: res is an expression of EFLAGS bits; part: a local holding them
        self.a, self.b, self.res = a, b, res
        self.size = size
        self.cf = cf  # inc/dec: source for the carry they keep (evaluated lazily)
        self.idx = idx
        self.base: Setter | None = None  # part: the state whose other flags stay
        self.pmask = 0  # part: the flag bits this instruction replaces

    def sync(self) -> str:
        """Source storing this state into the CPU's lazy flags."""
        if self.kind == "eager":
            return f"c.fl = (c.fl & -2262) | {self.res}; c.lop = 0"  # -2262 == ~0x8D5
        if self.kind == "part":
            pre = self.base.sync() + "; " if self.base is not None else ""
            return f"{pre}c.fl = (c.get_flags() & {~self.pmask}) | {self.res}; c.lop = 0"
        m = MASK[self.size]
        lop = _LOP[self.kind]
        if self.kind == "logic":
            return f"c.lop = 3; c.lres = {self.res}; c.lmask = {m}"
        s = f"c.lop = {lop}; c.la = {self.a}; c.lb = {self.b}; c.lres = {self.res}; c.lmask = {m}"
        if self.kind in ("inc", "dec"):
            # The kept carry first: it may read the CPU's state this overwrites.
            s = f"c.lcf = {self.cf}; " + s
        return s

    def flag(self, name: str) -> str:
        """A truth-valued expression for one arithmetic flag."""
        k, a, b, res = self.kind, self.a, self.b, self.res
        m, sign = MASK[self.size], SIGN[self.size]
        bit = dict(cf=1, pf=4, zf=0x40, sf=0x80, of=0x800)[name]
        if k == "eager" or (k == "part" and self.pmask & bit):
            return f"({res} & {bit})"
        if k == "part":
            if self.base is not None:
                return self.base.flag(name)
            return f"(c.get_flags() & {bit})"
        if name == "pf":
            return f"PAR[{res} & 255]"
        if name == "zf":
            return f"{res} == 0" if k == "logic" else f"({res} & {m}) == 0"
        if name == "sf":
            return f"({res} & {sign})"
        if k == "logic":
            return "0"
        if name == "cf":
            if k == "add":
                return f"{res} > {m}"
            if k in ("sub", "sbb"):
                return f"{res} < 0"
            return self.cf
        # OF
        if k == "add":
            return f"(({a} ^ {res}) & ({b} ^ {res}) & {sign})"
        if k in ("sub", "sbb"):
            return f"(({a} ^ {b}) & ({a} ^ {res}) & {sign})"
        if k == "inc":
            return f"({res} & {m}) == {sign}"
        return f"({res} & {m}) == {sign - 1}"


class Emitter:
    """Turns one instruction's bytes into inline source, or None (use the closure)."""

    def __init__(self, seg_nonflat: int = 0, stack32: bool = True) -> None:
        self.k = 0
        self.seg_nonflat = seg_nonflat  # CS/FS/GS overrides through these stay closures
        self.stack32 = stack32  # SS is 32-bit (part of mode_key): stack forms inline
        self.live: Setter | None = None
        self.refs: set[str] = set()  # locals this instruction uses (e0..e7, g0..g5)
        self.dirty: set[int] = set()  # registers written since the last write-back
        self.written: set[int] = set()  # registers written anywhere in the block
        self.c_flag_read = False  # read the CPU's flags while no inline setter was live
        self.setters: list[Setter] = []

    # -- registers and operands ------------------------------------------------------
    def get(self, n: int, size: int) -> str:
        if size == 1 and n >= 4:
            self.refs.add(f"e{n - 4}")
            return f"((e{n - 4} >> 8) & 255)"
        self.refs.add(f"e{n}")
        if size == 4:
            return f"e{n}"
        return f"(e{n} & {MASK[size]})"

    def put(self, n: int, size: int, val: str) -> str:
        if size == 1 and n >= 4:
            n -= 4
            self._wrote(n)
            return f"e{n} = (e{n} & 0xFFFF00FF) | (({val}) << 8)"
        self._wrote(n)
        if size == 4:
            return f"e{n} = {val}"
        if size == 2:
            return f"e{n} = (e{n} & 0xFFFF0000) | ({val})"
        return f"e{n} = (e{n} & 0xFFFFFF00) | ({val})"

    def _wrote(self, n: int) -> None:
        self.refs.add(f"e{n}")
        self.dirty.add(n)
        self.written.add(n)

    def seg(self, s: int) -> str:
        self.refs.add(f"g{s}")
        return f"g{s}"

    def ea(self, bs: _Bytes, mod: int, rm: int, over: int | None, lea: bool = False) -> str:
        """Source for the linear address of a 32-bit ModRM memory operand (for LEA, the
        offset alone)."""
        base, idx, sh = rm, -1, 0
        if rm == 4:
            sib = bs.u8()
            sh, idx, base = sib >> 6, (sib >> 3) & 7, sib & 7
            if idx == 4:
                idx = -1
        if base == 5 and mod == 0:
            base = -1
            d = bs.u32()
        else:
            d = 0 if mod == 0 else bs.s8() if mod == 1 else _s32(bs.u32())
        s = over if over is not None else SS if base in (4, 5) else DS
        parts = [] if lea else [self.seg(s)]
        if base >= 0:
            parts.append(self.get(base, 4))
        if idx >= 0:
            r = self.get(idx, 4)
            parts.append(f"({r} << {sh})" if sh else r)
        if d or not parts:
            parts.append(str(d))
        return "((" + " + ".join(parts) + ") & 0xFFFFFFFF)"

    def operand(self, bs: _Bytes, mod: int, rm: int, over: int | None) -> tuple[str, Any]:
        return ("r", rm) if mod == 3 else ("m", self.ea(bs, mod, rm, over))

    # -- memory ----------------------------------------------------------------------
    @staticmethod
    def load(dst: str, addr: str, size: int) -> list[str]:
        """dst = guest memory at linear addr, through the TLB inline (rdN on a miss or an
        unaligned word)."""
        lines = [f"_a = {addr}", "_p = rt.get(_a >> 12)"]
        if size == 1:
            return lines + [f"{dst} = ram[_p | (_a & 4095)] if _p is not None else rd8(_a)"]
        sh = size >> 1
        return lines + [
            f"{dst} = M{8 * size}[(_p | (_a & 4095)) >> {sh}] if _p is not None and not _a & "
            f"{size - 1} else rd{8 * size}(_a)"
        ]

    @staticmethod
    def store(val: str, size: int, addr: str | None = None) -> list[str]:
        """Guest memory at linear addr (or the _a of a preceding load) = val."""
        lines = ([] if addr is None else [f"_a = {addr}"]) + ["_p = wt.get(_a >> 12)"]
        if size == 1:
            fast, guard = f"ram[_p | (_a & 4095)] = {val}", ""
        else:
            fast = f"M{8 * size}[(_p | (_a & 4095)) >> {size >> 1}] = {val}"
            guard = f" and not _a & {size - 1}"
        return lines + [
            f"if _p is not None{guard}:",
            f"    {fast}",
            "else:",
            f"    wr{8 * size}(_a, {val})",
        ]

    def push(self, val: str) -> list[str]:
        """PUSH of a dword on a 32-bit stack: memory first, then ESP."""
        t = f"t{self.k}"
        self.refs.update(("e4", "g2"))
        self._wrote(4)
        return [
            f"{t} = (e4 - 4) & 0xFFFFFFFF",
            *self.store(val, 4, f"(g2 + {t}) & 0xFFFFFFFF"),
            f"e4 = {t}",
        ]

    def pop(self, dst: str) -> list[str]:
        """dst = POP dword; the caller stores dst where it goes, after ESP moved."""
        self.refs.update(("e4", "g2"))
        self._wrote(4)
        return [*self.load(dst, "(g2 + e4) & 0xFFFFFFFF", 4), "e4 = (e4 + 4) & 0xFFFFFFFF"]

    # -- flags -----------------------------------------------------------------------
    def carry(self) -> str:
        """Source for CF as 0/1 from the live state."""
        if self.live is None:
            self.c_flag_read = True
            return "c.get_cf()"
        if self.live.kind == "logic":
            return "0"
        return f"(1 if {self.live.flag('cf')} else 0)"

    def cond(self, cc: int) -> str:
        """Source for condition cc (0..15), from the live setter's locals if there is one."""
        s = self.live
        if s is None:
            self.c_flag_read = True
            return f"c.cond({cc})"
        k = cc >> 1
        cond = None
        if s.kind == "sub":
            sign = SIGN[s.size]
            if k == 1:
                cond = f"{s.a} < {s.b}"
            elif k == 3:
                cond = f"{s.a} <= {s.b}"
            elif k == 6:
                cond = f"({s.a} ^ {sign}) < ({s.b} ^ {sign})"
            elif k == 7:
                cond = f"({s.a} ^ {sign}) <= ({s.b} ^ {sign})"
        elif s.kind == "logic":
            if k in (0, 1):
                cond = "False"
            elif k == 3:
                cond = f"{s.res} == 0"
            elif k == 6:
                cond = f"({s.res} & {SIGN[s.size]})"
            elif k == 7:
                cond = f"({s.res} & {SIGN[s.size]}) or {s.res} == 0"
        if cond is None:
            fl = s.flag
            if k == 0:
                cond = fl("of")
            elif k == 1:
                cond = fl("cf")
            elif k == 2:
                cond = fl("zf")
            elif k == 3:
                cond = f"({fl('cf')}) or ({fl('zf')})"
            elif k == 4:
                cond = fl("sf")
            elif k == 5:
                cond = fl("pf")
            elif k == 6:
                cond = f"(not {fl('sf')}) != (not {fl('of')})"
            else:
                cond = f"({fl('zf')}) or (not {fl('sf')}) != (not {fl('of')})"
        return f"(not ({cond}))" if cc & 1 else f"({cond})"

    def set_flags(self, kind: str, a: str, b: str, res: str, size: int, cf: str = "") -> None:
        s = Setter(kind, a, b, res, size, cf, len(self.setters))
        self.setters.append(s)
        self.live = s

    def set_part(self, q: str, pmask: int, size: int) -> None:
        """Flags where only `pmask` bits change (held in local q); the rest stay."""
        base = self.live
        if base is None:
            self.c_flag_read = True
        self.set_flags("part", "", "", q, size)
        assert self.live is not None
        self.live.base = base
        self.live.pmask = pmask

    def to_cpu(self) -> list[str]:
        """Store the live flag state into the CPU now (before code that works on it there)."""
        if self.live is None:
            self.c_flag_read = True
            return []
        line = self.live.sync()
        self.live = None
        return [line]

    # -- instructions ----------------------------------------------------------------
    def emit(self, raw: bytes, nxt: int) -> tuple[list[str], bool] | None:
        """Returns (lines, may_fault) or None when the instruction is not inlined: the
        opcode table (optable.Op.jit) names the method for each opcode and the ModRM reg
        fields it inlines."""
        bs = _Bytes(raw)
        over = None
        size = 4
        while True:
            op = bs.u8()
            if op in SEG_PREFIX:
                over = SEG_PREFIX[op]
                if self.seg_nonflat >> over & 1:
                    return None  # checked on each access by the closure (mode_key has it)
            elif op == 0x66:
                size = 2
            elif op in (0x67, 0xF0, 0xF2, 0xF3):
                return None
            else:
                break
        if op == 0x0F:
            op = bs.u8()
            entry = _JIT_0F[op]
        else:
            entry = _JIT_1B[op]
        if entry is None:
            return None
        method, regs = entry
        if regs != 0xFF and not regs >> ((bs.d[bs.p] >> 3) & 7) & 1:
            return None
        return method(self, bs, op, over, size, nxt, f"a{self.k}")

    # One method per opcode group (the `jit` column of the opcode table), each with the
    # arguments (bytes after the opcode, opcode, segment override, operand size, next
    # EIP, the instruction's scratch local).
    def j_alu(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        alu = (op >> 3) & 7
        form = op & 7
        sz = 1 if form in (0, 2, 4) else size
        if form >= 4:
            return self._alu(alu, ("r", 0), ("i", bs.imm(sz)), sz)
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        other = self.operand(bs, mod, rm, over)
        if form < 2:
            return self._alu(alu, other, ("r", reg), sz)
        return self._alu(alu, ("r", reg), other, sz)

    def j_grp1(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, alu, rm = m >> 6, (m >> 3) & 7, m & 7
        sz = 1 if op in (0x80, 0x82) else size
        dst = self.operand(bs, mod, rm, over)
        imm = bs.s8() & MASK[sz] if op == 0x83 else bs.imm(sz)
        return self._alu(alu, dst, ("i", imm), sz)

    def j_test(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if op in (0xA8, 0xA9):
            sz = 1 if op == 0xA8 else size
            return self._alu(4, ("r", 0), ("i", bs.imm(sz)), sz, test=True)
        sz = 1 if op == 0x84 else size
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        return self._alu(4, self.operand(bs, mod, rm, over), ("r", reg), sz, test=True)

    def j_grp3(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op == 0xF6 else size
        m = bs.u8()
        mod, sub, rm = m >> 6, (m >> 3) & 7, m & 7
        dst = self.operand(bs, mod, rm, over)
        if sub in (0, 1):
            return self._alu(4, dst, ("i", bs.imm(sz)), sz, test=True)
        if sub in (2, 3):
            return self._notneg(sub == 3, dst, sz)
        if sz == 4:  # MUL/IMUL r/m32
            return self._mul(sub == 5, dst)
        return None

    def j_mov(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op in (0x88, 0x8A) else size
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        if mod == 3:
            d, s = (rm, reg) if op in (0x88, 0x89) else (reg, rm)
            return [self.put(d, sz, self.get(s, sz))], False
        ea = self.ea(bs, mod, rm, over)
        if op in (0x88, 0x89):
            return self.store(self.get(reg, sz), sz, ea), True
        return [*self.load(a, ea, sz), self.put(reg, sz, a)], True

    def j_mov_mi(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op == 0xC6 else size
        m = bs.u8()
        mod, rm = m >> 6, m & 7
        if mod == 3:
            return [self.put(rm, sz, str(bs.imm(sz)))], False
        ea = self.ea(bs, mod, rm, over)
        return self.store(str(bs.imm(sz)), sz, ea), True

    def j_mov_ri(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op < 0xB8 else size
        return [self.put(op & 7, sz, str(bs.imm(sz)))], False

    def j_moffs(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op in (0xA0, 0xA2) else size
        ea = f"(({self.seg(over if over is not None else DS)} + {bs.u32()}) & 0xFFFFFFFF)"
        if op <= 0xA1:
            return [*self.load(a, ea, sz), self.put(0, sz, a)], True
        return self.store(self.get(0, sz), sz, ea), True

    def j_lea(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        if mod == 3:
            return None
        off = self.ea(bs, mod, rm, None, lea=True)
        return [self.put(reg, size, off if size == 4 else f"{off} & 65535")], False

    def j_incdec_r(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        return self._incdec(op >= 0x48, ("r", op & 7), size)

    def j_grp45(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if op == 0xFF and not self.stack32:
            return None  # a 16-bit SS: c.push/c.pop in the closure
        m = bs.u8()
        mod, sub, rm = m >> 6, (m >> 3) & 7, m & 7
        sz = 1 if op == 0xFE else size
        if sub in (0, 1):
            return self._incdec(sub == 1, self.operand(bs, mod, rm, over), sz)
        if size != 4:
            return None
        lines, _ = self._value(a, self.operand(bs, mod, rm, over), 4)
        if sub == 6:
            return lines + self.push(a), True
        if sub == 2:
            lines += self.push(str(nxt))
        return lines + [f"c.eip = {a}"], True

    def j_push_r(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        return self.push(self.get(op & 7, 4)), True

    def j_pop_r(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        return [*self.pop(a), self.put(op & 7, 4, a)], True

    def j_push_i(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        imm = bs.u32() if op == 0x68 else bs.s8() & M
        return self.push(str(imm)), True

    def j_leave(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        # ESP = EBP, then POP EBP; the load comes first so a fault changes nothing.
        self.refs.update(("e4", "e5", "g2"))
        self._wrote(4)
        self._wrote(5)
        return [
            *self.load(a, "(g2 + e5) & 0xFFFFFFFF", 4),
            "e4 = (e5 + 4) & 0xFFFFFFFF",
            f"e5 = {a}",
        ], True

    def j_xchg(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op == 0x86 else size
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        if mod == 3:
            return [
                f"{a} = {self.get(rm, sz)}",
                self.put(rm, sz, self.get(reg, sz)),
                self.put(reg, sz, a),
            ], False
        ea = self.ea(bs, mod, rm, over)
        return [
            *self.load(a, ea, sz),
            *self.store(self.get(reg, sz), sz),
            self.put(reg, sz, a),
        ], True

    def j_xchg_ax(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        n = op & 7
        return [f"{a} = {self.get(0, 4)}", self.put(0, 4, self.get(n, 4)), self.put(n, 4, a)], (
            False
        )

    def j_nop(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        return [], False

    def j_cdq(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        return [self.put(2, 4, f"0xFFFFFFFF if {self.get(0, 4)} & 0x80000000 else 0")], False

    def j_cwde(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        return [
            f"{a} = {self.get(0, 2)}",
            self.put(0, 4, f"{a} | 0xFFFF0000 if {a} & 0x8000 else {a}"),
        ], False

    def j_grp2(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op in (0xC0, 0xD0) else size
        m = bs.u8()
        mod, sop, rm = m >> 6, (m >> 3) & 7, m & 7
        dst = self.operand(bs, mod, rm, over)
        cnt = (bs.u8() if op in (0xC0, 0xC1) else 1) & 31
        if cnt == 0:
            return None
        if sop in (0, 1):
            return self._rotate(sop, dst, cnt, sz)
        if cnt > sz * 8:
            return None
        return self._shift(sop, dst, cnt, sz)

    def j_shift_cl(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        sz = 1 if op == 0xD2 else size
        m = bs.u8()
        mod, sop, rm = m >> 6, (m >> 3) & 7, m & 7
        return self._shift_cl(sop, self.operand(bs, mod, rm, over), sz)

    def j_imul3(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        src = self.operand(bs, mod, rm, over)
        imm = bs.imm(size) if op == 0x69 else bs.s8()
        if op == 0x69:
            imm = imm - (1 << (8 * size)) if imm & SIGN[size] else imm
        return self._imul(reg, src, str(imm), size)

    def j_jcc(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        d = bs.s8()
        return [f"c.eip = {(nxt + d) & M} if {self.cond(op & 15)} else {nxt}"], False

    def j_jmp(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        d = bs.s8() if op == 0xEB else _s32(bs.u32())
        return [f"c.eip = {(nxt + d) & M}"], False

    def j_loop(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        d = bs.s8()
        self._wrote(1)
        return [
            "e1 = (e1 - 1) & 0xFFFFFFFF",
            f"c.eip = {(nxt + d) & M} if e1 else {nxt}",
        ], False

    def j_call(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        d = _s32(bs.u32())
        return [*self.push(str(nxt)), f"c.eip = {(nxt + d) & M}"], True

    def j_ret(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4 or not self.stack32:
            return None
        lines = self.pop(a)
        if op == 0xC2:
            imm = bs.u16()
            lines.append(f"e4 = (e4 + {imm}) & 0xFFFFFFFF")
        return [*lines, f"c.eip = {a}"], True

    # -- 0F map
    def j_movx(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        ssz = 1 if op in (0xB6, 0xBE) else 2
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        src = self.operand(bs, mod, rm, over)
        lines, fault = self._value(a, src, ssz)
        if op in (0xBE, 0xBF):
            sign = SIGN[ssz]
            val = f"({a} - {sign << 1} if {a} & {sign} else {a}) & {MASK[size]}"
        else:
            val = a
        return [*lines, self.put(reg, size, val)], fault

    def j_setcc(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, rm = m >> 6, m & 7
        val = f"(1 if {self.cond(op & 15)} else 0)"
        dst = self.operand(bs, mod, rm, over)
        if dst[0] == "r":
            return [self.put(rm, 1, val)], False
        return self.store(val, 1, dst[1]), True

    def j_cmov(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        lines, fault = self._value(a, self.operand(bs, mod, rm, over), size)
        return [*lines, f"if {self.cond(op & 15)}:", "    " + self.put(reg, size, a)], fault

    def j_jcc0f(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        d = _s32(bs.u32())
        return [f"c.eip = {(nxt + d) & M} if {self.cond(op & 15)} else {nxt}"], False

    def j_bswap(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        if size != 4:
            return None
        n = op & 7
        v = self.get(n, 4)
        return [self.put(n, 4, f"int.from_bytes({v}.to_bytes(4, 'little'), 'big')")], False

    def j_imul2(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        return self._imul(reg, self.operand(bs, mod, rm, over), None, size)

    def j_bt(self, bs: _Bytes, op: int, over, size: int, nxt: int, a: str):
        m = bs.u8()
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        if op == 0xBA:
            dst = self.operand(bs, mod, rm, over)
            return self._bt(reg - 4, dst, str(bs.u8() & (size * 8 - 1)), size)
        if mod != 3:
            return None  # a register bit offset addresses a bit string in memory
        bop = {0xA3: 0, 0xAB: 1, 0xB3: 2, 0xBB: 3}[op]
        return self._bt(bop, ("r", rm), f"({self.get(reg, size)} & {size * 8 - 1})", size)

    def _value(self, dst: str, src: tuple[str, Any], size: int) -> tuple[list[str], bool]:
        if src[0] == "r":
            return [f"{dst} = {self.get(src[1], size)}"], False
        if src[0] == "i":
            return [f"{dst} = {src[1]}"], False
        return self.load(dst, src[1], size), True

    def _alu(self, alu: int, dst, src, size: int, test: bool = False):
        sym, kind = _ALU[alu]
        k = self.k
        a, b, x = f"a{k}", f"b{k}", f"x{k}"
        m = MASK[size]
        lines, fault = self._value(a, dst, size)
        if src[0] == "i":
            b = str(src[1])  # a literal: no local needed
        else:
            more, f2 = self._value(b, src, size)
            lines += more
            fault = fault or f2
        if alu in (2, 3):
            lines.append(f"{x} = {a} {sym} {b} {sym} {self.carry()}")
        elif alu == 6 and dst == src:
            lines.append(f"{x} = 0")  # XOR r,r
        else:
            lines.append(f"{x} = {a} {sym} {b}")
        if alu != 7 and not test:
            val = x if kind == "logic" else f"({x} & {m})"
            if dst[0] == "m":
                lines += self.store(val, size)  # _a still holds the operand's address
            else:
                lines.append(self.put(dst[1], size, val))
        self.set_flags(kind, a, b, x, size)
        return lines, fault

    def _notneg(self, neg: bool, dst, size: int):
        k = self.k
        a, x = f"a{k}", f"x{k}"
        m = MASK[size]
        lines, fault = self._value(a, dst, size)
        val = f"(-{a}) & {m}" if neg else f"{a} ^ {m}"
        if neg:
            lines.append(f"{x} = -{a}")
            val = f"{x} & {m}"
        if dst[0] == "m":
            lines += self.store(val, size)
        else:
            lines.append(self.put(dst[1], size, val))
        if neg:
            self.set_flags("sub", "0", a, x, size)
        return lines, fault

    def _incdec(self, dec: bool, dst, size: int):
        k = self.k
        a, x = f"a{k}", f"x{k}"
        m = MASK[size]
        cf = self.carry()  # evaluated where used: its inputs stay as they are
        lines, fault = self._value(a, dst, size)
        lines.append(f"{x} = {a} {'-' if dec else '+'} 1")
        if dst[0] == "m":
            lines += self.store(f"{x} & {m}", size)
        else:
            lines.append(self.put(dst[1], size, f"{x} & {m}"))
        self.set_flags("dec" if dec else "inc", a, "1", x, size, cf)
        return lines, fault

    def _shift(self, sop: int, dst, cnt: int, size: int):
        k = self.k
        a, x = f"a{k}", f"x{k}"
        m, sign, bits = MASK[size], SIGN[size], size * 8
        lines, fault = self._value(a, dst, size)
        if sop in (4, 6):
            cfx = f"({a} >> {bits - cnt}) & 1"
            lines.append(f"{x} = ({a} << {cnt}) & {m}")
            ofx = f"(2048 if (({x} >> {bits - 1}) ^ {cfx}) & 1 else 0)"
        elif sop == 5:
            cfx = f"({a} >> {cnt - 1}) & 1"
            lines.append(f"{x} = {a} >> {cnt}")
            ofx = f"(2048 if {a} & {sign} else 0)"
        else:
            sv = f"(({a} ^ {sign}) - {sign})"
            cfx = f"({sv} >> {cnt - 1}) & 1"
            lines.append(f"{x} = ({sv} >> {cnt}) & {m}")
            ofx = "0"
        # Deferred: evaluated only where the flags are read or stored (from a and x,
        # which no other instruction assigns), so shifts whose flags die cost nothing.
        f = (
            f"({cfx} | {ofx} | PAR[{x} & 255] | (64 if {x} == 0 else 0) | "
            f"(128 if {x} & {sign} else 0))"
        )
        if dst[0] == "m":
            lines += self.store(x, size)
        else:
            lines.append(self.put(dst[1], size, x))
        self.set_flags("eager", "", "", f, size)
        return lines, fault

    def _rotate(self, sop: int, dst, cnt: int, size: int):
        """ROL/ROR by an immediate: CF and OF change, the other flags stay."""
        k = self.k
        a, x, q = f"a{k}", f"x{k}", f"q{k}"
        m, bits = MASK[size], size * 8
        n = cnt % bits
        lines, fault = self._value(a, dst, size)
        if sop == 0:
            lines.append(f"{x} = (({a} << {n}) | ({a} >> {bits - n})) & {m}" if n else f"{x} = {a}")
            lines.append(f"{q} = ({x} & 1) | ((({x} >> {bits - 1}) ^ {x}) & 1) << 11")
        else:
            lines.append(f"{x} = (({a} >> {n}) | ({a} << {bits - n})) & {m}" if n else f"{x} = {a}")
            lines.append(
                f"{q} = ({x} >> {bits - 1}) | ((({x} >> {bits - 1}) ^ ({x} >> {bits - 2})) & 1) << 11"
            )
        if dst[0] == "m":
            lines += self.store(x, size)
        else:
            lines.append(self.put(dst[1], size, x))
        self.set_part(q, 0x801, size)
        return lines, fault

    def _bt(self, bop: int, dst, bit: str, size: int):
        """BT/BTS/BTR/BTC with the bit number in `bit`: CF = the bit, other flags stay."""
        k = self.k
        a, n, q = f"a{k}", f"n{k}", f"q{k}"
        lines, fault = self._value(a, dst, size)
        lines += [f"{n} = {bit}", f"{q} = ({a} >> {n}) & 1"]
        if bop:
            val = {1: f"{a} | (1 << {n})", 2: f"{a} & ~(1 << {n})", 3: f"{a} ^ (1 << {n})"}[bop]
            if dst[0] == "m":
                lines += self.store(f"({val})", size)
            else:
                lines.append(self.put(dst[1], size, f"({val})"))
        self.set_part(q, 1, size)
        return lines, fault

    def _shift_cl(self, sop: int, dst, size: int):
        """SHL/SHR/SAR by CL: a count of 0 leaves the flags, so they go to the CPU."""
        k = self.k
        a, x, q, n = f"a{k}", f"x{k}", f"q{k}", f"n{k}"
        m, sign, bits = MASK[size], SIGN[size], size * 8
        lines = self.to_cpu()
        more, fault = self._value(a, dst, size)
        lines += more
        lines += [f"{n} = {self.get(1, 1)} & 31", f"{x} = {a}", f"if {n}:"]
        if sop in (4, 6):
            body = [
                f"{x} = {a} << {n}",
                f"{q} = ({x} >> {bits}) & 1",
                f"{x} &= {m}",
                f"{q} |= 2048 if (({x} >> {bits - 1}) ^ {q}) & 1 else 0",
            ]
        elif sop == 5:
            body = [
                f"{x} = {a} >> {n}",
                f"{q} = (({a} >> ({n} - 1)) & 1) | (2048 if {a} & {sign} else 0)",
            ]
        else:
            sv = f"(({a} ^ {sign}) - {sign})"
            body = [f"{x} = ({sv} >> {n}) & {m}", f"{q} = ({sv} >> ({n} - 1)) & 1"]
        body.append(
            f"c.fl = (c.fl & -2262) | {q} | PAR[{x} & 255] | (64 if {x} == 0 else 0) | "
            f"(128 if {x} & {sign} else 0); c.lop = 0"
        )
        lines += ["    " + ln for ln in body]
        if dst[0] == "m":
            lines += self.store(x, size)
        else:
            lines.append(self.put(dst[1], size, x))
        return lines, fault

    def _mul(self, signed: bool, src):
        """MUL/IMUL r/m32: EDX:EAX = EAX * r/m32."""
        k = self.k
        a, x = f"a{k}", f"x{k}"
        lines, fault = self._value(a, src, 4)
        eax = self.get(0, 4)
        # The flags come from the product x alone (deferred, like a shift's): x & M is
        # the new EAX in two's complement even when x is negative.
        if signed:
            lines += [
                f"{x} = (({eax} ^ 0x80000000) - 0x80000000) * (({a} ^ 0x80000000) - 0x80000000)",
                self.put(0, 4, f"{x} & 0xFFFFFFFF"),
                self.put(2, 4, f"({x} >> 32) & 0xFFFFFFFF"),
            ]
            q = f"((0 if ((({x} & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000) == {x} else 2049)"
        else:
            lines += [
                f"{x} = {eax} * {a}",
                self.put(0, 4, f"{x} & 0xFFFFFFFF"),
                self.put(2, 4, f"{x} >> 32"),
            ]
            q = f"((2049 if {x} >> 32 else 0)"
        q += (
            f" | PAR[{x} & 255] | (64 if ({x} & 0xFFFFFFFF) == 0 else 0)"
            f" | (128 if {x} & 0x80000000 else 0))"
        )
        self.set_flags("eager", "", "", q, 4)
        return lines, fault

    def _imul(self, reg: int, src, imm: str | None, size: int):
        k = self.k
        a, b, x = f"a{k}", f"b{k}", f"x{k}"
        m, sign = MASK[size], SIGN[size]
        lines, fault = self._value(a, src, size)
        if imm is None:
            lines.append(f"{b} = {self.get(reg, size)}")
            bv = f"(({b} ^ {sign}) - {sign})"
        else:
            bv = imm
        lines += [
            f"{x} = (({a} ^ {sign}) - {sign}) * {bv}",
            f"{a} = {x} & {m}",
            self.put(reg, size, a),
        ]
        f = (
            f"((0 if (({a} ^ {sign}) - {sign}) == {x} else 2049) | PAR[{a} & 255] | "
            f"(64 if {a} == 0 else 0) | (128 if {a} & {sign} else 0))"
        )
        self.set_flags("eager", "", "", f, size)
        return lines, fault


def compile_block(
    cpu: Cpu, insns: list[tuple[Any, int, int, bytes]], exits: frozenset[int] = frozenset()
) -> Any:
    """insns: (closure, eip, length, raw bytes) of each instruction of the block.
    exits: indices of conditional branches inside it (a superblock goes on past them to
    their fall-through): a taken one leaves the function there (a side exit)."""
    em = Emitter(cpu.seg_nonflat, not cpu.mode_key & STACK16)
    ns: dict[str, Any] = {
        "c": cpu, "r": cpu.r, "sb": cpu.sbase, "rd8": cpu.rd8, "rd16": cpu.rd16,
        "rd32": cpu.rd32, "wr8": cpu.wr8, "wr16": cpu.wr16, "wr32": cpu.wr32,
        "CpuFault": CpuFault, "PAR": PARITY, "ram": cpu.ram,
        "M16": cpu.ram16, "M32": cpu.ram32,
    }  # fmt: skip
    code32 = cpu.cs32
    start = insns[0][1]
    # Per instruction: its lines and the locals it uses (for the reloads after closures).
    chunks: list[tuple[list[str], set[str]]] = []
    live_at: list[int] = []  # index of the setter live when instruction k starts, or -1
    last_jump = False
    loop_cond: str | None = None
    first_def = -1  # the first instruction that defines the flags (a setter or a closure)
    closures: set[int] = set()  # instructions run by calling their closure
    for k, (fn, eip, n, raw) in enumerate(insns):
        if first_def < 0 and k and (em.setters or chunks[-1][0][-1:] == [_RELOAD]):
            first_def = k - 1
        em.k = k
        em.refs = set()
        live_at.append(em.live.idx if em.live is not None else -1)
        nxt = (eip + n) & (M if code32 else 0xFFFF)
        out = None
        if code32 and raw and not cpu.mode_key & SEGCHK:
            saved = (em.live, set(em.dirty), set(em.written), em.c_flag_read, len(em.setters))
            try:
                out = em.emit(raw, nxt)
            except IndexError:
                out = None
            if out is None:  # undo what a half-emitted instruction recorded
                em.live, em.dirty, em.written, em.c_flag_read = saved[:4]
                del em.setters[saved[4] :]
                em.refs = set()
        if out is None:
            ns[f"f{k}"] = fn
            closures.add(k)
            lines = [_SYNC + ",".join(map(str, sorted(em.dirty)))]
            em.dirty = set()
            if em.live is not None:
                lines.append(em.live.sync())
                em.live = None
            else:
                em.c_flag_read = True
            lines += [f"_i = {k}", f"f{k}()"]
            if k in exits:  # the closure branched: its state is all in the CPU
                lines += [f"if c.eip != {nxt}:", f"    {_EXIT}{k + 1}"]
            lines.append(_RELOAD)
            chunks.append((lines, set()))
            last_jump = True  # the closure stored EIP itself
            continue
        lines, may_fault = out
        if may_fault:
            lines = [f"_i = {k}", *lines]
        if k in exits:
            jl = lines[-1]
            head, sep, tail = jl.partition(" if ")
            if head.startswith("c.eip = ") and sep and tail.endswith(f" else {nxt}"):
                lines[-1] = f"if {tail[: -len(f' else {nxt}')]}:"
            else:  # another shape of branch: it stored EIP, compare that
                head = ""
                lines.append(f"if c.eip != {nxt}:")
            # Taken: write back what is dirty (registers, the live flags) and leave.
            lines.append(f"    {_SYNC}" + ",".join(map(str, sorted(em.dirty))))
            if em.live is not None:
                lines.append(f"    {em.live.sync()}")
            else:
                em.c_flag_read = True  # a loop must keep the CPU's flags current
            lines += ([f"    {head}"] if head else []) + [f"    {_EXIT}{k + 1}"]
            chunks.append((lines, em.refs))
            continue
        last_jump = any("c.eip =" in ln for ln in lines)
        if last_jump and k == len(insns) - 1:
            jl = lines[-1]
            if jl.startswith(f"c.eip = {start} if ") and jl.endswith(f" else {nxt}"):
                loop_cond = jl[len(f"c.eip = {start} if ") : -len(f" else {nxt}")]
                lines = lines[:-1]
            elif jl == f"c.eip = {start}":
                loop_cond = "True"
                lines = lines[:-1]
        chunks.append((lines, em.refs))

    if not last_jump:
        nxt = (insns[-1][1] + insns[-1][2]) & (M if code32 else 0xFFFF)
        chunks.append(([f"c.eip = {nxt}"], set()))

    all_refs: set[str] = set().union(*(r for _, r in chunks))
    written = sorted(em.written)

    def load(names: set[str]) -> list[str]:
        regs = sorted(nm for nm in names if nm[0] == "e")
        if len(regs) >= 3:  # one unpack beats three subscripts
            out = ["e0, e1, e2, e3, e4, e5, e6, e7 = r"]
        else:
            out = [f"{nm} = r[{nm[1:]}]" for nm in regs]
        return out + [f"{nm} = sb[{nm[1:]}]" for nm in sorted(names) if nm[0] == "g"]

    body: list[str] = []
    for i, (lines, _) in enumerate(chunks):
        for ln in lines:
            code = ln.lstrip()
            ind = ln[: len(ln) - len(code)]
            if code.startswith(_SYNC):
                # In a loop, a register written further on is dirty from the last pass.
                regs = {int(v) for v in code[len(_SYNC) :].split(",") if v}
                if loop_cond is not None:
                    regs |= set(written)
                body += [f"{ind}r[{w}] = e{w}" for w in sorted(regs)]
            elif code.startswith(_EXIT):
                ran = code[len(_EXIT) :]
                body.append(
                    f"{ind}return _n + {ran}" if loop_cond is not None else f"{ind}return {ran}"
                )
            elif ln == _RELOAD:
                if i == len(chunks) - 1 and loop_cond is None:
                    continue  # nothing runs after the last closure but the return
                later: set[str] = set().union(*(r for _, r in chunks[i + 1 :]))
                if loop_cond is not None:
                    later |= all_refs
                body += load(later | {f"e{w}" for w in written})
            else:
                body.append(ln)

    n_insns = len(insns)
    end_sync = [f"r[{i}] = e{i}" for i in sorted(em.dirty)]
    if em.live is not None:
        end_sync.append(em.live.sync())
    # The fault handler: registers, then the flags live at the faulting instruction.
    # Not when the fault came from a closure: everything was written back before the
    # call, and the closure may have changed registers before it faulted (a REP MOVS
    # interrupted by a #PF has advanced ECX, ESI and EDI); the locals are stale then.
    inline = [f"r[{i}] = e{i}" for i in written]
    used = sorted({s for s in live_at if s >= 0} | ({em.live.idx} if em.live else set()))
    if used:
        ns["LIVE"] = tuple(live_at)
        inline.append("_s = LIVE[_i]")
        if loop_cond is not None and em.live is not None:
            # Before the first flag definition of a pass, the previous pass's state is live.
            last = first_def if first_def >= 0 else n_insns
            inline.append(f"if _s < 0 and _n and _i <= {last}: _s = {em.live.idx}")
        for j, s in enumerate(used):
            inline.append(f"{'if' if j == 0 else 'elif'} _s == {s}: {em.setters[s].sync()}")
    if inline and closures:
        ns["CLOSURES"] = frozenset(closures)
        handler = ["if _i not in CLOSURES:"] + ["    " + ln for ln in inline]
    else:
        handler = inline
    ns["EIPS"] = tuple(i[1] for i in insns)
    handler += ["c.eip = EIPS[_i]", "raise"]

    src = ["def block():"]
    text = "\n".join(body)
    if "rt.get" in text:
        src.append("    rt = c.rtlb")
    if "wt.get" in text:
        src.append("    wt = c.wtlb")
    src += ["    " + ln for ln in load(all_refs)]
    may_fault = "_i = " in text
    if loop_cond is None and not may_fault:
        src += ["    " + ln for ln in body + end_sync] + [f"    return {n_insns}"]
    elif loop_cond is None:
        src += ["    try:"] + ["        " + ln for ln in body]
        src += ["    except CpuFault:"] + ["        " + ln for ln in handler]
        src += ["    " + ln for ln in end_sync] + [f"    return {n_insns}"]
    else:
        # The flags of the previous pass must be in the CPU when the body reads them there.
        back_sync = em.live.sync() if em.c_flag_read and em.live is not None else None
        src += ["    _n = 0", "    try:", "        while True:"]
        src += ["            " + ln for ln in body]
        src += [f"            _t = {loop_cond}", f"            _n += {n_insns}"]
        src += [f"            if not _t or _n >= {LOOP_LIMIT}:", "                break"]
        if back_sync:
            src.append("            " + back_sync)
        src += ["    except CpuFault:"] + ["        " + ln for ln in handler]
        nxt = (insns[-1][1] + insns[-1][2]) & M
        src += ["    " + ln for ln in end_sync]
        src += [f"    c.eip = {start} if _t else {nxt}", "    return _n"]
    text = "\n".join(src)
    if _DEBUG:
        print(text, file=sys.stderr)
    code = compile(text, "<emu block>", "exec")
    exec(code, ns)  # noqa: S102 - our own generated source, from decoded guest bytes
    return ns["block"]


def _dispatch(map_: str) -> list[tuple[Any, int] | None]:
    """Per opcode of one map: the Emitter method its table rows name and the ModRM reg
    fields they inline (0xFF: the whole opcode), or None."""
    out: list[tuple[Any, int] | None] = [None] * 256
    for code in range(256):
        rows = BY_OPCODE.get((map_, code), ())
        names = {row.jit for row in rows if row.jit}
        if not names:
            continue
        assert len(names) == 1, (map_, code, names)  # one method per opcode
        out[code] = (getattr(Emitter, names.pop()), reg_mask(rows, lambda row: bool(row.jit)))
    return out


_JIT_1B = _dispatch("")
_JIT_0F = _dispatch("0F")
