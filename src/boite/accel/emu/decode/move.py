"""Data movement: MOV forms, LEA, XCHG, MOVZX/MOVSX, CMOVcc/SETcc, BSWAP, CMPXCHG/XADD, and the one-byte odds (CBW/CWD, SAHF/LAHF, XLAT, SALC, WAIT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu.arch import (
    AF,
    CF,
    DS,
    M16,
    M32,
    MASK,
    PF,
    SF,
    ZF,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _sx,
)

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu


# The closures of MOV r/m (88-8B), each from a factory of its own and with its values as
# default arguments: a captured variable costs a cell (made inside _mov, a cell for every
# variable of every form, on each call), and the collector one more object to scan.
def _mov_rr(c: Cpu, r: list[int], d: int, s: int, nxt: int) -> Fn:
    def mov_rr(c: Cpu = c, r: list[int] = r, d: int = d, s: int = s, nxt: int = nxt) -> None:
        r[d] = r[s]
        c.eip = nxt

    return mov_rr


def _mov_mr(c: Cpu, wr: Callable[[int, int], None], ea: Callable[[], int],
            g: Callable[[], int], nxt: int) -> Fn:  # fmt: skip
    def mov_mr(c: Cpu = c, wr: Callable[[int, int], None] = wr, ea: Callable[[], int] = ea,
               g: Callable[[], int] = g, nxt: int = nxt) -> None:  # fmt: skip
        wr(ea(), g())
        c.eip = nxt

    return mov_mr


def _mov_set(c: Cpu, s: Callable[[int], None], g: Callable[[], int], nxt: int) -> Fn:
    def mov_rr2(c: Cpu = c, s: Callable[[int], None] = s, g: Callable[[], int] = g,
                nxt: int = nxt) -> None:  # fmt: skip
        s(g())
        c.eip = nxt

    return mov_rr2


def _mov_rm4(c: Cpu, r: list[int], reg: int, rd: Callable[[int], int],
             ea: Callable[[], int], nxt: int) -> Fn:  # fmt: skip
    def mov_rm4(c: Cpu = c, r: list[int] = r, reg: int = reg, rd: Callable[[int], int] = rd,
                ea: Callable[[], int] = ea, nxt: int = nxt) -> None:  # fmt: skip
        r[reg] = rd(ea())
        c.eip = nxt

    return mov_rm4


def _mov_ld4_bd(c: Cpu, r: list[int], rd: Callable[[int], int], sb: list[int], s: int,
                base: int, d: int, reg: int, nxt: int) -> Fn:  # fmt: skip
    """MOV r32, [base + d] (its address as modrm's closure computes it)."""

    def mov_ld4_bd(c: Cpu = c, r: list[int] = r, rd: Callable[[int], int] = rd,
                   sb: list[int] = sb, s: int = s, base: int = base, d: int = d,
                   reg: int = reg, nxt: int = nxt) -> None:  # fmt: skip
        r[reg] = rd((sb[s] + r[base] + d) & M32)
        c.eip = nxt

    return mov_ld4_bd


def _mov_st4_bd(c: Cpu, r: list[int], wr: Callable[[int, int], None], sb: list[int], s: int,
                base: int, d: int, reg: int, nxt: int) -> Fn:  # fmt: skip
    """MOV [base + d], r32."""

    def mov_st4_bd(c: Cpu = c, r: list[int] = r, wr: Callable[[int, int], None] = wr,
                   sb: list[int] = sb, s: int = s, base: int = base, d: int = d,
                   reg: int = reg, nxt: int = nxt) -> None:  # fmt: skip
        wr((sb[s] + r[base] + d) & M32, r[reg])
        c.eip = nxt

    return mov_st4_bd


def _lea4_bd(c: Cpu, r: list[int], reg: int, base: int, d: int, nxt: int) -> Fn:
    """LEA r32, [base + d]: the segment base modrm's closure adds, LEA takes off again."""

    def lea4_bd(c: Cpu = c, r: list[int] = r, reg: int = reg, base: int = base, d: int = d,
                nxt: int = nxt) -> None:  # fmt: skip
        r[reg] = (r[base] + d) & M32
        c.eip = nxt

    return lea4_bd


class MoveOps(DecoderBase):
    def _mov(self, x: Ctx, b: int) -> Fn:
        size = 1 if b == 0x88 or b == 0x8A else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x, size == 4)
        nxt = x.pos & x.eipmask
        c = self.c
        if mod == 3 and size == 4:
            return _mov_rr(c, c.r, rm, reg, nxt) if b == 0x89 else _mov_rr(c, c.r, reg, rm, nxt)
        if ea is None and mod != 3:  # 32-bit, [reg + disp] (modrm fuse)
            if b == 0x89:
                return _mov_st4_bd(c, c.r, c.wr32, c.sbase, x.ea_seg, x.ea_base, x.ea_disp,
                                   reg, nxt)  # fmt: skip
            return _mov_ld4_bd(c, c.r, c.rd32, c.sbase, x.ea_seg, x.ea_base, x.ea_disp,
                               reg, nxt)  # fmt: skip
        if b == 0x88 or b == 0x89:
            g = self.reg_get(reg, size)
            if mod != 3:
                return _mov_mr(c, self.wrfn(size), self.ea_for(ea, size, True), g, nxt)
            return _mov_set(c, self.reg_set(rm, size), g, nxt)
        if size == 4:
            return _mov_rm4(c, c.r, reg, c.rd32, self.ea_for(ea, 4, False), nxt)
        return _mov_set(c, self.reg_set(reg, size), self.rm_get(mod, rm, ea, size), nxt)

    def _mov_ri(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b < 0xB8 else (4 if x.op32 else 2)
        v = self.imm(x, size)
        nxt = self.nxt(x)
        s = self.reg_set(b & 7, size)
        if size == 4:
            r = c.r
            n = b & 7

            def mov_ri4(v=v, nxt=nxt, r=r, n=n, c=c) -> None:
                r[n] = v
                c.eip = nxt

            return mov_ri4

        def mov_ri(nxt=nxt, s=s, v=v, c=c) -> None:
            s(v)
            c.eip = nxt

        return mov_ri

    def _mov_mi(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b == 0xC6 else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x)
        if reg:
            return self._ud(x, b)
        v = self.imm(x, size)
        nxt = self.nxt(x)
        s = self.rm_set(mod, rm, ea, size)

        def mov_mi(nxt=nxt, s=s, v=v, c=c) -> None:
            s(v)
            c.eip = nxt

        return mov_mi

    def _mov_moffs(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b in (0xA0, 0xA2) else (4 if x.op32 else 2)
        off = self.u32(x) if x.ad32 else self.u16(x)
        nxt = self.nxt(x)
        s = x.seg if x.seg is not None else DS
        sb = c.sbase
        if self.seg_checked(s):
            lin = self.lin_fn(s, size, b > 0xA1)
            if b <= 0xA1:
                rd = self.rdfn(size)
                st = self.reg_set(0, size)

                def mov_a_m_chk() -> None:
                    st(rd(lin(off)))
                    c.eip = nxt

                return mov_a_m_chk
            wr = self.wrfn(size)
            g = self.reg_get(0, size)

            def mov_m_a_chk() -> None:
                wr(lin(off), g())
                c.eip = nxt

            return mov_m_a_chk
        if b <= 0xA1:
            rd = self.rdfn(size)
            st = self.reg_set(0, size)

            def mov_a_m(nxt=nxt, st=st, c=c, rd=rd, off=off, sb=sb, s=s) -> None:
                st(rd((sb[s] + off) & M32))
                c.eip = nxt

            return mov_a_m
        wr = self.wrfn(size)
        g = self.reg_get(0, size)

        def mov_m_a(nxt=nxt, wr=wr, c=c, g=g, off=off, sb=sb, s=s) -> None:
            wr((sb[s] + off) & M32, g())
            c.eip = nxt

        return mov_m_a

    def _lea(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        x.seg = DS  # any segment: LEA subtracts the base again below (no access, no check)
        mod, reg, rm, ea = self.modrm(x, size == 4)
        nxt = self.nxt(x)
        if mod == 3:
            return self._ud(x, b)
        if ea is None:  # 32-bit [base + disp]: the offset is all LEA wants
            return _lea4_bd(c, c.r, reg, x.ea_base, x.ea_disp, nxt)
        sb = c.sbase
        s = self.reg_set(reg, size)
        m = MASK[size]
        so = getattr(ea, "segoff", None)
        if so is not None:  # the offset closure of the checked decode: use it directly
            off = so[0]

            def lea_off(nxt=nxt, s=s, c=c, m=m, off=off) -> None:
                s(off() & m)
                c.eip = nxt

            return lea_off

        def lea(nxt=nxt, s=s, c=c, m=m, ea=ea, sb=sb) -> None:
            s((ea() - sb[DS]) & m)
            c.eip = nxt

        return lea

    def _xchg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b == 0x86 else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        gr = self.reg_get(reg, size)
        sr = self.reg_set(reg, size)
        if mod == 3:
            gm = self.reg_get(rm, size)
            sm = self.reg_set(rm, size)

            def xchg_rr(nxt=nxt, sm=sm, sr=sr, c=c, gm=gm, gr=gr) -> None:
                a, v = gm(), gr()
                sm(v)
                sr(a)
                c.eip = nxt

            return xchg_rr
        rd, wr = self.rdfn(size), self.wrfn(size)
        ea = self.ea_for(ea, size, True)

        def xchg_m(nxt=nxt, ea=ea, rd=rd, wr=wr, sr=sr, c=c, gr=gr) -> None:
            a = ea()
            old = rd(a)
            wr(a, gr())
            sr(old)
            c.eip = nxt

        return xchg_m

    def _xchg_ax(self, x: Ctx, b: int) -> Fn:
        c = self.c
        nxt = self.nxt(x)
        if b == 0x90 and not x.rep == 0xF3 or b == 0x90:

            def nop(nxt=nxt, c=c) -> None:
                c.eip = nxt

            return nop
        size = 4 if x.op32 else 2
        n = b & 7
        g0, s0 = self.reg_get(0, size), self.reg_set(0, size)
        g1, s1 = self.reg_get(n, size), self.reg_set(n, size)

        def xchg_ax(nxt=nxt, s0=s0, s1=s1, c=c, g0=g0, g1=g1) -> None:
            a, v = g0(), g1()
            s0(v)
            s1(a)
            c.eip = nxt

        return xchg_ax

    def _movx(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        ssize = 1 if b in (0xB6, 0xBE) else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, ssize)
        s = self.reg_set(reg, size)
        m = MASK[size]
        if b in (0xB6, 0xB7):

            def movzx(nxt=nxt, s=s, c=c, g=g) -> None:
                s(g())
                c.eip = nxt

            return movzx

        def movsx(nxt=nxt, s=s, c=c, m=m, ssize=ssize, g=g) -> None:
            s(_sx(g(), ssize) & m)
            c.eip = nxt

        return movsx

    def _misc1(self, x: Ctx, b: int) -> Fn:
        """CBW/CWD, SAHF/LAHF, XLAT, SALC, WAIT."""
        c = self.c
        r = c.r
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)
        sb = c.sbase
        seg = x.seg if x.seg is not None else DS
        am = M32 if x.ad32 else M16
        if b != 0xD7:
            xlat_lin = None
        elif self.seg_checked(seg):
            xlat_lin = self.lin_fn(seg, 1, False)
        else:
            xlat_lin = lambda o, sb=sb, seg=seg: (sb[seg] + o) & M32  # noqa: E731

        def misc(nxt=nxt, b=b, c=c, size=size, r=r, xlat_lin=xlat_lin, am=am) -> None:
            if b == 0x98:
                if size == 4:
                    r[0] = _sx(r[0] & 0xFFFF, 2) & M32
                else:
                    r[0] = (r[0] & 0xFFFF0000) | (_sx(r[0] & 0xFF, 1) & 0xFFFF)
            elif b == 0x99:
                if size == 4:
                    r[2] = M32 if r[0] & 0x80000000 else 0
                else:
                    r[2] = (r[2] & 0xFFFF0000) | (0xFFFF if r[0] & 0x8000 else 0)
            elif b == 0x9E:
                c.set_flags((r[0] >> 8) & 0xFF, SF | ZF | AF | PF | CF)
            elif b == 0x9F:
                f = c.get_flags()
                r[0] = (r[0] & 0xFFFF00FF) | ((f & 0xD7 | 2) << 8)
            elif b == 0xD7:
                r[0] = (r[0] & 0xFFFFFF00) | c.rd8(xlat_lin((r[3] + (r[0] & 0xFF)) & am))
            elif b == 0xD6:
                r[0] = (r[0] & 0xFFFFFF00) | (0xFF if c.get_cf() else 0)
            c.eip = nxt

        return misc

    def _cmov(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, size)
        s = self.reg_set(reg, size)
        cc = b & 15
        r = c.r

        def cmov(nxt=nxt, g=g, cc=cc, c=c, s=s, size=size, r=r, reg=reg) -> None:
            v = g()  # the source is read (and may fault) whatever the condition
            if c.cond(cc):
                s(v)
            elif size == 4:
                r[reg] = r[reg]
            c.eip = nxt

        return cmov

    def _setcc(self, x: Ctx, b: int) -> Fn:
        c = self.c
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        s = self.rm_set(mod, rm, ea, 1)
        cc = b & 15

        def setcc(nxt=nxt, s=s, c=c, cc=cc) -> None:
            s(1 if c.cond(cc) else 0)
            c.eip = nxt

        return setcc

    def _bswap(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        n = b & 7
        nxt = self.nxt(x)

        def bswap() -> None:
            r[n] = int.from_bytes(r[n].to_bytes(4, "little"), "big") if x_op32 else 0
            c.eip = nxt

        x_op32 = x.op32
        return bswap

    def _cmpxchg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b == 0xB0 else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        rd, wr = self.rdfn(size), self.wrfn(size)
        g0, s0 = self.reg_get(0, size), self.reg_set(0, size)
        gr = self.reg_get(reg, size)
        cmpf = self.alu_fn(7, size)
        gm = self.reg_get(rm, size) if mod == 3 else None
        sm = self.reg_set(rm, size) if mod == 3 else None
        if mod != 3:
            ea = self.ea_for(ea, size, True)  # the destination is always written

        def cmpxchg(
            nxt=nxt, mod=mod, g0=g0, cmpf=cmpf, c=c, gm=gm, ea=ea, rd=rd, s0=s0, sm=sm, wr=wr, gr=gr
        ) -> None:
            if mod == 3:
                d = gm()
            else:
                a = ea()
                d = rd(a)
            acc = g0()
            if acc == d:
                if mod == 3:
                    sm(gr())
                else:
                    wr(a, gr())
            else:
                if mod != 3:
                    wr(a, d)  # the processor always writes the destination
                s0(d)
            # The flags after the write: a #PF on it leaves them as they were (the
            # native tier's crash fuzz, seed 49842, saw the compare's flags pushed).
            cmpf(acc, d)
            c.eip = nxt

        return cmpxchg

    def _xadd(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b == 0xC0 else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        add = self.alu_fn(0, size)
        gr, sr = self.reg_get(reg, size), self.reg_set(reg, size)
        rmw = self.rm_rmw(mod, rm, ea, size)

        gm = self.reg_get(rm, size) if mod == 3 else None
        sm = self.reg_set(rm, size) if mod == 3 else None

        def xadd() -> None:
            src = gr()
            if mod == 3:
                old = gm()
                res = add(old, src)
                sr(old)
                sm(res)  # the destination is written last (XADD r, r with r == r)
            else:
                old = [0]

                def f(d: int) -> int:
                    old[0] = d
                    return add(d, src)

                rmw(f)
                sr(old[0])
            c.eip = nxt

        return xadd
