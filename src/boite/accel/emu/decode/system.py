"""System instructions: HLT, flag operations (CLC/STC/CLI/STI...), segment loads (LES/LDS/LSS/LFS/LGS, MOV Sreg), BOUND, ARPL, the x87 escapes, CR/DR/MSR/CPUID/RDTSC/RDPMC, groups 6/7/9, LAR/LSL, hint NOPs."""

from __future__ import annotations

from boite.accel.emu.arch import (
    ARITH,
    BR,
    CF,
    CS,
    DF,
    DS,
    ES,
    FS,
    GP,
    GS,
    IF,
    M32,
    MASK,
    NP,
    SS,
    UD,
    VM,
    ZF,
    CpuFault,
    CpuHalt,
)
from boite.accel.emu.cpumodel import MSR_P6_PERFCTR
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _sx,
)


class SystemOps(DecoderBase):
    def _hlt(self, x: Ctx, b: int) -> Fn:
        c = self.c
        nxt = self.nxt(x)

        def hlt() -> None:
            if c.cpl:
                raise CpuFault(GP, 0)
            c.eip = nxt
            raise CpuHalt()

        return hlt

    def _flagop(self, x: Ctx, b: int) -> Fn:
        c = self.c
        nxt = self.nxt(x)

        def flagop() -> None:
            if b == 0xF5:
                c.set_flags(c.get_flags() ^ CF, CF)
            elif b == 0xF8:
                c.set_flags(0, CF)
            elif b == 0xF9:
                c.set_flags(CF, CF)
            elif b == 0xFC:
                c.fl &= ~DF
            elif b == 0xFD:
                c.fl |= DF
            else:
                if c.cr0 & 1 and c.cpl > (c.fl >> 12) & 3:
                    raise CpuFault(GP, 0)
                if b == 0xFA:
                    c.fl &= ~IF
                else:
                    if not c.fl & IF:
                        c.inhibit_irq = True
                    c.fl |= IF
            c.eip = nxt

        return flagop

    def _les(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        seg = {0xC4: ES, 0xC5: DS, 0xB2: SS, 0xB4: FS, 0xB5: GS}[b]
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if mod == 3:
            return self._ud(x, b)
        s = self.reg_set(reg, size)
        rd = self.rdfn(size)
        ea = self.ea_for(ea, size + 2, False)

        def les() -> None:
            a = ea()
            off = rd(a)
            sel = c.rd16((a + size) & M32)
            c.load_seg(seg, sel)
            s(off)
            c.eip = nxt

        return les

    def _mov_sreg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if reg > 5:
            return self._ud(x, b)
        if b == 0x8C:
            if mod == 3:
                s = self.reg_set(rm, 4 if x.op32 else 2)
            else:
                s = self.rm_set(mod, rm, ea, 2)

            def mov_from_seg() -> None:
                s(c.sel[reg])
                c.eip = nxt

            return mov_from_seg
        if reg == CS:
            return self._ud(x, b)
        g = self.rm_get(mod, rm, ea, 2)

        def mov_to_seg() -> None:
            c.load_seg(reg, g())
            if reg == SS:
                c.inhibit_irq = True
            c.eip = nxt

        return mov_to_seg

    def _bound(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if mod == 3:
            return self._ud(x, b)
        g = self.reg_get(reg, size)
        rd = self.rdfn(size)
        ea = self.ea_for(ea, 2 * size, False)

        def bound() -> None:
            a = ea()
            lo = _sx(rd(a), size)
            hi = _sx(rd((a + size) & M32), size)
            v = _sx(g(), size)
            if v < lo or v > hi:
                raise CpuFault(BR)
            c.eip = nxt

        return bound

    def _arpl(self, x: Ctx, b: int) -> Fn:
        c = self.c
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if not c.cr0 & 1:
            return self._ud(x, b)
        rmw = self.rm_rmw(mod, rm, ea, 2)
        g = self.reg_get(reg, 2)

        def arpl() -> None:
            if c.fl & VM:
                raise CpuFault(UD)  # protected mode only, and virtual-8086 mode is not
            src = g()
            zf = [0]

            def f(d: int) -> int:
                if d & 3 < src & 3:
                    zf[0] = 1
                    return (d & ~3) | (src & 3)
                return d

            rmw(f)
            c.set_flags(ZF if zf[0] else 0, ZF)
            c.eip = nxt

        return arpl

    def _grp9(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if reg == 6 and mod == 3:
            # RDRAND r16/r32: the host's entropy; CF=1 (a value is always ready), the
            # other arithmetic flags clear.
            size = 4 if x.op32 else 2
            put = self.reg_set(rm, size)

            def rdrand() -> None:
                put(int.from_bytes(c.random_bytes(size), "little"))
                c.set_flags(CF, ARITH)
                c.eip = nxt

            return rdrand
        if reg != 1 or mod == 3:
            return self._ud(x, b)

        ea = self.ea_for(ea, 8, True)

        def cmpxchg8b() -> None:
            a = ea()
            v = c.rd32(a) | (c.rd32((a + 4) & M32) << 32)
            if v == (r[2] << 32) | r[0]:
                c.check_writable(a, 8)
                c.wr32(a, r[3])
                c.wr32((a + 4) & M32, r[1])
                c.set_flags(ZF, ZF)
            else:
                c.check_writable(a, 8)
                c.wr32(a, v & M32)
                c.wr32((a + 4) & M32, v >> 32)
                r[0], r[2] = v & M32, v >> 32
                c.set_flags(0, ZF)
            c.eip = nxt

        return cmpxchg8b

    def _sys0f(self, x: Ctx, b: int) -> Fn:
        """Privileged and system 0F opcodes: CR/DR moves, MSRs, CPUID, RDTSC, RDPMC, CLTS..."""
        c = self.c
        r = c.r
        nxt = self.nxt(x)
        if b in (0x20, 0x21, 0x22, 0x23):
            m = self.u8(x)
            nxt = self.nxt(x)
            reg, rm = (m >> 3) & 7, m & 7

            def movcr() -> None:
                if c.cpl:
                    raise CpuFault(GP, 0)
                if b == 0x20:
                    if reg not in (0, 2, 3, 4):
                        raise CpuFault(UD)
                    r[rm] = (c.cr0, 0, c.cr2, c.cr3, c.cr4)[reg]
                elif b == 0x22:
                    c.set_cr(reg, r[rm])
                elif b == 0x21:
                    r[rm] = c.get_dr(reg)
                else:
                    c.set_dr(reg, r[rm])
                c.eip = nxt

            return movcr

        def sys() -> None:
            if b == 0xA2:
                c.cpuid()
            elif b == 0x31:
                if c.cr4 & 4 and c.cpl:
                    raise CpuFault(GP, 0)
                t = c.rdtsc()
                r[0], r[2] = t & M32, t >> 32
            elif b == 0x33:
                # RDPMC: the P6 counters PerfCtr0/1 (ECX 0 or 1), 40 bits in EDX:EAX; ring
                # 0 unless CR4.PCE. Linux's P6 PMU driver reads them (perf, and on every
                # reboot or power-off when it stops its events).
                if c.cr4 & 0x100 == 0 and c.cpl:
                    raise CpuFault(GP, 0)
                if r[1] > 1:
                    raise CpuFault(GP, 0)
                v = c.rdmsr(MSR_P6_PERFCTR[r[1]])
                r[0], r[2] = v & M32, v >> 32
            else:
                if c.cpl:
                    raise CpuFault(GP, 0)
                if b == 0x06:
                    c.cr0 &= ~8
                elif b == 0x30:
                    c.wrmsr(r[1], (r[2] << 32) | r[0])
                elif b == 0x32:
                    v = c.rdmsr(r[1])
                    r[0], r[2] = v & M32, v >> 32
                # 0x08 INVD / 0x09 WBINVD: no caches to write back
            c.eip = nxt

        return sys

    def _sysenter(self, x: Ctx, b: int) -> Fn:
        """SYSENTER/SYSEXIT (CPUID SEP): the CPU does the whole transfer."""
        c = self.c
        if "sep" not in c.features:
            return self._ud(x, b)
        return c.sysenter if b == 0x34 else c.sysexit

    def _grp6(self, x: Ctx, b: int) -> Fn:
        """SLDT STR LLDT LTR VERR VERW."""
        c = self.c
        mod, op, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if op > 5:
            return self._ud(x, b)
        g = self.rm_get(mod, rm, ea, 2)
        s = self.rm_set(mod, rm, ea, 4 if (x.op32 and mod == 3) else 2)

        def grp6() -> None:
            if not c.cr0 & 1 or c.fl & VM:
                raise CpuFault(UD)
            if op == 0:
                s(c.ldt_sel)
            elif op == 1:
                s(c.tr_sel)
            elif op in (2, 3):
                if c.cpl:
                    raise CpuFault(GP, 0)
                sel = g()
                if op == 2:
                    c.load_ldt(sel)
                else:
                    if sel & 0xFFFC == 0 or sel & 4:
                        raise CpuFault(GP, sel & 0xFFFC)
                    d, addr = c.descriptor(sel)
                    base, limit, attr = c.desc_fields(d)
                    if attr & 0x1F not in (0x01, 0x09):
                        raise CpuFault(GP, sel & 0xFFFC)
                    if not attr & 0x80:
                        raise CpuFault(NP, sel & 0xFFFC)
                    c.sys_write(addr + 5, 1, (attr | 2) & 0xFF)  # mark busy
                    c.tr_sel, c.tr_base, c.tr_limit, c.tr_type = sel, base, limit, (attr | 2) & 0xF
            else:
                sel = g()
                ok = False
                try:
                    if sel & 0xFFFC:
                        d, _ = c.descriptor(sel)
                        _, _, attr = c.desc_fields(d)
                        dpl = (attr >> 5) & 3
                        if attr & 0x10:
                            conforming = attr & 0x1C == 0x1C
                            if conforming or max(c.cpl, sel & 3) <= dpl:
                                if op == 4:
                                    ok = not (attr & 8) or bool(attr & 2)
                                else:
                                    ok = not (attr & 8) and bool(attr & 2)
                except CpuFault:
                    ok = False
                c.set_flags(ZF if ok else 0, ZF)
            c.eip = nxt

        return grp6

    def _grp7(self, x: Ctx, b: int) -> Fn:
        """SGDT SIDT LGDT LIDT SMSW LMSW INVLPG."""
        c = self.c
        mod, op, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        op32 = x.op32
        if op == 5 or (mod == 3 and op not in (4, 6)):
            return self._ud(x, b)
        s = self.rm_set(mod, rm, ea, 2) if op == 4 else None
        g = self.rm_get(mod, rm, ea, 2) if op == 6 else None
        ea6 = self.ea_for(ea, 6, op in (0, 1)) if op < 4 else None  # the 6-byte operand

        def grp7() -> None:
            if op in (0, 1):
                a = ea6()
                base, limit = (c.gdt_base, c.gdt_limit) if op == 0 else (c.idt_base, c.idt_limit)
                c.check_writable(a, 6)
                c.wr16(a, limit)
                c.wr32((a + 2) & M32, base if op32 else base & 0xFFFFFF)
            elif op in (2, 3):
                if c.cpl:
                    raise CpuFault(GP, 0)
                a = ea6()
                limit = c.rd16(a)
                base = c.rd32((a + 2) & M32)
                if not op32:
                    base &= 0xFFFFFF
                if op == 2:
                    c.gdt_base, c.gdt_limit = base, limit
                else:
                    c.idt_base, c.idt_limit = base, limit
            elif op == 4:
                s(c.cr0 & 0xFFFF)
            elif op == 6:
                if c.cpl:
                    raise CpuFault(GP, 0)
                v = g()
                # LMSW sets PE but cannot clear it; touches MP EM TS only besides.
                c.set_cr(0, (c.cr0 & ~0xE) | (v & 0xF) | (c.cr0 & 1))
            else:  # INVLPG
                if c.cpl:
                    raise CpuFault(GP, 0)
                c.tlb_flush(ea() >> 12)
            c.eip = nxt

        return grp7

    def _larlsl(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, 2)
        s = self.reg_set(reg, size)

        def larlsl() -> None:
            if not c.cr0 & 1 or c.fl & VM:
                raise CpuFault(UD)
            sel = g()
            ok = False
            val = 0
            try:
                if sel & 0xFFFC:
                    d, _ = c.descriptor(sel)
                    _, limit, attr = c.desc_fields(d)
                    dpl = (attr >> 5) & 3
                    typ = attr & 0x1F
                    if attr & 0x10:
                        valid = (attr & 0x1C == 0x1C) or max(c.cpl, sel & 3) <= dpl
                    else:
                        allowed = (1, 2, 3, 9, 0xB) if b == 0x03 else (1, 2, 3, 4, 5, 9, 0xB, 0xC)
                        valid = typ in allowed and max(c.cpl, sel & 3) <= dpl
                    if valid:
                        ok = True
                        val = limit if b == 0x03 else (d >> 32) & 0x00F0FF00
            except CpuFault:
                ok = False
            if ok:
                s(val & MASK[size])
            c.set_flags(ZF if ok else 0, ZF)
            c.eip = nxt

        return larlsl

    def _nop_rm(self, x: Ctx, b: int) -> Fn:
        c = self.c
        self.modrm(x)
        nxt = self.nxt(x)

        def nop() -> None:
            c.eip = nxt

        return nop
