"""The decoder's core: instruction fetch (with the CS limit and the 15-byte rule),
prefixes, dispatch through the opcode table, ModRM/SIB operands and segment checks, and
basic blocks (translation, superblocks, the hand-off to jit.py). The closures of each
opcode group are built by the mixins beside it (see the package docstring)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from boite.accel.emu.arch import (
    CS,
    DS,
    FS,
    GP,
    GS,
    M16,
    M32,
    SEG_PREFIX,
    SEGCHK,
    SS,
    SS_VEC,
    UD,
    CpuFault,
    override_flat_bits,
)
from boite.accel.emu.optable import BY_OPCODE, Op, end_regs, lock_regs, lookup

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

Fn = Callable[[], None]
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
MAX_BLOCK = 48

# Segments whose accesses are checked whatever the mode: CS (never writable in protected
# mode) and FS/GS (often null or small, e.g. a null FS in Linux user space); they are only
# reached through a prefix, so checking them costs nothing to unprefixed code.
_ALWAYS_CHECKED = (CS, FS, GS)


class Ctx:
    """Decoding state of one instruction.

    Bytes at positions below `flim` are read straight from `mem` (guest RAM) at
    `base + pos`: the block's page, within the CS limit, the 15-byte rule and the 16-bit
    EIP range, all checked once when the instruction starts. Every other byte goes
    through DecoderBase.fetch_slow (the execute TLB, its faults and the checks byte by
    byte)."""

    __slots__ = (
        "start", "pos", "csb", "cslim", "op32", "ad32", "seg", "rep", "lock", "end", "eipmask",
        "p66", "mem", "base", "flim", "ea_seg", "ea_base", "ea_disp", "code32",
    )  # fmt: skip

    def __init__(
        self,
        start: int,
        csb: int,
        code32: bool,
        cslim: int,
        mem: Any = None,
        base: int = 0,
        flim: int = 0,
    ) -> None:
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
        self.code32 = code32
        self.p66 = False  # an operand-size prefix was seen (an SSE mandatory prefix)
        self.mem = mem
        self.base = base
        self.flim = flim
        # modrm(fuse=True) on an unchecked 32-bit [reg + disp] operand: its parts.
        self.ea_seg = 0
        self.ea_base = 0
        self.ea_disp = 0


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


# The prefix bytes: segment overrides, operand and address size, LOCK, REPNE/REP.
_PREFIX = bytes(b in SEG_PREFIX or b in (0x66, 0x67, 0xF0, 0xF2, 0xF3) for b in range(256))


def _fast_limit(eip: int, pa: int, page_end: int, cslim: int, code32: bool) -> int:
    """Where the bytes of the instruction at EIP (physical pa, in a RAM page ending at
    page_end) stop being readable from RAM directly: the page end, the CS limit, the
    15-byte rule, and in 16-bit code the EIP wrap (the next byte is at CS:0)."""
    flim = eip + 15
    if page_end - pa + eip < flim:
        flim = page_end - pa + eip
    if cslim < flim - 1:
        flim = cslim + 1
    if not code32 and flim > 0x10000:
        flim = 0x10000
    return flim


def _tail_fault(c: Cpu, vec: int, err: int | None, cr2: int) -> Fn:
    """The closure of an instruction whose tail could not be fetched: the fault, raised
    when it runs (with CR2 as the fetch left it)."""

    def fault() -> None:
        c.cr2 = cr2
        raise CpuFault(vec, err)

    return fault


# ModRM address closures, one factory per form. Their values are default arguments, not
# captured variables: a closure costs a cell per variable (and the collector as many more
# objects to scan), and made inside modrm it would cost cells for every form's variables.
_MODRM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, -1), (7, -1), (5, -1), (3, -1))


def _off_const(d: int) -> Callable[[], int]:
    return lambda d=d: d


def _off16_base(r: list[int], base: int, d: int) -> Callable[[], int]:
    return lambda r=r, base=base, d=d: (r[base] + d) & M16


def _off16_base_idx(r: list[int], base: int, idx: int, d: int) -> Callable[[], int]:
    return lambda r=r, base=base, idx=idx, d=d: (r[base] + r[idx] + d) & M16


def _off32_base(r: list[int], base: int, d: int) -> Callable[[], int]:
    return lambda r=r, base=base, d=d: (r[base] + d) & M32


def _off32_idx(r: list[int], idx: int, sh: int, d: int) -> Callable[[], int]:
    return lambda r=r, idx=idx, sh=sh, d=d: ((r[idx] << sh) + d) & M32


def _off32_base_idx(r: list[int], base: int, idx: int, sh: int, d: int) -> Callable[[], int]:
    return lambda r=r, base=base, idx=idx, sh=sh, d=d: (r[base] + (r[idx] << sh) + d) & M32


def _ea_segoff(sb: list[int], s: int, off: Callable[[], int]) -> Callable[[], int]:
    return lambda sb=sb, s=s, off=off: (sb[s] + off()) & M32


def _ea_disp(sb: list[int], s: int, d: int) -> Callable[[], int]:
    return lambda sb=sb, s=s, d=d: (sb[s] + d) & M32


def _ea_base(sb: list[int], s: int, r: list[int], base: int) -> Callable[[], int]:
    return lambda sb=sb, s=s, r=r, base=base: (sb[s] + r[base]) & M32


def _ea_base_disp(sb: list[int], s: int, r: list[int], base: int, d: int) -> Callable[[], int]:
    return lambda sb=sb, s=s, r=r, base=base, d=d: (sb[s] + r[base] + d) & M32


def _ea_idx(sb: list[int], s: int, r: list[int], idx: int, sh: int, d: int) -> Callable[[], int]:
    return lambda sb=sb, s=s, r=r, idx=idx, sh=sh, d=d: (sb[s] + (r[idx] << sh) + d) & M32


def _ea_base_idx(
    sb: list[int], s: int, r: list[int], base: int, idx: int, sh: int, d: int
) -> Callable[[], int]:
    return lambda sb=sb, s=s, r=r, base=base, idx=idx, sh=sh, d=d: (
        (sb[s] + r[base] + (r[idx] << sh) + d) & M32
    )


class Block:
    """A decoded basic block: its closures, and once hot, one compiled function."""

    __slots__ = ("eip", "csk", "mode", "mask", "fns", "pa", "info", "hits", "fn", "cacheable",
                 "native_refused")  # fmt: skip

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
        self.native_refused = False  # the native tier said no: the Python compiler next


class DecoderBase:
    """Fetch, prefixes, table dispatch, operands and block building; the opcode groups
    (mixins in the sibling modules) build the closures."""

    def __init__(self, cpu: Cpu) -> None:
        self.c = cpu
        # Per map, from the opcode table: the method building each opcode's closure, the
        # ModRM reg fields where it ends a block (0xFF: always) and where LOCK is legal.
        self.ops: list[Callable[[Ctx, int], Fn]] = [self._ud] * 256
        self.ops0f: list[Callable[[Ctx, int], Fn]] = [self._ud] * 256
        self.ends = [0] * 256
        self.ends0f = [0] * 256
        self.locks: list[int | None] = [None] * 256
        self.locks0f: list[int | None] = [None] * 256
        self.seg_overrides = 0  # bit i: an instruction decoded lately named segment i
        self.tail_fault = False  # the last decode could not fetch its tail (a fault)
        self.ctx = Ctx(0, 0, True, 0)  # the instruction being decoded (see decode)
        # Blocks of one page-straddling instruction by physical address (_keep_straddler).
        self.straddlers: dict[int, tuple] = {}
        self.shared: dict[tuple[str, int, int], Callable[..., int | None]] = {}
        self._install()

    # ---------------------------------------------------------------- fetch
    def fetch_slow(self, x: Ctx) -> int:
        """The byte at x.pos through the execute TLB, with every check."""
        # Longer than 15 bytes, or a byte past the CS limit: #GP(0) (a near branch beyond
        # the limit faults here, at the target, where the CPU faults on the branch).
        if x.pos - x.start >= 15 or (x.pos & x.eipmask) > x.cslim:
            raise CpuFault(GP, 0)
        v = self.c.fetch8((x.csb + (x.pos & x.eipmask)) & M32)
        x.pos += 1
        return v

    def u8(self, x: Ctx) -> int:
        p = x.pos
        if p < x.flim:
            x.pos = p + 1
            return x.mem[x.base + p]
        return self.fetch_slow(x)

    def u16(self, x: Ctx) -> int:
        p = x.pos
        if p + 2 <= x.flim:
            x.pos = p + 2
            return _u16(x.mem, x.base + p)[0]
        return self.u8(x) | (self.u8(x) << 8)

    def u32(self, x: Ctx) -> int:
        p = x.pos
        if p + 4 <= x.flim:
            x.pos = p + 4
            return _u32(x.mem, x.base + p)[0]
        return self.u16(x) | (self.u16(x) << 16)

    def imm(self, x: Ctx, size: int) -> int:
        return self.u8(x) if size == 1 else self.u16(x) if size == 2 else self.u32(x)

    def nxt(self, x: Ctx) -> int:
        return x.pos & x.eipmask

    def peek8(self, x: Ctx, pos: int) -> int:
        """The byte at `pos` (already fetched, or about to be) without moving x.pos."""
        if x.start <= pos < x.flim:
            return x.mem[x.base + pos]
        return self.c.rd8((x.csb + (pos & x.eipmask)) & M32)

    # ---------------------------------------------------------------- decode
    def _begin(self, x: Ctx) -> None:
        """Set the fields of the decoding state that hold for a whole block."""
        c = self.c
        x.code32 = code32 = c.cs32
        x.csb = c.sbase[CS]
        x.cslim = c.slimit[CS]
        x.eipmask = M32 if code32 else M16
        x.mem = c.ram

    def decode(self, eip: int, pa: int = -1, page_end: int = 0) -> tuple[Fn, int, bool]:
        """One instruction at EIP: (closure, length, whether it ends a block). With its
        physical address pa (in a RAM page ending at page_end) its bytes in that page are
        read from RAM directly."""
        c = self.c
        x = self.ctx
        self._begin(x)
        flim = 0
        if pa >= 0 and page_end <= c.ram_size:
            flim = _fast_limit(eip, pa, page_end, x.cslim, x.code32)
        try:
            fn = self._insn(x, eip, pa - eip, flim)
        except CpuFault as f:
            if x.pos == eip:
                raise  # the first byte itself cannot be fetched: fault now
            # A fault while fetching the tail: raise it when the instruction runs.
            self.tail_fault = True
            return _tail_fault(c, f.vector, f.error, c.cr2), x.pos - eip, True
        return fn, x.pos - eip, x.end

    def _insn(self, x: Ctx, eip: int, base: int, flim: int) -> Fn:
        """The closure of the instruction at EIP (x set by _begin); x.pos ends past it
        and x.end tells whether it ends a block. Bytes below flim are read from RAM at
        base + position; a fetch fault raises CpuFault."""
        # One Ctx for every instruction (no closure keeps it): reset, not made anew.
        code32 = x.code32
        x.start = x.pos = eip
        x.base = base
        x.flim = flim
        x.op32 = x.ad32 = code32
        x.seg = None
        x.rep = 0
        x.lock = x.end = x.p66 = False
        while True:
            p = x.pos
            if p < flim:
                x.pos = p + 1
                b = x.mem[base + p]
            else:
                b = self.fetch_slow(x)
            if not _PREFIX[b]:
                break
            if b in SEG_PREFIX:
                x.seg = SEG_PREFIX[b]
                self.seg_overrides |= 1 << x.seg
            elif b == 0x66:
                x.op32 = not code32
                x.p66 = True
            elif b == 0x67:
                x.ad32 = not code32
            elif b == 0xF0:
                x.lock = True
            else:  # F2, F3
                x.rep = b
        if b == 0x0F:
            b = self.u8(x)
            ops, ends, locks = self.ops0f, self.ends0f, self.locks0f
        else:
            ops, ends, locks = self.ops, self.ends, self.locks
        if x.lock and self.c.lock_ud and not self._lockable(x, locks[b]):
            return self._ud(x, b)
        mpos = x.pos
        fn = ops[b](x, b)
        e = ends[b]  # the table's block-end rule, by ModRM reg field
        if e and (e == 0xFF or e >> ((self.peek8(x, mpos) >> 3) & 7) & 1):
            x.end = True
        return fn

    def _lockable(self, x: Ctx, regs: int | None) -> bool:
        """LOCK is legal only on a read-modify-write form with a memory destination;
        `regs` is the set of ModRM reg fields (bit mask) that allow it."""
        if regs is None:
            return False
        modrm = self.peek8(x, x.pos)
        return modrm < 0xC0 and bool(regs >> ((modrm >> 3) & 7) & 1)

    def decode_one(self, eip: int) -> tuple[Fn, int]:
        fn, n, _ = self.decode(eip)
        return fn, n

    def translate_block(self, pa: int, eip: int) -> Block:
        """Decode a basic block at EIP (physical address pa) and cache it."""
        c = self.c
        st = self.straddlers.get(pa)
        if st is not None and st[0] == eip and st[1] == c.cs_key and st[2] == c.mode_key:
            block = self._straddler_again(pa, eip, st)
            if block is not None:
                return block
        nt = c.native
        first_run = nt is not None and nt.first_run
        if first_run:
            # Translate-first: the block runs as host code from its first run, never
            # decoded here (most of a boot's blocks run a few times: decoding them and
            # translating them later cost more than translating them once).
            out = nt.translate_with_overrides(pa, eip)
            if out is not None:
                fn, segs = out
                block = Block(eip, c.cs_key, c.mode_key, (), pa, [], ~override_flat_bits(~segs))
                block.fn = fn
                self._cache(block)
                return block
        fns: list[Fn] = []
        info: list[tuple[int, int]] = []
        page_end = (pa | 0xFFF) + 1
        cur = eip
        cur_pa = pa
        self.seg_overrides = 0
        self.tail_fault = False
        x = self.ctx
        self._begin(x)
        code32 = x.code32
        mask = x.eipmask
        cslim = x.cslim
        in_ram = page_end <= c.ram_size
        insn = self._insn
        while True:
            flim = 0
            if in_ram:  # as _fast_limit
                flim = cur + 15
                if page_end - cur_pa + cur < flim:
                    flim = page_end - cur_pa + cur
                if cslim < flim - 1:
                    flim = cslim + 1
                if not code32 and flim > 0x10000:
                    flim = 0x10000
            try:
                fn = insn(x, cur, cur_pa - cur, flim)
                end = x.end
            except CpuFault as f:
                if x.pos == cur:
                    raise  # the first byte itself cannot be fetched: fault now
                # A fault while fetching the tail: raise it when the instruction runs.
                self.tail_fault = True
                fn = _tail_fault(c, f.vector, f.error, c.cr2)
                end = True
            n = x.pos - cur
            fns.append(fn)
            info.append((cur, n))
            cur = (cur + n) & mask
            cur_pa += n
            if end or len(fns) >= MAX_BLOCK or cur_pa >= page_end:
                break
        if (cur_pa > page_end or self.tail_fault) and len(fns) > 1:
            # The last instruction straddles the page, or its tail could not be fetched
            # (the decoder handed back its fault): the block ends before it (and is
            # cached); that one is a block of its own, decoded each time.
            fns.pop()
            cur, n = info.pop()
            cur_pa -= n
            self.tail_fault = False
        unused = override_flat_bits(~self.seg_overrides)
        block = Block(eip, c.cs_key, c.mode_key, tuple(fns), pa, info, ~unused)
        if cur_pa > page_end or self.tail_fault:
            # An instruction straddles a page: run it, don't cache. Nor one whose tail
            # could not be fetched: its fault is what the block holds, and once the
            # guest maps that page the instruction must run.
            block.cacheable = False
            if not self.tail_fault and code32:
                self._keep_straddler(block, page_end)
            return block
        if first_run:
            # The native tier said no: the Python compiler takes it once hot (hot_block
            # is its own threshold here: translate-first leaves it as it was).
            block.native_refused = True
        self._cache(block)
        return block

    def _cache(self, block: Block) -> None:
        """Keep a block for its physical address; its page becomes a code page."""
        c = self.c
        pa = block.pa
        c.blocks[pa] = block
        ppage = pa >> 12
        lst = c.code_pages.get(ppage)
        if lst is None:
            c.code_pages[ppage] = [pa]
            c.guard_code_page(ppage)
        else:
            lst.append(pa)

    def _keep_straddler(self, block: Block, page_end: int) -> None:
        """Remember a (32-bit) instruction that straddles a page: where its second part
        was fetched from (the execute TLB's frame) and both parts' bytes. Such a block is
        never cached, so it is asked for each time it runs (the Debian boot decoded tens
        of thousands of them); this lets the next ask skip decoding when nothing moved."""
        c = self.c
        pa = block.pa
        ((eip, n),) = block.info
        n1 = page_end - pa
        lin2 = (c.sbase[CS] + eip + n1) & M32
        p2 = c.xtlb.get(lin2 >> 12)
        if p2 is None or lin2 & 0xFFF or p2 + n - n1 > c.ram_size:
            return
        self.straddlers[pa] = (
            eip, c.cs_key, c.mode_key, c.cr0 & 1, c.lock_ud, bytes(c.ram[pa:page_end]),
            lin2 >> 12, p2, bytes(c.ram[p2 : p2 + n - n1]), block.fns, block.info, block.mask,
        )  # fmt: skip

    def _straddler_again(self, pa: int, eip: int, st: tuple) -> Block | None:
        """The block of a straddling instruction kept by _keep_straddler, when decoding it
        again would give the same: same state, its second page still in the execute TLB
        at the same frame, the same bytes in both pages. Else None."""
        c = self.c
        if st[3] != c.cr0 & 1 or st[4] != c.lock_ud or c.xtlb.get(st[6]) != st[7]:
            return None
        first, p2, second = st[5], st[7], st[8]
        if c.ram[pa : pa + len(first)] != first or c.ram[p2 : p2 + len(second)] != second:
            return None
        block = Block(eip, c.cs_key, c.mode_key, st[9], pa, st[10], st[11])
        block.cacheable = False
        return block

    def compile(self, block: Block) -> None:
        """Hot block: build its Python function (jit.compile_block)."""
        from boite.accel.emu.jit import compile_block

        c = self.c
        if c.native is not None and not block.native_refused:  # the native tier first
            out = c.native.translate_with_overrides(block.pa, block.eip)
            if out is not None:
                # The host code may cover more instructions than the closures did (a
                # loop's body past its forward branches): their overrides count too.
                block.fn, segs = out
                block.mask |= override_flat_bits(segs)
                block.mode = c.mode_key & block.mask
                return
            # The native tier runs hot blocks sooner than the Python compiler (whose
            # compile costs more): that one waits for its own threshold, and is not
            # asked again (hits starts over below hot_block: without the mark a refused
            # block came back here and waited again, never compiled).
            wait = c.native.python_hot - block.hits
            if wait > 0:
                block.native_refused = True
                block.hits = c.hot_block - wait
                return
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
                or not after.fns  # host code from its first run (translate-first)
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
    def modrm(self, x: Ctx, fuse: bool = False) -> tuple[int, int, int, Callable[[], int] | None]:
        """Returns (mod, reg, rm, ea) with ea a closure giving the linear address. With
        `fuse`, an operand at [reg + disp] in a segment needing no checks (the commonest
        memory operand) gives ea None, its parts in x.ea_seg/ea_base/ea_disp: the caller
        computes the address inside its own closure (one call and two objects fewer)."""
        p = x.pos
        if p < x.flim:
            x.pos = p + 1
            m = x.mem[x.base + p]
        else:
            m = self.fetch_slow(x)
        if m >= 0xC0:
            return 3, (m >> 3) & 7, m & 7, None
        mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
        c = self.c
        r = c.r
        sb = c.sbase
        checked = c.mode_key & SEGCHK
        if not x.ad32:
            if mod == 0 and rm == 6:
                d = self.u16(x)
                base = idx = -1
                seg = DS
            else:
                d = 0 if mod == 0 else _sx8(self.u8(x)) if mod == 1 else self.u16(x)
                base, idx = _MODRM16[rm]
                seg = SS if rm in (2, 3, 6) else DS
            s = x.seg if x.seg is not None else seg
            if base < 0:
                off = _off_const(d)
            elif idx < 0:
                off = _off16_base(r, base, d)
            else:
                off = _off16_base_idx(r, base, idx, d)
            ea = _ea_segoff(sb, s, off)
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
        s = x.seg if x.seg is not None else (SS if base == 4 or base == 5 else DS)
        if checked or s in _ALWAYS_CHECKED:
            # The offset on its own, for the segment check (see ea_for).
            if base < 0 and idx < 0:
                off = _off_const(d & M32)
            elif idx < 0:
                off = _off32_base(r, base, d)
            elif base < 0:
                off = _off32_idx(r, idx, sh, d)
            else:
                off = _off32_base_idx(r, base, idx, sh, d)
            ea = _ea_segoff(sb, s, off)
            ea.segoff = (off, s)  # type: ignore[attr-defined]
            return mod, reg, rm, ea
        if base < 0 and idx < 0:
            return mod, reg, rm, _ea_disp(sb, s, d & M32)
        if idx < 0:
            if fuse:
                x.ea_seg = s
                x.ea_base = base
                x.ea_disp = d
                return mod, reg, rm, None
            if d == 0:
                return mod, reg, rm, _ea_base(sb, s, r, base)
            return mod, reg, rm, _ea_base_disp(sb, s, r, base, d)
        if base < 0:
            return mod, reg, rm, _ea_idx(sb, s, r, idx, sh, d)
        return mod, reg, rm, _ea_base_idx(sb, s, r, base, idx, sh, d)

    def offset_ea(self, x: Ctx) -> Callable[[], int]:
        """Effective address without segment base (LEA)."""
        # Decode with a zero segment: reuse modrm's parse by temporarily using a fake base.
        raise NotImplementedError

    # Register accessors, ALU/INC/DEC/shift flag functions: pure functions of the CPU and
    # their (n, size), made once per decoder and shared by every closure that needs one
    # (c.r and the CPU are never replaced).
    def reg_get(self, n: int, size: int) -> Callable[[], int]:
        f = self.shared.get(("rg", n, size))
        if f is None:
            f = self.shared[("rg", n, size)] = self._new_reg_get(n, size)
        return f

    def reg_set(self, n: int, size: int) -> Callable[[int], None]:
        f = self.shared.get(("rs", n, size))
        if f is None:
            f = self.shared[("rs", n, size)] = self._new_reg_set(n, size)
        return f

    def _new_reg_get(self, n: int, size: int) -> Callable[[], int]:
        r = self.c.r
        if size == 4:
            return lambda r=r, n=n: r[n]
        if size == 2:
            return lambda r=r, n=n: r[n] & 0xFFFF
        if n < 4:
            return lambda r=r, n=n: r[n] & 0xFF
        return lambda r=r, h=n - 4: (r[h] >> 8) & 0xFF

    def _new_reg_set(self, n: int, size: int) -> Callable[[int], None]:
        r = self.c.r
        if size == 4:

            def s4(v: int, r: list[int] = r, n: int = n) -> None:
                r[n] = v

            return s4
        if size == 2:

            def s2(v: int, r: list[int] = r, n: int = n) -> None:
                r[n] = (r[n] & 0xFFFF0000) | v

            return s2
        if n < 4:

            def s1(v: int, r: list[int] = r, n: int = n) -> None:
                r[n] = (r[n] & 0xFFFFFF00) | v

            return s1

        def s1h(v: int, r: list[int] = r, h: int = n - 4) -> None:
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

        def lin(o: int, vec=vec, lo=lo, s=s, n=n, hi=hi, sb=sb) -> int:
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

        def ea_checked(off=off, vec=vec, lo=lo, s=s, n=n, hi=hi, sb=sb) -> int:
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
        return lambda rd=rd, ea=ea: rd(ea())

    def rm_set(self, mod: int, rm: int, ea, size: int) -> Callable[[int], None]:
        if mod == 3:
            return self.reg_set(rm, size)
        ea = self.ea_for(ea, size, True)
        wr = self.wrfn(size)
        return lambda v, wr=wr, ea=ea: wr(ea(), v)

    def rm_rmw(self, mod: int, rm: int, ea, size: int):
        """A function applying f(old) -> new to the r/m operand (address computed once)."""
        if mod == 3:
            g = self.reg_get(rm, size)
            s = self.reg_set(rm, size)

            def rmw_reg(f, s=s, g=g):
                s(f(g()))

            return rmw_reg
        ea = self.ea_for(ea, size, True)
        rd = self.rdfn(size)
        wr = self.wrfn(size)
        c = self.c
        last = 0x1000 - size

        def rmw_mem(f, ea=ea, rd=rd, wr=wr, last=last, size=size, c=c):
            a = ea()
            v = rd(a)
            if (a >> 12) not in c.wtlb or a & 0xFFF > last:
                # Probe the write before f sets the flags: a read-only or absent page
                # faults with the flags as they were (found by the native tier's fuzz).
                c.check_writable(a, size)
            wr(a, f(v))

        return rmw_mem

    def rdfn(self, size: int):
        c = self.c
        return c.rd8 if size == 1 else c.rd16 if size == 2 else c.rd32

    def wrfn(self, size: int):
        c = self.c
        return c.wr8 if size == 1 else c.wr16 if size == 2 else c.wr32

    # ---------------------------------------------------------------- invalid
    def _ud(self, x: Ctx, b: int) -> Fn:
        x.end = True

        def ud() -> None:
            raise CpuFault(UD)

        return ud

    # ---------------------------------------------------------------- tables
    def _install(self) -> None:
        """Fill the dispatch lists from the opcode table (optable.ROWS)."""
        for map_, ops, ends, locks in (
            ("", self.ops, self.ends, self.locks),
            ("0F", self.ops0f, self.ends0f, self.locks0f),
        ):
            for code in range(256):
                rows = BY_OPCODE.get((map_, code))
                if not rows:
                    continue
                ops[code] = self._handler(map_, rows)
                ends[code] = end_regs(map_, code)
                locks[code] = lock_regs(map_, code)

    def _handler(self, map_: str, rows: tuple[Op, ...]) -> Callable[[Ctx, int], Fn]:
        """One method for the opcode, or where its rows name several (by ModRM reg or
        mandatory prefix), a selector that picks the row of the encoding at hand."""
        names = {row.decode for row in rows}
        if len(names) == 1 and all(row.prefix is None for row in rows):
            return getattr(self, names.pop())

        def select(x: Ctx, b: int) -> Fn:
            modrm = self.peek8(x, x.pos)
            pre = x.rep or (0x66 if x.p66 else None)
            row = lookup(map_, b, modrm, pre)
            if row is None:
                return self._ud(x, b)
            return getattr(self, row.decode)(x, b)

        return select
