"""The native tier: hot guest blocks become x86-64 host code (x86-64 Linux hosts only).

`NativeTier.translate(block)` is asked by the decoder when a block is hot (where it would
otherwise compile it with jit.py); the callable it returns has the compiled block's
contract: it runs the block, leaves the CPU state exact, returns the instructions it
ran, and raises CpuFault with EIP at the faulting instruction. So the block cache, the
per-mode EIP maps, code-page invalidation and interrupt polling of `Cpu.run` cover it
as they cover jit.py's functions.

The software TLB (`state.TlbTables`) mirrors the Python TLB pair of the current
privilege: an entry is set only from `Cpu.rtlb`/`wtlb` after a miss, and dropped with
them (`Cpu.tlb_flush`, a switch of pair, a page becoming code: `drop_write`), so a
write to a code page always misses and goes through `phys_write`, which throws away
the translations of that page.

Selection: `native_available()` says whether this host can run it; `BOITE_EMU_NATIVE`
("0" off, "1" on) and the .vmx key `emu.native` choose (see accel.py).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from boite.accel.emu.arch import ARITH, OP_NONE, SEGCHK, STACK16
from boite.accel.emu.native.state import (
    EXIT_MISS,
    CodeArena,
    NativeState,
    TlbTables,
    buffer_address,
)
from boite.accel.emu.native.translate import entry_stub, translate_block

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

LOOP_BUDGET = 1024  # passes of a self-looping block per call (interrupt latency)
_REGS = struct.Struct("<8I")
_SBASE = struct.Struct("<6I")


def native_available() -> bool:
    """x86-64 Linux with executable anonymous memory."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        CodeArena(4096)
    except (OSError, ValueError):
        return False
    return True


class NativeTier:
    """Translated blocks of one Cpu, its TLB tables and its code arena."""

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu
        self.st = NativeState()
        self.st_addr = ctypes.addressof(self.st)
        self.stbuf = (ctypes.c_char * ctypes.sizeof(NativeState)).from_address(self.st_addr)
        self.tlb = TlbTables()
        self.st.tlb_r = self.tlb.read_addr
        self.st.tlb_w = self.tlb.write_addr
        self.ram_addr = buffer_address(cpu.ram)
        self.arena = CodeArena()
        entry = self.arena.place(entry_stub())
        self.arena_keep = self.arena.used
        self.entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(entry)
        self.filled_r: set[int] = set()
        self.filled_w: dict[int, set[int]] = {}  # physical page -> linear pages
        self.bound: dict[int, int] | None = None  # the Python read TLB mirrored
        self.blocks = 0  # translated so far
        self.insns = 0

    # -- TLB mirror ----------------------------------------------------------------------
    def tlb_flush(self, page: int | None = None) -> None:
        if page is None:
            for p in self.filled_r:
                self.tlb.read[p] = 0
            self.filled_r.clear()
            for lins in self.filled_w.values():
                for p in lins:
                    self.tlb.write[p] = 0
            self.filled_w.clear()
            return
        if page in self.filled_r:
            self.filled_r.discard(page)
            self.tlb.read[page] = 0
        if self.tlb.write[page]:
            self.tlb.write[page] = 0
            for lins in self.filled_w.values():
                lins.discard(page)

    def drop_write(self, ppage: int) -> None:
        """Physical page ppage now holds translated code: no write reaches it directly."""
        for p in self.filled_w.pop(ppage, ()):
            self.tlb.write[p] = 0

    def _bind(self) -> None:
        cpu = self.cpu
        if self.bound is not cpu.rtlb:
            self.tlb_flush()
            self.bound = cpu.rtlb

    def _mirror(self, page: int, write: bool) -> bool:
        """Copy the Python TLB's entry for linear page into the table; False if none."""
        cpu = self.cpu
        pp = (cpu.wtlb if write else cpu.rtlb).get(page)
        if pp is None or pp & 0xFFF or pp + 0x1000 > cpu.ram_size:
            return False  # only whole pages of guest RAM enter the table
        if write:
            if (pp >> 12) in cpu.code_pages:
                return False
            self.tlb.write[page] = self.ram_addr + pp
            self.filled_w.setdefault(pp >> 12, set()).add(page)
        else:
            self.tlb.read[page] = self.ram_addr + pp
            self.filled_r.add(page)
        return True

    # -- translation ----------------------------------------------------------------------
    def translate(self, pa: int, eip: int) -> Callable[[], int] | None:
        """A callable running the block at eip (physical pa), or None where the tier does
        not apply (mode, first instruction not translated)."""
        cpu = self.cpu
        if not cpu.cs32 or cpu.mode_key & (SEGCHK | STACK16) or cpu.debug_on:
            return None
        left = 0x1000 - (pa & 0xFFF)
        if pa + left > cpu.ram_size:
            return None
        out = translate_block(lambda n: bytes(cpu.ram[pa : pa + n]), eip, left)
        if out is None:
            return None
        code, _ = out
        if not self.arena.room(len(code) + 16):
            cpu.flush_blocks()  # every translation goes; the arena starts over
            self.arena.reset(self.arena_keep)
        addr = self.arena.place(code)
        self.blocks += 1
        return self._runner(addr)

    def _runner(self, addr: int) -> Callable[[], int]:
        tier = self
        cpu = self.cpu
        st = self.st
        stbuf = self.stbuf
        st_addr = self.st_addr
        entry = self.entry
        regs_in, regs_out = _REGS.pack_into, _REGS.unpack_from
        sbase_in = _SBASE.pack_into

        def run_native() -> int:
            if tier.bound is not cpu.rtlb:
                tier._bind()
            regs_in(stbuf, 0, *cpu.r)
            fl = cpu.get_flags()
            st.eflags = fl
            sbase_in(stbuf, 40, *cpu.sbase)
            st.loops = 0
            st.budget = LOOP_BUDGET
            entry(st_addr, addr)
            cpu.r[:] = regs_out(stbuf, 0)
            cpu.fl = (fl & ~ARITH) | (st.eflags & ARITH) | 2
            cpu.lop = OP_NONE
            cpu.eip = st.eip
            n = st.loops + st.ndone
            tier.insns += n
            if st.reason == EXIT_MISS:
                return n + tier._miss(n)
            if n == 0:
                return tier._one()
            return n

        return run_native

    def _miss(self, done: int) -> int:
        """After a miss: fill the entry from the Python TLB (a #PF raises here, with the
        state of the faulting instruction), or run that instruction in Python (MMIO, a
        code page, an access across pages). Returns the instructions it ran."""
        cpu = self.cpu
        lin, kind = self.st.miss_addr, self.st.miss_write
        write = bool(kind & 1)
        page = lin >> 12
        table = self.tlb.write if write else self.tlb.read
        if not table[page]:
            try:
                if kind & 2:  # read-modify-write: the read faults first
                    cpu._fill(lin, False)
                cpu._fill(lin, write)
            except BaseException:
                cpu.icount += done  # what ran before the fault
                raise
            if self._mirror(page, write):
                return 0  # the next call goes on from this instruction
        try:
            return self._one()
        except BaseException:
            cpu.icount += done
            raise

    def _one(self) -> int:
        fn, _ = self.cpu.decoder.decode_one(self.cpu.eip)
        fn()
        return 1


def native_wanted(config_value: str | None = None) -> bool:
    """Whether to use the native tier: BOITE_EMU_NATIVE ("0"/"1") wins over the .vmx
    key emu.native; the default is off (see docs/architecture.md)."""
    env = os.environ.get("BOITE_EMU_NATIVE")
    if env is not None:
        return env == "1"
    if config_value is not None:
        return config_value.strip().lower() in ("true", "1", "yes")
    return False
