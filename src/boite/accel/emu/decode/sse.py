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
from boite.accel.emu.arch import GP, NM, UD, CpuFault
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
