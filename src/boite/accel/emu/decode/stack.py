"""The stack: PUSH/POP of registers, immediates, segment registers and memory, PUSHA/POPA, PUSHF/POPF, ENTER/LEAVE."""

from __future__ import annotations

from boite.accel.emu.arch import (
    CS,
    DS,
    ES,
    FS,
    GP,
    GS,
    IF,
    IOPL,
    M16,
    M32,
    MASK,
    SS,
    VM,
    CpuFault,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
    _sx8,
)


class StackOps(DecoderBase):
    def _push_r(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        n = b & 7
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)
        g = self.reg_get(n, size)
        if size == 4:
            sb = c.sbase
            wr = c.wr32

            def push4(nxt=nxt, c=c, wr=wr, r=r, n=n, sb=sb) -> None:
                if c.stack_fast:
                    sp = (r[4] - 4) & M32
                    wr((sb[2] + sp) & M32, r[n])
                    r[4] = sp
                else:
                    c.push(r[n], 4)
                c.eip = nxt

            return push4

        def push(nxt=nxt, g=g, size=size, c=c) -> None:
            v = g()
            c.push(v, size)
            c.eip = nxt

        return push

    def _pop_r(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        n = b & 7
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)
        s = self.reg_set(n, size)
        if size == 4:
            sb = c.sbase
            rd = c.rd32

            def pop4(nxt=nxt, c=c, r=r, rd=rd, n=n, sb=sb) -> None:
                if c.stack_fast:
                    sp = r[4]
                    v = rd((sb[2] + sp) & M32)
                    r[4] = (sp + 4) & M32
                    r[n] = v
                else:
                    r[n] = c.pop(4)
                c.eip = nxt

            return pop4

        def pop(nxt=nxt, size=size, s=s, c=c) -> None:
            v = c.pop(size)
            s(v)
            c.eip = nxt

        return pop

    def _push_i(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        v = self.imm(x, size) if b == 0x68 else _sx8(self.u8(x)) & MASK[size]
        nxt = self.nxt(x)

        def push_i(nxt=nxt, v=v, size=size, c=c) -> None:
            c.push(v, size)
            c.eip = nxt

        return push_i

    def _push_seg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        seg = {0x06: ES, 0x0E: CS, 0x16: SS, 0x1E: DS, 0xA0: FS, 0xA8: GS}[b]
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)

        def push_seg(nxt=nxt, c=c, size=size, seg=seg) -> None:
            if size == 4 and c.ss32:
                # A 32-bit push of a segment register writes only the low word.
                sp = (c.r[4] - 4) & M32
                c.wr16(c.stack_lin(sp, 4, True), c.sel[seg])
                c.r[4] = sp
            else:
                c.push(c.sel[seg], size)
            c.eip = nxt

        return push_seg

    def _pop_seg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        seg = {0x07: ES, 0x17: SS, 0x1F: DS, 0xA1: FS, 0xA9: GS}[b]
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)

        def pop_seg(nxt=nxt, seg=seg, size=size, c=c) -> None:
            v = c.peek(0, size) & 0xFFFF
            c.load_seg(seg, v)
            c.sp_add(size)
            if seg == SS:
                c.inhibit_irq = True
            c.eip = nxt

        return pop_seg

    def _pop_rm(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if reg:
            return self._ud(x, b)
        if mod == 3:
            s = self.reg_set(rm, size)

            def pop_r(nxt=nxt, s=s, c=c, size=size) -> None:
                s(c.pop(size))
                c.eip = nxt

            return pop_r
        wr = self.wrfn(size)
        ea = self.ea_for(ea, size, True)

        def pop_m(nxt=nxt, size=size, c=c, wr=wr, ea=ea) -> None:
            v = c.peek(0, size)
            old = c.r[4]
            c.sp_add(size)  # the address is computed with the incremented ESP
            try:
                wr(ea(), v)
            except CpuFault:
                c.r[4] = old
                raise
            c.eip = nxt

        return pop_m

    def _pusha(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 4 if x.op32 else 2
        m = MASK[size]
        nxt = self.nxt(x)
        if b == 0x60:

            def pusha() -> None:
                old = r[4]
                vals = [r[i] & m for i in range(8)]
                try:
                    for v in vals:
                        c.push(v, size)
                except CpuFault:
                    r[4] = old
                    raise
                c.eip = nxt

            return pusha

        def popa() -> None:
            vals = [c.peek(i * size, size) for i in range(8)]
            s = [self.reg_set(i, size) for i in range(8)]
            for i in (7, 6, 5, 3, 2, 1, 0):
                s[i](vals[7 - i])
            c.sp_add(8 * size)
            c.eip = nxt

        return popa

    def _pushf(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)
        if b == 0x9C:

            def pushf(nxt=nxt, size=size, c=c) -> None:
                f = c.get_flags()
                if f & VM and (f >> 12) & 3 < 3:
                    raise CpuFault(GP, 0)  # IOPL-sensitive in virtual-8086 mode
                c.push(f & 0xFCFFFF if size == 4 else f & 0xFFFF, size)
                c.eip = nxt

            return pushf

        def popf(nxt=nxt, size=size, c=c) -> None:
            if c.fl & VM and (c.fl >> 12) & 3 < 3:
                raise CpuFault(GP, 0)
            v = c.pop(size)
            mask = 0x247FD5 if size == 4 else 0x7FD5
            if c.cr0 & 1:
                if c.cpl > 0:
                    mask &= ~IOPL
                if c.cpl > (c.fl >> 12) & 3:
                    mask &= ~IF
            c.set_flags(v, mask)
            c.eip = nxt

        return popf

    def _enter(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 4 if x.op32 else 2
        alloc = self.u16(x)
        level = self.u8(x) & 31
        nxt = self.nxt(x)

        def enter(nxt=nxt, r=r, size=size, c=c, level=level, alloc=alloc) -> None:
            old_sp = r[4]
            try:
                bp = r[5]
                c.push(bp & MASK[size], size)
                frame = r[4] & (M32 if c.ss32 else M16)
                for _i in range(1, level):
                    bp = (bp - size) & (M32 if c.ss32 else M16)
                    c.push(c.rd(c.stack_lin(bp, size, False), size), size)
                if level > 0:  # a 16-bit ENTER on a 32-bit stack pushes SP's low word
                    c.push(frame & MASK[size], size)
                # The new ESP must be inside SS (#SS) and its page writable (#PF).
                nsp = (r[4] - alloc) & (M32 if c.ss32 else M16)
                c.check_writable(c.stack_lin(nsp, 1, True), 1)
            except CpuFault:
                r[4] = old_sp
                raise
            if size == 4:
                r[5] = frame
            else:
                r[5] = (r[5] & 0xFFFF0000) | (frame & M16)
            c.sp_add(-alloc)
            c.eip = nxt

        return enter

    def _leave(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)

        def leave(nxt=nxt, size=size, c=c, r=r) -> None:
            sp = r[5] if c.ss32 else r[5] & M16
            v = c.rd(c.stack_lin(sp, size, False), size)
            if c.ss32:
                r[4] = (sp + size) & M32
            else:
                r[4] = (r[4] & 0xFFFF0000) | ((sp + size) & M16)
            if size == 4:
                r[5] = v
            else:
                r[5] = (r[5] & 0xFFFF0000) | v
            c.eip = nxt

        return leave
