"""The guest state the native tier's machine code works on, as a C structure shared with
Python through ctypes, and the memory the tier owns: the software TLB tables and the
executable code arena.

Inside translated code the guest's EAX, ECX, EDX, EBX, EBP, ESI and EDI live in the
host's registers of the same number, the arithmetic flags in the host's flags (or in
R11, translate.py's _SAVE format, around code that changes the host's); ESP,
EIP and the segment bases stay in this structure (the host's RSP is the host stack).
R15 points at the structure, R14/R13 at the read/write TLB tables; R8-R12 are scratch.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

TLB_ENTRIES = 1 << 20  # one per 4 KiB page of the 32-bit linear space
TLB_BYTES = TLB_ENTRIES * 8


class NativeState(ctypes.Structure):
    _fields_ = [
        ("r", ctypes.c_uint32 * 8),  # EAX ECX EDX EBX ESP EBP ESI EDI
        ("eip", ctypes.c_uint32),
        ("eflags", ctypes.c_uint32),  # the arithmetic flags in, all of them out
        ("reason", ctypes.c_uint32),  # EXIT_*
        ("ndone", ctypes.c_uint32),  # instructions completed in the block that left
        # Instructions the chained blocks may still run; each block that chains on takes
        # its count off, and chaining stops at zero (so does the tier's return to Python).
        ("budget", ctypes.c_int32),
        # EFLAGS but the arithmetic flags (IF, DF, IOPL...): translated PUSHF/POPF/CLI/STI
        # read and change IF here; Python reads it back at the exit.
        ("sysfl", ctypes.c_uint32),
        # Pages a translated INVLPG flushed (inv_ring): Python applies Cpu.tlb_flush to
        # each at the exit (NativeTier.invlpg_ring); zero at each entry.
        ("inv_n", ctypes.c_uint32),
        # Nonzero: leave at the next chain (a pending interrupt, device DMA, a pause).
        # Device threads set it while translated code runs (the call releases the GIL).
        ("intr", ctypes.c_uint32),
        ("irq", ctypes.c_uint32),  # Cpu.intr at the entry: STI/POPF setting IF then leave
        ("ifok", ctypes.c_uint32),  # CLI/STI/POPF may change IF (not PE, or CPL <= IOPL)
        ("dstep", ctypes.c_int64),  # string instructions' step: 1, or -1 with DF set
        ("block", ctypes.c_uint64),  # the host code `enter` jumps to
        # (Each entry writes the fields from r to block in one go, those coming out are
        # r to sysfl: native/__init__.py. The fields below change rarely: sbase is
        # written when the segment bases changed.)
        ("miss_addr", ctypes.c_uint32),  # EXIT_MISS: the linear address
        ("miss_write", ctypes.c_uint32),  # EXIT_MISS: bit 0 a write, bit 1 read first
        ("tmp", ctypes.c_uint32),  # a value held across a second TLB lookup
        ("rep_eip", ctypes.c_uint32),
        ("rep_left", ctypes.c_uint32),
        ("sbase", ctypes.c_uint32 * 6),  # ES CS SS DS FS GS bases
        ("pad2", ctypes.c_uint32),
        # RDTSC: clock_gettime's host address, Cpu.tsc_hz and Cpu.tsc_offset (mod 2^64),
        # so the translated instruction gives what Cpu.rdtsc gives.
        ("clock", ctypes.c_uint64),
        ("tsc_hz", ctypes.c_uint64),
        ("tsc_off", ctypes.c_uint64),
        ("tlb_r", ctypes.c_uint64),  # host address of the read TLB table
        ("tlb_w", ctypes.c_uint64),  # host address of the write TLB table
        ("jtab", ctypes.c_uint64),  # host address of the chain table (see ChainTable)
        ("out", ctypes.c_uint64),  # the shared stub that leaves with EIP = R9D
        ("dispatch", ctypes.c_uint64),  # the shared stub that chains to EIP = R9D
        # NativeTier.cs_changed: the CS selector (PUSH CS); for IRET to the same CS at
        # CPL 0 (Linux's sync_core): whether it may be translated (iret_ok: protected
        # mode, a GDT selector within the limit, the cache a descriptor can give, the
        # GDT page's PDE and PTE accessed; cleared at a CR3 write or a TLB flush), the
        # host addresses in guest RAM of that PDE, PTE and descriptor and the values
        # they must still hold (Python's reload walks the page tables: with these
        # unchanged it reads the same descriptor, sets no A bit, gives the same cache).
        ("cs_sel", ctypes.c_uint32),
        ("iret_ok", ctypes.c_uint32),
        ("iret_pdev", ctypes.c_uint32),
        ("iret_ptev", ctypes.c_uint32),
        ("iret_pde", ctypes.c_uint64),
        ("iret_pte", ctypes.c_uint64),
        ("iret_dhost", ctypes.c_uint64),
        ("iret_desc", ctypes.c_uint64),
        ("tmp2", ctypes.c_uint32),  # a second value held across a TLB lookup
        ("pad3", ctypes.c_uint32),
        # A bit per linear page that holds (or held) a translated block (never cleared):
        # a translated INVLPG of such a page leaves for Python (chains go).
        ("codemap", ctypes.c_uint64),
        ("inv_ring", ctypes.c_uint32 * 64),  # INV_RING
    ]


INV_RING = 64


def off(name: str) -> int:
    return getattr(NativeState, name).offset


OFF_R = off("r")
OFF_ESP = OFF_R + 16
OFF_EIP = off("eip")
OFF_EFLAGS = off("eflags")
OFF_SBASE = off("sbase")
OFF_REASON = off("reason")
OFF_NDONE = off("ndone")
OFF_BUDGET = off("budget")
OFF_INTR = off("intr")
OFF_TMP = off("tmp")
OFF_SYSFL = off("sysfl")
OFF_IFOK = off("ifok")
OFF_INV_N = off("inv_n")
OFF_INV_RING = off("inv_ring")
OFF_CODEMAP = off("codemap")
OFF_CS_SEL = off("cs_sel")
OFF_IRET_OK = off("iret_ok")
OFF_IRET_PDE = off("iret_pde")
OFF_IRET_PTE = off("iret_pte")
OFF_IRET_PDEV = off("iret_pdev")
OFF_IRET_PTEV = off("iret_ptev")
OFF_IRET_DHOST = off("iret_dhost")
OFF_IRET_DESC = off("iret_desc")
OFF_TMP2 = off("tmp2")
OFF_IRQ = off("irq")
OFF_REP_EIP = off("rep_eip")
OFF_REP_LEFT = off("rep_left")
OFF_CLOCK = off("clock")
OFF_TSC_HZ = off("tsc_hz")
OFF_TSC_OFF = off("tsc_off")
OFF_DSTEP = off("dstep")
OFF_BLOCK = off("block")
OFF_JTAB = off("jtab")
OFF_OUT = off("out")
OFF_DISPATCH = off("dispatch")
OFF_MISS_ADDR = off("miss_addr")
OFF_MISS_WRITE = off("miss_write")
OFF_TLB_R = off("tlb_r")
OFF_TLB_W = off("tlb_w")

# Why translated code returned.
EXIT_END = 0  # ran to a branch or the block's end; EIP is the next one (no chain there,
# the budget spent or an interrupt pending)
EXIT_MISS = 1  # a TLB miss (or a page-crossing access) at EIP, before that instruction
EXIT_FALLBACK = 2  # the instruction at EIP is not translated: the Python tiers run it

# The chain table: guest EIP -> host code of its block, for one (mode, CS) key. A
# direct-mapped hash table of CHAIN_SLOTS (tag, host address) pairs; an emptied slot has
# tag 0xFFFFFFFF and the `out` stub as its code, so a hit on it (EIP 0xFFFFFFFF) leaves
# (a never used one is zero: see ChainTable). A hot block evicted by another leaves to
# Python at each chain to it: with 2^16 slots, the kit boot's hot blocks did so 14k
# times of 76k entries (bench/RESULTS.md, 2026-12-07 entry).
CHAIN_BITS = 18  # 4 MiB a table, of which only the pages of used slots cost memory
CHAIN_SLOTS = 1 << CHAIN_BITS
# The slot: x = EIP * CHAIN_MUL, x ^= x >> 16, then the top CHAIN_BITS of x * CHAIN_MUL
# (mod 2^32). (EIP ^ EIP >> 12 put kernel blocks 128 KiB apart with alike low bits into
# one slot: 134k extra exits in the Debian 686 boot. The top bits of EIP * CHAIN_MUL
# alone, Fibonacci hashing, put every block of one function into the slot of a block of
# another function wherever the distance d between them has d * CHAIN_MUL near 0 mod
# 2^32: two functions 0xC575 bytes apart that call each other in the kit boot collided
# at each of their block pairs, 14k exits of 76k. The second round mixes such pairs.)
CHAIN_MUL = 0x9E3779B1


def chain_slot(eip: int) -> int:
    x = (eip * CHAIN_MUL) & 0xFFFFFFFF
    x ^= x >> 16
    return ((x * CHAIN_MUL) & 0xFFFFFFFF) >> (32 - CHAIN_BITS)


def buffer_address(buf) -> int:
    """Host address of a writable buffer (an mmap, a bytearray, a memoryview of one)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class TlbTables:
    """The read and write TLB: per linear page, the host address of the guest RAM page
    it maps, or 0 (a miss). Only `NativeTier` writes them, and only with pages wholly
    inside guest RAM. Anonymous memory: untouched parts cost nothing."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, 2 * TLB_BYTES)
        base = buffer_address(self.mm)
        self.read_addr = base
        self.write_addr = base + TLB_BYTES
        self.read = (ctypes.c_uint64 * TLB_ENTRIES).from_address(base)
        self.write = (ctypes.c_uint64 * TLB_ENTRIES).from_address(base + TLB_BYTES)


_libc: ctypes.CDLL | None = None


def _libc_fn(name: str, restype, *argtypes):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


class CodeArena:
    """Executable memory for translated blocks, never writable and executable in one
    mapping. Where the host allows it, one memory file is mapped twice: read-write (where
    blocks are copied in) and read-execute (where they run), so placing a block is a copy
    and no system call; elsewhere a single mapping is turned read-write for the copy and
    back to read-execute (two mprotect calls a block)."""

    def __init__(self, size: int = 8 << 20) -> None:
        self.size = size
        self.used = 0
        self.dual = False
        try:
            self._map_dual(size)
            self.dual = True
        except (OSError, AttributeError, ValueError):
            self.mm = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.base = buffer_address(self.mm)
            self._mprotect = _libc_fn(
                "mprotect", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
            )

    def _map_dual(self, size: int) -> None:
        fd = os.memfd_create("boite-native-code", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            mapper = _libc_fn("mmap", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)  # fmt: skip
            addr = mapper(None, size, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                self.mm.close()
                raise OSError(ctypes.get_errno(), "an executable mapping is refused")
        finally:
            os.close(fd)
        self.base = addr
        unmap = _libc_fn("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        weakref.finalize(self, unmap, addr, size)  # the memory goes with the arena

    def _protect(self, start: int, end: int, prot: int) -> None:
        lo = start & ~0xFFF
        hi = (end + 0xFFF) & ~0xFFF
        if self._mprotect(self.base + lo, hi - lo, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the native code arena failed")

    def room(self, n: int) -> bool:
        return self.used + n <= self.size

    def place(self, code: bytes) -> int:
        """Copy code in (16-byte aligned); returns its host address."""
        at = (self.used + 15) & ~15
        end = at + len(code)
        if end > self.size:
            raise MemoryError("native code arena full")
        if self.dual:
            self.mm[at:end] = code
        else:
            self._protect(at, end, mmap.PROT_READ | mmap.PROT_WRITE)
            self.mm[at:end] = code
            self._protect(at, end, mmap.PROT_READ | mmap.PROT_EXEC)
        self.used = end
        return self.base + at

    def reset(self, keep: int) -> None:
        """Forget every block placed after the first `keep` bytes (the entry stub)."""
        self.used = keep


class ChainTable:
    """One chain table (see CHAIN_SLOTS): filled from Python when a translated block is
    entered in the table's mode, emptied whenever the Python tiers' per-mode EIP maps
    are (a block or a TLB entry went away), so a hit needs no further check."""

    def __init__(self, out: int) -> None:
        # Anonymous memory: untouched slots cost nothing and read (tag 0, code 0). Tag 0
        # matches only EIP 0, whose slot is made empty here, so no chain reaches code 0.
        self.mm = mmap.mmap(-1, 16 * CHAIN_SLOTS)
        self.slots = (ctypes.c_uint64 * (2 * CHAIN_SLOTS)).from_buffer(self.mm)
        s = chain_slot(0)
        self.slots[2 * s] = 0xFFFFFFFF
        self.slots[2 * s + 1] = out
        self.addr = ctypes.addressof(self.slots)
        self.used: set[int] = set()
        self.out = out

    def add(self, eip: int, host: int) -> None:
        s = chain_slot(eip)
        self.slots[2 * s] = eip
        self.slots[2 * s + 1] = host
        self.used.add(s)

    def clear(self) -> None:
        slots, out = self.slots, self.out
        for s in self.used:
            slots[2 * s] = 0xFFFFFFFF
            slots[2 * s + 1] = out
        self.used.clear()
