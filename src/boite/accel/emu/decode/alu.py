"""Integer arithmetic and logic: the ALU group, TEST, INC/DEC, shifts and rotates (group 2), group 3 (TEST/NOT/NEG/MUL/IMUL/DIV/IDIV), IMUL with an immediate, the BCD adjustments."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu.arch import (
    AF,
    CF,
    DE,
    M32,
    MASK,
    OF,
    OP_ADD,
    OP_DEC,
    OP_INC,
    OP_LOGIC,
    OP_NONE,
    OP_SUB,
    PARITY,
    PF,
    SF,
    SIGN,
    ZF,
    CpuFault,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _ea_base_disp,
    _sx,
    _sx8,
)

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu


# Closures of the commonest 32-bit forms, with the operands read inline (no accessor
# closures: fewer objects to make and to call); their values are default arguments.
def _cmp_ri4(c: Cpu, r: list[int], rm: int, f: Callable[[int, int], int], v: int,
             nxt: int) -> Fn:  # fmt: skip
    def cmp_ri4(c: Cpu = c, r: list[int] = r, rm: int = rm, f: Callable[[int, int], int] = f,
                v: int = v, nxt: int = nxt) -> None:  # fmt: skip
        f(r[rm], v)
        c.eip = nxt

    return cmp_ri4


def _cmp_mi4_bd(c: Cpu, r: list[int], rd: Callable[[int], int], sb: list[int], s: int,
                base: int, d: int, f: Callable[[int, int], int], v: int, nxt: int) -> Fn:  # fmt: skip
    def cmp_mi4_bd(c: Cpu = c, r: list[int] = r, rd: Callable[[int], int] = rd,
                   sb: list[int] = sb, s: int = s, base: int = base, d: int = d,
                   f: Callable[[int, int], int] = f, v: int = v, nxt: int = nxt) -> None:  # fmt: skip
        f(rd((sb[s] + r[base] + d) & M32), v)
        c.eip = nxt

    return cmp_mi4_bd


def _test_rr4(c: Cpu, r: list[int], rm: int, reg: int, nxt: int) -> Fn:
    def test_rr4(c: Cpu = c, r: list[int] = r, rm: int = rm, reg: int = reg,
                 nxt: int = nxt) -> None:  # fmt: skip
        c.lres = r[rm] & r[reg]
        c.lop = OP_LOGIC
        c.lmask = M32
        c.eip = nxt

    return test_rr4


class AluOps(DecoderBase):
    def alu_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        f = self.shared.get(("alu", op, size))
        if f is None:
            f = self.shared[("alu", op, size)] = self._new_alu_fn(op, size)
        return f

    def _new_alu_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        """op: 0 ADD 1 OR 2 ADC 3 SBB 4 AND 5 SUB 6 XOR 7 CMP; returns f(a, b) -> result."""
        c = self.c
        m = MASK[size]
        if op == 0:

            def add(a: int, b: int, m=m, c=c) -> int:
                res = a + b
                c.lop = OP_ADD
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return add
        if op == 2:

            def adc(a: int, b: int, m=m, c=c) -> int:
                res = a + b + c.get_cf()
                c.lop = OP_ADD
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return adc
        if op == 3:

            def sbb(a: int, b: int, m=m, c=c) -> int:
                res = a - b - c.get_cf()
                c.lop = OP_SUB
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return sbb
        if op == 5 or op == 7:

            def sub(a: int, b: int, m=m, c=c) -> int:
                res = a - b
                c.lop = OP_SUB
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return sub
        if op == 1:

            def or_(a: int, b: int, m=m, c=c) -> int:
                res = a | b
                c.lop = OP_LOGIC
                c.lres = res
                c.lmask = m
                return res

            return or_
        if op == 4:

            def and_(a: int, b: int, m=m, c=c) -> int:
                res = a & b
                c.lop = OP_LOGIC
                c.lres = res
                c.lmask = m
                return res

            return and_

        def xor(a: int, b: int, m=m, c=c) -> int:
            res = a ^ b
            c.lop = OP_LOGIC
            c.lres = res
            c.lmask = m
            return res

        return xor

    def _alu(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        op = (b >> 3) & 7
        form = b & 7
        size = 1 if form in (0, 2, 4) else (4 if x.op32 else 2)
        f = self.alu_fn(op, size)
        m = MASK[size]
        if form >= 4:
            v = self.imm(x, size)
            nxt = self.nxt(x)
            if size == 4:
                if op == 7:

                    def cmp_eax(v=v, f=f, r=r, c=c, nxt=nxt) -> None:
                        f(r[0], v)
                        c.eip = nxt

                    return cmp_eax

                def alu_eax(v=v, f=f, r=r, c=c, nxt=nxt) -> None:
                    r[0] = f(r[0], v)
                    c.eip = nxt

                return alu_eax
            g = self.reg_get(0, size)
            s = self.reg_set(0, size)
            if op == 7:

                def cmp_acc(f=f, g=g, v=v, c=c, nxt=nxt) -> None:
                    f(g(), v)
                    c.eip = nxt

                return cmp_acc

            def alu_acc(s=s, f=f, g=g, v=v, c=c, nxt=nxt) -> None:
                s(f(g(), v))
                c.eip = nxt

            return alu_acc
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if mod == 3 and size == 4:
            if form == 1:
                d, sr = rm, reg
            else:
                d, sr = reg, rm
            if op == 7:

                def cmp_rr(f=f, r=r, d=d, sr=sr, c=c, nxt=nxt) -> None:
                    f(r[d], r[sr])
                    c.eip = nxt

                return cmp_rr
            if op == 6 and d == sr:

                def xor_zero(m=m, nxt=nxt, r=r, d=d, c=c) -> None:
                    r[d] = 0
                    c.lop = OP_LOGIC
                    c.lres = 0
                    c.lmask = m
                    c.eip = nxt

                return xor_zero

            def alu_rr(f=f, r=r, d=d, sr=sr, c=c, nxt=nxt) -> None:
                r[d] = f(r[d], r[sr])
                c.eip = nxt

            return alu_rr
        if form in (0, 1):  # r/m, reg
            gr = self.reg_get(reg, size)
            if op == 7:
                gm = self.rm_get(mod, rm, ea, size)

                def cmp_mr(f=f, gm=gm, gr=gr, c=c, nxt=nxt) -> None:
                    f(gm(), gr())
                    c.eip = nxt

                return cmp_mr
            rmw = self.rm_rmw(mod, rm, ea, size)

            def alu_mr() -> None:
                b = gr()
                rmw(lambda a: f(a, b))
                c.eip = nxt

            return alu_mr
        gm = self.rm_get(mod, rm, ea, size)
        gr = self.reg_get(reg, size)
        if op == 7:

            def cmp_rm(nxt=nxt, f=f, c=c, gr=gr, gm=gm) -> None:
                f(gr(), gm())
                c.eip = nxt

            return cmp_rm
        sr = self.reg_set(reg, size)
        if size == 4:

            def alu_rm4(nxt=nxt, r=r, reg=reg, f=f, c=c, gm=gm) -> None:
                r[reg] = f(r[reg], gm())
                c.eip = nxt

            return alu_rm4

        def alu_rm(nxt=nxt, sr=sr, c=c, f=f, gr=gr, gm=gm) -> None:
            sr(f(gr(), gm()))
            c.eip = nxt

        return alu_rm

    def _grp1(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b in (0x80, 0x82) else (4 if x.op32 else 2)
        mod, op, rm, ea = self.modrm(x, size == 4)
        if b == 0x83:
            v = _sx8(self.u8(x)) & MASK[size]
        else:
            v = self.imm(x, size)
        nxt = self.nxt(x)
        f = self.alu_fn(op, size)
        if ea is None and mod != 3:  # 32-bit [base + disp] (modrm fuse)
            ea = _ea_base_disp(c.sbase, x.ea_seg, c.r, x.ea_base, x.ea_disp)
            if op == 7:
                return _cmp_mi4_bd(c, c.r, c.rd32, c.sbase, x.ea_seg, x.ea_base, x.ea_disp,
                                   f, v, nxt)  # fmt: skip
        if op == 7:
            if mod == 3 and size == 4:
                return _cmp_ri4(c, c.r, rm, f, v, nxt)
            g = self.rm_get(mod, rm, ea, size)

            def cmp_i(nxt=nxt, f=f, v=v, c=c, g=g) -> None:
                f(g(), v)
                c.eip = nxt

            return cmp_i
        if mod == 3 and size == 4:
            r = c.r

            def alu_ri(nxt=nxt, r=r, rm=rm, f=f, v=v, c=c) -> None:
                r[rm] = f(r[rm], v)
                c.eip = nxt

            return alu_ri
        rmw = self.rm_rmw(mod, rm, ea, size)

        def alu_mi() -> None:
            rmw(lambda a: f(a, v))
            c.eip = nxt

        return alu_mi

    def _test(self, x: Ctx, b: int) -> Fn:
        c = self.c
        if b in (0xA8, 0xA9):
            size = 1 if b == 0xA8 else (4 if x.op32 else 2)
            v = self.imm(x, size)
            g = self.reg_get(0, size)
        else:
            size = 1 if b == 0x84 else (4 if x.op32 else 2)
            mod, reg, rm, ea = self.modrm(x)
            if mod == 3 and size == 4:
                return _test_rr4(c, c.r, rm, reg, self.nxt(x))
            g1 = self.rm_get(mod, rm, ea, size)
            g2 = self.reg_get(reg, size)
            g = None
        nxt = self.nxt(x)
        m = MASK[size]
        if g is not None:

            def test_i(m=m, nxt=nxt, c=c, v=v, g=g) -> None:
                c.lres = g() & v
                c.lop = OP_LOGIC
                c.lmask = m
                c.eip = nxt

            return test_i

        def test(m=m, nxt=nxt, c=c, g1=g1, g2=g2) -> None:
            c.lres = g1() & g2()
            c.lop = OP_LOGIC
            c.lmask = m
            c.eip = nxt

        return test

    def _incdec_fn(self, dec: bool, size: int) -> Callable[[int], int]:
        f = self.shared.get(("incdec", dec, size))
        if f is None:
            f = self.shared[("incdec", dec, size)] = self._new_incdec_fn(dec, size)
        return f

    def _new_incdec_fn(self, dec: bool, size: int) -> Callable[[int], int]:
        c = self.c
        m = MASK[size]
        if dec:

            def f_dec(a: int, m=m, c=c) -> int:
                c.lcf = c.get_cf()
                res = a - 1
                c.lop = OP_DEC
                c.la = a
                c.lb = 1
                c.lres = res
                c.lmask = m
                return res & m

            return f_dec

        def f_inc(a: int, m=m, c=c) -> int:
            c.lcf = c.get_cf()
            res = a + 1
            c.lop = OP_INC
            c.la = a
            c.lb = 1
            c.lres = res
            c.lmask = m
            return res & m

        return f_inc

    def _incdec_r(self, x: Ctx, b: int) -> Fn:
        c = self.c
        n = b & 7
        size = 4 if x.op32 else 2
        f = self._incdec_fn(b >= 0x48, size)
        nxt = self.nxt(x)
        if size == 4:
            r = c.r

            def incdec4(nxt=nxt, r=r, n=n, f=f, c=c) -> None:
                r[n] = f(r[n])
                c.eip = nxt

            return incdec4
        g = self.reg_get(n, size)
        s = self.reg_set(n, size)

        def incdec(nxt=nxt, s=s, c=c, f=f, g=g) -> None:
            s(f(g()))
            c.eip = nxt

        return incdec

    def shift_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        f = self.shared.get(("shift", op, size))
        if f is None:
            f = self.shared[("shift", op, size)] = self._new_shift_fn(op, size)
        return f

    def _new_shift_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        """ROL ROR RCL RCR SHL SHR SAL SAR with eager flags; f(value, count) -> result."""
        c = self.c
        bits = size * 8
        m = MASK[size]
        sign = SIGN[size]

        def shift(v: int, cnt: int, sign=sign, c=c, op=op, bits=bits, m=m) -> int:
            cnt &= 31
            if cnt == 0:
                return v
            f = c.get_flags()
            if op == 0 or op == 1:  # ROL / ROR
                n = cnt % bits
                if op == 0:
                    res = ((v << n) | (v >> (bits - n))) & m if n else v
                    cf = res & 1
                    of = (1 if res & sign else 0) ^ cf
                else:
                    res = ((v >> n) | (v << (bits - n))) & m if n else v
                    cf = 1 if res & sign else 0
                    of = ((res >> (bits - 1)) ^ (res >> (bits - 2))) & 1
                f = (f & ~(CF | OF)) | cf | (OF if of else 0)
                c.fl = f
                c.lop = OP_NONE
                return res
            if op == 2 or op == 3:  # RCL / RCR through CF
                n = cnt % (bits + 1)
                cin = f & 1
                if n == 0:
                    res = v
                    cf = cin
                    of = ((1 if res & sign else 0) ^ cf) if op == 2 else 0
                elif op == 2:
                    w = (cin << bits) | v
                    w = ((w << n) | (w >> (bits + 1 - n))) & ((m << 1) | 1)
                    res = w & m
                    cf = w >> bits
                    of = (1 if res & sign else 0) ^ cf
                else:
                    of = (1 if v & sign else 0) ^ cin
                    w = (cin << bits) | v
                    w = ((w >> n) | (w << (bits + 1 - n))) & ((m << 1) | 1)
                    res = w & m
                    cf = w >> bits
                f = (f & ~(CF | OF)) | cf | (OF if of else 0)
                c.fl = f
                c.lop = OP_NONE
                return res
            if op == 4 or op == 6:  # SHL
                res = (v << cnt) & m
                cf = (v >> (bits - cnt)) & 1 if cnt <= bits else 0
                of = (1 if res & sign else 0) ^ cf
            elif op == 5:  # SHR
                res = v >> cnt
                cf = (v >> (cnt - 1)) & 1 if cnt <= bits else 0
                of = 1 if v & sign else 0
            else:  # SAR
                sv = v - (sign << 1) if v & sign else v
                res = (sv >> cnt) & m
                cf = (sv >> (cnt - 1)) & 1 if cnt <= bits else (1 if sv < 0 else 0)
                of = 0
            f &= ~(CF | OF | ZF | SF | PF | AF)
            f |= cf | (OF if of else 0) | PARITY[res & 0xFF]
            if res == 0:
                f |= ZF
            if res & sign:
                f |= SF
            c.fl = f
            c.lop = OP_NONE
            return res

        return shift

    def _grp2(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 1 if b in (0xC0, 0xD0, 0xD2) else (4 if x.op32 else 2)
        mod, op, rm, ea = self.modrm(x)
        if b in (0xC0, 0xC1):
            cnt = self.u8(x)
        elif b in (0xD0, 0xD1):
            cnt = 1
        else:
            cnt = -1
        nxt = self.nxt(x)
        f = self.shift_fn(op, size)
        rmw = self.rm_rmw(mod, rm, ea, size)
        if cnt >= 0:

            def shift_i() -> None:
                rmw(lambda v: f(v, cnt))
                c.eip = nxt

            return shift_i

        def shift_cl() -> None:
            n = r[1] & 0xFF
            rmw(lambda v: f(v, n))
            c.eip = nxt

        return shift_cl

    def _grp3(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 1 if b == 0xF6 else (4 if x.op32 else 2)
        m = MASK[size]
        sign = SIGN[size]
        bits = size * 8
        mod, op, rm, ea = self.modrm(x)
        if op in (0, 1):
            v = self.imm(x, size)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, size)
        if op in (0, 1):

            def test_i(m=m, nxt=nxt, c=c, v=v, g=g) -> None:
                c.lres = g() & v
                c.lop = OP_LOGIC
                c.lmask = m
                c.eip = nxt

            return test_i
        if op == 2:
            rmw = self.rm_rmw(mod, rm, ea, size)

            def not_() -> None:
                rmw(lambda a: a ^ m)
                c.eip = nxt

            return not_
        if op == 3:
            rmw = self.rm_rmw(mod, rm, ea, size)

            def neg_f(a: int, m=m, c=c) -> int:
                res = -a
                c.lop = OP_SUB
                c.la = 0
                c.lb = a
                c.lres = res
                c.lmask = m
                return res & m

            def neg(nxt=nxt, rmw=rmw, neg_f=neg_f, c=c) -> None:
                rmw(neg_f)
                c.eip = nxt

            return neg

        def setmul(lo: int, hi_nonzero: bool, sign=sign, c=c, m=m) -> None:
            f = c.get_flags() & ~(CF | OF | ZF | SF | PF | AF)
            if hi_nonzero:
                f |= CF | OF
            f |= PARITY[lo & 0xFF]
            if lo & m == 0:
                f |= ZF
            if lo & sign:
                f |= SF
            c.fl = f
            c.lop = OP_NONE

        if size == 1:

            def get_acc(r=r) -> int:
                return r[0] & 0xFFFF

            def set_res(lo: int, hi: int, r=r) -> None:
                r[0] = (r[0] & 0xFFFF0000) | (hi << 8) | lo

            def get_hi(r=r) -> int:
                return (r[0] >> 8) & 0xFF
        else:

            def get_acc(bits=bits, m=m, r=r) -> int:
                return ((r[2] & m) << bits) | (r[0] & m)

            def set_res(lo: int, hi: int, size=size, r=r) -> None:
                if size == 4:
                    r[0], r[2] = lo, hi
                else:
                    r[0] = (r[0] & 0xFFFF0000) | lo
                    r[2] = (r[2] & 0xFFFF0000) | hi

            def get_hi(m=m, r=r) -> int:
                return r[2] & m

        if op == 4:

            def mul(nxt=nxt, set_res=set_res, setmul=setmul, c=c, m=m, g=g, bits=bits, r=r) -> None:
                a = (r[0] & m) * g()
                set_res(a & m, a >> bits)
                setmul(a & m, (a >> bits) != 0)
                c.eip = nxt

            return mul
        if op == 5:

            def imul(
                nxt=nxt, m=m, set_res=set_res, setmul=setmul, c=c, size=size, g=g, bits=bits, r=r
            ) -> None:
                a = _sx(r[0] & m, size) * _sx(g(), size)
                lo = a & m
                set_res(lo, (a >> bits) & m)
                setmul(lo, _sx(lo, size) != a)
                c.eip = nxt

            return imul
        if op == 6:

            def div(nxt=nxt, g=g, get_acc=get_acc, m=m, set_res=set_res, c=c) -> None:
                d = g()
                if d == 0:
                    raise CpuFault(DE)
                n = get_acc()
                q, rem = divmod(n, d)
                if q > m:
                    raise CpuFault(DE)
                set_res(q, rem)
                c.eip = nxt

            return div

        def idiv(
            nxt=nxt, size=size, set_res=set_res, c=c, g=g, get_acc=get_acc, m=m, sign=sign
        ) -> None:
            d = _sx(g(), size)
            if d == 0:
                raise CpuFault(DE)
            n = _sx(get_acc(), size * 2)
            q = abs(n) // abs(d)
            if (n < 0) != (d < 0):
                q = -q
            rem = n - q * d
            if q > (sign - 1) or q < -sign:
                raise CpuFault(DE)
            set_res(q & m, rem & m)
            c.eip = nxt

        del get_hi
        return idiv

    def _imul3(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        if b == 0x69:
            v = _sx(self.imm(x, size), size)
        elif b == 0x6B:
            v = _sx8(self.u8(x))
        else:
            v = None
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, size)
        gr = self.reg_get(reg, size)
        s = self.reg_set(reg, size)
        m = MASK[size]
        sign = SIGN[size]

        def imul3(nxt=nxt, size=size, v=v, m=m, s=s, c=c, g=g, gr=gr, sign=sign) -> None:
            a = _sx(g(), size)
            bb = v if v is not None else _sx(gr(), size)
            p = a * bb
            lo = p & m
            s(lo)
            f = c.get_flags() & ~(CF | OF | ZF | SF | PF | AF)
            if _sx(lo, size) != p:
                f |= CF | OF
            f |= PARITY[lo & 0xFF] | (ZF if lo == 0 else 0) | (SF if lo & sign else 0)
            c.fl = f
            c.lop = OP_NONE
            c.eip = nxt

        return imul3

    def _bcd(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        base = self.u8(x) if b in (0xD4, 0xD5) else 10
        nxt = self.nxt(x)

        def szp(f: int, v: int) -> int:
            f &= ~(ZF | SF | PF)
            v &= 0xFF
            return f | (ZF if v == 0 else 0) | (v & 0x80) | PARITY[v]

        def bcd(nxt=nxt, b=b, c=c, r=r, szp=szp, base=base) -> None:
            f = c.get_flags()
            al = r[0] & 0xFF
            ah = (r[0] >> 8) & 0xFF
            if b in (0x27, 0x2F):  # DAA / DAS
                old_al, old_cf, af_in = al, f & CF, f & AF
                f &= ~(CF | AF)
                step = 6 if b == 0x27 else -6
                if (old_al & 0xF) > 9 or af_in:
                    if b == 0x2F and (old_al < 6 or old_cf):
                        f |= CF  # DAS keeps the borrow of the low-digit step (SDM)
                    al = (al + step) & 0xFF
                    f |= AF
                if old_al > 0x99 or old_cf:
                    al = (al + 16 * step) & 0xFF
                    f |= CF
                f = szp(f, al)
                r[0] = (r[0] & 0xFFFFFF00) | al
            elif b in (0x37, 0x3F):  # AAA / AAS
                if (al & 0xF) > 9 or f & AF:
                    if b == 0x37:
                        ax = (r[0] + 0x106) & 0xFFFF
                    else:
                        ax = ((r[0] & 0xFFFF) - 6) & 0xFFFF
                        ax = (ax & 0xFF) | ((((ax >> 8) - 1) & 0xFF) << 8)
                    f |= AF | CF
                else:
                    ax = r[0] & 0xFFFF
                    f &= ~(AF | CF)
                ax &= 0xFF0F
                r[0] = (r[0] & 0xFFFF0000) | ax
                f = szp(f, ax)
            elif b == 0xD4:  # AAM
                if base == 0:
                    raise CpuFault(DE)
                ah, al = divmod(al, base)
                r[0] = (r[0] & 0xFFFF0000) | (ah << 8) | al
                f = szp(f & ~(OF | AF | CF), al)
            else:  # AAD
                al = (al + ah * base) & 0xFF
                r[0] = (r[0] & 0xFFFF0000) | al
                f = szp(f & ~(OF | AF | CF), al)
            c.fl = f | 2
            c.lop = OP_NONE
            c.eip = nxt

        return bcd
