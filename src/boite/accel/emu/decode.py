"""Decode once: each x86 instruction becomes a Python closure that executes it.

The interpreter decodes the instruction at EIP every time and calls its closure; the
block translator decodes a basic block once, keeps the closures in the block cache keyed
by physical address, and replays them until a write to the code page or a paging change
throws them away. Both run the same closures, so the two paths agree by construction on
semantics, and differ only in when decoding happens.

A closure finishes by storing the next EIP; it raises CpuFault *before* changing any
architectural state it cannot leave half-done, so a fault restarts at the instruction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu import decode_x87
from boite.accel.emu.cpu import (
    AF,
    ARITH,
    BR,
    CF,
    CS,
    DE,
    DF,
    DS,
    ES,
    FS,
    GP,
    GS,
    IF,
    IOPL,
    M16,
    M32,
    NP,
    OF,
    OP_ADD,
    OP_DEC,
    OP_INC,
    OP_LOGIC,
    OP_NONE,
    OP_SUB,
    PARITY,
    PF,
    SEGCHK,
    SF,
    SS,
    SS_VEC,
    UD,
    VM,
    ZF,
    CpuFault,
    CpuHalt,
    override_flat_bits,
)

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

Fn = Callable[[], None]
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
SIGN = {1: 0x80, 2: 0x8000, 4: 0x80000000, 8: 1 << 63}  # 8: IDIV r/m32 dividend EDX:EAX
MAX_BLOCK = 48

# Opcodes after which a block ends (control flow, mode or interrupt-state changes).
# Opcodes that take LOCK (with a memory operand), as a mask of the ModRM reg fields allowed.
_ALL = 0xFF
_LOCK_1B = {b: _ALL for b in (0x00, 0x01, 0x08, 0x09, 0x10, 0x11, 0x18, 0x19, 0x20, 0x21,
                              0x28, 0x29, 0x30, 0x31, 0x86, 0x87)}  # fmt: skip
_LOCK_1B.update({0x80: 0x7F, 0x81: 0x7F, 0x83: 0x7F, 0xF6: 0x0C, 0xF7: 0x0C, 0xFE: 0x03,
                 0xFF: 0x03})  # fmt: skip
_LOCK_0F = {0xAB: _ALL, 0xB3: _ALL, 0xBB: _ALL, 0xBA: 0xE0, 0xB0: _ALL, 0xB1: _ALL,
            0xC0: _ALL, 0xC1: _ALL, 0xC7: 0x02}  # fmt: skip
_SEG_PREFIX = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}
# Segments whose accesses are checked whatever the mode: CS (never writable in protected
# mode) and FS/GS (often null or small, e.g. a null FS in Linux user space); they are only
# reached through a prefix, so checking them costs nothing to unprefixed code.
_ALWAYS_CHECKED = (CS, FS, GS)


class Ctx:
    """Decoding state of one instruction."""

    __slots__ = (
        "start", "pos", "csb", "cslim", "op32", "ad32", "seg", "rep", "lock", "end", "eipmask"
    )  # fmt: skip

    def __init__(self, start: int, csb: int, code32: bool, cslim: int) -> None:
        self.start = start
        self.pos = start
        self.csb = csb
        self.cslim = cslim
        self.op32 = code32
        self.ad32 = code32
        self.seg: int | None = None
        self.rep = 0
        self.lock = False
        self.end = False
        self.eipmask = M32 if code32 else M16


def _sx8(v: int) -> int:
    return v - 0x100 if v & 0x80 else v


def _sx(v: int, size: int) -> int:
    s = 1 << (size * 8 - 1)
    return v - (s << 1) if v & s else v


def _jcc_target(raw: bytes, nxt: int) -> int | None:
    """The target of a 32-bit code Jcc rel8/rel32 given its bytes, else None."""
    if len(raw) == 2 and 0x70 <= raw[0] <= 0x7F:
        return (nxt + _sx8(raw[1])) & M32
    if len(raw) == 6 and raw[0] == 0x0F and 0x80 <= raw[1] <= 0x8F:
        return (nxt + int.from_bytes(raw[2:], "little", signed=True)) & M32
    return None


class Block:
    """A decoded basic block: its closures, and once hot, one compiled function."""

    __slots__ = ("eip", "csk", "mode", "mask", "fns", "pa", "info", "hits", "fn", "cacheable")

    def __init__(
        self, eip: int, csk: int, mode: int, fns: tuple, pa: int, info: list, mask: int = -1
    ) -> None:
        self.eip = eip
        self.csk = csk  # Cpu.cs_key: CS base (and limit, where it can be reached)
        # The block is valid wherever mode_key & mask == mode: the flatness bits of the
        # override segments it never names are masked out (the kernel runs the same code
        # under each process's GS, and would otherwise keep re-translating it).
        self.mask = mask
        self.mode = mode & mask
        self.fns = fns
        self.pa = pa
        self.info = info
        self.hits = 0
        self.fn: Callable[[], int] | None = None
        self.cacheable = True


class Decoder:
    def __init__(self, cpu: Cpu) -> None:
        self.c = cpu
        self.ops: list[Callable[[Ctx, int], Fn]] = [self._ud] * 256
        self.ops0f: list[Callable[[Ctx, int], Fn]] = [self._ud] * 256
        self.seg_overrides = 0  # bit i: an instruction decoded lately named segment i
        self._install()

    # ---------------------------------------------------------------- fetch
    def u8(self, x: Ctx) -> int:
        # Longer than 15 bytes, or a byte past the CS limit: #GP(0) (a near branch beyond
        # the limit faults here, at the target, where the CPU faults on the branch).
        if x.pos - x.start >= 15 or (x.pos & x.eipmask) > x.cslim:
            raise CpuFault(GP, 0)
        v = self.c.rd8((x.csb + (x.pos & x.eipmask)) & M32)
        x.pos += 1
        return v

    def u16(self, x: Ctx) -> int:
        return self.u8(x) | (self.u8(x) << 8)

    def u32(self, x: Ctx) -> int:
        return self.u16(x) | (self.u16(x) << 16)

    def imm(self, x: Ctx, size: int) -> int:
        return self.u8(x) if size == 1 else self.u16(x) if size == 2 else self.u32(x)

    def nxt(self, x: Ctx) -> int:
        return x.pos & x.eipmask

    # ---------------------------------------------------------------- decode
    def decode(self, eip: int) -> tuple[Fn, int, bool]:
        c = self.c
        x = Ctx(eip, c.sbase[CS], c.cs32, c.slimit[CS])
        try:
            while True:
                b = self.u8(x)
                if b in _SEG_PREFIX:
                    x.seg = _SEG_PREFIX[b]
                    self.seg_overrides |= 1 << x.seg
                elif b == 0x66:
                    x.op32 = not c.cs32
                elif b == 0x67:
                    x.ad32 = not c.cs32
                elif b == 0xF0:
                    x.lock = True
                elif b == 0xF2 or b == 0xF3:
                    x.rep = b
                else:
                    break
            if b == 0x0F:
                b2 = self.u8(x)
                if x.lock and c.lock_ud and not self._lockable(x, _LOCK_0F.get(b2)):
                    fn = self._ud(x, b2)
                else:
                    fn = self.ops0f[b2](x, b2)
            elif x.lock and c.lock_ud and not self._lockable(x, _LOCK_1B.get(b)):
                fn = self._ud(x, b)
            else:
                fn = self.ops[b](x, b)
        except CpuFault as f:
            if x.pos == eip:
                raise  # the first byte itself cannot be fetched: fault now
            # A fault while fetching the tail: raise it when the instruction runs.
            vec, err = f.vector, f.error
            cr2 = c.cr2

            def fault() -> None:
                c.cr2 = cr2
                raise CpuFault(vec, err)

            return fault, x.pos - eip, True
        return fn, x.pos - eip, x.end

    def _lockable(self, x: Ctx, regs: int | None) -> bool:
        """LOCK is legal only on a read-modify-write form with a memory destination;
        `regs` is the set of ModRM reg fields (bit mask) that allow it."""
        if regs is None:
            return False
        modrm = self.c.rd8((x.csb + (x.pos & x.eipmask)) & M32)
        return modrm < 0xC0 and bool(regs >> ((modrm >> 3) & 7) & 1)

    def decode_one(self, eip: int) -> tuple[Fn, int]:
        fn, n, _ = self.decode(eip)
        return fn, n

    def translate_block(self, pa: int, eip: int) -> Block:
        """Decode a basic block at EIP (physical address pa) and cache it."""
        c = self.c
        fns: list[Fn] = []
        info: list[tuple[int, int]] = []
        page_end = (pa | 0xFFF) + 1
        cur = eip
        cur_pa = pa
        self.seg_overrides = 0
        while True:
            fn, n, end = self.decode(cur)
            fns.append(fn)
            info.append((cur, n))
            cur = (cur + n) & (M32 if c.cs32 else M16)
            cur_pa += n
            if end or len(fns) >= MAX_BLOCK or cur_pa >= page_end:
                break
        unused = override_flat_bits(~self.seg_overrides)
        block = Block(eip, c.cs_key, c.mode_key, tuple(fns), pa, info, ~unused)
        if cur_pa > page_end:
            block.cacheable = False  # an instruction straddles a page: run it, don't cache
            return block
        c.blocks[pa] = block
        ppage = pa >> 12
        lst = c.code_pages.get(ppage)
        if lst is None:
            c.code_pages[ppage] = [pa]
            for wt in (t[1] for t in c._tlbs.values()):
                for k in [k for k, v in wt.items() if v == ppage << 12]:
                    del wt[k]
        else:
            lst.append(pa)
        return block

    def compile(self, block: Block) -> None:
        """Hot block: build its Python function (jit.compile_block)."""
        from boite.accel.emu.jit import compile_block

        c = self.c
        insns = []
        off = block.pa
        for fn, (eip, n) in zip(block.fns, block.info, strict=True):
            raw = bytes(c.ram[off : off + n]) if off + n <= c.ram_size else b""
            insns.append((fn, eip, n, raw))
            off += n
        exits = self._superblock(block, insns, off) if c.cs32 else frozenset()
        block.fn = compile_block(c, insns, exits)

    def _superblock(self, block: Block, insns: list, off: int) -> frozenset[int]:
        """Grow a block that ends in a conditional branch by the cached block of its
        fall-through (same page, same mode), when that has run about as often, up to
        MAX_BLOCK instructions: one call instead of several dispatches where a branch is
        mostly not taken (grown blindly, the kernel's boot got slower: longer compiles for
        code that rarely runs). A branch back to the block's start stays the end (the
        compiler turns that into a loop). Returns the indices of the branches now inside,
        for their side exits."""
        c = self.c
        exits: list[int] = []
        page_end = (block.pa | 0xFFF) + 1
        while off < page_end:
            _, eip, n, raw = insns[-1]
            nxt = (eip + n) & M32
            target = _jcc_target(raw, nxt)
            after = c.blocks.get(off)
            if (
                target is None
                or target == block.eip
                or after is None
                or after.eip != nxt
                or after.csk != block.csk
                or after.mode != c.mode_key & after.mask
                or (after.fn is None and after.hits < block.hits // 2)
                or len(insns) + len(after.fns) > MAX_BLOCK
            ):
                break
            exits.append(len(insns) - 1)
            for fn, (a_eip, a_n) in zip(after.fns, after.info, strict=True):
                insns.append((fn, a_eip, a_n, bytes(c.ram[off : off + a_n])))
                off += a_n
            block.mask |= after.mask  # it now names the override segments of both
        block.mode = c.mode_key & block.mask
        return frozenset(exits)

    # ---------------------------------------------------------------- operands
    def modrm(self, x: Ctx) -> tuple[int, int, int, Callable[[], int] | None]:
        """Returns (mod, reg, rm, ea) with ea a closure giving the linear address."""
        m = self.u8(x)
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        if mod == 3:
            return mod, reg, rm, None
        c = self.c
        r = c.r
        sb = c.sbase
        checked = bool(c.mode_key & SEGCHK)
        if not x.ad32:
            if mod == 0 and rm == 6:
                d = self.u16(x)
                base = idx = -1
                seg = DS
            else:
                d = 0 if mod == 0 else _sx8(self.u8(x)) if mod == 1 else self.u16(x)
                base, idx = ((3, 6), (3, 7), (5, 6), (5, 7), (6, -1), (7, -1), (5, -1), (3, -1))[rm]
                seg = SS if rm in (2, 3, 6) else DS
            s = x.seg if x.seg is not None else seg
            if base < 0:
                off = lambda: d  # noqa: E731
            elif idx < 0:
                off = lambda: (r[base] + d) & M16  # noqa: E731
            else:
                off = lambda: (r[base] + r[idx] + d) & M16  # noqa: E731
            ea = lambda: (sb[s] + off()) & M32  # noqa: E731
            if checked or s in _ALWAYS_CHECKED:
                ea.segoff = (off, s)  # type: ignore[attr-defined]
            return mod, reg, rm, ea
        base = rm
        idx = -1
        sh = 0
        if rm == 4:
            sib = self.u8(x)
            sh, idx, base = sib >> 6, (sib >> 3) & 7, sib & 7
            if idx == 4:
                idx = -1
        if base == 5 and mod == 0:
            base = -1
            d = self.u32(x)
        else:
            d = 0 if mod == 0 else _sx8(self.u8(x)) if mod == 1 else self.u32(x)
        seg = SS if base in (4, 5) else DS
        s = x.seg if x.seg is not None else seg
        if checked or s in _ALWAYS_CHECKED:
            # The offset on its own, for the segment check (see ea_for).
            if base < 0 and idx < 0:
                d &= M32
                off = lambda: d  # noqa: E731
            elif idx < 0:
                off = lambda: (r[base] + d) & M32  # noqa: E731
            elif base < 0:
                off = lambda: ((r[idx] << sh) + d) & M32  # noqa: E731
            else:
                off = lambda: (r[base] + (r[idx] << sh) + d) & M32  # noqa: E731
            ea = lambda: (sb[s] + off()) & M32  # noqa: E731
            ea.segoff = (off, s)  # type: ignore[attr-defined]
            return mod, reg, rm, ea
        if base < 0 and idx < 0:
            d &= M32
            return mod, reg, rm, lambda: (sb[s] + d) & M32
        if idx < 0:
            if d == 0:
                return mod, reg, rm, lambda: (sb[s] + r[base]) & M32
            return mod, reg, rm, lambda: (sb[s] + r[base] + d) & M32
        if base < 0:
            return mod, reg, rm, lambda: (sb[s] + (r[idx] << sh) + d) & M32
        return mod, reg, rm, lambda: (sb[s] + r[base] + (r[idx] << sh) + d) & M32

    def offset_ea(self, x: Ctx) -> Callable[[], int]:
        """Effective address without segment base (LEA)."""
        # Decode with a zero segment: reuse modrm's parse by temporarily using a fake base.
        raise NotImplementedError

    def reg_get(self, n: int, size: int) -> Callable[[], int]:
        r = self.c.r
        if size == 4:
            return lambda: r[n]
        if size == 2:
            return lambda: r[n] & 0xFFFF
        if n < 4:
            return lambda: r[n] & 0xFF
        h = n - 4
        return lambda: (r[h] >> 8) & 0xFF

    def reg_set(self, n: int, size: int) -> Callable[[int], None]:
        r = self.c.r
        if size == 4:

            def s4(v: int) -> None:
                r[n] = v

            return s4
        if size == 2:

            def s2(v: int) -> None:
                r[n] = (r[n] & 0xFFFF0000) | v

            return s2
        if n < 4:

            def s1(v: int) -> None:
                r[n] = (r[n] & 0xFFFFFF00) | v

            return s1
        h = n - 4

        def s1h(v: int) -> None:
            r[h] = (r[h] & 0xFFFF00FF) | (v << 8)

        return s1h

    def seg_checked(self, s: int) -> bool:
        """Whether the closure being decoded must check accesses through segment s."""
        return s in _ALWAYS_CHECKED or bool(self.c.mode_key & SEGCHK)

    def lin_fn(self, s: int, size: int, write: bool) -> Callable[[int], int]:
        """offset -> linear address of a `size`-byte access through segment s, raising
        #GP(0) (#SS(0) for SS) when it is outside the limit, through a null selector, a
        write to a read-only or code segment, or a read of an execute-only one."""
        c = self.c
        sb = c.sbase
        lo = c.slo
        hi = c.swhi if write else c.srhi
        n = size - 1
        vec = SS_VEC if s == SS else GP

        def lin(o: int) -> int:
            if o < lo[s] or o + n > hi[s]:
                raise CpuFault(vec, 0)
            return (sb[s] + o) & M32

        return lin

    def ea_for(self, ea, size: int, write: bool):
        """The ModRM address closure for a `size`-byte read or write: unchanged when its
        segment needs no checks, else one that checks limit and rights first (a
        read-modify-write asks for `write`, which implies readable for data)."""
        so = getattr(ea, "segoff", None)
        if so is None:
            return ea
        off, s = so
        c = self.c
        sb = c.sbase
        lo = c.slo
        hi = c.swhi if write else c.srhi
        n = size - 1
        vec = SS_VEC if s == SS else GP

        def ea_checked() -> int:
            o = off()
            if o < lo[s] or o + n > hi[s]:
                raise CpuFault(vec, 0)
            return (sb[s] + o) & M32

        return ea_checked

    def rm_get(self, mod: int, rm: int, ea, size: int) -> Callable[[], int]:
        if mod == 3:
            return self.reg_get(rm, size)
        ea = self.ea_for(ea, size, False)
        rd = self.rdfn(size)
        return lambda: rd(ea())

    def rm_set(self, mod: int, rm: int, ea, size: int) -> Callable[[int], None]:
        if mod == 3:
            return self.reg_set(rm, size)
        ea = self.ea_for(ea, size, True)
        wr = self.wrfn(size)
        return lambda v: wr(ea(), v)

    def rm_rmw(self, mod: int, rm: int, ea, size: int):
        """A function applying f(old) -> new to the r/m operand (address computed once)."""
        if mod == 3:
            g = self.reg_get(rm, size)
            s = self.reg_set(rm, size)

            def rmw_reg(f):
                s(f(g()))

            return rmw_reg
        ea = self.ea_for(ea, size, True)
        rd = self.rdfn(size)
        wr = self.wrfn(size)

        def rmw_mem(f):
            a = ea()
            wr(a, f(rd(a)))

        return rmw_mem

    def rdfn(self, size: int):
        c = self.c
        return c.rd8 if size == 1 else c.rd16 if size == 2 else c.rd32

    def wrfn(self, size: int):
        c = self.c
        return c.wr8 if size == 1 else c.wr16 if size == 2 else c.wr32

    # ---------------------------------------------------------------- ALU
    def alu_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        """op: 0 ADD 1 OR 2 ADC 3 SBB 4 AND 5 SUB 6 XOR 7 CMP; returns f(a, b) -> result."""
        c = self.c
        m = MASK[size]
        if op == 0:

            def add(a: int, b: int) -> int:
                res = a + b
                c.lop = OP_ADD
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return add
        if op == 2:

            def adc(a: int, b: int) -> int:
                res = a + b + c.get_cf()
                c.lop = OP_ADD
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return adc
        if op == 3:

            def sbb(a: int, b: int) -> int:
                res = a - b - c.get_cf()
                c.lop = OP_SUB
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return sbb
        if op == 5 or op == 7:

            def sub(a: int, b: int) -> int:
                res = a - b
                c.lop = OP_SUB
                c.la = a
                c.lb = b
                c.lres = res
                c.lmask = m
                return res & m

            return sub
        if op == 1:

            def or_(a: int, b: int) -> int:
                res = a | b
                c.lop = OP_LOGIC
                c.lres = res
                c.lmask = m
                return res

            return or_
        if op == 4:

            def and_(a: int, b: int) -> int:
                res = a & b
                c.lop = OP_LOGIC
                c.lres = res
                c.lmask = m
                return res

            return and_

        def xor(a: int, b: int) -> int:
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

                    def cmp_eax(v=v) -> None:
                        f(r[0], v)
                        c.eip = nxt

                    return cmp_eax

                def alu_eax(v=v) -> None:
                    r[0] = f(r[0], v)
                    c.eip = nxt

                return alu_eax
            g = self.reg_get(0, size)
            s = self.reg_set(0, size)
            if op == 7:

                def cmp_acc() -> None:
                    f(g(), v)
                    c.eip = nxt

                return cmp_acc

            def alu_acc() -> None:
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

                def cmp_rr() -> None:
                    f(r[d], r[sr])
                    c.eip = nxt

                return cmp_rr
            if op == 6 and d == sr:

                def xor_zero() -> None:
                    r[d] = 0
                    c.lop = OP_LOGIC
                    c.lres = 0
                    c.lmask = m
                    c.eip = nxt

                return xor_zero

            def alu_rr() -> None:
                r[d] = f(r[d], r[sr])
                c.eip = nxt

            return alu_rr
        if form in (0, 1):  # r/m, reg
            gr = self.reg_get(reg, size)
            if op == 7:
                gm = self.rm_get(mod, rm, ea, size)

                def cmp_mr() -> None:
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

            def cmp_rm() -> None:
                f(gr(), gm())
                c.eip = nxt

            return cmp_rm
        sr = self.reg_set(reg, size)
        if size == 4:

            def alu_rm4() -> None:
                r[reg] = f(r[reg], gm())
                c.eip = nxt

            return alu_rm4

        def alu_rm() -> None:
            sr(f(gr(), gm()))
            c.eip = nxt

        return alu_rm

    def _grp1(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b in (0x80, 0x82) else (4 if x.op32 else 2)
        mod, op, rm, ea = self.modrm(x)
        if b == 0x83:
            v = _sx8(self.u8(x)) & MASK[size]
        else:
            v = self.imm(x, size)
        nxt = self.nxt(x)
        f = self.alu_fn(op, size)
        if op == 7:
            g = self.rm_get(mod, rm, ea, size)

            def cmp_i() -> None:
                f(g(), v)
                c.eip = nxt

            return cmp_i
        if mod == 3 and size == 4:
            r = c.r

            def alu_ri() -> None:
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
            g1 = self.rm_get(mod, rm, ea, size)
            g2 = self.reg_get(reg, size)
            g = None
        nxt = self.nxt(x)
        m = MASK[size]
        if g is not None:

            def test_i() -> None:
                c.lres = g() & v
                c.lop = OP_LOGIC
                c.lmask = m
                c.eip = nxt

            return test_i

        def test() -> None:
            c.lres = g1() & g2()
            c.lop = OP_LOGIC
            c.lmask = m
            c.eip = nxt

        return test

    def _incdec_fn(self, dec: bool, size: int) -> Callable[[int], int]:
        c = self.c
        m = MASK[size]
        if dec:

            def f_dec(a: int) -> int:
                c.lcf = c.get_cf()
                res = a - 1
                c.lop = OP_DEC
                c.la = a
                c.lb = 1
                c.lres = res
                c.lmask = m
                return res & m

            return f_dec

        def f_inc(a: int) -> int:
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

            def incdec4() -> None:
                r[n] = f(r[n])
                c.eip = nxt

            return incdec4
        g = self.reg_get(n, size)
        s = self.reg_set(n, size)

        def incdec() -> None:
            s(f(g()))
            c.eip = nxt

        return incdec

    # ---------------------------------------------------------------- moves
    def _mov(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 1 if b in (0x88, 0x8A) else (4 if x.op32 else 2)
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if mod == 3 and size == 4:
            d, s = (rm, reg) if b == 0x89 else (reg, rm)

            def mov_rr() -> None:
                r[d] = r[s]
                c.eip = nxt

            return mov_rr
        if b in (0x88, 0x89):
            g = self.reg_get(reg, size)
            if mod != 3:
                wr = self.wrfn(size)
                ea = self.ea_for(ea, size, True)

                def mov_mr() -> None:
                    wr(ea(), g())
                    c.eip = nxt

                return mov_mr
            s = self.reg_set(rm, size)

            def mov_rr2() -> None:
                s(g())
                c.eip = nxt

            return mov_rr2
        g = self.rm_get(mod, rm, ea, size)
        if size == 4:
            rd = c.rd32
            ea = self.ea_for(ea, 4, False)

            def mov_rm4() -> None:
                r[reg] = rd(ea())
                c.eip = nxt

            return mov_rm4
        s = self.reg_set(reg, size)

        def mov_rm() -> None:
            s(g())
            c.eip = nxt

        return mov_rm

    def _mov_ri(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b < 0xB8 else (4 if x.op32 else 2)
        v = self.imm(x, size)
        nxt = self.nxt(x)
        s = self.reg_set(b & 7, size)
        if size == 4:
            r = c.r
            n = b & 7

            def mov_ri4() -> None:
                r[n] = v
                c.eip = nxt

            return mov_ri4

        def mov_ri() -> None:
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

        def mov_mi() -> None:
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

            def mov_a_m() -> None:
                st(rd((sb[s] + off) & M32))
                c.eip = nxt

            return mov_a_m
        wr = self.wrfn(size)
        g = self.reg_get(0, size)

        def mov_m_a() -> None:
            wr((sb[s] + off) & M32, g())
            c.eip = nxt

        return mov_m_a

    def _lea(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        x.seg = DS  # any segment: LEA subtracts the base again below (no access, no check)
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if mod == 3:
            return self._ud(x, b)
        sb = c.sbase
        s = self.reg_set(reg, size)
        m = MASK[size]
        so = getattr(ea, "segoff", None)
        if so is not None:  # the offset closure of the checked decode: use it directly
            off = so[0]

            def lea_off() -> None:
                s(off() & m)
                c.eip = nxt

            return lea_off

        def lea() -> None:
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

            def xchg_rr() -> None:
                a, v = gm(), gr()
                sm(v)
                sr(a)
                c.eip = nxt

            return xchg_rr
        rd, wr = self.rdfn(size), self.wrfn(size)
        ea = self.ea_for(ea, size, True)

        def xchg_m() -> None:
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

            def nop() -> None:
                c.eip = nxt

            return nop
        size = 4 if x.op32 else 2
        n = b & 7
        g0, s0 = self.reg_get(0, size), self.reg_set(0, size)
        g1, s1 = self.reg_get(n, size), self.reg_set(n, size)

        def xchg_ax() -> None:
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

            def movzx() -> None:
                s(g())
                c.eip = nxt

            return movzx

        def movsx() -> None:
            s(_sx(g(), ssize) & m)
            c.eip = nxt

        return movsx

    # ---------------------------------------------------------------- stack
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

            def push4() -> None:
                if c.stack_fast:
                    sp = (r[4] - 4) & M32
                    wr((sb[2] + sp) & M32, r[n])
                    r[4] = sp
                else:
                    c.push(r[n], 4)
                c.eip = nxt

            return push4

        def push() -> None:
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

            def pop4() -> None:
                if c.stack_fast:
                    sp = r[4]
                    v = rd((sb[2] + sp) & M32)
                    r[4] = (sp + 4) & M32
                    r[n] = v
                else:
                    r[n] = c.pop(4)
                c.eip = nxt

            return pop4

        def pop() -> None:
            v = c.pop(size)
            s(v)
            c.eip = nxt

        return pop

    def _push_i(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        v = self.imm(x, size) if b == 0x68 else _sx8(self.u8(x)) & MASK[size]
        nxt = self.nxt(x)

        def push_i() -> None:
            c.push(v, size)
            c.eip = nxt

        return push_i

    def _push_seg(self, x: Ctx, b: int) -> Fn:
        c = self.c
        seg = {0x06: ES, 0x0E: CS, 0x16: SS, 0x1E: DS, 0xA0: FS, 0xA8: GS}[b]
        size = 4 if x.op32 else 2
        nxt = self.nxt(x)

        def push_seg() -> None:
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
        x.end = True

        def pop_seg() -> None:
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

            def pop_r() -> None:
                s(c.pop(size))
                c.eip = nxt

            return pop_r
        wr = self.wrfn(size)
        ea = self.ea_for(ea, size, True)

        def pop_m() -> None:
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

            def pushf() -> None:
                f = c.get_flags()
                if f & VM and (f >> 12) & 3 < 3:
                    raise CpuFault(GP, 0)  # IOPL-sensitive in virtual-8086 mode
                c.push(f & 0xFCFFFF if size == 4 else f & 0xFFFF, size)
                c.eip = nxt

            return pushf
        x.end = True

        def popf() -> None:
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

        def enter() -> None:
            old_sp = r[4]
            try:
                bp = r[5]
                c.push(bp & MASK[size], size)
                frame = r[4] & (M32 if c.ss32 else M16)
                for _i in range(1, level):
                    bp = (bp - size) & (M32 if c.ss32 else M16)
                    c.push(c.rd(c.stack_lin(bp, size, False), size), size)
                if level > 0:
                    c.push(frame, size)
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

        def leave() -> None:
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

    # ---------------------------------------------------------------- control flow
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
        x.end = True
        cond = c.cond
        k = cc >> 1
        neg = cc & 1
        if k == 2:  # Z / NZ: straight from the lazy result

            def jz() -> None:
                if c.lop:
                    z = (c.lres & c.lmask) == 0
                else:
                    z = bool(c.fl & ZF)
                c.eip = nxt if z == neg else tgt

            return jz

        def jcc() -> None:
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
        x.end = True

        def jmp() -> None:
            c.eip = tgt

        return jmp

    def _call(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        d = _sx(self.imm(x, size), size)
        nxt = self.nxt(x)
        tgt = (nxt + d) & MASK[size]
        x.end = True

        def call() -> None:
            c.push(nxt, size)
            c.eip = tgt

        return call

    def _ret(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        imm = self.u16(x) if b == 0xC2 else 0
        x.end = True

        def ret() -> None:
            v = c.peek(0, size)
            c.sp_add(size + imm)
            c.eip = v

        return ret

    def _retf(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        imm = self.u16(x) if b == 0xCA else 0
        x.end = True

        def retf() -> None:
            c.far_return(size, imm)

        return retf

    def _far_ptr(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        off = self.imm(x, size)
        sel = self.u16(x)
        nxt = self.nxt(x)
        x.end = True
        call = b == 0x9A

        def far() -> None:
            c.far_jump(sel, off, call, size, nxt)

        return far

    def _loop(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        d = _sx8(self.u8(x))
        nxt = self.nxt(x)
        tgt = (nxt + d) & (M32 if x.op32 else M16)
        cm = M32 if x.ad32 else M16
        x.end = True

        def loop() -> None:
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
        x.end = True

        def int_n() -> None:
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
        x.end = True

        def iret() -> None:
            c.iret(size, nxt)

        return iret

    def _hlt(self, x: Ctx, b: int) -> Fn:
        c = self.c
        nxt = self.nxt(x)
        x.end = True

        def hlt() -> None:
            if c.cpl:
                raise CpuFault(GP, 0)
            c.eip = nxt
            raise CpuHalt()

        return hlt

    # ---------------------------------------------------------------- group 2/3/4/5
    def shift_fn(self, op: int, size: int) -> Callable[[int, int], int]:
        """ROL ROR RCL RCR SHL SHR SAL SAR with eager flags; f(value, count) -> result."""
        c = self.c
        bits = size * 8
        m = MASK[size]
        sign = SIGN[size]

        def shift(v: int, cnt: int) -> int:
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

            def test_i() -> None:
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

            def neg_f(a: int) -> int:
                res = -a
                c.lop = OP_SUB
                c.la = 0
                c.lb = a
                c.lres = res
                c.lmask = m
                return res & m

            def neg() -> None:
                rmw(neg_f)
                c.eip = nxt

            return neg

        def setmul(lo: int, hi_nonzero: bool) -> None:
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

            def get_acc() -> int:
                return r[0] & 0xFFFF

            def set_res(lo: int, hi: int) -> None:
                r[0] = (r[0] & 0xFFFF0000) | (hi << 8) | lo

            def get_hi() -> int:
                return (r[0] >> 8) & 0xFF
        else:

            def get_acc() -> int:
                return ((r[2] & m) << bits) | (r[0] & m)

            def set_res(lo: int, hi: int) -> None:
                if size == 4:
                    r[0], r[2] = lo, hi
                else:
                    r[0] = (r[0] & 0xFFFF0000) | lo
                    r[2] = (r[2] & 0xFFFF0000) | hi

            def get_hi() -> int:
                return r[2] & m

        if op == 4:

            def mul() -> None:
                a = (r[0] & m) * g()
                set_res(a & m, a >> bits)
                setmul(a & m, (a >> bits) != 0)
                c.eip = nxt

            return mul
        if op == 5:

            def imul() -> None:
                a = _sx(r[0] & m, size) * _sx(g(), size)
                lo = a & m
                set_res(lo, (a >> bits) & m)
                setmul(lo, _sx(lo, size) != a)
                c.eip = nxt

            return imul
        if op == 6:

            def div() -> None:
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

        def idiv() -> None:
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

    def _grp45(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        size = 1 if b == 0xFE else (4 if x.op32 else 2)
        mod, op, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        if op in (0, 1):
            f = self._incdec_fn(op == 1, size)
            rmw = self.rm_rmw(mod, rm, ea, size)

            def incdec() -> None:
                rmw(f)
                c.eip = nxt

            return incdec
        if b == 0xFE or op == 7:
            return self._ud(x, b)
        g = self.rm_get(mod, rm, ea, size)
        if op in (2, 4):
            x.end = True
            call = op == 2

            def jmp_ind() -> None:
                t = g()
                if call:
                    c.push(nxt, size)
                c.eip = t

            return jmp_ind
        if op in (3, 5):
            x.end = True
            if mod == 3:
                return self._ud(x, b)
            rd = self.rdfn(size)
            ea = self.ea_for(ea, size + 2, False)

            def far_ind() -> None:
                a = ea()
                off = rd(a)
                sel = c.rd16((a + size) & M32)
                c.far_jump(sel, off, op == 3, size, nxt)

            return far_ind

        def push_rm() -> None:
            c.push(g(), size)
            c.eip = nxt

        del r
        return push_rm

    # ---------------------------------------------------------------- strings
    def _string(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        sb = c.sbase
        size = 1 if b in (0xA4, 0xA6, 0xAA, 0xAC, 0xAE, 0x6C, 0x6E) else (4 if x.op32 else 2)
        am = M32 if x.ad32 else M16
        src_seg = x.seg if x.seg is not None else DS
        rep = x.rep
        nxt = self.nxt(x)
        rd, wr = self.rdfn(size), self.wrfn(size)
        m = MASK[size]
        kind = b & 0xFE
        cmpf = self.alu_fn(7, size)

        def adv(reg: int, delta: int) -> None:
            r[reg] = (r[reg] & ~am & M32) | ((r[reg] + delta) & am)

        uses_src = kind in (0xA4, 0xA6, 0xAC, 0x6E)
        uses_dst = kind in (0xA4, 0xA6, 0xAA, 0xAE, 0x6C)
        dst_write = kind in (0xA4, 0xAA, 0x6C)
        # Segment checks: DS:(E)SI (or the override) for the source, ES:(E)DI (never
        # overridden) for the destination; both before anything is read or written.
        chk_src = uses_src and self.seg_checked(src_seg)
        chk_dst = uses_dst and self.seg_checked(ES)
        chk = chk_src or chk_dst
        src_lin = self.lin_fn(src_seg, size, False) if chk_src else None
        dst_lin = self.lin_fn(ES, size, dst_write) if chk_dst else None

        def one() -> bool:
            """One iteration; returns the REPE/REPNE condition value (ZF) for CMPS/SCAS."""
            if chk:
                if src_lin is not None:
                    src_lin(r[6] & am)
                if dst_lin is not None:
                    dst_lin(r[7] & am)
            step = -size if c.fl & DF else size
            if kind == 0xA4:  # MOVS
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                wr((sb[ES] + (r[7] & am)) & M32, v)
                adv(6, step)
                adv(7, step)
            elif kind == 0xAA:  # STOS
                wr((sb[ES] + (r[7] & am)) & M32, r[0] & m)
                adv(7, step)
            elif kind == 0xAC:  # LODS
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                if size == 4:
                    r[0] = v
                elif size == 2:
                    r[0] = (r[0] & 0xFFFF0000) | v
                else:
                    r[0] = (r[0] & 0xFFFFFF00) | v
                adv(6, step)
            elif kind == 0xA6:  # CMPS
                a = rd((sb[src_seg] + (r[6] & am)) & M32)
                v = rd((sb[ES] + (r[7] & am)) & M32)
                cmpf(a, v)
                adv(6, step)
                adv(7, step)
                return (a - v) & m == 0
            elif kind == 0xAE:  # SCAS
                v = rd((sb[ES] + (r[7] & am)) & M32)
                a = r[0] & m
                cmpf(a, v)
                adv(7, step)
                return (a - v) & m == 0
            elif kind == 0x6C:  # INS
                c.io_check(r[2] & 0xFFFF, size)
                a = (sb[ES] + (r[7] & am)) & M32
                c.check_writable(a, size)
                wr(a, c.port_in(r[2] & 0xFFFF, size))
                adv(7, step)
            else:  # OUTS
                c.io_check(r[2] & 0xFFFF, size)
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                c.port_out(r[2] & 0xFFFF, size, v)
                adv(6, step)
            return True

        if not rep:

            def string1() -> None:
                one()
                c.eip = nxt

            return string1

        cond_kind = kind in (0xA6, 0xAE)
        want = rep == 0xF3  # REPE: continue while equal

        if kind == 0xA4:
            fast = self._fast_movs(am, src_seg, size, chk_src, chk_dst)
        elif kind == 0xAA:
            fast = self._fast_stos(am, size, chk_dst)
        else:
            fast = None

        def string_rep() -> None:
            use_fast = fast is not None and (kind == 0xA4 or not c.fl & DF)
            while r[1] & am:
                if use_fast:
                    fast()  # whole page runs; the slow step below fills the TLB for it
                    if not r[1] & am:
                        break
                res = one()
                r[1] = (r[1] & ~am & M32) | ((r[1] - 1) & am)
                if cond_kind and res != want:
                    break
            c.eip = nxt

        return string_rep

    def _room(self, s: int, size: int, am: int, write: bool, chk: bool):
        """f(offset, backwards) -> how many `size`-byte elements from offset on, in the
        copy direction, stay inside segment s (and do not wrap a 16-bit offset), for the
        fast REP paths; 0 sends the element to the checked one-at-a-time step. None when
        neither bound applies."""
        if not chk and am == M32:
            return None
        c = self.c
        lo_l = c.slo
        hi_l = (c.swhi if write else c.srhi) if chk else None
        n = size - 1

        def room(o: int, back: bool) -> int:
            lo = lo_l[s] if chk else 0
            hi = min(hi_l[s], am) if hi_l is not None else am
            if o < lo or o + n > hi:
                return 0
            return (o - lo) // size + 1 if back else (hi - n - o) // size + 1

        return room

    def _fast_movs(
        self, am: int, src_seg: int, size: int, chk_src: bool = False, chk_dst: bool = False
    ) -> Fn:
        """REP MOVS within RAM pages, either direction: runs of elements copied with one
        slice assignment each. A run never overlaps its own destination in the copy
        direction, so the result equals the element-by-element copy. Runs stop at segment
        limits; the element there takes the checked step (and its fault)."""
        c = self.c
        r = c.r
        sb = c.sbase
        src_room = self._room(src_seg, size, am, False, chk_src)
        dst_room = self._room(ES, size, am, True, chk_dst)

        def fast() -> None:
            ram = c.ram
            back = bool(c.fl & DF)
            step = -size if back else size
            while r[1] & am:
                s = (sb[src_seg] + (r[6] & am)) & M32
                d = (sb[ES] + (r[7] & am)) & M32
                sp = c.rtlb.get(s >> 12)
                dp = c.wtlb.get(d >> 12)
                so, do = s & 0xFFF, d & 0xFFF
                if sp is None or dp is None or so + size > 0x1000 or do + size > 0x1000:
                    return
                if back:
                    n = min(r[1] & am, so // size + 1, do // size + 1)
                else:
                    n = min(r[1] & am, (0x1000 - so) // size, (0x1000 - do) // size)
                if src_room is not None:
                    n = min(n, src_room(r[6] & am, back))
                if dst_room is not None:
                    n = min(n, dst_room(r[7] & am, back))
                if n <= 0:
                    return
                so |= sp
                do |= dp
                gap = (do - so) if not back else (so - do)
                if 0 < gap < n * size:
                    n = gap // size  # the destination runs into the source: shorter runs
                    if n == 0:
                        return
                span = n * size
                if back:
                    ram[do - span + size : do + size] = ram[so - span + size : so + size]
                else:
                    ram[do : do + span] = ram[so : so + span]
                r[6] = (r[6] & ~am & M32) | ((r[6] + step * n) & am)
                r[7] = (r[7] & ~am & M32) | ((r[7] + step * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)

        return fast

    def _fast_stos(self, am: int, size: int, chk_dst: bool = False) -> Fn:
        """REP STOS forwards within RAM pages, a run per page (stopping at ES's limit)."""
        c = self.c
        r = c.r
        sb = c.sbase
        dst_room = self._room(ES, size, am, True, chk_dst)

        def fast() -> None:
            ram = c.ram
            while r[1] & am:
                d = (sb[ES] + (r[7] & am)) & M32
                dp = c.wtlb.get(d >> 12)
                if dp is None:
                    return
                n = min(r[1] & am, (0x1000 - (d & 0xFFF)) // size)
                if dst_room is not None:
                    n = min(n, dst_room(r[7] & am, False))
                if n <= 0:
                    return
                do = dp | (d & 0xFFF)
                ram[do : do + size * n] = (r[0] & MASK[size]).to_bytes(size, "little") * n
                r[7] = (r[7] & ~am & M32) | ((r[7] + size * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)

        return fast

    # ---------------------------------------------------------------- I/O
    def _io(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b in (0xE4, 0xE6, 0xEC, 0xEE) else (4 if x.op32 else 2)
        port = self.u8(x) if b < 0xE8 else -1
        nxt = self.nxt(x)
        out = b in (0xE6, 0xE7, 0xEE, 0xEF)
        g = self.reg_get(0, size)
        s = self.reg_set(0, size)
        r = c.r
        x.end = True  # device side effects (power-off, IRQs) are seen at once

        def io() -> None:
            p = port if port >= 0 else r[2] & 0xFFFF
            c.io_check(p, size)
            if out:
                c.port_out(p, size, g())
            else:
                s(c.port_in(p, size))
            c.eip = nxt

        return io

    # ---------------------------------------------------------------- flags & misc
    def _flagop(self, x: Ctx, b: int) -> Fn:
        c = self.c
        nxt = self.nxt(x)
        if b in (0xFA, 0xFB):
            x.end = True

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
            xlat_lin = lambda o: (sb[seg] + o) & M32  # noqa: E731

        def misc() -> None:
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

    def _bcd(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        base = self.u8(x) if b in (0xD4, 0xD5) else 10
        nxt = self.nxt(x)

        def szp(f: int, v: int) -> int:
            f &= ~(ZF | SF | PF)
            v &= 0xFF
            return f | (ZF if v == 0 else 0) | (v & 0x80) | PARITY[v]

        def bcd() -> None:
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
        x.end = True
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
        x.end = True

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

        def imul3() -> None:
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

    def _fpu(self, x: Ctx, b: int) -> Fn:
        """x87 escapes D8-DF: decode_x87.py."""
        return decode_x87.x87(self, x, b)

    def _fwait(self, x: Ctx, b: int) -> Fn:
        return decode_x87.fwait(self.c, self.nxt(x))

    def _ud(self, x: Ctx, b: int) -> Fn:
        x.end = True

        def ud() -> None:
            raise CpuFault(UD)

        return ud

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

    # ---------------------------------------------------------------- 0F opcodes
    def _setcc(self, x: Ctx, b: int) -> Fn:
        c = self.c
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        s = self.rm_set(mod, rm, ea, 1)
        cc = b & 15

        def setcc() -> None:
            s(1 if c.cond(cc) else 0)
            c.eip = nxt

        return setcc

    def _cmov(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 4 if x.op32 else 2
        mod, reg, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        g = self.rm_get(mod, rm, ea, size)
        s = self.reg_set(reg, size)
        cc = b & 15
        r = c.r

        def cmov() -> None:
            v = g()  # the source is read (and may fault) whatever the condition
            if c.cond(cc):
                s(v)
            elif size == 4:
                r[reg] = r[reg]
            c.eip = nxt

        return cmov

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
            ea_at = lambda off: blin((boff() + off) & am)  # noqa: E731
        else:
            ea_at = lambda off: (ea() + off) & M32  # noqa: E731

        def bt() -> None:
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

        def bsf() -> None:
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

        def cmpxchg() -> None:
            if mod == 3:
                d = gm()
            else:
                a = ea()
                d = rd(a)
            acc = g0()
            cmpf(acc, d)
            if acc == d:
                if mod == 3:
                    sm(gr())
                else:
                    wr(a, gr())
            else:
                if mod != 3:
                    wr(a, d)  # the processor always writes the destination
                s0(d)
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
                put(int.from_bytes(os.urandom(size), "little"))
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

    def _sys0f(self, x: Ctx, b: int) -> Fn:
        """Privileged and system 0F opcodes: CR/DR moves, MSRs, CPUID, RDTSC, CLTS..."""
        c = self.c
        r = c.r
        nxt = self.nxt(x)
        if b in (0x20, 0x21, 0x22, 0x23):
            m = self.u8(x)
            nxt = self.nxt(x)
            reg, rm = (m >> 3) & 7, m & 7
            x.end = True

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
        x.end = b != 0xA2 and b != 0x31

        def sys() -> None:
            if b == 0xA2:
                c.cpuid()
            elif b == 0x31:
                if c.cr4 & 4 and c.cpl:
                    raise CpuFault(GP, 0)
                t = c.rdtsc()
                r[0], r[2] = t & M32, t >> 32
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

    def _grp6(self, x: Ctx, b: int) -> Fn:
        """SLDT STR LLDT LTR VERR VERW."""
        c = self.c
        mod, op, rm, ea = self.modrm(x)
        nxt = self.nxt(x)
        x.end = True
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
        x.end = True
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

    # ---------------------------------------------------------------- tables
    def _install(self) -> None:
        o = self.ops
        for b in range(0x40):
            if b & 7 < 6:
                o[b] = self._alu
        for b in (0x06, 0x0E, 0x16, 0x1E):
            o[b] = self._push_seg
        for b in (0x07, 0x17, 0x1F):
            o[b] = self._pop_seg
        for b in (0x27, 0x2F, 0x37, 0x3F, 0xD4, 0xD5):
            o[b] = self._bcd
        for b in range(0x40, 0x50):
            o[b] = self._incdec_r
        for b in range(0x50, 0x58):
            o[b] = self._push_r
        for b in range(0x58, 0x60):
            o[b] = self._pop_r
        o[0x60] = o[0x61] = self._pusha
        o[0x62] = self._bound
        o[0x63] = self._arpl
        o[0x68] = o[0x6A] = self._push_i
        o[0x69] = o[0x6B] = self._imul3
        for b in (0x6C, 0x6D, 0x6E, 0x6F, 0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE):
            o[b] = self._string
        o[0xAF] = self._string
        for b in range(0x70, 0x80):
            o[b] = self._jcc
        for b in range(0x80, 0x84):
            o[b] = self._grp1
        o[0x84] = o[0x85] = o[0xA8] = o[0xA9] = self._test
        o[0x86] = o[0x87] = self._xchg
        for b in range(0x88, 0x8C):
            o[b] = self._mov
        o[0x8C] = o[0x8E] = self._mov_sreg
        o[0x8D] = self._lea
        o[0x8F] = self._pop_rm
        for b in range(0x90, 0x98):
            o[b] = self._xchg_ax
        for b in (0x98, 0x99, 0x9E, 0x9F, 0xD6, 0xD7):
            o[b] = self._misc1
        o[0x9A] = o[0xEA] = self._far_ptr
        o[0x9C] = o[0x9D] = self._pushf
        for b in range(0xA0, 0xA4):
            o[b] = self._mov_moffs
        for b in range(0xB0, 0xC0):
            o[b] = self._mov_ri
        for b in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3):
            o[b] = self._grp2
        o[0xC2] = o[0xC3] = self._ret
        o[0xC4] = o[0xC5] = self._les
        o[0xC6] = o[0xC7] = self._mov_mi
        o[0xC8] = self._enter
        o[0xC9] = self._leave
        o[0xCA] = o[0xCB] = self._retf
        o[0xCC] = o[0xCD] = o[0xCE] = o[0xF1] = self._int
        o[0xCF] = self._iret
        for b in range(0xD8, 0xE0):
            o[b] = self._fpu
        for b in range(0xE0, 0xE4):
            o[b] = self._loop
        for b in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF):
            o[b] = self._io
        o[0xE8] = self._call
        o[0xE9] = o[0xEB] = self._jmp
        o[0xF4] = self._hlt
        o[0x9B] = self._fwait
        o[0xF6] = o[0xF7] = self._grp3
        for b in (0xF5, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD):
            o[b] = self._flagop
        o[0xFE] = o[0xFF] = self._grp45
        t = self.ops0f
        t[0x00] = self._grp6
        t[0x01] = self._grp7
        t[0x02] = t[0x03] = self._larlsl
        for b in (0x06, 0x08, 0x09, 0x20, 0x21, 0x22, 0x23, 0x30, 0x31, 0x32, 0xA2):
            t[b] = self._sys0f
        for b in range(0x18, 0x20):
            t[b] = self._nop_rm
        for b in range(0x40, 0x50):
            t[b] = self._cmov
        for b in range(0x80, 0x90):
            t[b] = self._jcc
        for b in range(0x90, 0xA0):
            t[b] = self._setcc
        t[0xA0] = t[0xA8] = self._push_seg
        t[0xA1] = t[0xA9] = self._pop_seg
        t[0xA3] = t[0xAB] = t[0xB3] = t[0xBB] = t[0xBA] = self._bt
        t[0xA4] = t[0xA5] = t[0xAC] = t[0xAD] = self._shd
        t[0xAF] = self._imul3
        t[0xB0] = t[0xB1] = self._cmpxchg
        t[0xB2] = t[0xB4] = t[0xB5] = self._les
        t[0xB6] = t[0xB7] = t[0xBE] = t[0xBF] = self._movx
        t[0xBC] = t[0xBD] = self._bsf
        t[0xC0] = t[0xC1] = self._xadd
        t[0xC7] = self._grp9
        for b in range(0xC8, 0xD0):
            t[b] = self._bswap
