"""x87 escapes D8-DF and WAIT (`FpuOps`): closures over `fpu.FpuState`.

Each closure checks CR0.EM/TS (#NM), then, for a waiting instruction, an unmasked
exception left pending by an earlier one (`Cpu.fpu_error`: #MF with CR0.NE, else FERR#
to IRQ 13), reads its memory operand, runs the FpuState method and writes a store's
result before committing the FPU state, so a fault restarts the instruction cleanly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu import fpu as F
from boite.accel.emu.arch import AF, CF, CS, DS, NM, OF, OP_NONE, PF, SF, SS, UD, ZF, CpuFault

if TYPE_CHECKING:
    from boite.accel.emu.decode import Decoder
    from boite.accel.emu.decode.core import Ctx

Fn = Callable[[], None]

# memory operand kinds by (opcode, reg) for loads/stores
_MEM_KIND = {0xD8: "m32", 0xDA: "i32", 0xDC: "m64", 0xDE: "i16"}
_SIZE = {"m32": 4, "m64": 8, "m80": 10, "i16": 2, "i32": 4, "i64": 8, "bcd": 10}
_CONST = {0xE8: "one", 0xE9: "l2t", 0xEA: "l2e", 0xEB: "pi", 0xEC: "lg2", 0xED: "ln2", 0xEE: "zero"}
_FCMOV_CC = (2, 4, 6, 10)  # B E BE U (Jcc codes); DB: the negations


def read_bytes(c, lin: int, n: int) -> int:
    v = 0
    i = 0
    while i + 4 <= n:
        v |= c.rd32((lin + i) & 0xFFFFFFFF) << (8 * i)
        i += 4
    while i < n:
        v |= c.rd8((lin + i) & 0xFFFFFFFF) << (8 * i)
        i += 1
    return v


def write_bytes(c, lin: int, n: int, v: int) -> None:
    c.check_writable(lin, n)
    i = 0
    while i + 4 <= n:
        c.wr32((lin + i) & 0xFFFFFFFF, (v >> (8 * i)) & 0xFFFFFFFF)
        i += 4
    while i < n:
        c.wr8((lin + i) & 0xFFFFFFFF, (v >> (8 * i)) & 0xFF)
        i += 1


def _default_seg(dec: Decoder, x: Ctx) -> int:
    """The segment a ModRM operand uses (for FDS), from its bytes at x.pos."""
    if x.seg is not None:
        return x.seg
    c = dec.c
    m = c.rd8((x.csb + (x.pos & x.eipmask)) & 0xFFFFFFFF)
    mod, rm = m >> 6, m & 7
    if not x.ad32:
        return SS if rm in (2, 3) or (rm == 6 and mod != 0) else DS
    if rm == 4:
        sib = c.rd8((x.csb + ((x.pos + 1) & x.eipmask)) & 0xFFFFFFFF)
        base = sib & 7
        return SS if base == 4 or (base == 5 and mod != 0) else DS
    return SS if rm == 5 and mod != 0 else DS


def x87(dec: Decoder, x: Ctx, b: int) -> Fn:
    c = dec.c
    modrm_pos = x.pos
    seg = _default_seg(dec, x)
    mod, reg, rm, ea = dec.modrm(x)
    nxt = dec.nxt(x)
    modrm = c.rd8((x.csb + (modrm_pos & x.eipmask)) & 0xFFFFFFFF)
    fop = ((b & 7) << 8) | modrm
    op32 = x.op32
    ins_eip = _ins_eip(x)
    sbase = c.sbase

    def guard(waiting: bool = True) -> F.FpuState:
        if c.cr0 & 0xC:
            raise CpuFault(NM)
        f = c.fpu
        if waiting and f.sw & F.ES:
            c.fpu_error()
        return f

    def note(f: F.FpuState, lin: int | None = None) -> None:
        f.fip = ins_eip
        f.fcs = c.sel[CS]
        f.fop = fop
        if lin is not None:
            f.fdp = (lin - sbase[seg]) & 0xFFFFFFFF
            f.fds = c.sel[seg]
        else:
            f.fdp = 0
            f.fds = 0

    body = (
        _mem_op(dec, x, b, reg, ea, guard, note, nxt, op32)
        if mod != 3
        else _reg_op(dec, b, reg, rm, guard, note, nxt)
    )
    if body is None:
        x.end = True

        def ud() -> None:
            raise CpuFault(UD)

        return ud
    return body


def _ins_eip(x: Ctx) -> int:
    return x.start & x.eipmask


def _mem_op(dec: Decoder, x: Ctx, b: int, reg: int, ea, guard, note, nxt: int, op32: bool):
    c = dec.c

    def load_fn(kind: str):
        n = _SIZE[kind]
        ea_r = dec.ea_for(ea, n, False)
        return ea_r, n

    # ---- arithmetic and compares with a memory operand
    if b in _MEM_KIND:
        kind = _MEM_KIND[b]
        ea_r, n = load_fn(kind)
        if reg in (2, 3):
            pops = reg - 2

            def fcom_m() -> None:
                f = guard()
                lin = ea_r()
                y, lf = F.load_converted(kind, read_bytes(c, lin, n))
                f.compare(y, False, pops, load_flags=lf)
                note(f, lin)
                c.eip = nxt

            return fcom_m

        def arith_m() -> None:
            f = guard()
            lin = ea_r()
            y, lf = F.load_converted(kind, read_bytes(c, lin, n))
            f.arith_mem(reg, y, lf)
            note(f, lin)
            c.eip = nxt

        return arith_m

    load_kinds = {(0xD9, 0): "m32", (0xDB, 0): "i32", (0xDB, 5): "m80", (0xDD, 0): "m64",
                  (0xDF, 0): "i16", (0xDF, 4): "bcd", (0xDF, 5): "i64"}  # fmt: skip
    store_kinds = {(0xD9, 2): ("m32", False, False), (0xD9, 3): ("m32", True, False),
                   (0xDB, 1): ("i32", True, True), (0xDB, 2): ("i32", False, False),
                   (0xDB, 3): ("i32", True, False), (0xDB, 7): ("m80", True, False),
                   (0xDD, 1): ("i64", True, True), (0xDD, 2): ("m64", False, False),
                   (0xDD, 3): ("m64", True, False), (0xDF, 1): ("i16", True, True),
                   (0xDF, 2): ("i16", False, False), (0xDF, 3): ("i16", True, False),
                   (0xDF, 6): ("bcd", True, False), (0xDF, 7): ("i64", True, False)}  # fmt: skip
    if (b, reg) in load_kinds:
        kind = load_kinds[(b, reg)]
        ea_r, n = load_fn(kind)

        def fld_m() -> None:
            f = guard()
            lin = ea_r()
            v, lf = F.load_converted(kind, read_bytes(c, lin, n))
            f.load(v, lf)
            note(f, lin)
            c.eip = nxt

        return fld_m
    if (b, reg) in store_kinds:
        kind, pop, trunc = store_kinds[(b, reg)]
        n = _SIZE[kind]
        ea_w = dec.ea_for(ea, n, True)

        def fst_m() -> None:
            f = guard()
            lin = ea_w()
            bits, flags = f.store_value(kind, trunc)
            if bits is not None:
                write_bytes(c, lin, n, bits)
            f.commit_store(flags, pop)
            note(f, lin)
            c.eip = nxt

        return fst_m
    if (b, reg) in ((0xD9, 5), (0xD9, 7), (0xDD, 7)):  # FLDCW, FNSTCW, FNSTSW m16
        load = reg == 5
        ea_a = dec.ea_for(ea, 2, not load)

        def cw_sw() -> None:
            f = guard(waiting=load)
            lin = ea_a()
            if load:
                f.fldcw(c.rd16(lin))
                c.fpu_ferr_update()
            else:
                c.wr16(lin, f.cw if b == 0xD9 else f.status())
            c.eip = nxt

        return cw_sw
    if (b, reg) in ((0xD9, 4), (0xD9, 6), (0xDD, 4), (0xDD, 6)):
        full = b == 0xDD
        load = reg == 4
        size = (28 if op32 else 14) + (80 if full else 0)
        ea_a = dec.ea_for(ea, size, not load)

        def env_op() -> None:
            f = guard(waiting=load)
            lin = ea_a()
            prot = bool(c.cr0 & 1) and not c.fl & 0x20000
            if load:
                data = read_bytes(c, lin, size).to_bytes(size, "little")
                if full:
                    f.restore(data, op32, prot)
                else:
                    f.load_env(data, op32, prot)
                if not prot:
                    f.fcs = f.fds = 0
                c.fpu_ferr_update()
            else:
                img = f.save_bytes(op32, prot) if full else f.env_bytes(op32, prot)
                write_bytes(c, lin, size, int.from_bytes(img, "little"))
                if full:
                    f.finit()
                    c.fpu_ferr_update()
                else:
                    f.cw |= 0x3F  # FNSTENV masks every exception
            c.eip = nxt

        return env_op
    return None


def _reg_op(dec: Decoder, b: int, reg: int, rm: int, guard, note, nxt: int):
    c = dec.c
    i = rm

    def simple(
        action: Callable[[F.FpuState], None], waiting: bool = True, record: bool = True
    ) -> Fn:
        def op() -> None:
            f = guard(waiting)
            action(f)
            if record:
                note(f)
            c.eip = nxt

        return op

    if b in (0xD8, 0xDC, 0xDE):
        if reg in (2, 3):  # FCOM/FCOMP (DC D0/D8 and DE D0 are aliases); DE D9 FCOMPP
            if b == 0xDE and reg == 3:
                if i != 1:
                    return None
                return simple(lambda f: f.compare(None if f.is_empty(1) else f.st(1), False, 2))
            pops = 1 if (reg == 3 or b == 0xDE) else 0
            return simple(lambda f: f.compare(None if f.is_empty(i) else f.st(i), False, pops))
        dest_i = b != 0xD8
        pop = b == 0xDE
        return simple(lambda f: f.arith_st(reg, i, dest_i, pop))
    if b == 0xD9:
        if reg == 0:
            return simple(lambda f: f.load_st(i))
        if reg == 1:
            return simple(lambda f: f.fxch(i))
        if reg == 2:
            return simple(lambda f: None) if i == 0 else None  # FNOP
        if reg == 3:
            return simple(lambda f: f.store_st(i, True))  # FSTP1 (undocumented alias)
        op = 0xE0 | (reg - 4) << 3 | i
        if op == 0xE0:
            return simple(lambda f: f.fchs_fabs(False))
        if op == 0xE1:
            return simple(lambda f: f.fchs_fabs(True))
        if op == 0xE4:
            return simple(lambda f: f.ftst())
        if op == 0xE5:
            return simple(lambda f: f.fxam())
        if op in _CONST:
            name = _CONST[op]
            return simple(lambda f: f.load_const(name))
        table: dict[int, Callable[[F.FpuState], None]] = {
            0xF0: lambda f: f.unary(F.f2xm1),
            0xF1: lambda f: f.binary_pop(F.fyl2x),
            0xF2: lambda f: f.trig("tan"),
            0xF3: lambda f: f.binary_pop(F.fpatan),
            0xF4: lambda f: f.fxtract(),
            0xF5: lambda f: f.fprem(True),
            0xF6: lambda f: f.incdec_top(-1),
            0xF7: lambda f: f.incdec_top(1),
            0xF8: lambda f: f.fprem(False),
            0xF9: lambda f: f.binary_pop(F.fyl2xp1),
            0xFA: lambda f: f.sqrt(),
            0xFB: lambda f: f.trig("sincos"),
            0xFC: lambda f: f.unary(F.frndint),
            0xFD: lambda f: f.fscale(),
            0xFE: lambda f: f.trig("sin"),
            0xFF: lambda f: f.trig("cos"),
        }
        act = table.get(op)
        return simple(act) if act is not None else None
    if b in (0xDA, 0xDB) and reg < 4:
        cc = _FCMOV_CC[reg]
        neg = b == 0xDB
        return simple(lambda f: f.fcmov(c.cond(cc) != neg, i))
    if b == 0xDA:
        if reg == 5 and i == 1:  # FUCOMPP
            return simple(lambda f: f.compare(None if f.is_empty(1) else f.st(1), True, 2))
        return None
    if b == 0xDB:
        if reg == 4:
            if i == 2:
                return simple(lambda f: (f.fnclex(), c.fpu_ferr_update()), False, False)
            if i == 3:
                return simple(lambda f: (f.finit(), c.fpu_ferr_update()), False, False)
            if i in (0, 1, 4):  # FENI, FDISI, FSETPM: no-ops since the 387
                return simple(lambda f: None, True, False)
            return None
        if reg in (5, 6):  # FUCOMI / FCOMI
            return _fcomi(dec, i, reg == 5, 0, guard, note, nxt)
        return None
    if b == 0xDD:
        if reg == 0:
            return simple(lambda f: f.ffree(i, False))
        if reg == 1:
            return simple(lambda f: f.fxch(i))
        if reg in (2, 3):
            pop = reg == 3
            return simple(lambda f: f.store_st(i, pop))
        if reg in (4, 5):
            pops = reg - 4
            return simple(lambda f: f.compare(None if f.is_empty(i) else f.st(i), True, pops))
        return None
    if b == 0xDF:
        if reg == 0:
            return simple(lambda f: f.ffree(i, True))  # FFREEP
        if reg == 1:
            return simple(lambda f: f.fxch(i))
        if reg in (2, 3):
            return simple(lambda f: f.store_st(i, True))
        if reg == 4:
            if i != 0:
                return None
            r = c.r

            def fnstsw_ax() -> None:
                f = guard(False)
                r[0] = (r[0] & 0xFFFF0000) | f.status()
                c.eip = nxt

            return fnstsw_ax
        if reg in (5, 6):
            return _fcomi(dec, i, reg == 5, 1, guard, note, nxt)
        return None
    return None


def _fcomi(dec: Decoder, i: int, quiet: bool, pops: int, guard, note, nxt: int) -> Fn:
    c = dec.c

    def fcomi() -> None:
        f = guard()
        fl = f.compare(None if f.is_empty(i) else f.st(i), quiet, pops, eflags=True)
        if fl is not None:
            g = c.get_flags() & ~(ZF | PF | CF | OF | SF | AF)
            c.fl = g | fl
            c.lop = OP_NONE
        note(f)
        c.eip = nxt

    return fcomi


def fwait(c, nxt: int) -> Fn:
    """WAIT/FWAIT: #NM with CR0.MP and TS, else deliver a pending unmasked exception."""

    def wait() -> None:
        if c.cr0 & 0xA == 0xA:
            raise CpuFault(NM)
        if c.fpu.sw & F.ES:
            c.fpu_error()
        c.eip = nxt

    return wait


class FpuOps:
    """Decoder mixin: the x87 rows of the opcode table."""

    def _fpu(self, x: Ctx, b: int) -> Fn:
        return x87(self, x, b)  # type: ignore[arg-type]

    def _fwait(self, x: Ctx, b: int) -> Fn:
        return fwait(self.c, self.nxt(x))  # type: ignore[attr-defined]
