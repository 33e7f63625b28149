"""MMX, SSE/SSE2 integer forms and the 0F AE group (`SseOps`): closures over the MMX
registers (the x87 registers' low 64 bits), the XMM registers and MXCSR in `FpuState`,
with the semantics in sse.py.

Checks (SDM vol. 3, 13.1/table 2-... "#UD/#NM conditions"): MMX forms are #UD with
CR0.EM, #NM with CR0.TS, deliver a pending x87 exception (#MF) first, and leave TOP = 0
and every tag valid (EMMS empties them). SSE/SSE2 forms are #UD with CR0.EM or without
CR4.OSFXSR, #NM with CR0.TS, and #GP(0) on a misaligned 16-byte memory operand except
for the unaligned moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from boite.accel.emu import fpu as F
from boite.accel.emu import sse as S
from boite.accel.emu.arch import GP, NM, UD, XM, CpuFault
from boite.accel.emu.decode.fpu import read_bytes, write_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from boite.accel.emu.decode.core import Ctx

    Fn = Callable[[], None]

M64 = (1 << 64) - 1
MMX_EXP = 0xFFFF << 64  # an MMX write sets the register's exponent bits to ones


class SseOps:
    """Decoder mixin: MMX/SSE rows of the opcode table."""

    # ------------------------------------------------------------ checks
    def _simd_guard(self, xmm: bool):
        c = self.c  # type: ignore[attr-defined]

        if xmm:

            def guard_xmm() -> F.FpuState:
                if c.cr0 & 4 or not c.cr4 & 0x200:
                    raise CpuFault(UD)
                if c.cr0 & 8:
                    raise CpuFault(NM)
                return c.fpu

            return guard_xmm

        def guard_mmx() -> F.FpuState:
            if c.cr0 & 4:
                raise CpuFault(UD)
            if c.cr0 & 8:
                raise CpuFault(NM)
            f = c.fpu
            if f.sw & F.ES:
                c.fpu_error()
            f.top = 0
            f.empty = 0
            return f

        return guard_mmx

    def _simd_src(self, x: Ctx, mod: int, rm: int, ea, xmm: bool, aligned: bool = True,
                  size: int | None = None):  # fmt: skip
        """A closure reading the r/m operand (MMX/XMM register or memory)."""
        c = self.c  # type: ignore[attr-defined]
        n = size or (16 if xmm else 8)
        if mod == 3:
            if xmm:
                return lambda: c.fpu.xmm[rm]
            return lambda: c.fpu.regs[rm] & M64
        ea_r = self.ea_for(ea, n, False)  # type: ignore[attr-defined]
        check = aligned and n == 16

        def mem() -> int:
            lin = ea_r()
            if check and lin & 15:
                raise CpuFault(GP, 0)
            return read_bytes(c, lin, n)

        return mem

    # ------------------------------------------------------------ packed integer ops
    def _packed(self, x: Ctx, b: int) -> Fn:
        xmm = x.p66
        if x.rep or (not xmm and b not in S.MMX_ONLY and b not in (0xD4, 0xFB, 0xF4) and
                     b not in (0xDA, 0xDE, 0xE0, 0xE3, 0xE4, 0xEA, 0xEE, 0xF6)) or (
            not xmm and b in (0x6C, 0x6D)
        ):  # fmt: skip
            return self._ud(x, b)  # type: ignore[attr-defined]
        c = self.c  # type: ignore[attr-defined]
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        guard = self._simd_guard(xmm)
        src = self._simd_src(x, mod, rm, ea, xmm)
        width = 128 if xmm else 64
        if b in S.SHIFTS:
            kind, w = S.SHIFTS[b]

            def fn(a: int, cnt: int, width: int) -> int:
                return S.shift(kind, w, a, cnt & M64 if cnt >> 64 == 0 else 1 << 64, width)

            if xmm:
                fn0 = fn

                def fn(a: int, cnt: int, width: int) -> int:  # the count is the low quadword
                    cnt &= M64
                    return fn0(a, cnt, width)
        else:
            fn = S.PACKED[b]
        if xmm:

            def op_xmm() -> None:
                f = guard()
                v = src()
                f.xmm[reg] = fn(f.xmm[reg], v, 128)
                c.eip = nxt

            return op_xmm

        def op_mmx() -> None:
            f = guard()
            v = src()
            f.regs[reg] = MMX_EXP | fn(f.regs[reg] & M64, v, width)
            c.eip = nxt

        return op_mmx

    def _shift_imm(self, x: Ctx, b: int) -> Fn:
        """0F 71/72/73: PSRLW/PSRAW/PSLLW, D, Q by an immediate; PSRLDQ/PSLLDQ (66)."""
        xmm = x.p66
        c = self.c  # type: ignore[attr-defined]
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        imm = self.u8(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        w = {0x71: 16, 0x72: 32, 0x73: 64}[b]
        kind = {2: "srl", 4: "sra", 6: "sll"}.get(reg)
        bytewise = b == 0x73 and reg in (3, 7)
        if (
            mod != 3
            or x.rep
            or (kind is None and not (bytewise and xmm))
            or (b == 0x73 and reg == 4)
        ):
            return self._ud(x, b)  # type: ignore[attr-defined]
        guard = self._simd_guard(xmm)

        def op() -> None:
            f = guard()
            if xmm:
                a = f.xmm[rm]
                if bytewise:
                    f.xmm[rm] = S.byte_shift(a, imm, reg == 7)
                else:
                    f.xmm[rm] = S.shift(kind, w, a, imm, 128)  # type: ignore[arg-type]
            else:
                f.regs[rm] = MMX_EXP | S.shift(kind, w, f.regs[rm] & M64, imm, 64)  # type: ignore[arg-type]
            c.eip = nxt

        return op

    # ------------------------------------------------------------ moves
    def _movdq(self, x: Ctx, b: int) -> Fn:
        """MOVD/MOVQ between MMX/XMM and GPR/memory; MOVDQA/MOVDQU; MOVQ xmm forms."""
        if b == 0xD6 and x.rep:
            return self._ssemisc(x, b)  # MOVQ2DQ / MOVDQ2Q
        c = self.c  # type: ignore[attr-defined]
        r = c.r
        pre = x.rep or (0x66 if x.p66 else 0)
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        if pre == 0xF2:
            return self._ud(x, b)  # type: ignore[attr-defined]
        xmm = pre != 0
        guard = self._simd_guard(xmm)
        if b == 0x6E and pre in (0, 0x66):  # MOVD mm/xmm, r/m32
            get = self.rm_get(mod, rm, ea, 4)  # type: ignore[attr-defined]

            def movd_in() -> None:
                f = guard()
                v = get()
                if xmm:
                    f.xmm[reg] = v
                else:
                    f.regs[reg] = MMX_EXP | v
                c.eip = nxt

            return movd_in
        if b == 0x7E and pre in (0, 0x66):  # MOVD r/m32, mm/xmm
            put = self.rm_set(mod, rm, ea, 4)  # type: ignore[attr-defined]

            def movd_out() -> None:
                f = guard()
                put((f.xmm[reg] if xmm else f.regs[reg]) & 0xFFFFFFFF)
                c.eip = nxt

            del r
            return movd_out
        if (b == 0x7E and pre == 0xF3) or (b == 0x6F and pre == 0):  # MOVQ load
            src = self._simd_src(x, mod, rm, ea, pre == 0xF3 and mod == 3, size=8)
            to_xmm = pre == 0xF3
            if to_xmm and mod == 3:
                src = (lambda s: lambda: s() & M64)(src)

            def movq_in() -> None:
                f = guard()
                v = src()
                if to_xmm:
                    f.xmm[reg] = v
                else:
                    f.regs[reg] = MMX_EXP | v
                c.eip = nxt

            return movq_in
        if (b == 0xD6 and pre == 0x66) or (b == 0x7F and pre == 0):  # MOVQ store
            from_xmm = pre == 0x66
            ea_w = self.ea_for(ea, 8, True) if mod != 3 else None  # type: ignore[attr-defined]

            def movq_out() -> None:
                f = guard()
                v = (f.xmm[reg] if from_xmm else f.regs[reg]) & M64
                if ea_w is None:
                    if from_xmm:
                        f.xmm[rm] = v
                    else:
                        f.regs[rm] = MMX_EXP | v
                else:
                    write_bytes(c, ea_w(), 8, v)
                c.eip = nxt

            return movq_out
        if b in (0x6F, 0x7F) and pre in (0x66, 0xF3):  # MOVDQA / MOVDQU
            aligned = pre == 0x66
            if b == 0x6F:
                src = self._simd_src(x, mod, rm, ea, True, aligned)

                def movdq_in() -> None:
                    f = guard()
                    f.xmm[reg] = src()
                    c.eip = nxt

                return movdq_in
            ea_w = self.ea_for(ea, 16, True) if mod != 3 else None  # type: ignore[attr-defined]

            def movdq_out() -> None:
                f = guard()
                if ea_w is None:
                    f.xmm[rm] = f.xmm[reg]
                else:
                    lin = ea_w()
                    if aligned and lin & 15:
                        raise CpuFault(GP, 0)
                    write_bytes(c, lin, 16, f.xmm[reg])
                c.eip = nxt

            return movdq_out
        return self._ud(x, b)  # type: ignore[attr-defined]

    def _emms(self, x: Ctx, b: int) -> Fn:
        c = self.c  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        if x.rep or x.p66:
            return self._ud(x, b)  # type: ignore[attr-defined]
        guard = self._simd_guard(False)

        def emms() -> None:
            f = guard()
            f.empty = 0xFF
            c.eip = nxt

        return emms

    def _pmovmskb(self, x: Ctx, b: int) -> Fn:
        c = self.c  # type: ignore[attr-defined]
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        xmm = x.p66
        if mod != 3 or x.rep:
            return self._ud(x, b)  # type: ignore[attr-defined]
        guard = self._simd_guard(xmm)
        r = c.r

        def pmovmskb() -> None:
            f = guard()
            r[reg] = S.pmovmskb(f.xmm[rm], 128) if xmm else S.pmovmskb(f.regs[rm] & M64, 64)
            c.eip = nxt

        return pmovmskb

    def _pshuf(self, x: Ctx, b: int) -> Fn:
        """0F 70: PSHUFW (MMX), PSHUFD (66), PSHUFHW (F3), PSHUFLW (F2)."""
        c = self.c  # type: ignore[attr-defined]
        pre = x.rep or (0x66 if x.p66 else 0)
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        xmm = pre != 0
        src = self._simd_src(x, mod, rm, ea, xmm)
        imm = self.u8(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        guard = self._simd_guard(xmm)

        def pshuf() -> None:
            f = guard()
            v = src()
            if pre == 0:
                f.regs[reg] = MMX_EXP | S.pshufw(v, imm)
            elif pre == 0x66:
                f.xmm[reg] = S.pshufd(v, imm)
            elif pre == 0xF2:
                f.xmm[reg] = (v >> 64 << 64) | S.pshufw(v & M64, imm)
            else:
                f.xmm[reg] = (S.pshufw(v >> 64, imm) << 64) | (v & M64)
            c.eip = nxt

        return pshuf

    # ------------------------------------------------------------ 0F AE
    def _grp15(self, x: Ctx, b: int) -> Fn:
        """FXSAVE, FXRSTOR, LDMXCSR, STMXCSR, LFENCE, MFENCE, SFENCE, CLFLUSH."""
        c = self.c  # type: ignore[attr-defined]
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        if x.rep or x.p66:
            return self._ud(x, b)  # type: ignore[attr-defined]
        if mod == 3:
            if reg in (5, 6, 7):  # the fences: this CPU orders everything already

                def fence() -> None:
                    c.eip = nxt

                return fence
            return self._ud(x, b)  # type: ignore[attr-defined]
        if reg == 7:  # CLFLUSH: no caches to flush, but the access is checked
            ea_r = self.ea_for(ea, 1, False)  # type: ignore[attr-defined]

            def clflush() -> None:
                c.rd8(ea_r())
                c.eip = nxt

            return clflush
        if reg in (0, 1):
            save = reg == 0
            ea_a = self.ea_for(ea, 512, save)  # type: ignore[attr-defined]

            def fxsave_rstor() -> None:
                if c.cr0 & 0xC:
                    raise CpuFault(NM)
                f = c.fpu
                lin = ea_a()
                if lin & 15:
                    raise CpuFault(GP, 0)
                with_xmm = bool(c.cr4 & 0x200)  # OSFXSR: the SSE state too
                if save:
                    img = f.fxsave_image(with_xmm)
                    if not with_xmm:  # the XMM area is left as it was in memory
                        old = read_bytes(c, lin + 160, 128).to_bytes(128, "little")
                        img[160:288] = old
                    write_bytes(c, lin, 512, int.from_bytes(img, "little"))
                else:
                    img = read_bytes(c, lin, 512).to_bytes(512, "little")
                    if not F.mxcsr_valid(int.from_bytes(img[24:28], "little")):
                        raise CpuFault(GP, 0)
                    f.fxrstor_image(img, with_xmm)
                    c.fpu_ferr_update()
                c.eip = nxt

            return fxsave_rstor
        if reg in (2, 3):
            load = reg == 2
            ea_a = self.ea_for(ea, 4, not load)  # type: ignore[attr-defined]
            guard = self._simd_guard(True)

            def mxcsr_op() -> None:
                f = guard()
                lin = ea_a()
                if load:
                    v = c.rd32(lin)
                    if not F.mxcsr_valid(v):
                        raise CpuFault(GP, 0)
                    f.mxcsr = v
                else:
                    c.wr32(lin, f.mxcsr)
                c.eip = nxt

            return mxcsr_op
        return self._ud(x, b)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ SSE/SSE2 floating point
    def _ssefp(self, x: Ctx, b: int) -> Fn:
        """Scalar and packed single/double arithmetic, logic, moves, compares and
        conversions: no prefix = PS, 66 = PD, F3 = SS, F2 = SD."""
        c = self.c  # type: ignore[attr-defined]
        pre = x.rep or (0x66 if x.p66 else 0)
        double = pre in (0x66, 0xF2)
        scalar = pre in (0xF3, 0xF2)
        if b in (0x2A, 0x2C, 0x2D) and not scalar:
            return self._ssemisc(x, b)  # the MMX-register conversions
        w = 64 if double else 32
        lane_mask = (1 << w) - 1
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        guard = self._simd_guard(True)
        r = c.r
        imm = None
        if b in (0xC2, 0xC6):
            imm_pos = True
        else:
            imm_pos = False
        # memory operand size: scalar lanes read only their bytes (no alignment rule)
        size = (w // 8) if scalar else 16
        if b == 0x2A:
            src = self.rm_get(mod, rm, ea, 4)  # type: ignore[attr-defined]
        elif b in (0x2E, 0x2F) and pre in (0, 0x66):
            src = self._simd_src(x, mod, rm, ea, True, False, 8 if double else 4)
            if mod == 3:
                src = (lambda s: lambda: s() & lane_mask)(src)
        elif b in (0x2E, 0x2F):
            return self._ud(x, b)  # type: ignore[attr-defined]
        elif b == 0x5A and pre == 0 and mod != 3:
            src = self._simd_src(x, mod, rm, ea, True, False, 8)  # CVTPS2PD reads 64 bits
        else:
            unaligned = scalar or b in (0x10, 0x11)
            src = self._simd_src(x, mod, rm, ea, True, not unaligned, size if scalar else 16)
        if imm_pos:
            imm = self.u8(x)  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]

        def deliver(f: F.FpuState, flags: int) -> None:
            f.mxcsr |= flags & 0x3F
            if flags & ~(f.mxcsr >> 7) & 0x3F:
                raise CpuFault(XM if c.cr4 & 0x400 else UD)

        def lanes2(a: int, v: int, fn) -> tuple[int, int]:
            """Apply fn(lane_a, lane_b) -> (bits, flags) to the scalar or every lane."""
            if scalar:
                out, fl = fn(a & lane_mask, v & lane_mask)
                return (a & ~lane_mask) | out, fl
            res = 0
            flags = 0
            for i in range(0, 128, w):
                o, fl = fn((a >> i) & lane_mask, (v >> i) & lane_mask)
                res |= o << i
                flags |= fl
            return res, flags

        arith = {0x51: "sqrt", 0x58: "add", 0x59: "mul", 0x5C: "sub", 0x5D: "min", 0x5E: "div",
                 0x5F: "max"}.get(b)  # fmt: skip
        if arith is not None:

            def fp_arith() -> None:
                f = guard()
                v = src()
                res, flags = lanes2(
                    f.xmm[reg], v, lambda p, q: S.fp_arith(arith, double, p, q, f.mxcsr)
                )
                deliver(f, flags)
                f.xmm[reg] = res
                c.eip = nxt

            return fp_arith
        if b in (0x54, 0x55, 0x56, 0x57):
            if scalar:
                return self._ud(x, b)  # type: ignore[attr-defined]
            fn = {0x54: lambda p, q: p & q, 0x55: lambda p, q: ~p & q & ((1 << 128) - 1),
                  0x56: lambda p, q: p | q, 0x57: lambda p, q: p ^ q}[b]  # fmt: skip

            def fp_logic() -> None:
                f = guard()
                v = src()
                f.xmm[reg] = fn(f.xmm[reg], v)
                c.eip = nxt

            return fp_logic
        if b in (0x10, 0x11, 0x28, 0x29):
            if b in (0x28, 0x29) and scalar:
                return self._ud(x, b)  # type: ignore[attr-defined]
            store = b in (0x11, 0x29)
            if not store:

                def fp_load() -> None:
                    f = guard()
                    v = src()
                    if scalar:
                        # MOVSS/MOVSD: from memory the rest is zeroed, from a register kept
                        f.xmm[reg] = v if mod != 3 else (f.xmm[reg] & ~lane_mask) | (v & lane_mask)
                    else:
                        f.xmm[reg] = v
                    c.eip = nxt

                return fp_load
            n = size if scalar else 16
            ea_w = self.ea_for(ea, n, True) if mod != 3 else None  # type: ignore[attr-defined]
            aligned = b == 0x29

            def fp_store() -> None:
                f = guard()
                v = f.xmm[reg]
                if ea_w is None:
                    f.xmm[rm] = (f.xmm[rm] & ~lane_mask) | (v & lane_mask) if scalar else v
                else:
                    lin = ea_w()
                    if aligned and lin & 15:
                        raise CpuFault(GP, 0)
                    write_bytes(c, lin, n, v & ((1 << (8 * n)) - 1))
                c.eip = nxt

            return fp_store
        if b in (0x2E, 0x2F):
            signalling = b == 0x2F

            def fp_comi() -> None:
                f = guard()
                v = src()
                rel, flags = S.fp_compare(double, f.xmm[reg] & lane_mask, v, f.mxcsr, signalling)
                deliver(f, flags)
                c.fl = (c.get_flags() & ~0x8D5) | (0, 1, 0x40, 0x45)[rel]
                c.lop = 0
                c.eip = nxt

            return fp_comi
        if b == 0xC2:
            pred = imm & 7  # type: ignore[operator]

            def fp_cmp() -> None:
                f = guard()
                v = src()

                def one(p: int, q: int) -> tuple[int, int]:
                    t, fl = S.fp_cmp_pred(double, p, q, pred, f.mxcsr)
                    return (lane_mask if t else 0), fl

                res, flags = lanes2(f.xmm[reg], v, one)
                deliver(f, flags)
                f.xmm[reg] = res
                c.eip = nxt

            return fp_cmp
        if b == 0x2A:  # CVTSI2SS/SD

            def cvtsi2s() -> None:
                f = guard()
                n = src()
                n = n - (1 << 32) if n >> 31 else n
                v, flags = S.fp_from_int(double, n, f.mxcsr)
                deliver(f, flags)
                f.xmm[reg] = (f.xmm[reg] & ~lane_mask) | v
                c.eip = nxt

            return cvtsi2s
        if b in (0x2C, 0x2D):  # CVT(T)SS2SI / SD2SI
            trunc = b == 0x2C
            if mod == 3:
                src = (lambda s: lambda: s() & lane_mask)(src)

            def cvt2si() -> None:
                f = guard()
                v = src()
                n, flags = S.fp_to_int(double, v, f.mxcsr, trunc)
                deliver(f, flags)
                r[reg] = n
                c.eip = nxt

            return cvt2si
        if b == 0x5A:  # CVTPS2PD CVTPD2PS CVTSS2SD CVTSD2SS

            def cvt_fp() -> None:
                f = guard()
                v = src()
                sw_ = 64 if double else 32  # source lane width
                dw = 32 if double else 64
                n = 1 if scalar else 2
                res = 0
                flags = 0
                for i in range(n):
                    o, fl = S.fp_convert(double, (v >> (i * sw_)) & ((1 << sw_) - 1), f.mxcsr)
                    res |= o << (i * dw)
                    flags |= fl
                deliver(f, flags)
                if scalar:
                    f.xmm[reg] = (f.xmm[reg] & ~((1 << dw) - 1)) | res
                else:
                    f.xmm[reg] = res  # CVTPD2PS zeroes the upper half
                c.eip = nxt

            return cvt_fp
        if b in (0x14, 0x15) and not scalar:
            high = b == 0x15

            def unpck() -> None:
                f = guard()
                v = src()
                a = f.xmm[reg]
                if double:
                    lo = (a >> 64) if high else a & M64
                    hi = (v >> 64) if high else v & M64
                    f.xmm[reg] = lo | (hi << 64)
                else:
                    la, lb = S.lanes(a, 32, 128), S.lanes(v, 32, 128)
                    k = 2 if high else 0
                    f.xmm[reg] = S.join([la[k], lb[k], la[k + 1], lb[k + 1]], 32)
                c.eip = nxt

            return unpck
        if b == 0xC6 and not scalar:

            def shuf() -> None:
                f = guard()
                v = src()
                a = f.xmm[reg]
                if double:
                    lo = (a >> (64 * (imm & 1))) & M64  # type: ignore[operator]
                    hi = (v >> (64 * ((imm >> 1) & 1))) & M64  # type: ignore[operator]
                    f.xmm[reg] = lo | (hi << 64)
                else:
                    la, lb = S.lanes(a, 32, 128), S.lanes(v, 32, 128)
                    sel = [(imm >> (2 * i)) & 3 for i in range(4)]  # type: ignore[operator]
                    f.xmm[reg] = S.join([la[sel[0]], la[sel[1]], lb[sel[2]], lb[sel[3]]], 32)
                c.eip = nxt

            return shuf
        if b == 0x50 and not scalar and mod == 3:

            def movmsk() -> None:
                f = guard()
                v = f.xmm[rm]
                r[reg] = sum(((v >> (i + w - 1)) & 1) << (i // w) for i in range(0, 128, w))
                c.eip = nxt

            return movmsk
        return self._ud(x, b)  # type: ignore[attr-defined]

    def _ssemisc(self, x: Ctx, b: int) -> Fn:
        """The rest of SSE/SSE2: MOVLPS/MOVHPS/MOVLPD/MOVHPD/MOVHLPS/MOVLHPS, the
        non-temporal stores, MASKMOVQ/MASKMOVDQU, PINSRW/PEXTRW, RCP/RSQRT, the
        packed and MMX conversions, MOVQ2DQ/MOVDQ2Q."""
        c = self.c  # type: ignore[attr-defined]
        r = c.r
        pre = x.rep or (0x66 if x.p66 else 0)
        mod, reg, rm, ea = self.modrm(x)  # type: ignore[attr-defined]
        imm = self.u8(x) if b in (0xC4, 0xC5) else 0  # type: ignore[attr-defined]
        nxt = self.nxt(x)  # type: ignore[attr-defined]
        ud = self._ud  # type: ignore[attr-defined]
        sse = self._simd_guard(True)
        mmx = self._simd_guard(False)
        ea_for = self.ea_for  # type: ignore[attr-defined]

        def done() -> None:
            c.eip = nxt

        if b in (0x12, 0x13, 0x16, 0x17):
            if pre not in (0, 0x66) or (b in (0x13, 0x17) and mod == 3) or (pre and mod == 3):
                return ud(x, b)
            high = b in (0x16, 0x17)
            sh = 64 if high else 0
            if b in (0x12, 0x16):
                ea_r = ea_for(ea, 8, False) if mod != 3 else None

                def movlh_load() -> None:
                    f = sse()
                    if ea_r is None:  # MOVHLPS / MOVLHPS
                        v = (f.xmm[rm] >> 64) if not high else (f.xmm[rm] & M64)
                    else:
                        v = read_bytes(c, ea_r(), 8)
                    f.xmm[reg] = (f.xmm[reg] & ~(M64 << sh)) | (v << sh)
                    done()

                return movlh_load
            ea_w = ea_for(ea, 8, True)

            def movlh_store() -> None:
                f = sse()
                write_bytes(c, ea_w(), 8, (f.xmm[reg] >> sh) & M64)
                done()

            return movlh_store
        if b in (0x2B, 0xE7, 0xC3):  # MOVNTPS/PD, MOVNTQ/MOVNTDQ, MOVNTI
            if mod == 3 or pre in (0xF2, 0xF3) or (b == 0xC3 and pre):
                return ud(x, b)
            n = 4 if b == 0xC3 else 8 if (b == 0xE7 and not pre) else 16
            ea_w = ea_for(ea, n, True)
            guard = mmx if n == 8 else sse

            def movnt() -> None:
                f = guard() if b != 0xC3 else None
                lin = ea_w()
                if n == 16 and lin & 15:
                    raise CpuFault(GP, 0)
                v = r[reg] if f is None else (f.regs[reg] & M64 if n == 8 else f.xmm[reg])
                write_bytes(c, lin, n, v)
                done()

            return movnt
        if b == 0xF7:  # MASKMOVQ / MASKMOVDQU: bytes with the mask's top bit to DS:(E)DI
            if mod != 3 or pre not in (0, 0x66):
                return ud(x, b)
            xmm = pre == 0x66
            n = 16 if xmm else 8
            ad32 = x.ad32
            seg = x.seg if x.seg is not None else 3  # DS
            lin_of = self.lin_fn(seg, n, True)  # type: ignore[attr-defined]

            def maskmov() -> None:
                f = sse() if xmm else mmx()
                data = f.xmm[reg] if xmm else f.regs[reg] & M64
                mask = f.xmm[rm] if xmm else f.regs[rm] & M64
                lin = lin_of(r[7] if ad32 else r[7] & 0xFFFF)
                for i in range(n):
                    if (mask >> (8 * i + 7)) & 1:
                        c.wr8((lin + i) & 0xFFFFFFFF, (data >> (8 * i)) & 0xFF)
                done()

            return maskmov
        if b == 0xC4:  # PINSRW
            if pre not in (0, 0x66):
                return ud(x, b)
            xmm = pre == 0x66
            get = self.rm_get(mod, rm, ea, 2) if mod != 3 else (lambda: r[rm] & 0xFFFF)  # type: ignore[attr-defined]
            k = imm & (7 if xmm else 3)

            def pinsrw() -> None:
                f = sse() if xmm else mmx()
                v = get()
                if xmm:
                    f.xmm[reg] = (f.xmm[reg] & ~(0xFFFF << (16 * k))) | (v << (16 * k))
                else:
                    f.regs[reg] = (
                        MMX_EXP | (f.regs[reg] & M64 & ~(0xFFFF << (16 * k))) | (v << (16 * k))
                    )
                done()

            return pinsrw
        if b == 0xC5:  # PEXTRW
            if mod != 3 or pre not in (0, 0x66):
                return ud(x, b)
            xmm = pre == 0x66
            k = imm & (7 if xmm else 3)

            def pextrw() -> None:
                f = sse() if xmm else mmx()
                v = f.xmm[rm] if xmm else f.regs[rm]
                r[reg] = (v >> (16 * k)) & 0xFFFF
                done()

            return pextrw
        if b in (0x52, 0x53):  # RSQRTPS/SS, RCPPS/SS
            if pre not in (0, 0xF3):
                return ud(x, b)
            scalar = pre == 0xF3
            src = self._simd_src(x, mod, rm, ea, True, not scalar, 4 if scalar else 16)
            is_sqrt = b == 0x52

            def rcp() -> None:
                f = sse()
                v = src()
                if scalar:
                    f.xmm[reg] = (f.xmm[reg] & ~0xFFFFFFFF) | S.approx_recip(
                        False, v & 0xFFFFFFFF, is_sqrt
                    )
                else:
                    f.xmm[reg] = S.join(
                        [S.approx_recip(False, q, is_sqrt) for q in S.lanes(v, 32, 128)], 32
                    )
                done()

            return rcp
        if b == 0xD6 and pre in (0xF3, 0xF2):  # MOVQ2DQ / MOVDQ2Q
            if mod != 3:
                return ud(x, b)
            to_xmm = pre == 0xF3

            def movq2dq() -> None:
                sse()
                f = mmx()
                if to_xmm:
                    f.xmm[reg] = f.regs[rm] & M64
                else:
                    f.regs[reg] = MMX_EXP | (f.xmm[rm] & M64)
                done()

            return movq2dq
        if b in (0x5B, 0xE6):
            # 5B: CVTDQ2PS (none) CVTPS2DQ (66) CVTTPS2DQ (F3); E6: CVTTPD2DQ (66)
            # CVTDQ2PD (F3) CVTPD2DQ (F2)
            kind = {(0x5B, 0): "dq2ps", (0x5B, 0x66): "ps2dq", (0x5B, 0xF3): "tps2dq",
                    (0xE6, 0x66): "tpd2dq", (0xE6, 0xF3): "dq2pd", (0xE6, 0xF2): "pd2dq"}.get((b, pre))  # fmt: skip
            if kind is None:
                return ud(x, b)
            src = self._simd_src(
                x, mod, rm, ea, True, kind != "dq2pd", 8 if kind == "dq2pd" else 16
            )
            return self._cvt_packed(kind, src, reg, sse, nxt, lambda: None)
        if b in (0x2A, 0x2C, 0x2D) and pre in (0, 0x66):
            # CVTPI2PS/PD (2A), CVTTPS2PI/CVTTPD2PI (2C), CVTPS2PI/CVTPD2PI (2D)
            double = pre == 0x66
            if b == 0x2A:
                kind = "pi2pd" if double else "pi2ps"
                if mod == 3:
                    src = lambda: c.fpu.regs[rm] & M64  # noqa: E731
                    touch = mmx
                else:
                    src = self._simd_src(x, mod, rm, ea, False, False, 8)
                    touch = (lambda: None) if not double else (lambda: None)
                return self._cvt_packed(kind, src, reg, sse, nxt, touch)
            kind = (
                ("tpd2pi" if b == 0x2C else "pd2pi")
                if double
                else ("tps2pi" if b == 0x2C else "ps2pi")
            )
            src = self._simd_src(x, mod, rm, ea, True, double, 16 if double else 8)
            if mod == 3 and not double:
                src = (lambda s: lambda: s() & M64)(src)
            return self._cvt_packed(kind, src, reg, sse, nxt, mmx)
        return ud(x, b)

    def _cvt_packed(self, kind: str, src, reg: int, sse, nxt: int, touch) -> Fn:
        c = self.c  # type: ignore[attr-defined]

        def deliver(f: F.FpuState, flags: int) -> None:
            f.mxcsr |= flags & 0x3F
            if flags & ~(f.mxcsr >> 7) & 0x3F:
                raise CpuFault(XM if c.cr4 & 0x400 else UD)

        def cvt() -> None:
            f = sse()
            v = src()
            mx = f.mxcsr
            flags = 0
            out: list[int] = []
            if kind in ("dq2ps", "pi2ps", "dq2pd", "pi2pd"):
                double = kind.endswith("pd")
                n = 4 if kind == "dq2ps" else 2
                for q in S.lanes(v, 32, 32 * n):
                    o, fl = S.fp_from_int(double, q - (1 << 32) if q >> 31 else q, mx)
                    out.append(o)
                    flags |= fl
                w = 64 if double else 32
            else:
                double = "pd" in kind
                trunc = kind.startswith("t")
                n = 2 if double or kind.endswith("pi") else 4
                for q in S.lanes(v, 64 if double else 32, (64 if double else 32) * n):
                    o, fl = S.fp_to_int(double, q, mx, trunc)
                    out.append(o)
                    flags |= fl
                w = 32
            deliver(f, flags)
            res = S.join(out, w)
            if kind.endswith("pi"):
                touch()
                f.regs[reg] = MMX_EXP | res
            elif kind == "pi2ps":
                touch()
                f.xmm[reg] = (f.xmm[reg] & ~M64) | res
            else:
                if kind == "pi2pd":
                    touch()
                f.xmm[reg] = res  # the *pd2dq forms zero the upper half
            c.eip = nxt

        return cvt
