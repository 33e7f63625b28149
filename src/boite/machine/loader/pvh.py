"""ELF kernels (an uncompressed Linux `vmlinux`) booted through the PVH entry point.

The kernel names its 32-bit entry in an ELF note (name "Xen", type
XEN_ELFNOTE_PHYS32_ENTRY = 18). The loader puts the PT_LOAD segments at their physical
addresses and hands the kernel an `hvm_start_info` (version 1: command line, modules,
memory map) in EBX; the CPU is in flat 32-bit protected mode with paging off, as the
PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h) specifies.
"""

from __future__ import annotations

import struct

from boite.accel.cpustate import CpuState
from boite.machine.loader.bootstate import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    PVH_INFO_ADDR,
    protected_mode_state,
)
from boite.machine.loader.elf import EM_386, EM_X86_64, ElfImage, parse_elf
from boite.machine.loader.errors import KernelFormatError
from boite.machine.loader.placement import place_high, write_guest, zero_guest
from boite.machine.machine import Machine

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
START_INFO_SIZE = 56
MODLIST_ADDR = PVH_INFO_ADDR + 0x40
MEMMAP_ADDR = PVH_INFO_ADDR + 0x100
MEMMAP_MAX = (0x7000 - MEMMAP_ADDR) // 24
INITRD_ADDR_MAX = 0x37FF_FFFF  # a 32-bit kernel's lowmem limit, safe for both


def pvh_entry(elf: ElfImage) -> int | None:
    for note in elf.notes():
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise KernelFormatError(
                    f"{elf.path}: PVH entry note has {len(note.desc)} bytes; expected 4 or 8"
                )
            return int.from_bytes(note.desc, "little")
    return None


def load_pvh(
    machine: Machine,
    kernel_path: str,
    data: bytes,
    cmdline: str = "",
    initrd: bytes | None = None,
    elf: ElfImage | None = None,
) -> CpuState:
    elf = elf or parse_elf(data, kernel_path)
    if elf.machine not in (EM_386, EM_X86_64):
        raise KernelFormatError(
            f"{kernel_path}: ELF machine {elf.machine}; expected x86 ({EM_386} or {EM_X86_64})"
        )
    entry = pvh_entry(elf)
    if entry is None:
        raise KernelFormatError(
            f"{kernel_path}: ELF kernel without a PVH entry note (Xen note type "
            f"{XEN_ELFNOTE_PHYS32_ENTRY}); build it with CONFIG_PVH=y or boot the bzImage"
        )
    loads = elf.loads()
    if not loads:
        raise KernelFormatError(f"{kernel_path}: ELF has no loadable (PT_LOAD) segments")
    kernel_end = 0
    for p in loads:
        write_guest(machine, p.paddr, elf.segment_bytes(p), "an ELF segment", kernel_path)
        zero_guest(machine, p.paddr + p.filesz, p.memsz - p.filesz, "an ELF bss", kernel_path)
        kernel_end = max(kernel_end, p.paddr + p.memsz)

    raw = cmdline.encode()
    if len(raw) >= CMDLINE_MAX or b"\0" in raw:
        raise KernelFormatError(
            f"{kernel_path}: the kernel command line ({len(raw)} bytes) is too long or has a NUL"
        )
    write_guest(machine, CMDLINE_ADDR, raw + b"\0", "the command line", kernel_path)

    nr_modules = 0
    if initrd is not None:
        addr = place_high(
            machine, len(initrd), above=kernel_end, below=INITRD_ADDR_MAX + 1,
            what="the initrd", path=kernel_path,
        )  # fmt: skip
        write_guest(machine, addr, initrd, "the initrd", kernel_path)
        write_guest(
            machine, MODLIST_ADDR, struct.pack("<QQQQ", addr, len(initrd), 0, 0),
            "the PVH module list", kernel_path,
        )  # fmt: skip
        nr_modules = 1

    e820 = sorted(machine.e820, key=lambda e: e.addr)
    if len(e820) > MEMMAP_MAX:
        raise KernelFormatError(
            f"{kernel_path}: {len(e820)} memory map entries; at most {MEMMAP_MAX}"
        )
    memmap = b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in e820)
    write_guest(machine, MEMMAP_ADDR, memmap, "the PVH memory map", kernel_path)
    info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,  # version
        0,  # flags
        nr_modules,
        MODLIST_ADDR if nr_modules else 0,
        CMDLINE_ADDR,
        0,  # rsdp_paddr: no ACPI
        MEMMAP_ADDR,
        len(e820),
        0,
    )
    write_guest(machine, PVH_INFO_ADDR, info, "hvm_start_info", kernel_path)
    return protected_mode_state(machine.memory, entry, rbx=PVH_INFO_ADDR)
