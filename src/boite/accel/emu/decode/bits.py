"""Bit instructions: BT/BTS/BTR/BTC, BSF/BSR, SHLD/SHRD."""

from __future__ import annotations

from boite.accel.emu.arch import (
    AF,
    CF,
    M16,
    M32,
    MASK,
    OF,
    OP_NONE,
    PARITY,
    PF,
    SF,
    SIGN,
    ZF,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _sx,
)


class BitOps(DecoderBase):
    def _bt(self, x: Ctx, b: int) -> Fn:
        """BT/BTS/BTR/BTC r/m, reg|imm8."""
        c = self.c
        size = 4 if x.op32 else 2
        bits = size * 8
        mod, reg, rm, ea = self.modrm(x)
        if b == 0xBA:
            op = reg - 4
            if op < 0:
                return self._ud(x, b)
            imm = self.u8(x) & (bits - 1)
            gb = None
        else:
            op = {0xA3: 0, 0xAB: 1, 0xB3: 2, 0xBB: 3}[b]
            imm = 0
            gb = self.reg_get(reg, size)
        nxt = self.nxt(x)
        rd, wr = self.rdfn(size), self.wrfn(size)
        gr = self.reg_get(rm, size) if mod == 3 else None
        sr = self.reg_set(rm, size) if mod == 3 else None
        so = getattr(ea, "segoff", None) if mod != 3 else None
        if so is not None:
            # The bit offset moves the operand: check the offset it lands on.
            boff, bseg = so
            blin = self.lin_fn(bseg, size, op != 0)
            am = M32 if x.ad32 else M16
            ea_at = lambda off, blin=blin, am=am, boff=boff: blin((boff() + off) & am)  # noqa: E731
        else:
            ea_at = lambda off, ea=ea: (ea() + off) & M32  # noqa: E731

        def bt(
            op=op,
            nxt=nxt,
            gb=gb,
            imm=imm,
            mod=mod,
            c=c,
            gr=gr,
            ea_at=ea_at,
            rd=rd,
            size=size,
            bits=bits,
            sr=sr,
            wr=wr,
        ) -> None:
            if gb is None:
                n = imm
                off = 0
            else:
                n = gb()
                if mod != 3:
                    sn = _sx(n, size)
                    off = (sn >> (5 if size == 4 else 4)) * size
                    n &= bits - 1
                else:
                    off = 0
                    n &= bits - 1
            if mod == 3:
                v = gr()
            else:
                a = ea_at(off)
                v = rd(a)
            bit = (v >> n) & 1
            if op:
                if op == 1:
                    nv = v | (1 << n)
                elif op == 2:
                    nv = v & ~(1 << n)
                else:
                    nv = v ^ (1 << n)
                if mod == 3:
                    sr(nv)
                else:
                    wr(a, nv)
            c.set_flags(bit, CF)
            c.eip = nxt

        return bt

    def _bsf(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, size)
        s = self.reg_set(reg, size)

        def bsf(nxt=nxt, g=g, c=c, s=s, b=b) -> None:
            v = g()
            if v == 0:
                c.set_flags(ZF, ZF)
            else:
                s((v & -v).bit_length() - 1 if b == 0xBC else v.bit_length() - 1)
                c.set_flags(0, ZF)
            c.eip = nxt

        return bsf

    def _shd(self, x: Ctx, b: int) -> Fn:
        """SHLD/SHRD."""
        c = self.c
        r = c.r
        size = 4 if x.op32 else 2
        bits = size * 8
        m = MASK[size]
        sign = SIGN[size]
        mod, reg, rm, ea = self.modrm(x)
        cnt_imm = self.u8(x) if b in (0xA4, 0xAC) else -1
        nxt = self.nxt(x)
        rmw = self.rm_rmw(mod, rm, ea, size)
        g = self.reg_get(reg, size)
        left = b in (0xA4, 0xA5)

        def shd() -> None:
            cnt = (cnt_imm if cnt_imm >= 0 else r[1]) & 31
            if cnt == 0:
                # Still a read-modify-write of the destination, as the group-2 shifts
                # (QEMU stores it back; a read-only page faults, the PTE gets its D bit:
                # the native tier's crash fuzz, seed 53709).
                rmw(lambda d: d)
                c.eip = nxt
                return
            src = g()

            def f(d: int) -> int:
                if left:
                    w = (d << bits) | src
                    res = (w >> (bits - cnt)) & m if cnt <= bits else (w << (cnt - bits)) & m
                    cf = (d >> (bits - cnt)) & 1 if cnt <= bits else (src >> (2 * bits - cnt)) & 1
                else:
                    w = (src << bits) | d
                    res = (w >> cnt) & m
                    cf = (w >> (cnt - 1)) & 1
                fl = c.get_flags() & ~(CF | OF | ZF | SF | PF | AF)
                fl |= cf | PARITY[res & 0xFF] | (ZF if res == 0 else 0) | (SF if res & sign else 0)
                if (res ^ d) & sign:
                    fl |= OF
                c.fl = fl
                c.lop = OP_NONE
                return res

            rmw(f)
            c.eip = nxt

        return shd
