"""Initial CPU states for bare-metal guests loaded at a fixed address.

A real loader (multiboot, bzImage, PVH) builds these from a kernel file; the bare-metal
tests load a flat binary themselves and start the vCPU in the mode the program expects,
the way a VMM sets up a direct-boot entry: real mode, flat 32-bit protected mode, or
64-bit long mode with identity-mapped page tables.
"""

from __future__ import annotations

from boite.accel.cpustate import CpuState, DescriptorTable, Segment
from boite.machine.memory import GuestMemory

GDT_ADDR = 0x1000
PML4_ADDR = 0x10000  # then PDPT at +0x1000, PD at +0x2000
STACK_TOP = 0x80000

CR0_PE, CR0_ET, CR0_PG = 1, 0x10, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

# null, 32-bit code, 32-bit data, 64-bit code (as descriptors in memory)
GDT = [0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF]


def _write_gdt(memory: GuestMemory) -> DescriptorTable:
    for i, desc in enumerate(GDT):
        memory.write_u64(GDT_ADDR + 8 * i, desc)
    return DescriptorTable(GDT_ADDR, 8 * len(GDT) - 1)


def real_mode(entry: int, stack: int = 0x7000) -> CpuState:
    """CS:IP = 0000:entry (entry below 64 KiB), every segment base 0."""
    code = Segment(selector=0, base=0, limit=0xFFFF, type=0xB)
    data = Segment(selector=0, base=0, limit=0xFFFF, type=0x3)
    state = CpuState(rip=entry, cr0=CR0_ET)
    state.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    state.gpr["rsp"] = stack
    return state


def flat32(memory: GuestMemory, entry: int) -> CpuState:
    """Flat 4 GiB code and data segments (selectors 0x08/0x10), paging off."""
    gdt = _write_gdt(memory)
    code = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    data = Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
    state = CpuState(rip=entry, cr0=CR0_PE | CR0_ET, gdt=gdt)
    state.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    state.gpr["rsp"] = STACK_TOP
    return state


def long64(memory: GuestMemory, entry: int) -> CpuState:
    """64-bit mode: the first 1 GiB identity-mapped with 2 MiB pages, 64-bit CS (0x18)."""
    gdt = _write_gdt(memory)
    pdpt, pd = PML4_ADDR + 0x1000, PML4_ADDR + 0x2000
    memory.write_u64(PML4_ADDR, pdpt | 0x3)  # present | writable
    memory.write_u64(pdpt, pd | 0x3)
    for i in range(512):
        memory.write_u64(pd + 8 * i, (i << 21) | 0x83)  # present | writable | 2 MiB page
    code = Segment(selector=0x18, base=0, limit=0xFFFFFFFF, type=0xB, l=1, g=1)
    data = Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
    state = CpuState(
        rip=entry, cr0=CR0_PE | CR0_ET | CR0_PG, cr3=PML4_ADDR, cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA, gdt=gdt,
    )  # fmt: skip
    state.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    state.gpr["rsp"] = STACK_TOP
    return state
