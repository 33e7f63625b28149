"""The emulated x86 CPU: registers, lazy flags, MMU with a software TLB, segmentation,
interrupt and exception delivery, and the run loops (plain interpreter and block cache).

What CPUID and the MSRs report comes from the CPU model in cpumodel.py (a Pentium M
class IA-32 CPU, showing only the features implemented here). Paging is 2-level (with
PSE 4 MiB pages) or PAE (2 MiB pages, the XD bit under EFER.NXE: instruction fetches go
through an execute TLB of their own while NX is on). SYSENTER/SYSEXIT are emulated.
The x87, MMX, SSE and SSE2 are emulated exactly (fpu.py, sse.py over softfloat.py's
exact arithmetic); CR0.EM/TS/MP give #NM/#UD as the SDM says, so a kernel with math
emulation (CR0.EM) still traps every escape into it.

Virtual-8086 mode is entered by IRET from ring 0 and left by interrupts and exceptions
to ring-0 handlers (without the VME extensions, which CPUID does not report: CLI, STI,
PUSHF, POPF, INT n and IRET fault with IOPL < 3; I/O goes through the TSS bitmap).

Hardware task switches (far JMP/CALL to a TSS or a task gate, interrupts through a task
gate, IRET with NT) and the DR7 breakpoints (execute, data, and I/O with CR4.DE) are
emulated. Not emulated: SMM.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from boite.accel.emu.arch import (
    AC,
    AF,
    ARITH,
    BP,
    CF,
    CONTRIBUTORY,
    CS,
    DB,
    DF_VEC,
    DS,
    ES,
    FLAT_SEGS_MASK,
    FS,
    GP,
    GS,
    HAS_ERROR_CODE,
    IF,
    IOPL,
    M16,
    M32,
    MF,
    NP,
    NT,
    OF,
    OF_VEC,
    OP_ADD,
    OP_DEC,
    OP_INC,
    OP_LOGIC,
    OP_NONE,
    OP_SUB,
    PARITY,
    PF,
    PF_VEC,
    RF,
    SEG_BIG,
    SEGCHK,
    SF,
    SS,
    SS_VEC,
    STACK16,
    TF,
    TS,
    UD,
    VM,
    VM86_SEG_ATTR,
    ZF,
    CpuFault,
    CpuHalt,
    CpuStop,
    TripleFault,
    override_flat_bits,
)
from boite.accel.emu.cpumodel import (
    EFER_NXE,
    FEATURES,
    MSR_APIC_BASE,
    MSR_BIOS_SIGN_ID,
    MSR_EFER,
    MSR_P6_PERFCTR,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
    MSR_TSC,
    PHYS_MASK,
    cpuid_leaf,
    msr_specs,
    msr_value_ok,
)

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_p16 = struct.Struct("<H").pack_into
_p32 = struct.Struct("<I").pack_into

# Executions before a block is compiled to one Python function. compile() costs about
# 0.5 ms a block, as much as running a typical block through its closures a few hundred
# times: booting the tiny Linux was fastest between 128 and 256 with the first block
# compiler, and is 2-7% faster at 100 than at 200 since its flags are deferred (six
# interleaved boots).
# PyPy's tracing JIT does better on the shared closures than on thousands of generated
# functions (tiny Linux to init: 21.6 s with closures only, 47.8 s compiling at 200), so
# there blocks are never compiled.
HOT_BLOCK = 100 if sys.implementation.name != "pypy" else 1 << 62
# Write-TLB additions after which Cpu.wrev is rebuilt from the tables (drops stale pages).
WREV_PRUNE = 1 << 18
# TLB flushes whose EIP map entries are kept for Cpu._unstash (Linux toggles CR4.PGE
# twice for one global flush; older stashes are mostly put back or stale).
STASH_GENS = 4


class _TssLayout(NamedTuple):
    """Where a TSS keeps a task's state: offsets of EIP, EFLAGS, the eight registers and
    the segment selectors (each `size` bytes apart), and the LDT selector."""

    eip: int
    flags: int
    regs: int
    sels: int
    nsels: int
    ldt: int
    size: int


_TSS32 = _TssLayout(eip=0x20, flags=0x24, regs=0x28, sels=0x48, nsels=6, ldt=0x60, size=4)
_TSS16 = _TssLayout(eip=0x0E, flags=0x10, regs=0x12, sels=0x22, nsels=4, ldt=0x2A, size=2)


class Cpu:
    """One IA-32 vCPU. Memory is a GuestMemory; port I/O and MMIO go to the buses."""

    def __init__(
        self,
        memory: Any,
        pio: Any = None,
        mmio: Any = None,
        *,
        translate: bool = True,
        tsc_hz: int = 1_000_000_000,
    ) -> None:
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        low = memory.region_at(0)
        self.ram = low.mm if low is not None else bytearray(0)
        self.ram_size = low.size if low is not None else 0
        # Word and dword views of the first RAM region: compiled blocks index them for
        # aligned accesses (cheaper than struct calls). close() releases them.
        whole = self.ram_size & ~3
        self.ram16 = memoryview(self.ram)[:whole].cast("H")
        self.ram32 = memoryview(self.ram)[:whole].cast("I")
        self.r = [0] * 8
        self.eip = 0
        self.sel = [0] * 6
        self.sbase = [0] * 6
        self.slimit = [M16] * 6
        # CS base, plus its limit where the limit is below what EIP can reach: the key
        # translated code is filed under, since the decoder checks fetches against it.
        self.cs_key = 0
        # Compiled blocks by EIP, one map per (mode_key, cs_key); emptied whenever a
        # block or a TLB entry goes away, so a hit needs no further check. fast_cur is
        # the map of the current key (kept by _update_mode and update_cs_key).
        self._fast: dict[tuple[int, int], dict[int, Callable[[], int]]] = {(0, 0): {}}
        self.fast_cur: dict[int, Callable[[], int]] = self._fast[(0, 0)]
        self.sattr = [0x93] * 6  # access byte | (flags nibble << 8): bit 14 = D/B, 15 = G
        self.sattr[CS] = 0x9B
        self.cs32 = False
        self.ss32 = False
        self.cpl = 0
        self.fl = 0x2
        self.lop = OP_NONE
        self.la = self.lb = self.lres = 0
        self.lmask = M32
        self.lcf = 0
        self.cr0 = 0x60000010
        self.cr2 = 0
        self.cr3 = 0
        self.cr4 = 0
        self.dr = [0, 0, 0, 0, 0, 0, 0xFFFF0FF0, 0x400]
        # Enabled DR7 breakpoints: (n, linear address) to execute, (n, start, size, rw) on
        # data. With any, run() takes one instruction at a time and checks them.
        self.bp_exec: list[tuple[int, int]] = []
        self.bp_data: list[tuple[int, int, int, int]] = []
        self.bp_io: list[tuple[int, int, int]] = []  # (n, port, size), with CR4.DE
        self.watch_pages: frozenset[int] = frozenset()  # kept out of the TLB
        self.debug_on = False
        self.dbg_hits = 0  # data breakpoints hit by the instruction running
        self.gdt_base, self.gdt_limit = 0, M16
        self.idt_base, self.idt_limit = 0, M16
        self.ldt_sel, self.ldt_base, self.ldt_limit = 0, 0, 0
        self.tr_sel, self.tr_base, self.tr_limit, self.tr_type = 0, 0, 0xFFFF, 0xB
        # The CPU model (cpumodel.py): CPUID features, the MSRs it has, and the values
        # software wrote to them (an unwritten MSR reads as its power-on value).
        self.features = FEATURES
        self.msr_spec = msr_specs(FEATURES)
        self.msrs: dict[int, int] = {}
        self.efer = 0
        # SMP (accel/emu/smp.py): this CPU's initial APIC id, the logical processors
        # CPUID leaf 1 reports, and every CPU sharing this guest memory (itself included):
        # they share one code-page guard so that a store by any of them drops the
        # translated code of all (see invalidate_code).
        self.apic_id = 0
        self.logical_cpus = 1
        self.cpus: list[Cpu] = [self]
        self.pdptes: tuple[int, int, int, int] = (0, 0, 0, 0)  # PAE: loaded with CR3
        self.halted = False
        self.inhibit_irq = False  # one-instruction shadow after STI / MOV SS
        self.tsc_hz = tsc_hz
        self.tsc_offset = 0
        self.random_bytes = os.urandom  # RDRAND's entropy (the fuzz makes it repeatable)
        self.icount = 0
        self.irq_count = 0  # external interrupts taken
        self.translate_blocks = translate
        self.lock_ud = True  # LOCK on a non-RMW form is #UD (386+); a 286 model takes it
        self.mode_key = 0  # see _update_mode; kept current by set_seg_raw and tlb_switch
        self.slo = [0] * 6  # per-access segment check ranges (see SEG_BIG)
        self.srhi = [M16] * 6
        self.swhi = [M16] * 6
        self.seg_nonflat = 0  # bit i: segment register i needs per-access checks
        self.seg_key = 0  # SEGCHK when ES, SS or DS is not flat
        self.stack_fast = False  # SS is 32-bit and flat: push/pop need no limit check
        self.compile_blocks = translate  # hot blocks become Python functions (jit.py)
        self.irq_check: Callable[[], int | None] = lambda: None  # returns a vector or None
        self.reset_requested = False
        self.stop = False  # set by I/O side effects and pause(): leave run() at a boundary
        self.intr = True  # hint: the interrupt controller may have a request (see irq_check)
        # Software TLB: linear page -> physical page base, for pages of the first RAM region.
        self.rtlb: dict[int, int] = {}
        self.wtlb: dict[int, int] = {}
        self._tlbs: dict[int, tuple[dict[int, int], dict[int, int]]] = {}
        # Physical page number -> the linear pages whose write TLB entries (either
        # privilege) may map it: a superset, so that guard_code_page finds them without
        # scanning every entry (it did: ~1 s of the Debian 686 boot, 3,800 code pages).
        self.wrev: dict[int, set[int]] = {}
        self.wrev_adds = 0  # additions since wrev was last rebuilt (it is pruned then)
        # Pages instructions may be fetched from: the read TLB itself unless PAE paging
        # with EFER.NXE is on, when execute rights differ from read rights (NX pages).
        self.xtlb: dict[int, int] = self.rtlb
        self._xtlbs: dict[int, dict[int, int]] = {}
        self.paging = False
        self.pae = False
        self.nx = False
        # Block cache: physical address -> (key, fns, count); code pages are write-guarded.
        self.blocks: dict[int, Any] = {}
        self.code_pages: dict[int, list[int]] = {}
        # Linear pages blocks were fetched from since the maps were last emptied: INVLPG
        # of any other page (a fixmap, a data page) leaves the maps and chains alone.
        self.code_lin: set[int] = set()
        # Physical page -> the (EIP map, EIP) entries made for blocks on it since the
        # maps were last emptied: a store into a code page drops only those.
        self.fast_phys: dict[int, list[tuple[dict[int, Callable[[], int]], int]]] = {}
        # What TLB flushes took out of the EIP maps, newest last (at most STASH_GENS): per
        # flush, the maps' entries by key and that fast_phys. run()'s miss path puts back
        # a page's entries once its linear page maps to the same physical page again (the
        # kit boot's CR4.PGE toggles emptied the maps 27 times: ~8k blocks looked up and
        # entered again; the Debian 686 boot ~78k).
        self.code_stash: list[tuple[dict[tuple[int, int], dict[int, Callable[[], int]]],
                                    dict[int, list[tuple[dict[int, Callable[[], int]], int]]]]] = []  # fmt: skip
        # The physical pages code_stash may hold entries of (a superset: the miss path
        # looks here first).
        self.stash_pages: set[int] = set()
        # (key, linear page, physical page) that _unstash put back since the last flush:
        # what stays stashed for that page is of other keys or linear pages.
        self.unstashed: set[tuple[int, int, int, int]] = set()
        # Linear pages whose TLB entries are not global (PTE.G with CR4.PGE): all a
        # MOV to CR3 drops (Cpu.tlb_flush_nonglobal); walk_global is the last walk's G.
        self.nonglobal: set[int] = set()
        self.walk_global = False
        self.hot_block = HOT_BLOCK
        # (gpa, length) written by devices, for run() to drain (see note_dma_write).
        self.dma_writes: list[tuple[int, int]] = []
        # The native tier (native/, x86-64 hosts), when the accelerator turns it on.
        self.native: Any = None
        # Instructions a native entry completed before it raised (run() counts them, so
        # a guest looping through faults still ends run(n)); run_left: what run() may
        # still run, which bounds one native entry.
        self.done_before_raise = 0
        self.run_left = 1 << 30
        from boite.accel.emu.decode import Decoder
        from boite.accel.emu.fpu import FpuState

        self.fpu = FpuState()
        # FERR# of the PC's legacy x87 error path (CR0.NE=0): raises IRQ 13 at the PIC.
        self.ferr_irq: Callable[[bool], None] | None = None
        self.decoder = Decoder(self)
        self.seg_checks_all()
        self.tlb_switch()

    def close(self) -> None:
        """Let go of the RAM views (the mmap cannot close while they exist)."""
        self.flush_blocks()
        self.ram16.release()
        self.ram32.release()

    # ------------------------------------------------------------------ flags
    def get_cf(self) -> int:
        op = self.lop
        if op == OP_NONE:
            return self.fl & 1
        if op == OP_ADD:
            return 1 if self.lres > self.lmask else 0
        if op == OP_SUB:
            return 1 if self.lres < 0 else 0
        if op == OP_LOGIC:
            return 0
        return self.lcf

    def get_flags(self) -> int:
        op = self.lop
        if op == OP_NONE:
            return self.fl
        m = self.lmask
        res = self.lres
        a = self.la
        b = self.lb
        f = self.fl & ~ARITH
        rm = res & m
        sign = (m + 1) >> 1
        if rm == 0:
            f |= ZF
        if rm & sign:
            f |= SF
        f |= PARITY[rm & 0xFF]
        if op == OP_ADD or op == OP_INC:
            if op == OP_ADD:
                if res > m:
                    f |= CF
            else:
                f |= self.lcf
            if (a ^ res) & (b ^ res) & sign:
                f |= OF
            f |= (a ^ b ^ res) & AF
        elif op == OP_SUB or op == OP_DEC:
            if op == OP_SUB:
                if res < 0:
                    f |= CF
            else:
                f |= self.lcf
            if (a ^ b) & (a ^ res) & sign:
                f |= OF
            f |= (a ^ b ^ res) & AF
        return f

    def materialize(self) -> int:
        f = self.get_flags()
        self.fl = f
        self.lop = OP_NONE
        return f

    def set_flags(self, value: int, mask: int = 0x3F7FD5) -> None:
        """Write EFLAGS bits under `mask` (what the instruction may change)."""
        f = self.get_flags()
        self.fl = ((f & ~mask) | (value & mask)) | 2
        self.lop = OP_NONE

    def cond(self, cc: int) -> bool:
        """Condition code cc (0..15) of Jcc/SETcc/CMOVcc."""
        op = self.lop
        k = cc >> 1
        if op != OP_NONE and (k == 2 or k == 4):
            rm = self.lres & self.lmask
            v = (rm == 0) if k == 2 else bool(rm & ((self.lmask + 1) >> 1))
        elif op != OP_NONE and k == 1:
            v = bool(self.get_cf())
        else:
            f = self.get_flags()
            if k == 0:
                v = bool(f & OF)
            elif k == 1:
                v = bool(f & CF)
            elif k == 2:
                v = bool(f & ZF)
            elif k == 3:
                v = bool(f & (CF | ZF))
            elif k == 4:
                v = bool(f & SF)
            elif k == 5:
                v = bool(f & PF)
            elif k == 6:
                v = bool(f & SF) != bool(f & OF)
            else:
                v = bool(f & ZF) or (bool(f & SF) != bool(f & OF))
        return v != bool(cc & 1)

    # ------------------------------------------------------------------ memory
    def tlb_switch(self) -> None:
        """Select the TLB pair for the current privilege (user pages differ from supervisor)."""
        user = 1 if self.cpl == 3 else 0
        self._update_mode()
        pair = self._tlbs.get(user)
        if pair is None:
            pair = self._tlbs[user] = ({}, {})
        self.rtlb, self.wtlb = pair
        if self.nx:
            xt = self._xtlbs.get(user)
            if xt is None:
                xt = self._xtlbs[user] = {}
            self.xtlb = xt
        else:
            self.xtlb = self.rtlb

    def tlb_flush(self, page: int | None = None) -> None:
        code = page is None or page in self.code_lin
        if code:  # a block's code may map elsewhere now
            self._stash_maps()
        if page is None:
            self.nonglobal.clear()
        if self.native is not None:
            self.native.tlb_flush(page, code)
        for tables in (*self._tlbs.values(), self._xtlbs.values()):
            for t in tables:
                if page is None:
                    t.clear()
                else:
                    t.pop(page, None)
        if page is None:
            self.wrev.clear()  # every write TLB is empty

    def _stash_maps(self) -> None:
        """A TLB flush took code pages' entries: the EIP maps empty (a block's page may
        map elsewhere now), their entries kept aside in code_stash for _unstash."""
        if self.fast_phys:
            saved = {key: fm.copy() for key, fm in self._fast.items() if fm}
            stash = self.code_stash
            for _, phys in stash:  # a page's older entries are mostly these again
                for p in self.fast_phys:
                    phys.pop(p, None)
            stash.append((saved, self.fast_phys.copy()))
            if len(stash) > STASH_GENS:
                del stash[0]
            self.stash_pages.update(self.fast_phys)
            self.unstashed.clear()
            self.fast_phys.clear()
        for fm in self._fast.values():
            fm.clear()
        self.code_lin.clear()

    def _unstash(self, lpage: int, ppage: int) -> None:
        """run()'s miss path found linear page lpage mapped to physical page ppage for
        an instruction fetch (at this privilege, through this TLB): the stashed entries of
        the current EIP map for blocks on lpage that were on ppage are valid again (their
        code is: invalidate_code drops a page's stash). The rest stay stashed."""
        done = (self.mode_key, self.cs_key, lpage, ppage)
        if done in self.unstashed:
            return
        fm = self.fast_cur
        key = (self.mode_key, self.cs_key)
        base = self.cs_key & M32
        live = None
        if self.native is not None:
            self.native.rechain(lpage, ppage)
        held = False
        for saved, phys in self.code_stash:
            lst = phys.get(ppage)
            if lst is None:
                continue
            old = saved.get(key)
            if old is None:
                held = True
                continue
            rest = []
            for e in lst:
                m, eip = e
                if m is fm and (base + eip) >> 12 & 0xFFFFF == lpage:
                    f = old.get(eip)
                    if f is not None and eip not in fm:
                        fm[eip] = f
                        if live is None:
                            live = self.fast_phys.get(ppage)
                            if live is None:
                                live = self.fast_phys[ppage] = []
                        live.append(e)
                else:
                    rest.append(e)
            if rest:
                phys[ppage] = rest
                held = True
            else:
                del phys[ppage]
        if held:
            self.unstashed.add(done)
        else:
            self.stash_pages.discard(ppage)

    def _rebuild_wrev(self) -> None:
        """wrev from the write TLBs as they are (entries flushed since are dropped)."""
        rev: dict[int, set[int]] = {}
        for _, wt in self._tlbs.values():
            for lin, base in wt.items():
                rev.setdefault(base >> 12, set()).add(lin)
        self.wrev = rev
        self.wrev_adds = 0

    def tlb_flush_nonglobal(self) -> None:
        """MOV to CR3 with CR4.PGE: the TLB entries of global pages stay (the kernel's
        code and data); the EIP maps and chains go only if a block's page was not
        global."""
        pages = self.nonglobal
        if pages:
            self.tlb_flush_set(pages)
            pages.clear()

    def tlb_flush_set(self, pages: set[int] | list[int]) -> None:
        """tlb_flush(p) for each of these pages, in one go (the global pages of a CR3
        reload; the pages translated INVLPGs flushed: NativeTier.invlpg_ring)."""
        code = not self.code_lin.isdisjoint(pages)
        if code:
            self._stash_maps()
        for tables in (*self._tlbs.values(), self._xtlbs.values()):
            for t in tables:
                for p in pages:
                    t.pop(p, None)
        if self.native is not None:
            self.native.tlb_flush_pages(pages, code)

    def paging_changed(self) -> None:
        """CR0.PG, CR4.PAE or EFER.NXE changed (or a state was loaded): pick the page
        walk, reload the PDPTEs for PAE, and start from empty TLBs."""
        self.paging = bool(self.cr0 & 0x80000000)
        self.pae = self.paging and bool(self.cr4 & 0x20)
        if self.pae:
            self.pdptes = self.load_pdptes(self.cr3)
        self.nx = self.pae and bool(self.efer & EFER_NXE)
        self.tlb_flush()
        self.tlb_switch()

    def load_pdptes(self, cr3: int) -> tuple[int, int, int, int]:
        """The four PAE page-directory-pointer entries CR3 points at, as MOV to CR3 (or
        to CR0/CR4 turning PAE paging on) loads them: a present entry with a reserved bit
        set is #GP(0) (Intel SDM vol. 3, 4.4.1)."""
        base = cr3 & 0xFFFFFFE0
        entries = []
        for i in range(4):
            e = self.phys_read(base + 8 * i, 8)
            if e & 1 and e & ((0x1E6) | ~PHYS_MASK):
                raise CpuFault(GP, 0)
            entries.append(e)
        return entries[0], entries[1], entries[2], entries[3]

    def translate(self, lin: int, write: bool, user: bool, fetch: bool = False) -> int:
        """Linear to physical: 2-level 32-bit paging (PSE 4 MiB pages too), or 3-level
        PAE paging (2 MiB pages, the XD bit with EFER.NXE). Sets accessed and dirty bits
        as the walk goes, as the hardware does."""
        self.walk_global = False
        if not self.paging:
            return lin
        if self.pae:
            return self._translate_pae(lin, write, user, fetch)
        pde_a = (self.cr3 & 0xFFFFF000) | ((lin >> 20) & 0xFFC)
        pde = self.phys_read(pde_a, 4)
        if not pde & 1:
            self._page_fault(lin, 0, write, user, fetch)
        if pde & 0x80 and self.cr4 & 0x10:
            ok = self._page_perm(pde, pde, write, user)
            if not ok:
                self._page_fault(lin, 1, write, user, fetch)
            new = pde | 0x20 | (0x40 if write else 0)
            if new != pde:
                self.phys_write(pde_a, 4, new)
            self.walk_global = bool(pde & 0x100 and self.cr4 & 0x80)
            return (pde & 0xFFC00000) | (lin & 0x3FFFFF)
        pte_a = (pde & 0xFFFFF000) | ((lin >> 10) & 0xFFC)
        pte = self.phys_read(pte_a, 4)
        if not pte & 1:
            self._page_fault(lin, 0, write, user, fetch)
        if not self._page_perm(pde, pte, write, user):
            self._page_fault(lin, 1, write, user, fetch)
        if not pde & 0x20:
            self.phys_write(pde_a, 4, pde | 0x20)
        new = pte | 0x20 | (0x40 if write else 0)
        if new != pte:
            self.phys_write(pte_a, 4, new)
        self.walk_global = bool(pte & 0x100 and self.cr4 & 0x80)
        return (pte & 0xFFFFF000) | (lin & 0xFFF)

    def _translate_pae(self, lin: int, write: bool, user: bool, fetch: bool) -> int:
        # Reserved bits of a PDE/PTE: above MAXPHYADDR, and XD (bit 63) without NXE;
        # one set in a present entry is a #PF with RSVD (error code bit 3).
        rsvd = ~PHYS_MASK & ((1 << 63) - 1 if self.efer & EFER_NXE else (1 << 64) - 1)
        pdpte = self.pdptes[(lin >> 30) & 3]
        if not pdpte & 1:
            self._page_fault(lin, 0, write, user, fetch)
        pde_a = (pdpte & PHYS_MASK & ~0xFFF) | ((lin >> 18) & 0xFF8)
        pde = self.phys_read(pde_a, 8)
        if not pde & 1:
            self._page_fault(lin, 0, write, user, fetch)
        if pde & 0x80:  # 2 MiB page: bits 20:13 reserved
            if pde & (rsvd | 0x1FE000):
                self._page_fault(lin, 9, write, user, fetch)
            if not self._page_perm(pde, pde, write, user) or (fetch and pde >> 63 and self.nx):
                self._page_fault(lin, 1, write, user, fetch)
            new = pde | 0x20 | (0x40 if write else 0)
            if new != pde:
                self.phys_write(pde_a, 4, new & M32)
            self.walk_global = bool(pde & 0x100 and self.cr4 & 0x80)
            return (pde & PHYS_MASK & ~0x1FFFFF) | (lin & 0x1FFFFF)
        if pde & rsvd:
            self._page_fault(lin, 9, write, user, fetch)
        pte_a = (pde & PHYS_MASK & ~0xFFF) | ((lin >> 9) & 0xFF8)
        pte = self.phys_read(pte_a, 8)
        if not pte & 1:
            self._page_fault(lin, 0, write, user, fetch)
        if pte & rsvd:
            self._page_fault(lin, 9, write, user, fetch)
        if not self._page_perm(pde, pte, write, user) or (fetch and (pde | pte) >> 63 and self.nx):
            self._page_fault(lin, 1, write, user, fetch)
        if not pde & 0x20:
            self.phys_write(pde_a, 4, (pde | 0x20) & M32)
        new = pte | 0x20 | (0x40 if write else 0)
        if new != pte:
            self.phys_write(pte_a, 4, new & M32)
        self.walk_global = bool(pte & 0x100 and self.cr4 & 0x80)
        return (pte & PHYS_MASK & ~0xFFF) | (lin & 0xFFF)

    def _page_perm(self, pde: int, pte: int, write: bool, user: bool) -> bool:
        if user:
            if not (pde & pte & 4):
                return False
            if write and not (pde & pte & 2):
                return False
        elif write and self.cr0 & 0x10000 and not (pde & pte & 2):
            return False
        return True

    def _page_fault(self, lin: int, code: int, write: bool, user: bool, fetch: bool) -> None:
        """#PF with error code `code` (P, RSVD) plus W/R, U/S, and I/D where the SDM
        reports it (an instruction fetch under PAE paging with EFER.NXE)."""
        self.cr2 = lin
        if fetch:
            write = False
            if self.nx:
                code |= 0x10
        raise CpuFault(PF_VEC, code | (2 if write else 0) | (4 if user else 0))

    def phys_read(self, pa: int, n: int) -> int:
        if pa + n <= self.ram_size:
            return int.from_bytes(self.ram[pa : pa + n], "little")
        r = self.memory.region_at(pa)
        if r is not None and pa + n <= r.end:
            o = pa - r.gpa
            return int.from_bytes(r.mm[o : o + n], "little")
        if self.mmio is None:
            return (1 << (8 * n)) - 1
        return self.mmio.read(pa, n)

    def phys_write(self, pa: int, n: int, v: int) -> None:
        if pa + n <= self.ram_size:
            self.ram[pa : pa + n] = v.to_bytes(n, "little")
            cp = self.code_pages
            if cp and (pa >> 12) in cp or ((pa + n - 1) >> 12) in cp:
                self.invalidate_code(pa >> 12)
                self.invalidate_code((pa + n - 1) >> 12)
            return
        r = self.memory.region_at(pa)
        if r is not None and pa + n <= r.end:
            o = pa - r.gpa
            r.mm[o : o + n] = v.to_bytes(n, "little")
            return
        if self.mmio is not None:
            self.mmio.write(pa, n, v)

    def _fill(self, lin: int, write: bool) -> int:
        """Translate for an access by the current CPL and fill the TLB when the page is RAM."""
        pa = self.translate(lin, write, self.cpl == 3)
        page = lin >> 12
        ppage = pa & ~0xFFF
        if ppage + 0x1000 <= self.ram_size and page not in self.watch_pages:
            self.rtlb[page] = ppage
            if write and (pa >> 12) not in self.code_pages:
                self.wtlb[page] = ppage
                lins = self.wrev.get(pa >> 12)
                if lins is None:
                    self.wrev[pa >> 12] = {page}
                else:
                    lins.add(page)
                self.wrev_adds += 1
                if self.wrev_adds > WREV_PRUNE:
                    self._rebuild_wrev()
            if not self.walk_global:
                self.nonglobal.add(page)
        return pa

    def fill_fetch(self, lin: int) -> int:
        """Translate an instruction fetch (execute rights: NX pages fault with I/D) and
        fill the execute TLB."""
        if not self.nx:
            return self._fill(lin, False)
        pa = self.translate(lin, False, self.cpl == 3, True)
        ppage = pa & ~0xFFF
        if ppage + 0x1000 <= self.ram_size and (lin >> 12) not in self.watch_pages:
            self.xtlb[lin >> 12] = ppage
            if not self.walk_global:
                self.nonglobal.add(lin >> 12)
        return pa

    def fetch8(self, lin: int) -> int:
        """One byte of an instruction (through the execute TLB)."""
        p = self.xtlb.get(lin >> 12)
        if p is not None:
            return self.ram[p | (lin & 0xFFF)]
        return self.phys_read(self.fill_fetch(lin), 1)

    def rd_slow(self, lin: int, n: int) -> int:
        if self.bp_data:
            self._watch(lin, n, False)
        if (lin & 0xFFF) + n > 0x1000:
            v = 0
            for i in range(n):
                v |= self.rd_slow((lin + i) & M32, 1) << (8 * i)
            return v
        return self.phys_read(self._fill(lin, False), n)

    def wr_slow(self, lin: int, n: int, v: int) -> None:
        if self.bp_data:
            self._watch(lin, n, True)
        if (lin & 0xFFF) + n > 0x1000:
            # Translate every page first so a fault leaves memory untouched.
            pas = [self.translate((lin + i) & M32, True, self.cpl == 3) for i in range(n)]
            for i, pa in enumerate(pas):
                self.phys_write(pa, 1, (v >> (8 * i)) & 0xFF)
            return
        self.phys_write(self._fill(lin, True), n, v)

    def rd8(self, lin: int) -> int:
        p = self.rtlb.get(lin >> 12)
        if p is not None:
            return self.ram[p | (lin & 0xFFF)]
        return self.rd_slow(lin, 1)

    def rd16(self, lin: int) -> int:
        p = self.rtlb.get(lin >> 12)
        if p is not None and (lin & 0xFFF) != 0xFFF:
            return _u16(self.ram, p | (lin & 0xFFF))[0]
        return self.rd_slow(lin, 2)

    def rd32(self, lin: int) -> int:
        p = self.rtlb.get(lin >> 12)
        if p is not None and (lin & 0xFFF) <= 0xFFC:
            return _u32(self.ram, p | (lin & 0xFFF))[0]
        return self.rd_slow(lin, 4)

    def wr8(self, lin: int, v: int) -> None:
        p = self.wtlb.get(lin >> 12)
        if p is not None:
            self.ram[p | (lin & 0xFFF)] = v
        else:
            self.wr_slow(lin, 1, v)

    def wr16(self, lin: int, v: int) -> None:
        p = self.wtlb.get(lin >> 12)
        if p is not None and (lin & 0xFFF) != 0xFFF:
            _p16(self.ram, p | (lin & 0xFFF), v)
        else:
            self.wr_slow(lin, 2, v)

    def wr32(self, lin: int, v: int) -> None:
        p = self.wtlb.get(lin >> 12)
        if p is not None and (lin & 0xFFF) <= 0xFFC:
            _p32(self.ram, p | (lin & 0xFFF), v)
        else:
            self.wr_slow(lin, 4, v)

    def rd(self, lin: int, size: int) -> int:
        if size == 4:
            return self.rd32(lin)
        if size == 2:
            return self.rd16(lin)
        return self.rd8(lin)

    def wr(self, lin: int, size: int, v: int) -> None:
        if size == 4:
            self.wr32(lin, v)
        elif size == 2:
            self.wr16(lin, v)
        else:
            self.wr8(lin, v)

    def check_writable(self, lin: int, n: int) -> None:
        """Probe a write without doing it (for instructions that must not half-complete)."""
        for a in {lin & ~0xFFF, (lin + n - 1) & ~0xFFF}:
            if (a >> 12) not in self.wtlb:
                self.translate(a & M32, True, self.cpl == 3)

    # Supervisor accesses (descriptor tables, TSS): always with CPL 0 rights.
    def sys_read(self, lin: int, n: int) -> int:
        if (lin & 0xFFF) + n <= 0x1000:
            # Within one page (a descriptor, mostly): one walk gives every byte's address
            # and sets the A bits the byte-wise walks would; RAM reads as bytes do.
            pa = self.translate(lin & M32, False, False)
            if pa + n <= self.ram_size:
                return int.from_bytes(self.ram[pa : pa + n], "little")
        v = 0
        for i in range(n):
            v |= self.phys_read(self.translate((lin + i) & M32, False, False), 1) << (8 * i)
        return v

    def sys_write(self, lin: int, n: int, v: int) -> None:
        for i in range(n):
            self.phys_write(self.translate((lin + i) & M32, True, False), 1, (v >> 8 * i) & 0xFF)

    # ------------------------------------------------------------------ debug registers
    def set_dr(self, n: int, v: int) -> None:
        """MOV to DRn (DR4/DR5 are DR6/DR7 while CR4.DE is clear)."""
        if n in (4, 5):
            if self.cr4 & 8:
                raise CpuFault(UD)
            n += 2
        if n == 6:
            v = (v & 0xE00F) | 0xFFFF0FF0
        elif n == 7:
            v = (v & 0xFFFF23FF) | 0x400
        self.dr[n] = v & M32
        if n != 6:
            self.debug_setup()

    def get_dr(self, n: int) -> int:
        if n in (4, 5):
            if self.cr4 & 8:
                raise CpuFault(UD)
            n += 2
        return self.dr[n]

    def debug_setup(self) -> None:
        """Recompute the enabled breakpoints from DR0-DR3 and DR7 (R/W 10 is an I/O
        breakpoint with CR4.DE, and undefined without: ignored then)."""
        dr7 = self.dr[7]
        self.bp_exec, self.bp_data, self.bp_io = [], [], []
        for i in range(4):
            if not (dr7 >> (2 * i)) & 3:
                continue
            rw = (dr7 >> (16 + 4 * i)) & 3
            size = (1, 2, 8, 4)[(dr7 >> (18 + 4 * i)) & 3]
            if rw == 0:
                self.bp_exec.append((i, self.dr[i] & M32))
            elif rw != 2:
                self.bp_data.append((i, self.dr[i] & M32 & ~(size - 1), size, rw))
            elif self.cr4 & 8:
                self.bp_io.append((i, self.dr[i] & M16 & ~(size - 1), size))
        self.watch_pages = frozenset(
            p for _, a, size, _ in self.bp_data for p in (a >> 12, (a + size - 1) >> 12)
        )
        on = bool(self.bp_exec or self.bp_data or self.bp_io)
        if on != self.debug_on:
            self.debug_on = on
            self.stop = True  # run() picks its path (translated or one at a time) anew
        self.tlb_flush()  # watched pages leave the TLB, so their accesses are seen

    def _watch_io(self, port: int, n: int) -> None:
        for i, p, size in self.bp_io:
            if port < p + size and p < port + n:
                self.dbg_hits |= 1 << i

    def _watch(self, lin: int, n: int, write: bool) -> None:
        for i, a, size, rw in self.bp_data:
            if (write or rw == 3) and lin < a + size and a < lin + n:
                self.dbg_hits |= 1 << i

    def _one_instruction(self) -> None:
        """Decode and run the instruction at EIP (under the breakpoints, if any)."""
        fn, _ = self.decoder.decode_one(self.eip)
        if self.debug_on:
            self._debug_step(fn)
        else:
            fn()

    def _debug_step(self, fn: Callable[[], None]) -> None:
        """Run one instruction under the breakpoints: an execute breakpoint on its first
        byte is a fault before it (unless EFLAGS.RF), data breakpoints a trap after it."""
        rf = self.fl & RF
        if not rf:
            lin = (self.sbase[CS] + self.eip) & M32
            hits = sum(1 << i for i, a in self.bp_exec if a == lin)
            if hits:
                self.dr[6] = (self.dr[6] & ~0xF) | hits
                raise CpuFault(DB)
        self.dbg_hits = 0
        fn()
        if rf and self.fl & RF:
            self.fl &= ~RF  # RF lasts one instruction
        if self.dbg_hits:
            self.dr[6] = (self.dr[6] & ~0xF) | self.dbg_hits
            self.dbg_hits = 0
            self.exception(DB, None)  # a trap: EIP is already past the instruction

    # ------------------------------------------------------------------ code cache
    def invalidate_code(self, ppage: int) -> None:
        keys = self.code_pages.pop(ppage, None)
        if keys:
            for c in self.cpus:  # the guard is shared: every CPU's blocks on the page go
                # Only the EIP map entries and chains of the blocks on this page: every
                # block lies within one page (the decoder ends blocks there).
                for fast, eip in c.fast_phys.pop(ppage, ()):
                    fast.pop(eip, None)
                for _, phys in c.code_stash:
                    phys.pop(ppage, None)
                c.stash_pages.discard(ppage)
                if c.native is not None:
                    c.native.unchain_page(ppage)
                blocks = c.blocks
                for k in keys:
                    blocks.pop(k, None)

    def flush_blocks(self) -> None:
        for c in self.cpus:  # code_pages is shared: emptying it unguards every CPU's blocks
            for fast in c._fast.values():
                fast.clear()
            c.fast_phys.clear()
            c.code_stash.clear()
            c.stash_pages.clear()
            if c.native is not None:
                c.native.unchain()
            c.blocks.clear()
        self.code_pages.clear()

    def guard_code_page(self, ppage: int) -> None:
        """A first block on physical page `ppage`: no CPU may write it through its write
        TLB any more (the slow path's phys_write sees the store and invalidates)."""
        base = ppage << 12
        for c in self.cpus:
            lins = c.wrev.pop(ppage, None)
            if lins:
                for wt in (t[1] for t in c._tlbs.values()):
                    for k in lins:
                        if wt.get(k) == base:
                            del wt[k]
            if c.native is not None:
                c.native.drop_write(ppage)

    def share_code_guard(self, cpus: list[Cpu]) -> None:
        """Join the CPUs of one machine: one code-page guard for all (see invalidate_code)."""
        for c in cpus:
            c.flush_blocks()
            c.cpus = cpus
            c.code_pages = cpus[0].code_pages

    def note_dma_write(self, gpa: int, length: int) -> None:
        """GuestMemory write observer: a device (maybe on its own thread, e.g. TAP RX)
        wrote guest RAM. The block cache belongs to the vCPU thread, so the write is only
        queued (list.append is atomic) and `intr` makes run() leave its fast path: it
        drains the queue at the next block boundary, before another block runs."""
        self.dma_writes.append((gpa, length))
        self.kick()

    def kick(self) -> None:
        """From any thread: an interrupt may be pending (or DMA to drain), so run() must
        reach a block boundary soon; translated native code, which runs with the GIL
        released, sees it at its next chain."""
        self.intr = True
        native = self.native
        if native is not None:
            native.st.intr = 1

    def drain_dma_writes(self) -> None:
        """Drop the translated code of every page a device wrote (vCPU thread only)."""
        pending = self.dma_writes
        cp = self.code_pages
        while pending:
            gpa, length = pending.pop()
            if not cp or length <= 0:
                continue
            first, last = gpa >> 12, (gpa + length - 1) >> 12
            # Most device writes land on pages without code: one membership test a page,
            # or one pass over the code pages when a (hostile) buffer is bigger than that.
            if last - first < len(cp):
                hit = [p for p in range(first, last + 1) if p in cp]
            else:
                hit = [p for p in cp if first <= p <= last]
            for p in hit:
                self.invalidate_code(p)

    # ------------------------------------------------------------------ stack
    def stack_lin(self, sp: int, size: int, write: bool) -> int:
        """Linear address of `size` bytes at SS:sp, after the SS limit and rights check."""
        if sp < self.slo[SS] or sp + size - 1 > (self.swhi if write else self.srhi)[SS]:
            raise CpuFault(SS_VEC, 0)
        return (self.sbase[SS] + sp) & M32

    def push(self, v: int, size: int) -> None:
        r = self.r
        if size == 2:  # a 16-bit push stores the low word (CALL's IP, a call gate's SP)
            v &= 0xFFFF
        if self.stack_fast:
            sp = (r[4] - size) & M32
            self.wr((self.sbase[SS] + sp) & M32, size, v)
            r[4] = sp
        elif self.ss32:
            sp = (r[4] - size) & M32
            self.wr(self.stack_lin(sp, size, True), size, v)
            r[4] = sp
        else:  # 16-bit SP (real mode): the check inline, it is hot there
            sp = (r[4] - size) & M16
            if sp < self.slo[SS] or sp + size - 1 > self.swhi[SS]:
                raise CpuFault(SS_VEC, 0)
            self.wr((self.sbase[SS] + sp) & M32, size, v)
            r[4] = (r[4] & 0xFFFF0000) | sp

    def pop(self, size: int) -> int:
        r = self.r
        if self.stack_fast:
            sp = r[4]
            v = self.rd((self.sbase[SS] + sp) & M32, size)
            r[4] = (sp + size) & M32
        elif self.ss32:
            sp = r[4]
            v = self.rd(self.stack_lin(sp, size, False), size)
            r[4] = (sp + size) & M32
        else:
            sp = r[4] & M16
            if sp < self.slo[SS] or sp + size - 1 > self.srhi[SS]:
                raise CpuFault(SS_VEC, 0)
            v = self.rd((self.sbase[SS] + sp) & M32, size)
            r[4] = (r[4] & 0xFFFF0000) | ((sp + size) & M16)
        return v

    def peek(self, offset: int, size: int) -> int:
        """Read the stack at ESP+offset without popping."""
        sp = (self.r[4] + offset) & (M32 if self.ss32 else M16)
        if self.stack_fast:
            return self.rd((self.sbase[SS] + sp) & M32, size)
        return self.rd(self.stack_lin(sp, size, False), size)

    def sp_add(self, n: int) -> None:
        r = self.r
        if self.ss32:
            r[4] = (r[4] + n) & M32
        else:
            r[4] = (r[4] & 0xFFFF0000) | ((r[4] + n) & M16)

    # ------------------------------------------------------------------ segments
    @property
    def protected(self) -> bool:
        return bool(self.cr0 & 1)

    def descriptor(self, sel: int, vec: int = GP) -> tuple[int, int]:
        """The 8-byte descriptor a selector names, and its linear address."""
        idx = sel & 0xFFF8
        if sel & 4:
            base, limit = self.ldt_base, self.ldt_limit
            if not self.ldt_sel:
                raise CpuFault(vec, sel & 0xFFFC)
        else:
            base, limit = self.gdt_base, self.gdt_limit
        if idx + 7 > limit:
            raise CpuFault(vec, sel & 0xFFFC)
        addr = (base + idx) & M32
        return self.sys_read(addr, 8), addr

    @staticmethod
    def desc_fields(d: int) -> tuple[int, int, int]:
        """(base, byte-granular limit, attr) of a descriptor; attr = access | flags << 8."""
        base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)
        limit = (d & 0xFFFF) | (((d >> 48) & 0xF) << 16)
        attr = ((d >> 40) & 0xFF) | (((d >> 52) & 0xF) << 12)
        if attr & 0x8000:
            limit = (limit << 12) | 0xFFF
        return base, limit, attr

    def set_seg_raw(self, i: int, sel: int, base: int, limit: int, attr: int) -> None:
        self.sel[i] = sel
        self.sbase[i] = base
        self.slimit[i] = limit
        self.sattr[i] = attr
        if i == CS:
            self.cs32 = bool(attr & 0x4000)
            self.update_cs_key()
        elif i == SS:
            self.ss32 = bool(attr & 0x4000)
        self.seg_check_update(i)

    def seg_check_update(self, i: int) -> None:
        """Recompute segment i's access-check ranges (after its hidden cache or CR0.PE
        changed), whether it is flat, and mode_key."""
        attr = self.sattr[i]
        limit = self.slimit[i]
        big = SEG_BIG if limit >= M32 else limit
        lo = 0
        if not self.cr0 & 1:
            # Real mode: only the cached limit counts (0xFFFF, or 4 GiB in "unreal
            # mode"); no type checks, CS is writable.
            rhi = whi = big
        elif not attr & 0x80:  # null selector (or unusable cache): every access is #GP(0)
            rhi = whi = -1
        elif attr & 8:  # code: never writable; readable when R
            rhi = big if attr & 2 else -1
            whi = -1
        elif attr & 4:  # expand-down data: limit+1 up to 64 KiB or 4 GiB (D/B)
            lo = limit + 1
            rhi = M32 if attr & 0x4000 else M16
            whi = rhi if attr & 2 else -1
        else:
            rhi = big
            whi = big if attr & 2 else -1
        self.slo[i] = lo
        self.srhi[i] = rhi
        self.swhi[i] = whi
        if lo == 0 and whi == SEG_BIG:
            self.seg_nonflat &= ~(1 << i)
        else:
            self.seg_nonflat |= 1 << i
        # The flatness of CS, FS and GS is part of the key too: compiled blocks inline
        # accesses through those overrides only while the segment is flat.
        # And so is a 16-bit SS: compiled blocks push and pop inline only on a 32-bit one.
        self.seg_key = (
            (SEGCHK if self.seg_nonflat & FLAT_SEGS_MASK else 0)
            | override_flat_bits(self.seg_nonflat)
            | (0 if self.ss32 else STACK16)
        )
        self.stack_fast = self.ss32 and not self.seg_nonflat & (1 << SS)
        self._update_mode()

    def seg_checks_all(self) -> None:
        for i in range(6):
            self.seg_check_update(i)

    def load_seg(self, i: int, sel: int) -> None:
        """MOV/POP/LxS to a segment register other than CS."""
        sel &= 0xFFFF
        if not self.cr0 & 1 or self.fl & VM:
            if not self.sattr[i] & 0x80:
                # A cache left unusable by a protected-mode null load becomes a normal
                # 64 KiB read/write segment (real-mode selectors are never null).
                self.set_seg_raw(i, sel, sel << 4, M16, 0x93)
                return
            self.sel[i] = sel
            self.sbase[i] = sel << 4
            return
        if sel & 0xFFFC == 0:
            if i == SS:
                raise CpuFault(GP, 0)
            self.set_seg_raw(i, sel, 0, 0, 0)  # null: unusable until reloaded
            return
        d, addr = self.descriptor(sel)
        base, limit, attr = self.desc_fields(d)
        rpl = sel & 3
        dpl = (attr >> 5) & 3
        typ = attr & 0x1F
        if i == SS:
            if rpl != self.cpl or dpl != self.cpl or (typ & 0x1A) != 0x12:
                raise CpuFault(GP, sel & 0xFFFC)
            if not attr & 0x80:
                raise CpuFault(SS_VEC, sel & 0xFFFC)
        else:
            if not typ & 0x10 or (typ & 0x1A) == 0x18:  # system, or execute-only code
                raise CpuFault(GP, sel & 0xFFFC)
            if (typ & 0x1C) != 0x1C and max(rpl, self.cpl) > dpl:  # not conforming code
                raise CpuFault(GP, sel & 0xFFFC)
            if not attr & 0x80:
                raise CpuFault(NP, sel & 0xFFFC)
        if not attr & 1:
            self.sys_write(addr + 5, 1, (attr & 0xFF) | 1)
            attr |= 1
        self.set_seg_raw(i, sel, base, limit, attr)

    def load_cs(self, sel: int, base: int, limit: int, attr: int, cpl: int) -> None:
        sel = (sel & 0xFFFC) | cpl
        if (
            sel != self.sel[CS]
            or base != self.sbase[CS]
            or limit != self.slimit[CS]
            or attr != self.sattr[CS]
        ):  # (the same CS again, e.g. an IRET to the same code segment, changes nothing)
            self.set_seg_raw(CS, sel, base, limit, attr)
        elif self.native is not None and self.native.cs_stale:
            self.native.cs_changed()  # a CR3 write since: translated IRET waits for this
        if cpl != self.cpl:
            self.cpl = cpl
            self.tlb_switch()

    def real_cs(self, sel: int) -> None:
        self.sel[CS] = sel & 0xFFFF
        self.sbase[CS] = (sel & 0xFFFF) << 4
        if not self.cr0 & 1:
            self.cs32 = bool(self.sattr[CS] & 0x4000)
        self.update_cs_key()

    def update_cs_key(self) -> None:
        limit = self.slimit[CS]
        reach = M32 if self.cs32 else M16
        self.cs_key = self.sbase[CS] | (0 if limit >= reach else (limit + 1) << 32)
        self._native_cs()
        self._select_fast()

    def _select_fast(self) -> None:
        key = (self.mode_key, self.cs_key)
        fm = self._fast.get(key)
        if fm is None:
            fm = self._fast[key] = {}
        self.fast_cur = fm

    def _native_cs(self) -> None:
        """CS, CR0.PE or the GDT changed: translated PUSH CS and IRET read what follows
        from them (NativeTier.cs_changed)."""
        native = getattr(self, "native", None)
        if native is not None:
            native.cs_changed()

    @property
    def gdt_base(self) -> int:
        return self._gdt_base

    @gdt_base.setter
    def gdt_base(self, v: int) -> None:
        self._gdt_base = v
        self._native_cs()

    @property
    def gdt_limit(self) -> int:
        return self._gdt_limit

    @gdt_limit.setter
    def gdt_limit(self, v: int) -> None:
        self._gdt_limit = v
        self._native_cs()

    def code_descriptor(self, sel: int) -> tuple[int, int, int, int]:
        """Check a selector for a far JMP/CALL/RET target; returns (base, limit, attr, addr)."""
        if sel & 0xFFFC == 0:
            raise CpuFault(GP, 0)
        d, addr = self.descriptor(sel)
        base, limit, attr = self.desc_fields(d)
        return base, limit, attr, addr

    def far_jump(self, sel: int, eip: int, call: bool, opsize: int, next_eip: int) -> None:
        """JMP/CALL ptr16:16/32 (and through call gates)."""
        if not self.cr0 & 1 or self.fl & VM:
            if call:
                self.push(self.sel[CS], opsize)
                self.push(next_eip, opsize)
            self.real_cs(sel)
            self.eip = eip & (M32 if opsize == 4 else M16)
            return
        base, limit, attr, addr = self.code_descriptor(sel)
        typ = attr & 0x1F
        dpl = (attr >> 5) & 3
        rpl = sel & 3
        if typ & 0x18 == 0x18:  # code segment
            if typ & 4:  # conforming
                if dpl > self.cpl:
                    raise CpuFault(GP, sel & 0xFFFC)
            elif rpl > self.cpl or dpl != self.cpl:
                raise CpuFault(GP, sel & 0xFFFC)
            if not attr & 0x80:
                raise CpuFault(NP, sel & 0xFFFC)
            if call:
                self.push(self.sel[CS], opsize)
                self.push(next_eip, opsize)
            self.load_cs(sel, base, limit, attr | 1, self.cpl)
            self.eip = eip & (M32 if opsize == 4 else M16)
            return
        if typ in (0x04, 0x0C):  # 16/32-bit call gate
            d, _ = self.descriptor(sel)
            if dpl < self.cpl or dpl < rpl:
                raise CpuFault(GP, sel & 0xFFFC)
            if not attr & 0x80:
                raise CpuFault(NP, sel & 0xFFFC)
            gsize = 4 if typ == 0x0C else 2
            tsel = (d >> 16) & 0xFFFF
            teip = (d & 0xFFFF) | ((d >> 32) & 0xFFFF0000 if gsize == 4 else 0)
            nparams = (d >> 32) & 0x1F
            tbase, tlimit, tattr, _ = self.code_descriptor(tsel)
            tdpl = (tattr >> 5) & 3
            if tattr & 0x18 != 0x18 or tdpl > self.cpl:
                raise CpuFault(GP, tsel & 0xFFFC)
            if not tattr & 0x80:
                raise CpuFault(NP, tsel & 0xFFFC)
            if call and not tattr & 4 and tdpl < self.cpl:
                old_ss, old_esp, old_cpl = self.sel[SS], self.r[4], self.cpl
                params = [self.peek(i * gsize, gsize) for i in range(nparams)]
                self.stack_switch(tdpl)
                self.push(old_ss, gsize)
                self.push(old_esp, gsize)
                for p in reversed(params):
                    self.push(p, gsize)
                self.push(self.sel[CS], gsize)
                self.push(next_eip, gsize)
                del old_cpl
                self.load_cs(tsel, tbase, tlimit, tattr, tdpl)
            else:
                if call:
                    self.push(self.sel[CS], gsize)
                    self.push(next_eip, gsize)
                self.load_cs(tsel, tbase, tlimit, tattr, self.cpl)
            self.eip = teip
            return
        if typ not in (0x01, 0x05, 0x09):  # only an available TSS or a task gate switches
            raise CpuFault(GP, sel & 0xFFFC)
        if dpl < self.cpl or dpl < rpl:
            raise CpuFault(GP, sel & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(NP, sel & 0xFFFC)
        if typ == 0x05:  # task gate: the TSS selector is in it
            d, _ = self.descriptor(sel)
            sel = (d >> 16) & 0xFFFF
        self.task_switch(sel, "call" if call else "jmp", next_eip)

    def stack_switch(self, new_cpl: int) -> None:
        """Load SS:ESP for `new_cpl` from the current 32-bit TSS (inner-level entry)."""
        if self.tr_type & 8:
            off = 4 + new_cpl * 8
            esp = self.sys_read(self.tr_base + off, 4)
            ss = self.sys_read(self.tr_base + off + 4, 2)
        else:
            off = 2 + new_cpl * 4
            esp = self.sys_read(self.tr_base + off, 2)
            ss = self.sys_read(self.tr_base + off + 2, 2)
        if ss & 0xFFFC == 0:
            raise CpuFault(TS, ss & 0xFFFC)
        d, addr = self.descriptor(ss, TS)
        base, limit, attr = self.desc_fields(d)
        if (ss & 3) != new_cpl or ((attr >> 5) & 3) != new_cpl or (attr & 0x1A) != 0x12:
            raise CpuFault(TS, ss & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(SS_VEC, ss & 0xFFFC)
        self.set_seg_raw(SS, ss, base, limit, attr)
        self.r[4] = esp

    def far_return(self, opsize: int, imm: int) -> None:
        """RETF [imm16]."""
        if not self.cr0 & 1 or self.fl & VM:
            eip = self.pop(opsize)
            cs = self.pop(opsize)
            self.sp_add(imm)
            self.real_cs(cs)
            self.eip = eip
            return
        eip = self.peek(0, opsize)
        cs = self.peek(opsize, opsize) & 0xFFFF
        rpl = cs & 3
        if rpl < self.cpl:
            raise CpuFault(GP, cs & 0xFFFC)
        base, limit, attr, _ = self.code_descriptor(cs)
        if attr & 0x18 != 0x18:
            raise CpuFault(GP, cs & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(NP, cs & 0xFFFC)
        if rpl == self.cpl:
            self.sp_add(2 * opsize + imm)
            self.load_cs(cs, base, limit, attr, self.cpl)
            self.eip = eip
            return
        esp = self.peek(2 * opsize + imm, opsize)
        ss = self.peek(3 * opsize + imm, opsize) & 0xFFFF
        self.load_cs(cs, base, limit, attr, rpl)
        self.load_seg(SS, ss)
        self.r[4] = esp if opsize == 4 else (self.r[4] & 0xFFFF0000) | esp
        self.sp_add(imm)
        self.eip = eip
        self._null_outer_segments()

    def _null_outer_segments(self) -> None:
        for i in (ES, DS, FS, GS):
            attr = self.sattr[i]
            dpl = (attr >> 5) & 3
            if (attr & 0x1C) != 0x1C and dpl < self.cpl:  # data or non-conforming code
                self.set_seg_raw(i, 0, 0, 0, 0)

    def iret(self, opsize: int, next_eip: int) -> None:
        if self.fl & VM:
            # In virtual-8086 mode IRET is IOPL-sensitive (no VME), and with IOPL 3 pops
            # like real mode but leaves IOPL and VM alone.
            if (self.fl >> 12) & 3 < 3:
                raise CpuFault(GP, 0)
            eip = self.peek(0, opsize)
            cs = self.peek(opsize, opsize) & 0xFFFF
            fl = self.peek(2 * opsize, opsize)
            self.sp_add(3 * opsize)
            self.real_cs(cs)
            self.eip = eip & M16
            self.set_flags(fl, (0x257FD5 if opsize == 4 else 0x7FD5) & ~IOPL)
            return
        if not self.cr0 & 1:
            eip = self.pop(opsize)
            cs = self.pop(opsize)
            fl = self.pop(opsize)
            self.real_cs(cs)
            self.eip = eip
            if opsize == 2:
                self.set_flags(fl, 0x7FD5)
            else:
                self.set_flags(fl, 0x257FD5)
            return
        if self.fl & NT:  # return to the task that called this one (the back link)
            self.task_switch(self.sys_read(self.tr_base, 2), "iret", next_eip)
            return
        eip = self.peek(0, opsize)
        cs = self.peek(opsize, opsize) & 0xFFFF
        fl = self.peek(2 * opsize, opsize)
        if opsize == 4 and fl & VM and self.cpl == 0:
            self._iret_to_vm86(eip, cs, fl)
            return
        rpl = cs & 3
        if rpl < self.cpl:
            raise CpuFault(GP, cs & 0xFFFC)
        base, limit, attr, _ = self.code_descriptor(cs)
        if attr & 0x18 != 0x18:
            raise CpuFault(GP, cs & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(NP, cs & 0xFFFC)
        old_cpl = self.cpl
        mask = 0x257FD5 if opsize == 4 else 0x7FD5
        if old_cpl > 0:
            mask &= ~IOPL
        if old_cpl > (self.fl >> 12) & 3:
            mask &= ~IF
        if rpl == old_cpl:
            self.sp_add(3 * opsize)
            self.load_cs(cs, base, limit, attr, rpl)
        else:
            esp = self.peek(3 * opsize, opsize)
            ss = self.peek(4 * opsize, opsize) & 0xFFFF
            self.load_cs(cs, base, limit, attr, rpl)
            try:
                self.load_seg(SS, ss)
            except CpuFault:
                self.load_cs(self.sel[CS], self.sbase[CS], self.slimit[CS], self.sattr[CS], old_cpl)
                raise
            self.r[4] = esp if opsize == 4 else (self.r[4] & 0xFFFF0000) | esp
            self._null_outer_segments()
        self.eip = eip
        self.set_flags(fl, mask)

    def _iret_to_vm86(self, eip: int, cs: int, fl: int) -> None:
        """IRET at CPL 0 with VM set in the popped EFLAGS: the frame goes on with ESP, SS,
        ES, DS, FS, GS (dwords); every segment becomes a real-mode style one at CPL 3."""
        esp = self.peek(12, 4)
        sels = [self.peek(off, 4) & 0xFFFF for off in (16, 20, 24, 28, 32)]  # SS ES DS FS GS
        self.set_flags(fl, 0x3F7FD5)
        for i, sel in zip((SS, ES, DS, FS, GS), sels, strict=True):
            self.set_seg_raw(i, sel, sel << 4, M16, VM86_SEG_ATTR)
        self.r[4] = esp
        self.set_seg_raw(CS, cs, cs << 4, M16, VM86_SEG_ATTR)  # the selector as it is
        self.cpl = 3
        self.tlb_switch()
        self.eip = eip & M16

    def load_ldt(self, sel: int, vec: int = GP) -> None:
        """LLDT, or a new task's LDT (faults then are #TS): a GDT selector of an LDT
        descriptor, or null for none."""
        if sel & 0xFFFC == 0:
            self.ldt_sel, self.ldt_base, self.ldt_limit = 0, 0, 0
            return
        if sel & 4:
            raise CpuFault(vec, sel & 0xFFFC)
        d, _ = self.descriptor(sel, vec)
        base, limit, attr = self.desc_fields(d)
        if attr & 0x1F != 0x02:
            raise CpuFault(vec, sel & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(NP, sel & 0xFFFC)
        self.ldt_sel, self.ldt_base, self.ldt_limit = sel, base, limit

    def task_switch(self, sel: int, reason: str, next_eip: int, error: int | None = None) -> None:
        """Hardware task switch (SDM vol. 3, 7.3) to the TSS `sel`, for a far JMP or CALL
        (to a TSS or a task gate), an interrupt through a task gate, or an IRET with NT
        (reason "jmp", "call", "int", "iret"). The outgoing state goes into the current
        TSS, the incoming one is read whole before anything changes."""
        iret = reason == "iret"
        vec = TS if iret else GP
        if sel & 4 or sel & 0xFFFC == 0:
            raise CpuFault(vec, sel & 0xFFFC)
        d, addr = self.descriptor(sel, vec)
        base, limit, attr = self.desc_fields(d)
        typ = attr & 0x1F
        if typ not in ((0x0B, 0x03) if iret else (0x09, 0x01)):
            raise CpuFault(vec, sel & 0xFFFC)
        if not attr & 0x80:
            raise CpuFault(NP, sel & 0xFFFC)
        big = bool(typ & 8)
        if limit < (0x67 if big else 0x2B):
            raise CpuFault(TS, sel & 0xFFFC)
        # The incoming state, whole, before anything is written.
        rd, wr = self.sys_read, self.sys_write
        new = _TSS32 if big else _TSS16
        n = new.size
        cr3 = rd(base + 0x1C, 4) if big else None
        eip, fl = rd(base + new.eip, n), rd(base + new.flags, n)
        # A 16-bit TSS has no upper register halves: they stay as they are.
        keep = 0 if big else 0xFFFF0000
        regs = [(self.r[i] & keep) | rd(base + new.regs + n * i, n) for i in range(8)]
        sels = [rd(base + new.sels + n * i, 2) for i in range(new.nsels)] + [0] * (6 - new.nsels)
        ldt = rd(base + new.ldt, 2)
        # The outgoing state into the current TSS.
        old_sel, old_base = self.tr_sel, self.tr_base
        old = _TSS32 if self.tr_type & 8 else _TSS16
        n = old.size
        wr(old_base + old.eip, n, next_eip)
        wr(old_base + old.flags, n, self.get_flags() & ~(NT if iret else 0))
        for i in range(8):
            wr(old_base + old.regs + n * i, n, self.r[i])
        for i in range(old.nsels):
            wr(old_base + old.sels + n * i, 2, self.sel[i])
        # Busy bits and the back link.
        if reason in ("jmp", "iret") and old_sel & 0xFFFC:
            old_addr = (self.gdt_base + (old_sel & 0xFFF8) + 5) & M32
            wr(old_addr, 1, rd(old_addr, 1) & ~2)
        if not iret:
            wr(addr + 5, 1, rd(addr + 5, 1) | 2)
        if reason in ("call", "int"):
            fl |= NT
            wr(base, 2, old_sel)
        self.tr_sel, self.tr_base, self.tr_limit, self.tr_type = sel, base, limit, (typ | 2) & 0xF
        self.cr0 |= 8  # TS: the FPU state belongs to the task that ran before
        if cr3 is not None and self.cr0 & 0x80000000:
            self.set_cr(3, cr3)
        self.r[:] = [v & M32 for v in regs]
        self.set_flags(fl, 0x3F7FD5)
        self.eip = eip
        # Faults from here on belong to the new task (#TS for its selectors).
        self.load_ldt(ldt, TS)
        if fl & VM:  # a virtual-8086 task
            for i in range(6):
                self.set_seg_raw(i, sels[i], sels[i] << 4, M16, VM86_SEG_ATTR)
            self.cpl = 3
            self.tlb_switch()
            self.eip &= M16
            return
        cs = sels[CS]
        if cs & 0xFFFC == 0:
            raise CpuFault(TS, 0)
        cbase, climit, cattr, _ = self.code_descriptor(cs)
        if cattr & 0x18 != 0x18 or (not cattr & 4 and (cattr >> 5) & 3 != cs & 3):
            raise CpuFault(TS, cs & 0xFFFC)
        if not cattr & 0x80:
            raise CpuFault(NP, cs & 0xFFFC)
        self.load_cs(cs, cbase, climit, cattr, cs & 3)
        for i in (SS, DS, ES, FS, GS):
            try:
                self.load_seg(i, sels[i])
            except CpuFault as f:
                raise CpuFault(TS if f.vector == GP else f.vector, f.error) from None
        if error is not None:  # an exception's error code goes on the new task's stack
            self.push(error, 4 if big else 2)

    # ------------------------------------------------------------------ interrupts
    def interrupt(
        self, vec: int, error: int | None, software: bool, next_eip: int, rf: bool = False
    ) -> None:
        """Deliver vector `vec`; `next_eip` is the EIP pushed (faults: the instruction).
        `rf`: a fault pushes EFLAGS with RF set, so the restarted instruction's own
        instruction breakpoint does not hit again."""
        flags = self.get_flags()
        if not self.cr0 & 1:
            if vec * 4 + 3 > self.idt_limit:
                raise CpuFault(DF_VEC if vec == DF_VEC else GP, 0)
            ent = self.rd32((self.idt_base + vec * 4) & M32)
            self.push(flags & 0xFFFF, 2)
            self.push(self.sel[CS], 2)
            self.push(next_eip & 0xFFFF, 2)
            self.fl = flags & ~(IF | TF | AC) | 2
            self.lop = OP_NONE
            self.real_cs(ent >> 16)
            self.eip = ent & 0xFFFF
            return
        vm86 = flags & VM
        ext = 0 if software else 1
        if vec * 8 + 7 > self.idt_limit:
            raise CpuFault(GP, vec * 8 + 2 + ext)
        gate = self.sys_read((self.idt_base + vec * 8) & M32, 8)
        gattr = (gate >> 40) & 0xFF
        gtype = gattr & 0x1F
        if gtype == 0x05:  # task gate
            if software and ((gattr >> 5) & 3) < self.cpl:
                raise CpuFault(GP, vec * 8 + 2)
            if not gattr & 0x80:
                raise CpuFault(NP, vec * 8 + 2 + ext)
            self.task_switch((gate >> 16) & 0xFFFF, "int", next_eip, error)
            return
        if gtype not in (0x06, 0x07, 0x0E, 0x0F):
            raise CpuFault(GP, vec * 8 + 2 + ext)
        if software and ((gattr >> 5) & 3) < self.cpl:
            raise CpuFault(GP, vec * 8 + 2)
        if not gattr & 0x80:
            raise CpuFault(NP, vec * 8 + 2 + ext)
        gsize = 4 if gtype & 8 else 2
        tsel = (gate >> 16) & 0xFFFF
        teip = (gate & 0xFFFF) | (((gate >> 48) & 0xFFFF) << 16 if gsize == 4 else 0)
        if tsel & 0xFFFC == 0:
            raise CpuFault(GP, ext)
        d, _ = self.descriptor(tsel)
        base, limit, attr = self.desc_fields(d)
        dpl = (attr >> 5) & 3
        if attr & 0x18 != 0x18 or dpl > self.cpl or (vm86 and (dpl or attr & 4)):
            # From virtual-8086 mode only to a ring-0 non-conforming handler.
            raise CpuFault(GP, (tsel & 0xFFFC) + ext)
        if not attr & 0x80:
            raise CpuFault(NP, (tsel & 0xFFFC) + ext)
        pushed_flags = flags | RF if rf else flags
        old_cs, old_ss, old_esp, old_cpl = self.sel[CS], self.sel[SS], self.r[4], self.cpl
        old_ss_state = (self.sel[SS], self.sbase[SS], self.slimit[SS], self.sattr[SS])
        if not attr & 4 and dpl < self.cpl:
            self.stack_switch(dpl)
            try:
                # The pushes happen with the new privilege (supervisor stack).
                self.cpl = dpl
                self.tlb_switch()
                if vm86:  # the real-mode style data selectors go first
                    for i in (GS, FS, DS, ES):
                        self.push(self.sel[i], gsize)
                self.push(old_ss, gsize)
                self.push(old_esp, gsize)
                self.push(pushed_flags, gsize)
                self.push(old_cs, gsize)
                self.push(next_eip, gsize)
                if error is not None:
                    self.push(error, gsize)
            except CpuFault:
                self.cpl = old_cpl
                self.tlb_switch()
                self.set_seg_raw(SS, *old_ss_state)
                self.r[4] = old_esp
                raise
            self.load_cs(tsel, base, limit, attr, dpl)
            if vm86:  # the handler starts with null data segments
                for i in (ES, DS, FS, GS):
                    self.set_seg_raw(i, 0, 0, 0, 0)
        else:
            try:
                self.push(pushed_flags, gsize)
                self.push(old_cs, gsize)
                self.push(next_eip, gsize)
                if error is not None:
                    self.push(error, gsize)
            except CpuFault:
                self.r[4] = old_esp
                raise
            self.load_cs(tsel, base, limit, attr, self.cpl)
        nf = flags & ~(TF | NT | RF | VM)
        if not gtype & 1:
            nf &= ~IF
        self.fl = nf | 2
        self.lop = OP_NONE
        self.eip = teip

    def exception(self, vec: int, error: int | None) -> None:
        """Deliver a fault, escalating to #DF and to a triple fault (reset) like hardware."""
        if vec not in HAS_ERROR_CODE or not self.cr0 & 1:
            error = None
        elif error is None:
            error = 0
        try:
            self.interrupt(vec, error, False, self.eip, vec not in (DB, BP, OF_VEC))
        except CpuFault as second:
            v2 = second.vector
            if vec == DF_VEC:
                raise TripleFault() from None
            if (vec in CONTRIBUTORY and v2 in CONTRIBUTORY) or (
                vec == PF_VEC and (v2 in CONTRIBUTORY or v2 == PF_VEC)
            ):
                try:
                    self.interrupt(DF_VEC, 0 if self.cr0 & 1 else None, False, self.eip, True)
                except CpuFault:
                    raise TripleFault() from None
            else:
                self.exception(v2, second.error)

    # ------------------------------------------------------------------ port I/O
    def io_check(self, port: int, size: int) -> None:
        """IN/OUT/INS/OUTS above IOPL (or in virtual-8086 mode) are allowed only where the
        32-bit TSS's I/O permission bitmap has a 0 bit for every byte of the access
        (Linux's ioperm() uses it); anything else, or a bitmap past the TSS limit, is #GP(0)."""
        if not self.cr0 & 1 or (self.cpl <= (self.fl >> 12) & 3 and not self.fl & VM):
            return
        if self.tr_type & 0xF not in (0x9, 0xB) or self.tr_limit < 0x67:
            raise CpuFault(GP, 0)  # no TSS, or a 16-bit one: it has no bitmap
        offset = self.sys_read(self.tr_base + 0x66, 2) + (port >> 3)
        if offset + 1 > self.tr_limit:
            raise CpuFault(GP, 0)
        bits = self.sys_read(self.tr_base + offset, 2)
        if bits & (((1 << size) - 1) << (port & 7)):
            raise CpuFault(GP, 0)

    def port_in(self, port: int, size: int) -> int:
        if self.bp_io:
            self._watch_io(port, size)
        if self.pio is None:
            return (1 << (8 * size)) - 1
        return self.pio.read(port, size)

    def port_out(self, port: int, size: int, value: int) -> None:
        if self.bp_io:
            self._watch_io(port, size)
        if port == 0xF0:
            self._port_f0()
        if self.pio is not None:
            self.pio.write(port, size, value)

    # ------------------------------------------------------------------ x87 errors
    def fpu_error(self) -> None:
        """A waiting x87 instruction found an unmasked exception pending (SDM vol. 1,
        8.7 and appendix D): #MF with CR0.NE; else the PC's legacy path: FERR# raises
        IRQ 13 and the CPU waits at this instruction for the interrupt, unless IGNNE#
        (a write to port 0xF0 by the IRQ 13 handler) tells it to go on."""
        if self.cr0 & 0x20:
            raise CpuFault(MF)
        f = self.fpu
        if f.ignne:
            return
        if not f.ferr:
            f.ferr = True
            if self.ferr_irq is not None:
                self.ferr_irq(True)
        raise CpuHalt()  # EIP still at the instruction: it runs again after the interrupt

    def fpu_ferr_update(self) -> None:
        """FERR# (and with it IGNNE#) goes away once the status word's ES is clear."""
        f = self.fpu
        if f.ferr and not f.sw & 0x80:
            f.ferr = f.ignne = False

    def _port_f0(self) -> None:
        """Port 0xF0 (PC chipset): clear the IRQ 13 latch, assert IGNNE# while FERR# is."""
        f = self.fpu
        if self.ferr_irq is not None:
            self.ferr_irq(False)
        if f.ferr:
            f.ignne = True

    # ------------------------------------------------------------------ system
    def cpuid(self) -> None:
        r = self.r  # EAX=0 ECX=1 EDX=2 EBX=3
        if r[0] == 1:
            # The microcode revision latches into IA32_BIOS_SIGN_ID (0: none loaded).
            self.msrs[MSR_BIOS_SIGN_ID] = 0
        leaf = r[0]
        r[0], r[3], r[1], r[2] = cpuid_leaf(self.features, leaf, self.apic_id, self.tsc_hz)
        if leaf == 1 and self.logical_cpus > 1:
            r[3] |= self.logical_cpus << 16  # EBX[23:16]: logical processors (with HTT)
            r[2] |= 1 << 28

    def rdtsc(self) -> int:
        return (time.monotonic_ns() * self.tsc_hz // 1_000_000_000 + self.tsc_offset) & (
            (1 << 64) - 1
        )

    def rdmsr(self, idx: int) -> int:
        if idx == MSR_TSC:
            return self.rdtsc()
        spec = self.msr_spec.get(idx)
        if spec is None:
            raise CpuFault(GP, 0)
        if idx == MSR_APIC_BASE:  # the BSP flag: set on the CPU whose APIC id is 0
            return self.msrs.get(idx, spec.reset) & ~0x100 | (0 if self.apic_id else 0x100)
        return self.msrs.get(idx, spec.reset)

    def wrmsr(self, idx: int, v: int) -> None:
        """WRMSR: the value is kept exactly; a reserved bit, a bad memory type or a
        read-only MSR is #GP(0) and changes nothing."""
        if idx == MSR_TSC:
            self.tsc_offset = v - self.rdtsc() + self.tsc_offset
            if self.native is not None:
                self.native.sync_tsc()
            return
        if idx == MSR_APIC_BASE:
            v &= ~0x100  # the BSP flag is read-only: writing back what RDMSR gave is fine
        elif idx in MSR_P6_PERFCTR and not v >> 40:
            # Bits 31:0 are written, sign-extended into the counter's 39:32 (bits past 39
            # are the spec's reserved bits here: #GP below).
            v = (v & M32) | (0xFF00000000 if v & 0x80000000 else 0)
        spec = self.msr_spec.get(idx)
        if spec is None or spec.read_only or v & ~spec.writable or not msr_value_ok(idx, v):
            raise CpuFault(GP, 0)
        if idx == MSR_EFER:
            if (self.efer ^ v) & EFER_NXE:
                self.efer = v
                self.paging_changed()
                self.flush_blocks()
            self.efer = v
        self.msrs[idx] = v

    def sysenter(self) -> None:
        """SYSENTER: to ring 0 at IA32_SYSENTER_EIP/ESP with flat segments derived from
        IA32_SYSENTER_CS (Intel SDM vol. 2B, SYSENTER)."""
        cs = self.rdmsr(MSR_SYSENTER_CS) & 0xFFFC
        if not self.cr0 & 1 or cs == 0:
            raise CpuFault(GP, 0)
        self.fl &= ~(VM | IF | RF)
        self.cpl = 0
        self.set_seg_raw(CS, cs, 0, M32, 0xC09B)  # 32-bit code, DPL 0, accessed
        self.set_seg_raw(SS, cs + 8, 0, M32, 0xC093)  # 32-bit data, DPL 0
        self.r[4] = self.rdmsr(MSR_SYSENTER_ESP)
        self.eip = self.rdmsr(MSR_SYSENTER_EIP)
        self.tlb_switch()

    def sysexit(self) -> None:
        """SYSEXIT: back to ring 3 at EDX with ESP = ECX."""
        cs = self.rdmsr(MSR_SYSENTER_CS) & 0xFFFC
        if not self.cr0 & 1 or cs == 0 or self.cpl:
            raise CpuFault(GP, 0)
        self.cpl = 3
        self.set_seg_raw(CS, (cs + 16) | 3, 0, M32, 0xC0FB)  # DPL 3 code
        self.set_seg_raw(SS, (cs + 24) | 3, 0, M32, 0xC0F3)  # DPL 3 data
        self.r[4] = self.r[1]
        self.eip = self.r[2]
        self.tlb_switch()

    def set_cr(self, n: int, v: int) -> None:
        if n == 0:
            if v & 0x80000000 and not v & 1:
                raise CpuFault(GP, 0)
            old = self.cr0
            if v & ~old & 0x80000000 and self.cr4 & 0x20:
                self.load_pdptes(self.cr3)  # #GP before anything changes
            self.cr0 = v | 0x10
            if (old ^ v) & 1:
                self.seg_checks_all()  # real mode checks limits only, protected mode rights too
                self._native_cs()
            if (old ^ v) & 0x80010001:
                self.paging_changed()
                self.flush_blocks()
        elif n == 2:
            self.cr2 = v
        elif n == 3:
            if self.pae:
                self.pdptes = self.load_pdptes(v)
            self.cr3 = v
            if self.native is not None:
                self.native.cs_stale_now()  # other page tables: the next CS load says
            if self.cr4 & 0x80:  # PGE: global pages stay
                self.tlb_flush_nonglobal()
            else:
                self.tlb_flush()
        elif n == 4:
            if v & ~0x7FF:  # VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
                raise CpuFault(GP, 0)
            if v & 0x20 and "pae" not in self.features:
                raise CpuFault(GP, 0)
            if v & ~self.cr4 & 0x20 and self.paging:
                self.load_pdptes(self.cr3)
            old = self.cr4
            self.cr4 = v
            if (old ^ v) & 0x20:
                self.paging_changed()
                self.flush_blocks()
            else:
                self.tlb_flush()
            if (old ^ v) & 8:
                self.debug_setup()  # DE turns DR7's R/W 10 into I/O breakpoints
        else:
            raise CpuFault(UD, None)

    def reset(self) -> None:
        """Power-on state: real mode at F000:FFF0."""
        self.r[:] = [0] * 8
        self.r[2] = 0x600
        for i in range(6):
            self.set_seg_raw(i, 0, 0, M16, 0x93)
        self.set_seg_raw(CS, 0xF000, 0xFFFF0000, M16, 0x9B)
        self.eip = 0xFFF0
        self.fl = 2
        self.lop = OP_NONE
        self.cr0, self.cr2, self.cr3, self.cr4 = 0x60000010, 0, 0, 0
        self.efer = 0
        self.msrs.clear()  # RESET returns every MSR to its power-on value
        self.cpl = 0
        self.fpu.reset()
        self.seg_checks_all()
        self.halted = False
        self.paging_changed()
        self.tlb_switch()
        self.flush_blocks()

    def _update_mode(self) -> None:
        """mode_key: what a translated block depends on besides its address: CPL, code
        size and seg_key (SEGCHK, CS/FS/GS flatness, STACK16)."""
        self.mode_key = self.cpl | (4 if self.cs32 else 0) | self.seg_key
        self._select_fast()

    # ------------------------------------------------------------------ run loop
    def step(self) -> None:
        """Decode and execute one instruction (the reference interpreter path)."""
        try:
            fn, _n = self.decoder.decode_one(self.eip)
            fn()
            self.icount += 1
        except CpuFault as f:
            self.exception(f.vector, f.error)

    def _block_boundary(self, irq_check: Callable[[], int | None]) -> bool:
        """Between blocks, off the fast path: take a pending interrupt, drop the code that
        device DMA replaced, end an STI/MOV SS shadow. Returns whether the next
        instruction is the one in the shadow."""
        if self.intr and self.fl & IF and not self.inhibit_irq:
            vec = irq_check()
            if vec is not None:
                self.halted = False  # an interrupt ends HLT
                self.irq_count += 1
                try:
                    self.interrupt(vec, None, False, self.eip)
                except CpuFault as f:
                    self.exception(f.vector, f.error)
            elif self.halted:
                return False  # the request went away before INTA: keep sleeping
        if self.dma_writes:  # after irq_check, which may clear intr: see note_dma_write
            self.drain_dma_writes()
        shadow = self.inhibit_irq
        if shadow:
            self.inhibit_irq = False
        return shadow

    def _cold_block(self, b: Any, fm: dict[int, Callable[[], int]]) -> Callable[[], int]:
        """The closures of a cached, not yet compiled block as one callable for the EIP
        map `fm` (emptied whenever a block or a TLB entry goes away, as for compiled
        ones): counts the block's runs and compiles it when hot, as run()'s slow path
        does; a fault or HLT inside tells run() what completed before it. (Its values
        are default arguments: no cells, no cycle, cheap to make for run-once code.)"""

        def cold(
            b: Any = b, fns: tuple = b.fns, eip: int = b.eip, fm: dict = fm, cpu: Cpu = self
        ) -> int:
            f = b.fn
            if f is not None:  # compiled meanwhile, through another map
                return f()
            b.hits += 1
            if b.hits >= cpu.hot_block and cpu.compile_blocks:
                cpu.decoder.compile(b)
                # An entry at eip in fm is this block's (entries go with their block).
                if b.fn is not None and eip in fm:
                    fm[eip] = b.fn
            n = 0
            try:
                for fn in fns:
                    fn()
                    n += 1
            except (CpuFault, CpuHalt):
                cpu.done_before_raise += n
                raise
            return n

        return cold

    def run(self, max_insns: int, should_stop: Callable[[], bool] | None = None) -> int:
        """Execute up to about `max_insns` instructions; returns how many ran.

        Stops early on HLT (self.halted), when `should_stop()` is true at a block
        boundary, or on CpuStop raised by an I/O handler. Interrupts are taken at block
        boundaries through `irq_check` when EFLAGS.IF is set.
        """
        if self.halted and not (self.intr and self.fl & IF):
            return 0  # asleep in HLT until an interrupt can be taken
        done = 0
        # Faults count against max_insns too: a compiled or native block that faults
        # reports none of the instructions it ran before the fault to `done`, so a guest
        # looping through faults (handler -> block -> fault) would keep run() from ever
        # returning (found by the native tier's fuzz; test_native_fuzz).
        faults = 0
        translate = self.translate_blocks and not self.debug_on
        blocks = self.blocks
        decoder = self.decoder
        irq_check = self.irq_check
        sbase = self.sbase
        code_lin = self.code_lin
        fast_phys = self.fast_phys
        stash_pages = self.stash_pages
        try:
            while done + faults < max_insns:
                # Bounds a native entry (native/), faults included: with only `done`
                # the last entry could outrun the loop, fill the TLB for its next
                # instruction (A/D bits) and stop before running it (fuzz seed 51752).
                self.run_left = max_insns - done - faults
                f = None
                if translate and not (
                    self.inhibit_irq
                    or self.fl & TF
                    or (self.intr and (self.fl & IF or self.dma_writes))
                ):
                    # Fast path: a block for this EIP in this mode (compiled, native or
                    # the closures of a cold one). A request while IF is clear waits:
                    # the boundary would take nothing either.
                    f = self.fast_cur.get(self.eip)
                n = 0
                if f is None:
                    shadow = self._block_boundary(irq_check)
                    if self.halted:
                        break
                try:
                    if f is not None:
                        done += f()
                    elif (tf := self.fl & TF) or shadow:
                        # Single-step, or the one instruction of an STI/MOV SS shadow: run it
                        # alone so that an interrupt is taken right after it, not a block later.
                        if_before = self.fl & IF
                        self._one_instruction()
                        done += 1
                        # The #DB trap after the instruction, unless it was MOV/POP SS: their
                        # shadow holds debug traps too (STI's, the one that set IF, does not).
                        if tf and not (self.inhibit_irq and (if_before or not self.fl & IF)):
                            self.dr[6] |= 0x4000  # BS
                            self.exception(DB, None)
                    elif translate:
                        eip = self.eip
                        csk = self.cs_key
                        lin = (sbase[1] + eip) & M32
                        code_lin.add(lin >> 12)
                        if lin & 0xFFF > 0xFF0:  # an instruction may reach the next page
                            code_lin.add(((lin >> 12) + 1) & 0xFFFFF)
                        p = self.xtlb.get(lin >> 12)
                        pa = (p | (lin & 0xFFF)) if p is not None else self.fill_fetch(lin)
                        if pa >> 12 in stash_pages:  # a TLB flush took this page's entries
                            self._unstash(lin >> 12, pa >> 12)
                        b = blocks.get(pa)
                        if (
                            b is None
                            or b.eip != eip
                            or b.csk != csk
                            or b.mode != self.mode_key & b.mask
                        ):
                            b = decoder.translate_block(pa, eip)
                        f = b.fn
                        if b.cacheable:
                            # Into the EIP map: a compiled block, or the closures of a
                            # cold one (next time without the lookups above).
                            fm = self.fast_cur
                            if f is None:
                                f = self._cold_block(b, fm)
                            if eip not in fm:  # (else made before: interrupt, shadow)
                                at = fast_phys.get(pa >> 12)
                                if at is None:
                                    fast_phys[pa >> 12] = [(fm, eip)]
                                else:
                                    at.append((fm, eip))
                            fm[eip] = f
                            done += f()
                        elif f is not None:
                            done += f()
                        else:  # not cached (it straddles a page): decoded each time
                            b.hits += 1
                            for fn in b.fns:
                                fn()
                                n += 1
                            done += n
                    else:
                        self._one_instruction()
                        done += 1
                except CpuFault as e:
                    done += n + self.done_before_raise
                    self.done_before_raise = 0
                    faults += 1
                    self.exception(e.vector, e.error)
                except CpuHalt:
                    done += n + 1 + self.done_before_raise
                    self.done_before_raise = 0
                    self.halted = True
                    break
                except CpuStop:
                    done += self.done_before_raise
                    self.done_before_raise = 0
                    break
                if self.stop or (should_stop is not None and should_stop()):
                    break
        finally:
            self.icount += done  # also when a guest error ends the run
        return done
