"""Control flow: Jcc, JMP, CALL, RET/RETF, far pointers, LOOP/JCXZ, INT/INTO/INT3, IRET, and group 5 (INC/DEC/CALL/JMP/PUSH r/m)."""

from __future__ import annotations

from boite.accel.emu.arch import (
    GP,
    M16,
    M32,
    MASK,
    OF,
    VM,
    ZF,
    CpuFault,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _sx,
    _sx8,
)


class BranchOps(DecoderBase):
    def _jcc(self, x: Ctx, b: int) -> Fn:
        c = self.c
        if b < 0x80:
            d = _sx8(self.u8(x))
            cc = b & 15
        else:
            d = _sx(self.imm(x, 4 if x.op32 else 2), 4 if x.op32 else 2)
            cc = b & 15
        nxt = self.nxt(x)
        tgt = (nxt + d) & (M32 if x.op32 else M16)
        cond = c.cond
        k = cc >> 1
        neg = cc & 1
        if k == 2:  # Z / NZ: straight from the lazy result

            def jz(c=c, nxt=nxt, tgt=tgt, neg=neg) -> None:
                if c.lop:
                    z = (c.lres & c.lmask) == 0
                else:
                    z = bool(c.fl & ZF)
                c.eip = nxt if z == neg else tgt

            return jz

        def jcc(c=c, tgt=tgt, nxt=nxt, cond=cond, cc=cc) -> None:
            c.eip = tgt if cond(cc) else nxt

        return jcc

    def _jmp(self, x: Ctx, b: int) -> Fn:
        c = self.c
        if b == 0xEB:
            d = _sx8(self.u8(x))
        else:
            size = 4 if x.op32 else 2
            d = _sx(self.imm(x, size), size)
        nxt = self.nxt(x)
        tgt = (nxt + d) & (M32 if x.op32 else M16)

        def jmp(tgt=tgt, c=c) -> None:
            c.eip = tgt

        return jmp

    def _call(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        d = _sx(self.imm(x, size), size)
        nxt = self.nxt(x)
        tgt = (nxt + d) & MASK[size]

        def call(tgt=tgt, nxt=nxt, size=size, c=c) -> None:
            c.push(nxt, size)
            c.eip = tgt

        return call

    def _ret(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        imm = self.u16(x) if b == 0xC2 else 0

        def ret(size=size, c=c, imm=imm) -> None:
            v = c.peek(0, size)
            c.sp_add(size + imm)
            c.eip = v

        return ret

    def _retf(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        imm = self.u16(x) if b == 0xCA else 0

        def retf(size=size, imm=imm, c=c) -> None:
            c.far_return(size, imm)

        return retf

    def _far_ptr(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        off = self.imm(x, size)
        sel = self.u16(x)
        nxt = self.nxt(x)
        call = b == 0x9A

        def far(sel=sel, off=off, call=call, size=size, nxt=nxt, c=c) -> None:
            c.far_jump(sel, off, call, size, nxt)

        return far

    def _loop(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        d = _sx8(self.u8(x))
        nxt = self.nxt(x)
        tgt = (nxt + d) & (M32 if x.op32 else M16)
        cm = M32 if x.ad32 else M16

        def loop(b=b, c=c, tgt=tgt, nxt=nxt, cm=cm, r=r) -> None:
            if b == 0xE3:
                take = (r[1] & cm) == 0
            else:
                cnt = (r[1] - 1) & cm
                r[1] = (r[1] & ~cm & M32) | cnt
                if b == 0xE2:
                    take = cnt != 0
                elif b == 0xE1:
                    take = cnt != 0 and c.cond(4)
                else:
                    take = cnt != 0 and not c.cond(4)
            c.eip = tgt if take else nxt

        return loop

    def _int(self, x: Ctx, b: int) -> Fn:
        c = self.c
        vec = 3 if b == 0xCC else 1 if b == 0xF1 else 4 if b == 0xCE else self.u8(x)
        nxt = self.nxt(x)

        def int_n(nxt=nxt, vec=vec, b=b, c=c) -> None:
            if b == 0xCE and not c.get_flags() & OF:
                c.eip = nxt
                return
            # INT n (not INT3/INTO/INT1) is IOPL-sensitive in virtual-8086 mode.
            if c.fl & VM and b == 0xCD and (c.fl >> 12) & 3 < 3:
                raise CpuFault(GP, 0)
            c.interrupt(vec, None, b != 0xF1, nxt)

        return int_n

    def _iret(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)

        def iret(size=size, nxt=nxt, c=c) -> None:
            c.iret(size, nxt)

        return iret

    def _grp45(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 1 if b == 0xFE else (4 if x.op32 else 2)
        mod, op, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if op in (0, 1):
            f = self._incdec_fn(op == 1, size)
            rmw = self.rm_rmw(mod, rm, ea, size)

            def incdec(nxt=nxt, rmw=rmw, f=f, c=c) -> None:
                rmw(f)
                c.eip = nxt

            return incdec
        if b == 0xFE or op == 7:
            return self._ud(x, b)
        g = self.rm_get(mod, rm, ea, size)
        if op in (2, 4):
            call = op == 2

            def jmp_ind(call=call, g=g, c=c, nxt=nxt, size=size) -> None:
                t = g()
                if call:
                    c.push(nxt, size)
                c.eip = t

            return jmp_ind
        if op in (3, 5):
            if mod == 3:
                return self._ud(x, b)
            rd = self.rdfn(size)
            ea = self.ea_for(ea, size + 2, False)

            def far_ind(ea=ea, rd=rd, size=size, nxt=nxt, c=c, op=op) -> None:
                a = ea()
                off = rd(a)
                sel = c.rd16((a + size) & M32)
                c.far_jump(sel, off, op == 3, size, nxt)

            return far_ind

        def push_rm(nxt=nxt, size=size, c=c, g=g) -> None:
            c.push(g(), size)
            c.eip = nxt

        del r
        return push_rm
