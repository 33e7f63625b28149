"""The native tier: guest blocks become x86-64 host code at their first run (x86-64 Linux
hosts only).

`NativeTier.translate(pa, eip)` is asked by the decoder when a block first runs (or,
with NATIVE_HOT > 0, once it has run that often); the callable it returns has the
compiled block's contract: it leaves the CPU state exact, returns the instructions it
ran, and raises CpuFault with EIP at the faulting instruction. Inside, one ctypes call
(which releases the GIL) runs the block and then the blocks it chains to: each block's
exit takes its instructions off a budget and, while budget remains and the interrupt
flag is clear (`Cpu.kick`, set from device threads), jumps through the chain table of
the current (mode, CS) key (guest EIP -> host code; filled when a runner is entered,
emptied with the Python tiers' per-mode EIP maps: `unchain`). It returns to Python for
TLB misses, untranslated instructions (I/O, privileged, rare: the exit profile,
BOITE_NATIVE_PROFILE=1, counts them), faults, an empty chain slot, the budget or a
pending interrupt.

The software TLB (`state.TlbTables`, one set per privilege level) mirrors the Python
TLB pair of that privilege: an entry is set only from `Cpu.rtlb`/`wtlb` after a miss,
and dropped with them (`Cpu.tlb_flush`, a page becoming code: `drop_write`), so a
write to a code page always misses and goes through `phys_write`, which throws away
the translations of that page.

Selection: `native_available()` says whether this host can run it; tiers.py chooses.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu.arch import ARITH, CS, DF, IF, OP_NONE, SEGCHK, STACK16
from boite.accel.emu.decode import string as string_ops
from boite.accel.emu.native import translate as native_translate
from boite.accel.emu.native.state import (
    EXIT_END,
    EXIT_MISS,
    OFF_BLOCK,
    OFF_BUDGET,
    OFF_DSTEP,
    OFF_EIP,
    OFF_IFOK,
    OFF_INTR,
    OFF_INV_N,
    OFF_IRQ,
    OFF_REASON,
    OFF_SBASE,
    OFF_SYSFL,
    ChainTable,
    CodeArena,
    NativeState,
    TlbTables,
    buffer_address,
    chain_slot,
)
from boite.accel.emu.native.translate import (
    REP_MOVES,
    host_lahf,
    runtime_stubs,
    translate_block,
)

# TLB flushes whose chain slots are kept for rechain (Cpu.code_stash's generations).
STASH_GENS = 4

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

# Instructions one entry may run through chained blocks; Cpu.run(n)'s n bounds it too
# (the accelerator's chunk, which grows to about CHUNK_NS of running).
BUDGET = 1 << 21
# Runs of a block in the Python tiers before it is translated; 0: translated at its first
# run, never decoded by the Python tier first (translate-first, as QEMU's TCG). A boot's
# blocks mostly run a few times: decoding each (~4 us a guest instruction), running its
# closures, then translating the hot ones (~5-9 us) cost the kit boot ~10% more than
# translating every block once (bench/RESULTS.md, 2026-12-07 tfirst). Before, 4 measured
# best of 2/4/8/16.
NATIVE_HOT = 0
TIME_EVERY = 128  # translations per one timed (translate_s): a thread-clock read is a
# system call, ~20 us of CPU each in a boot on this project's hosts (8 cost the kit ~0.08 s)
# The code arena: ~120 bytes of host code a translated guest instruction, and a full
# arena drops every translation (Python's too: flush_blocks). The Debian 686 boot
# translates ~16 MiB (8 MiB filled up midway); untouched pages cost nothing.
ARENA_BYTES = 64 << 20
# The state going in (NativeState from r to block: the registers, EFLAGS, budget,
# sysfl, intr, irq, ifok, dstep, block; eip, reason, ndone and inv_n are zeroed) and
# coming out (the registers; EIP, EFLAGS, reason, ndone, budget, sysfl, inv_n: pages a
# translated INVLPG flushed). The segment bases (sbase) are written only when they
# changed (`_write_sbase`).
_STATE_IN = struct.Struct("<8I4xI8xiI4xIIIqQ")
_SBASE = struct.Struct("<6I")
_REGS_OUT = struct.Struct("<8I")
_EXIT_OUT = struct.Struct("<IIIIiII")
assert _STATE_IN.size == OFF_BLOCK + 8 and OFF_BLOCK == OFF_DSTEP + 8 == OFF_IFOK + 12
assert OFF_IFOK == OFF_IRQ + 4 == OFF_INTR + 8 == OFF_INV_N + 12 == OFF_SYSFL + 16
assert OFF_SYSFL == OFF_BUDGET + 4 and OFF_BUDGET == OFF_REASON + 8 == OFF_EIP + 16
assert OFF_EIP == _REGS_OUT.size


def native_available() -> bool:
    """x86-64 Linux with executable anonymous memory (and LAHF/SAHF in 64-bit mode)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if not host_lahf():
        return False  # translated code moves the guest flags with LAHF/SAHF
    try:
        CodeArena(4096)
    except (OSError, ValueError):
        return False
    return True


class _Tlb:
    """The native TLB tables of one Python TLB pair (one privilege level), and which of
    their entries are set."""

    def __init__(self, rtlb: dict[int, int]) -> None:
        self.rtlb = rtlb
        self.tables = TlbTables()
        self.filled_r: set[int] = set()
        self.filled_w: dict[int, set[int]] = {}  # physical page -> linear pages

    def flush(self, page: int | None) -> None:
        read, write = self.tables.read, self.tables.write
        if page is None:
            for p in self.filled_r:
                read[p] = 0
            self.filled_r.clear()
            for lins in self.filled_w.values():
                for p in lins:
                    write[p] = 0
            self.filled_w.clear()
            return
        if page in self.filled_r:
            self.filled_r.discard(page)
            read[page] = 0
        if write[page]:
            write[page] = 0
            for lins in self.filled_w.values():
                lins.discard(page)

    def drop_write(self, ppage: int) -> None:
        write = self.tables.write
        for p in self.filled_w.pop(ppage, ()):
            write[p] = 0


class NativeTier:
    """Translated blocks of one Cpu, its TLB tables (one set per privilege level, so a
    switch between user and kernel keeps both), its chain tables and its code arena."""

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu
        self.python_hot = cpu.hot_block
        self.first_run = NATIVE_HOT == 0  # DecoderBase.translate_block asks first
        if not self.first_run:
            cpu.hot_block = min(cpu.hot_block, NATIVE_HOT)
        self.st = NativeState()
        self.st.rep_eip = 0xFFFFFFFF
        libc = ctypes.CDLL(None)
        self.st.clock = ctypes.cast(libc.clock_gettime, ctypes.c_void_p).value or 0
        self.st.tsc_hz = cpu.tsc_hz
        self.sync_tsc()
        self.st_addr = ctypes.addressof(self.st)
        # A bit per linear page holding a translated block (state codemap).
        self.codemap = (ctypes.c_uint8 * (1 << 17))()
        self.st.codemap = ctypes.addressof(self.codemap)
        self.stbuf = (ctypes.c_char * ctypes.sizeof(NativeState)).from_address(self.st_addr)
        self.ram_addr = buffer_address(cpu.ram)
        self.arena = CodeArena(ARENA_BYTES)
        self.arena_resets = 0  # times the arena filled up
        # The last translation in the arena by (pa, EIP): what it was made from (the
        # guest bytes translate_block's extent names, flat (-1: any), host_tsc,
        # MATCH_PYTHON_FLAGS), its host address, the EIPs of its STI shadows, the
        # override segments it inlines.
        self.made: dict[tuple[int, int], tuple] = {}
        self.reused = 0  # translations taken from `made`
        code, at = runtime_stubs(self.st_addr)
        base = self.arena.place(code)
        self.arena_keep = self.arena.used
        self.out_addr = base + at["out"]
        self.st.out = self.out_addr
        self.st.dispatch = base + at["dispatch"]
        self.entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(base + at["entry"])
        self.enter = ctypes.CFUNCTYPE(None)(base + at["enter"])  # st.block: the block
        self.tlbs: list[_Tlb] = []
        self.tlb: _Tlb | None = None  # the current privilege's
        self.bound: dict[int, int] | None = None  # the Python read TLB it mirrors
        # Chain tables by (mode_key, cs_key), as the Python tiers' per-mode EIP maps.
        self.chains: dict[tuple[int, int], ChainTable] = {}
        # The chain table of the current key, and the EIP map of that key (Cpu.fast_cur).
        self.cfast: dict[int, Callable[[], int]] | None = None
        self.ctab: ChainTable = self._select((-1, -1))
        self.epoch = 0  # unchain() calls: a translation made before may be stale
        # Physical page -> the chain slots filled for its blocks since the tables were
        # last emptied, as (table, slot, host code, EIP): unchain_page drops those.
        self.chain_pages: dict[int, set[tuple[ChainTable, int, int, int]]] = {}
        # What TLB flushes took out of the tables (chain_pages then), newest last, for
        # rechain (as Cpu.code_stash for the EIP maps).
        self.chain_stash: list[dict[int, set[tuple[ChainTable, int, int, int]]]] = []
        self.blocks = 0  # translated so far
        self.insns = 0
        self.translate_s = 0.0  # host CPU seconds translating, estimated (see _translate)
        self.translations = 0
        self.translated_insns = 0
        self.exits = [0, 0, 0]  # by EXIT_*
        self.sbase = [0] * 6  # the segment bases the state holds
        # EIPs of instructions in a translated STI's shadow: an exit there (a TLB miss)
        # leaves the shadow to Cpu.run (inhibit_irq), so an interrupt that came meanwhile
        # waits for that instruction, as after the Python tiers' STI. An EIP of another
        # CS in the set only delays an interrupt by one instruction.
        self.shadows: set[int] = set()
        # BOITE_NATIVE_PROFILE=1: where translated code leaves, by (reason, EIP): the
        # instructions the tier should cover next (see exit_profile).
        self.profile: dict[tuple[int, int], int] | None = (
            {} if os.environ.get("BOITE_NATIVE_PROFILE") == "1" else None
        )
        self.profile_raw: dict[tuple[int, int], str] = {}
        self._make_runner = self._runner_maker()
        self.cs_changed()  # then called by Cpu when CS, CR0.PE or the GDT change

    @property
    def entries(self) -> int:
        """Calls into translated code."""
        return sum(self.exits)

    # -- TLB mirror ----------------------------------------------------------------------
    def tlb_flush(self, page: int | None = None, code: bool = True) -> None:
        """Drop TLB entries (page None: all); `code`: a translated block's page may map
        elsewhere now, so no chain may lead to one (Cpu.code_lin says which pages)."""
        for t in self.tlbs:
            t.flush(page)
        if page is None:
            self.cs_stale_now()  # maybe other page tables: the next CS load says
        if code:
            self.unchain(keep=True)

    def sync_tsc(self) -> None:
        """Cpu.tsc_offset changed (WRMSR): translated RDTSC adds the new one."""
        self.st.tsc_off = self.cpu.tsc_offset & 0xFFFFFFFFFFFFFFFF

    def tlb_flush_pages(self, pages: set[int] | list[int], code: bool) -> None:
        """Drop the entries of these linear pages (a MOV to CR3 keeping global pages).
        filled_w keeps its stale names: drop_write zeroes them again, harmlessly."""
        for t in self.tlbs:
            read, write, filled = t.tables.read, t.tables.write, t.filled_r
            for p in pages:
                read[p] = 0
                write[p] = 0
                filled.discard(p)
        if code:
            self.unchain(keep=True)

    def cs_stale_now(self) -> None:
        """The page tables may differ (a CR3 write, a full TLB flush): translated IRET
        leaves for Python until CS is loaded again (Cpu.load_cs calls cs_changed)."""
        self.st.iret_ok = 0
        self.cs_stale = True

    def cs_changed(self) -> None:
        """What translated PUSH CS and IRET read about CS (state cs_sel, iret_*)."""
        cpu = self.cpu
        st = self.st
        self.cs_stale = False
        sel = cpu.sel[CS]
        st.cs_sel = sel
        ok = 0
        idx = sel & 0xFFF8
        # IRET to the same CS at CPL 0 in protected mode (CS.RPL is the CPL there): the
        # descriptor Python would reload must give the cache as it is (checked in memory
        # at each IRET; VM and NT in EFLAGS are checked there too).
        if cpu.cr0 & 1 and sel & 7 == 0 and idx and idx + 7 <= cpu.gdt_limit:
            base, limit, attr = cpu.sbase[CS], cpu.slimit[CS], cpu.sattr[CS]
            raw = limit >> 12 if attr & 0x8000 else limit
            d = (
                (raw & 0xFFFF) | (base & 0xFFFFFF) << 16 | (attr & 0xFF) << 40
                | (raw >> 16 & 0xF) << 48 | (attr >> 12 & 0xF) << 52 | (base >> 24 & 0xFF) << 56
            )  # fmt: skip
            if 0 <= raw < 1 << 20 and cpu.desc_fields(d) == (base, limit, attr):
                ok = self._iret_walk((cpu.gdt_base + idx) & 0xFFFFFFFF, d)
                # Not yet (an A bit of the GDT page's PDE/PTE clear): Python's IRET sets
                # it, and its reload of the same CS asks again.
                self.cs_stale = not ok
        st.iret_ok = ok

    def _iret_walk(self, lin: int, desc: int) -> int:
        """The page walk Python's descriptor read would do for the 8 bytes at lin (no
        PAE; no side effect: 0 where it would set an A bit or leave guest RAM): state
        iret_* get the host addresses and values translated IRET compares."""
        cpu = self.cpu
        ram, size = cpu.ram, cpu.ram_size
        if lin & 0xFFF > 0xFF8:
            return 0
        if not cpu.paging:
            pa = pde_a = pte_a = lin
        elif cpu.pae:
            return 0
        else:
            pde_a = (cpu.cr3 & 0xFFFFF000) | (lin >> 20 & 0xFFC)
            if pde_a + 4 > size:
                return 0
            pde = int.from_bytes(ram[pde_a : pde_a + 4], "little")
            if pde & 0x21 != 0x21:
                return 0
            if pde & 0x80 and cpu.cr4 & 0x10:
                pte_a = pde_a
                pa = (pde & 0xFFC00000) | (lin & 0x3FFFFF)
            else:
                pte_a = (pde & 0xFFFFF000) | (lin >> 10 & 0xFFC)
                if pte_a + 4 > size:
                    return 0
                pte = int.from_bytes(ram[pte_a : pte_a + 4], "little")
                if pte & 0x21 != 0x21:
                    return 0
                pa = (pte & 0xFFFFF000) | (lin & 0xFFF)
        if pa + 8 > size or int.from_bytes(ram[pa : pa + 8], "little") != desc:
            return 0
        st, base = self.st, self.ram_addr
        st.iret_pde, st.iret_pte, st.iret_dhost = base + pde_a, base + pte_a, base + pa
        st.iret_pdev = int.from_bytes(ram[pde_a : pde_a + 4], "little")
        st.iret_ptev = int.from_bytes(ram[pte_a : pte_a + 4], "little")
        st.iret_desc = desc
        return 1

    def invlpg_ring(self, n: int) -> None:
        """Translated INVLPGs zeroed the current native TLB tables' entries of these
        pages (none held a translated block: codemap); the rest of Cpu.tlb_flush (the
        Python TLBs, the other privileges' tables) follows here, at the exit."""
        self.cpu.tlb_flush_set(self.st.inv_ring[:n])

    def drop_write(self, ppage: int) -> None:
        """Physical page ppage now holds translated code: no write reaches it directly."""
        for t in self.tlbs:
            t.drop_write(ppage)

    def unchain(self, keep: bool = False) -> None:
        """A block or a TLB entry went away: no chain may lead to a stale block. `keep`
        (a TLB flush: the blocks stay, their pages may map elsewhere): the filled slots
        are kept aside for rechain."""
        self.epoch += 1
        for ct in self.chains.values():
            ct.clear()
        stash = self.chain_stash
        if not keep:
            stash.clear()
        elif self.chain_pages:
            for gen in stash:  # a page's older slots are mostly these again
                for p in self.chain_pages:
                    gen.pop(p, None)
            stash.append(self.chain_pages.copy())
            if len(stash) > STASH_GENS:
                del stash[0]
        self.chain_pages.clear()

    def rechain(self, lpage: int, ppage: int) -> None:
        """Cpu._unstash put back the EIP map entries of the blocks on linear page lpage
        (physical page ppage again): their chain slots in the current table too."""
        cpu = self.cpu
        ct = self.chains.get((cpu.mode_key, cpu.cs_key))
        if ct is None:
            return
        base = cpu.cs_key & 0xFFFFFFFF
        slots, used = ct.slots, ct.used
        live = None
        for gen in self.chain_stash:
            entries = gen.get(ppage)
            if entries is None:
                continue
            rest = set()
            for e in entries:
                t, s, host, eip = e
                if t is ct and (base + eip) >> 12 & 0xFFFFF == lpage:
                    slots[2 * s] = eip
                    slots[2 * s + 1] = host
                    used.add(s)
                    if live is None:
                        live = self.chain_pages.get(ppage)
                        if live is None:
                            live = self.chain_pages[ppage] = set()
                    live.add(e)
                else:
                    rest.add(e)
            if rest:
                gen[ppage] = rest
            else:
                del gen[ppage]

    def unchain_page(self, ppage: int) -> None:
        """The blocks of physical page ppage went away (a store into it): the chain slots
        filled for them lead out again. (Every block lies within one page.)"""
        self.epoch += 1
        out = self.out_addr
        for gen in self.chain_stash:
            gen.pop(ppage, None)
        for ct, s, host, _ in self.chain_pages.pop(ppage, ()):
            slots = ct.slots
            if slots[2 * s + 1] == host:
                slots[2 * s] = 0xFFFFFFFF
                slots[2 * s + 1] = out
                ct.used.discard(s)

    def _bind(self) -> None:
        rtlb = self.cpu.rtlb
        for t in self.tlbs:
            if t.rtlb is rtlb:
                break
        else:
            t = _Tlb(rtlb)
            self.tlbs.append(t)
        self.tlb = t
        self.bound = rtlb
        self.st.tlb_r = t.tables.read_addr
        self.st.tlb_w = t.tables.write_addr

    def _select(self, key: tuple[int, int]) -> ChainTable:
        ct = self.chains.get(key)
        if ct is None:
            ct = self.chains[key] = ChainTable(self.out_addr)
        self.cfast = self.cpu.fast_cur if key[0] >= 0 else None
        self.ctab = ct
        self.st.jtab = ct.addr
        return ct

    def _mirror(self, page: int, write: bool) -> bool:
        """Copy the Python TLB's entry for linear page into the table; False if none."""
        cpu = self.cpu
        t = self.tlb
        assert t is not None
        pp = (cpu.wtlb if write else cpu.rtlb).get(page)
        if pp is None or pp & 0xFFF or pp + 0x1000 > cpu.ram_size:
            return False  # only whole pages of guest RAM enter the table
        if write:
            if (pp >> 12) in cpu.code_pages:
                return False
            t.tables.write[page] = self.ram_addr + pp
            t.filled_w.setdefault(pp >> 12, set()).add(page)
        else:
            t.tables.read[page] = self.ram_addr + pp
            t.filled_r.add(page)
        return True

    # -- translation ----------------------------------------------------------------------
    def translate(self, pa: int, eip: int) -> Callable[[], int] | None:
        """A callable running the block at eip (physical pa), or None where the tier does
        not apply (mode, first instruction not translated)."""
        out = self.translate_with_overrides(pa, eip)
        return None if out is None else out[0]

    def translate_with_overrides(self, pa: int, eip: int) -> tuple[Callable[[], int], int] | None:
        """translate, and the override segments the block's instructions name (bit i:
        segment i; the block holds only while those stay as flat as now)."""
        cpu = self.cpu
        if not cpu.cs32 or cpu.mode_key & (SEGCHK | STACK16) or cpu.debug_on:
            return None
        left = 0x1000 - (pa & 0xFFF)
        if pa + left > cpu.ram_size:
            return None
        out = self._translate(pa, eip)
        if out is not None:
            return out
        # The first instruction is not translated: its closure, then the rest natively
        # (a block of its own at the next EIP, so chains can find it too).
        decoder = cpu.decoder
        decoder.seg_overrides = 0
        fn, n, end = decoder.decode(eip, pa, (pa | 0xFFF) + 1)  # bytes from RAM
        eip2 = (eip + n) & 0xFFFFFFFF
        if end or (pa & 0xFFF) + n >= 0x1000:
            return None
        out = self._translate(pa + n, eip2)
        if out is None:
            return None
        tail, segs = out

        def first_in_python() -> int:
            epoch = self.epoch
            fn()
            if cpu.eip != eip2 or self.epoch != epoch:
                # A REP string instruction left to be resumed, or the instruction wrote
                # code (maybe the rest of this very block) or changed the TLB.
                return 1
            cpu.run_left -= 1
            try:
                return 1 + tail()
            except BaseException:
                cpu.done_before_raise += 1  # the first instruction completed
                raise

        return first_in_python, segs | decoder.seg_overrides

    def _translate(self, pa: int, eip: int) -> tuple[Callable[[], int], int] | None:
        cpu = self.cpu
        # Thread CPU time is a system call (1-20 us, more than a small block's translation):
        # every TIME_EVERY-th translation is timed, for all of them.
        self.translations += 1
        timed = not self.translations % TIME_EVERY
        t0 = time.thread_time() if timed else 0.0
        left = 0x1000 - (pa & 0xFFF)
        # Overrides may name the segments that need no checks (never CS: not writable).
        flat = ~cpu.seg_nonflat & 0x3F & ~(1 << CS)
        host_tsc = "rdtsc" not in vars(cpu)  # replaced (the fuzz): RDTSC is Python's
        ram = cpu.ram
        match = native_translate.MATCH_PYTHON_FLAGS
        made = self.made.get((pa, eip))
        if (
            made is not None
            and ram[pa : pa + len(made[0])] == made[0]
            and (made[1] < 0 or made[1] == flat)
            and made[2] == host_tsc
            and made[3] == match
        ):
            # Made before from the same bytes and still in the arena: a guest that writes
            # to a code page loses all its blocks (the kit boot ran ~13% of its blocks
            # again that way, unchanged), and a change of segments more.
            addr, shadows = made[4], made[5]
            if shadows:
                self.shadows.update(shadows)
            self.reused += 1
            if timed:
                self.translate_s += (time.thread_time() - t0) * TIME_EVERY
            return self._place_done(addr, eip, pa), made[6]
        extent: list = []
        shadows: set[int] = set()
        out = translate_block(lambda n: bytes(ram[pa : pa + n]), eip, left, flat, host_tsc,
                              shadows, extent)  # fmt: skip
        if shadows:
            self.shadows.update(shadows)
        if timed:
            self.translate_s += (time.thread_time() - t0) * TIME_EVERY
        if out is None:
            return None
        code, ninsns, segs = out
        self.translated_insns += ninsns
        if not self.arena.room(len(code) + 16):
            if len(code) + 16 > self.arena.size - self.arena_keep:
                return None  # it would never fit: the Python tiers keep it
            cpu.flush_blocks()  # every translation goes; the arena starts over
            self.arena.reset(self.arena_keep)
            self.made.clear()
            self.arena_resets += 1
        addr = self.arena.place(code)
        self.made[(pa, eip)] = (extent[0], flat if extent[1] else -1, host_tsc, match, addr,
                                tuple(shadows), segs)  # fmt: skip
        self.blocks += 1
        return self._place_done(addr, eip, pa), segs

    def _place_done(self, addr: int, eip: int, pa: int) -> Callable[[], int]:
        """The runner of the block at addr, which is now in use."""
        lin = (self.cpu.sbase[CS] + eip) >> 12 & 0xFFFFF
        self.codemap[lin >> 3] |= 1 << (lin & 7)  # a translated INVLPG of it leaves
        return self._make_runner(addr, eip, pa)

    def _write_sbase(self) -> None:
        """The segment bases changed since the last entry (rare in flat code)."""
        sbase = self.cpu.sbase
        _SBASE.pack_into(self.stbuf, OFF_SBASE, *sbase)
        self.sbase[:] = sbase

    def _runner_maker(self) -> Callable[[int, int, int], Callable[[], int]]:
        """The function that makes each block's runner (called once per tier): what
        every runner reads is bound here once, so making one (once a translated block,
        ~30k in the kit boot) builds only its own cells."""
        tier = self
        cpu = self.cpu
        stbuf = self.stbuf
        enter = self.enter
        state_in = _STATE_IN.pack_into
        regs_out, exit_out = _REGS_OUT.unpack_from, _EXIT_OUT.unpack_from
        chain_pages = self.chain_pages
        exits = self.exits
        shadows = self.shadows
        sbase = self.sbase  # what the state holds
        regs = cpu.r
        # One entry is Python work around one ctypes call: the state goes in with one
        # struct call and comes out with two (_STATE_IN, _REGS_OUT, _EXIT_OUT).

        def make(addr: int, eip: int, pa: int) -> Callable[[], int]:
            cslot = chain_slot(eip)
            slot = 2 * cslot + 1
            ppage = pa >> 12

            def run_native() -> int:
                if tier.bound is not cpu.rtlb:
                    tier._bind()
                ct = tier.ctab
                if cpu.fast_cur is not tier.cfast:  # another (mode_key, cs_key)
                    ct = tier._select((cpu.mode_key, cpu.cs_key))
                slots = ct.slots
                if slots[slot] != addr:  # this block is valid here: let chains find it
                    slots[slot - 1] = eip  # (ChainTable.add, its slot known)
                    slots[slot] = addr
                    ct.used.add(cslot)
                    at = chain_pages.get(ppage)
                    if at is None:
                        chain_pages[ppage] = {(ct, cslot, addr, eip)}
                    else:
                        at.add((ct, cslot, addr, eip))
                if cpu.sbase != sbase:
                    tier._write_sbase()
                fl = cpu.fl if cpu.lop == OP_NONE else cpu.get_flags()
                left = cpu.run_left
                budget = BUDGET if BUDGET < left else left  # BUDGET read now: tests set it
                # Leave at the first chain only when an interrupt can be taken (IF does not
                # change inside translated code) or DMA is to be drained; device threads
                # set it meanwhile (Cpu.kick).
                if cpu.intr:
                    irq = 1
                    intr = 1 if fl & IF or cpu.dma_writes or cpu.stop else 0
                else:
                    irq = 0
                    intr = 1 if cpu.dma_writes or cpu.stop else 0
                # sysfl: IF etc. for translated PUSHF/POPF/CLI/STI; ifok: they may change IF.
                ifok = 1 if not cpu.cr0 & 1 or cpu.cpl <= (fl >> 12) & 3 else 0
                r0, r1, r2, r3, r4, r5, r6, r7 = regs
                state_in(stbuf, 0, r0, r1, r2, r3, r4, r5, r6, r7, fl, budget, fl & ~ARITH, intr,
                         irq, ifok, -1 if fl & DF else 1, addr)  # fmt: skip
                enter()
                regs[:] = regs_out(stbuf)
                eip_out, efl, reason, ndone, budget_left, sysfl, inv_n = exit_out(stbuf, OFF_EIP)
                if inv_n:  # translated INVLPGs: the Python TLBs follow before anything reads them
                    tier.invlpg_ring(inv_n)
                cpu.fl = (sysfl & ~ARITH) | (efl & ARITH) | 2
                cpu.lop = OP_NONE
                cpu.eip = eip_out
                n = budget - budget_left + ndone
                tier.insns += n
                exits[reason] += 1
                if tier.profile is not None:
                    tier._note_exit(reason)
                if reason == EXIT_END:  # the most frequent
                    if n == 0:
                        return tier._one()
                    if eip_out in shadows:
                        cpu.inhibit_irq = True
                    return n
                shadow = eip_out in shadows and n > 0
                if reason == EXIT_MISS:
                    if n >= budget:
                        if tier.st.rep_eip == eip_out:  # inside a REP compare's slice
                            return n + tier._rest_of_slice(n)
                        # run(n)'s count is reached: stop before the instruction (its miss,
                        # maybe its fault, comes with the next run, as on the Python tiers).
                        cpu.inhibit_irq = cpu.inhibit_irq or shadow
                        return n
                    m = tier._miss(n)
                    if m == 0 and shadow:
                        cpu.inhibit_irq = True  # the shadow instruction runs next, alone
                    return n + m
                if n == 0:
                    return tier._one()
                if shadow:
                    cpu.inhibit_irq = True
                return n

            return run_native

        return make

    def _note_exit(self, reason: int) -> None:
        cpu = self.cpu
        key = (reason, cpu.eip)
        prof = self.profile
        assert prof is not None
        if key not in self.profile_raw:
            lin = (cpu.sbase[1] + cpu.eip) & 0xFFFFFFFF
            p = cpu.xtlb.get(lin >> 12)  # no fill: profiling must not change the TLB
            at = (p | (lin & 0xFFF)) if p is not None else None
            raw = bytes(cpu.ram[at : at + 8]).hex() if at is not None else "?"
            self.profile_raw[key] = raw
        prof[key] = prof.get(key, 0) + 1

    def exit_profile(self, top: int = 30) -> list[tuple[int, str, int, str]]:
        """The most frequent exits as (count, reason, EIP, the bytes there)."""
        names = {0: "end", 1: "miss", 2: "fallback"}
        assert self.profile is not None
        rows = sorted(self.profile.items(), key=lambda kv: -kv[1])[:top]
        return [(n, names.get(k[0], "?"), k[1], self.profile_raw[k]) for k, n in rows]

    def _miss(self, done: int) -> int:
        """After a miss: fill the entry from the Python TLB (a #PF raises here, with the
        state of the faulting instruction), or run that instruction in Python (MMIO, a
        code page, an access across pages). Returns the instructions it ran."""
        cpu = self.cpu
        lin, kind = self.st.miss_addr, self.st.miss_write
        # A REP compare left mid-slice goes on with its count only after a plain fill.
        rep_eip, self.st.rep_eip = self.st.rep_eip, 0xFFFFFFFF
        write = bool(kind & 1)
        page = lin >> 12
        assert self.tlb is not None
        table = self.tlb.tables.write if write else self.tlb.tables.read
        if write and lin & 0xFFF > 0xFF0:
            # Maybe an access across pages (the miss does not say its size): filling
            # this page for writing would set its PTE's D bit even when the next page
            # faults (fuzz seed 51752; QEMU and the closures leave D clear). The closure
            # does it all, then the table takes what the Python TLB holds.
            try:
                n = self._one(rep_eip)
            except BaseException:
                cpu.done_before_raise += done
                raise
            if not table[page]:
                self._mirror(page, write)
            return n
        if not table[page]:
            # Inside a REP MOVS/STOS: this element is a step of the closures' slice (they
            # fill the TLB with a one-element step); past the slice it yields first, as
            # they do (EIP stays on it, it counts as run; nothing filled).
            moves = rep_eip == cpu.eip and self.st.rep_left & REP_MOVES
            if moves and not self.st.rep_left & ~REP_MOVES:
                return 1
            try:
                if kind & 2:  # read-modify-write: the read faults first
                    cpu._fill(lin, False)
                cpu._fill(lin, write)
            except BaseException:
                cpu.done_before_raise += done  # what ran before the fault (Cpu.run)
                raise
            if self._mirror(page, write):
                if moves:
                    self.st.rep_left -= 1
                self.st.rep_eip = rep_eip
                return 0  # the next call goes on from this instruction
        try:
            return self._one(rep_eip)
        except BaseException:
            cpu.done_before_raise += done
            raise

    def _rest_of_slice(self, done: int) -> int:
        """run(n)'s count ran out at a miss inside a REP compare's slice: the closure
        runs what the slice had left, so the instruction stops where it would have
        natively and where the Python tiers' slice stops (fuzz seed 75771)."""
        rep_eip, self.st.rep_eip = self.st.rep_eip, 0xFFFFFFFF
        try:
            return self._one(rep_eip)
        except BaseException:
            self.cpu.done_before_raise += done
            raise

    def _one(self, rep_eip: int = 0xFFFFFFFF) -> int:
        if rep_eip == self.cpu.eip:
            # A REP compare left mid-slice: the closure's slice is what the native one
            # had left (REP_SLICE is read when a REP closure runs).
            saved = string_ops.REP_SLICE
            string_ops.REP_SLICE = self.st.rep_left & ~REP_MOVES
            try:
                fn, _ = self.cpu.decoder.decode_one(self.cpu.eip)
                fn()
            finally:
                string_ops.REP_SLICE = saved
            return 1
        fn, _ = self.cpu.decoder.decode_one(self.cpu.eip)
        fn()
        return 1
