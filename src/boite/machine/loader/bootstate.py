"""The initial CPU state the loaders hand to an accelerator, and the tables it points at.

Low-memory layout used by the loaders (all below the EBDA at 0x9fc00):

  0x0500  boot GDT: 0 null, 0x08 null, 0x10 code, 0x18 data, 0x20 TSS (Linux's __BOOT_CS
          and __BOOT_DS selectors, used by every protocol for one consistent state)
  0x6000  PVH hvm_start_info, its module list (0x6040) and memory map (0x6100)
  0x7000  Linux boot_params (the "zero page"); multiboot memory map (as QEMU's option ROM)
  0x9000  64-bit identity page tables: PML4, PDPT at 0xa000, four PDs at 0xb000-0xefff
          (2 MiB pages, the first 4 GiB); the multiboot info structure (as QEMU)
  0x20000 kernel command line
"""

from __future__ import annotations

from boite.accel.cpustate import CpuState, DescriptorTable, Segment
from boite.machine.memory import GuestMemory

GDT_ADDR = 0x0500
TSS_ADDR = 0  # PVH asks for a TSS with base 0 and limit 0x67; nothing uses it
PVH_INFO_ADDR = 0x6000
ZERO_PAGE_ADDR = 0x7000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TR = 0x20

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

FLAT_LIMIT = 0xFFFF_FFFF
TSS_LIMIT = 0x67


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor; `limit` in units of the G flag's granularity."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


CODE32 = _descriptor(0, 0xFFFFF, 0x9B, 0xC)  # present, ring 0, exec/read, accessed; G, D
CODE64 = _descriptor(0, 0xFFFFF, 0x9B, 0xA)  # G, L
DATA = _descriptor(0, 0xFFFFF, 0x93, 0xC)  # present, ring 0, read/write, accessed; G, B
TSS_BUSY = _descriptor(TSS_ADDR, TSS_LIMIT, 0x8B, 0x0)  # busy 32/64-bit TSS


def write_gdt(mem: GuestMemory, long_mode: bool) -> DescriptorTable:
    entries = [0, 0, CODE64 if long_mode else CODE32, DATA, TSS_BUSY]
    if long_mode:
        entries.append(0)  # a 64-bit TSS descriptor is 16 bytes: upper base bits are 0
    table = b"".join(e.to_bytes(8, "little") for e in entries)
    mem.write(GDT_ADDR, table)
    return DescriptorTable(base=GDT_ADDR, limit=len(table) - 1)


def _code(long_mode: bool) -> Segment:
    return Segment(
        selector=BOOT_CS, base=0, limit=FLAT_LIMIT, type=0xB, present=1, dpl=0,
        db=0 if long_mode else 1, s=1, l=1 if long_mode else 0, g=1,
    )  # fmt: skip


def _data() -> Segment:
    return Segment(
        selector=BOOT_DS, base=0, limit=FLAT_LIMIT, type=0x3, present=1, dpl=0, db=1, s=1, g=1
    )


def _tr() -> Segment:
    return Segment(selector=BOOT_TR, base=TSS_ADDR, limit=TSS_LIMIT, type=0xB, present=1, s=0)


def _ldt() -> Segment:
    return Segment(selector=0, base=0, limit=0xFFFF, type=0x2, present=0, s=0, unusable=1)


def protected_mode_state(mem: GuestMemory, entry: int, **gprs: int) -> CpuState:
    """Flat 32-bit protected mode, paging off, interrupts off (multiboot, Linux 32-bit
    boot protocol, PVH)."""
    state = CpuState()
    state.gdt = write_gdt(mem, long_mode=False)
    state.idt = DescriptorTable(base=0, limit=0)
    state.segments = {
        "cs": _code(False), "ds": _data(), "es": _data(), "fs": _data(), "gs": _data(),
        "ss": _data(), "tr": _tr(), "ldt": _ldt(),
    }  # fmt: skip
    state.cr0 = CR0_PE | CR0_ET
    state.cr3 = state.cr4 = state.efer = 0
    state.rflags = 0x2
    state.rip = entry
    for name, value in gprs.items():
        state.gpr[name] = value & 0xFFFF_FFFF_FFFF_FFFF
    return state


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; returns CR3."""
    mem.write(PML4_ADDR, (PDPT_ADDR | 0x3).to_bytes(8, "little") + bytes(4096 - 8))
    pdpt = bytearray(4096)
    for i in range(4):
        pdpt[i * 8 : i * 8 + 8] = (PD_ADDR + i * 0x1000 | 0x3).to_bytes(8, "little")
    mem.write(PDPT_ADDR, pdpt)
    pd = bytearray(4 * 4096)
    for i in range(4 * 512):
        pd[i * 8 : i * 8 + 8] = ((i << 21) | 0x83).to_bytes(8, "little")  # P, RW, PS
    mem.write(PD_ADDR, pd)
    return PML4_ADDR


def long_mode_state(mem: GuestMemory, entry: int, **gprs: int) -> CpuState:
    """64-bit long mode with the loader's identity page tables, interrupts off."""
    state = protected_mode_state(mem, entry, **gprs)
    state.gdt = write_gdt(mem, long_mode=True)
    state.segments["cs"] = _code(True)
    state.cr3 = write_identity_page_tables(mem)
    state.cr4 = CR4_PAE
    state.cr0 = CR0_PE | CR0_ET | CR0_PG
    state.efer = EFER_LME | EFER_LMA
    return state
