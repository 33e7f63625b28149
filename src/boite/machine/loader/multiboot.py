"""Multiboot (version 1) kernels, loaded as QEMU's `-kernel` does.

The header is searched in the first 8192 bytes on a 4-byte boundary. With flag 16 (the
"a.out kludge") the header's address fields say where the file goes and the image is
loaded flat; otherwise the file must be a 32-bit ELF and its PT_LOAD segments go to their
physical addresses. As in QEMU, the module list, the command lines and the boot loader
name follow the kernel image (page-aligned), then the modules, each page-aligned; the
information structure is at 0x9000 and the memory map at 0x7000. The kernel's command
line is QEMU's "KERNEL-PATH CMDLINE" and a module's is its own path (plus arguments).

Entry: EAX=0x2BADB002, EBX=info, flat 32-bit protected mode, paging and interrupts off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from boite.accel.cpustate import CpuState
from boite.box.paths import FileKindError, read_regular
from boite.machine.loader.bootstate import GDT_ADDR, protected_mode_state
from boite.machine.loader.elf import ELFCLASS32, EM_386, EM_X86_64, is_elf, parse_elf
from boite.machine.loader.errors import KernelFormatError
from boite.machine.loader.placement import PAGE, ram_ranges, write_guest, zero_guest
from boite.machine.machine import Machine

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192

HDR_ALIGN_MODULES = 1 << 0
HDR_MEMORY_INFO = 1 << 1
HDR_VIDEO_MODE = 1 << 2
HDR_AOUT_KLUDGE = 1 << 16

INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOTLOADER = 1 << 9

MBI_ADDR = 0x9000
MMAP_ADDR = 0x7000
MBI_SIZE = 0x58
MOD_ENTRY_SIZE = 16
BOOT_LOADER_NAME = "boite"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class MultibootModule:
    path: str
    cmdline: str  # QEMU passes the module's whole -initrd item ("path args")


def find_header(data: bytes) -> MultibootHeader | None:
    limit = min(len(data), SEARCH_LIMIT)
    for off in range(0, limit - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            if flags & HDR_AOUT_KLUDGE:
                if off + 32 > len(data):
                    raise KernelFormatError(
                        f"multiboot header at offset {off:#x} is cut off by the end of the file"
                    )
                fields = struct.unpack_from("<IIIII", data, off + 12)
                return MultibootHeader(off, flags, *fields)
            return MultibootHeader(off, flags)
    return None


def _image_aout(data: bytes, hdr: MultibootHeader, path: str) -> tuple[int, bytes, int, int]:
    """(load address, image bytes incl. zeroed bss, entry, bss size) for the a.out kludge."""
    if hdr.header_addr < hdr.load_addr:
        raise KernelFormatError(
            f"{path}: multiboot header_addr {hdr.header_addr:#x} is below load_addr "
            f"{hdr.load_addr:#x} (header at offset {hdr.offset:#x})"
        )
    if hdr.header_addr - hdr.load_addr > hdr.offset:
        raise KernelFormatError(
            f"{path}: multiboot header_addr {hdr.header_addr:#x} - load_addr "
            f"{hdr.load_addr:#x} exceeds the header's file offset {hdr.offset:#x}"
        )
    text_offset = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise KernelFormatError(
                f"{path}: multiboot load_end_addr {hdr.load_end_addr:#x} is below load_addr "
                f"{hdr.load_addr:#x}"
            )
        load_size = hdr.load_end_addr - hdr.load_addr
    else:
        load_size = len(data) - text_offset
    if text_offset + load_size > len(data):
        raise KernelFormatError(
            f"{path}: multiboot load_end_addr asks for {load_size} bytes from file offset "
            f"{text_offset:#x}; the file has {len(data)} bytes"
        )
    if load_size > 0xFFFF_FFFF - hdr.load_addr:
        raise KernelFormatError(f"{path}: multiboot kernel does not fit the 32-bit address space")
    if hdr.bss_end_addr:
        if hdr.bss_end_addr < hdr.load_addr + load_size:
            raise KernelFormatError(
                f"{path}: multiboot bss_end_addr {hdr.bss_end_addr:#x} is below the end of the "
                f"loaded image {hdr.load_addr + load_size:#x}"
            )
        kernel_size = hdr.bss_end_addr - hdr.load_addr
    else:
        kernel_size = load_size
    image = data[text_offset : text_offset + load_size]
    return hdr.load_addr, image, hdr.entry_addr, kernel_size - load_size


def _image_elf(data: bytes, path: str) -> tuple[int, bytes, int, int]:
    if not is_elf(data):
        raise KernelFormatError(
            f"{path}: multiboot header without the a.out kludge (flag 16) but the file is not "
            f"ELF (found {data[:4]!r} at offset 0)"
        )
    elf = parse_elf(data, path)
    if elf.machine == EM_X86_64 or elf.elfclass != ELFCLASS32:
        raise KernelFormatError(
            f"{path}: multiboot ELF kernel is {elf.bits}-bit (machine {elf.machine}); "
            f"multiboot needs a 32-bit i386 ELF"
        )
    if elf.machine != EM_386:
        raise KernelFormatError(f"{path}: ELF machine {elf.machine}; expected i386 ({EM_386})")
    loads = elf.loads()
    if not loads:
        raise KernelFormatError(f"{path}: ELF has no loadable (PT_LOAD) segments")
    low = min(p.paddr for p in loads)
    high = max(p.paddr + p.memsz for p in loads)
    if high > 1 << 32:
        raise KernelFormatError(f"{path}: ELF segments end at {high:#x}, above 4 GiB")
    image = bytearray(high - low)
    for p in loads:
        image[p.paddr - low : p.paddr - low + p.filesz] = elf.segment_bytes(p)
    return low, bytes(image), elf.entry, 0


def _align(v: int) -> int:
    return (v + PAGE - 1) & ~(PAGE - 1)


def load_multiboot(
    machine: Machine,
    kernel_path: str,
    data: bytes,
    cmdline: str = "",
    modules: list[MultibootModule] | None = None,
    header: MultibootHeader | None = None,
) -> CpuState:
    hdr = header or find_header(data)
    if hdr is None:
        raise KernelFormatError(
            f"{kernel_path}: no multiboot header (magic {MULTIBOOT_MAGIC:#x} with a valid "
            f"checksum) in the first {SEARCH_LIMIT} bytes"
        )
    if hdr.flags & HDR_AOUT_KLUDGE:
        load_addr, image, entry, bss = _image_aout(data, hdr, kernel_path)
    else:
        load_addr, image, entry, bss = _image_elf(data, kernel_path)
    kernel_end = load_addr + len(image) + bss
    for lo, hi, what in (
        (GDT_ADDR, GDT_ADDR + 0x30, "boot GDT"),
        (MMAP_ADDR, MMAP_ADDR + 20 * len(machine.e820), "memory map"),
        (MBI_ADDR, MBI_ADDR + MBI_SIZE, "multiboot information"),
    ):
        if load_addr < hi and lo < kernel_end:
            raise KernelFormatError(
                f"{kernel_path}: multiboot kernel at {load_addr:#x}-{kernel_end:#x} overlaps "
                f"the loader's {what} at {lo:#x}-{hi:#x}; link it at 1 MiB or above"
            )
    write_guest(machine, load_addr, image, "the multiboot kernel", kernel_path)
    zero_guest(machine, load_addr + len(image), bss, "the multiboot kernel's bss", kernel_path)
    kernel_size = len(image) + bss

    mods = modules or []
    mod_payloads = []
    for m in mods:
        try:  # a regular file no larger than guest RAM (a FIFO or /dev/zero never hangs)
            mod_payloads.append(read_regular(m.path, machine.memory.size, what="multiboot module"))
        except FileKindError as e:
            raise KernelFormatError(str(e)) from None
        except OSError as e:
            raise KernelFormatError(f"{m.path}: cannot read multiboot module: {e.strerror}") from e
    kcmdline = f"{kernel_path} {cmdline}".encode() + b"\0"
    mod_cmdlines = [m.cmdline.encode() + b"\0" for m in mods]
    loader_name = BOOT_LOADER_NAME.encode() + b"\0"

    # QEMU's layout after the kernel: module list, command lines, loader name, modules.
    off_mbinfo = _align(kernel_size)
    off_cmdlines = off_mbinfo + len(mods) * MOD_ENTRY_SIZE
    strings = b"".join(mod_cmdlines) + kcmdline
    off_loader = off_cmdlines + len(strings)
    off_mods = _align(off_loader + len(loader_name))
    base = load_addr
    mod_list = bytearray()
    pos = off_mods
    cmd_pos = off_cmdlines
    for payload, mcmd in zip(mod_payloads, mod_cmdlines, strict=True):
        start = base + pos
        write_guest(machine, start, payload, "a multiboot module", kernel_path)
        mod_list += struct.pack("<IIII", start, start + len(payload), base + cmd_pos, 0)
        cmd_pos += len(mcmd)
        pos = _align(pos + len(payload))
    write_guest(machine, base + off_mbinfo, bytes(mod_list), "the module list", kernel_path)
    write_guest(machine, base + off_cmdlines, strings, "the command lines", kernel_path)
    write_guest(machine, base + off_loader, loader_name, "the boot loader name", kernel_path)
    kernel_cmdline_addr = base + off_cmdlines + sum(len(c) for c in mod_cmdlines)

    # Memory map (entries as "size, base, length, type") and the sizes derived from it.
    mmap = bytearray()
    for e in sorted(machine.e820, key=lambda e: e.addr):
        mmap += struct.pack("<IQQI", 20, e.addr, e.size, e.type)
    write_guest(machine, MMAP_ADDR, bytes(mmap), "the multiboot memory map", kernel_path)
    mem_lower = mem_upper = 0
    for start, end in ram_ranges(machine):
        if start == 0:
            mem_lower = min(end, 0xA0000) // 1024
        if start <= 0x100000 < end:
            mem_upper = (end - 0x100000) // 1024

    info = bytearray(MBI_SIZE)
    struct.pack_into(
        "<IIIIIII",
        info,
        0,
        INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODULES | INFO_MMAP | INFO_BOOTLOADER,
        mem_lower,
        mem_upper,
        0x8000FFFF,  # boot device: first hard disk, no partition (as QEMU)
        kernel_cmdline_addr,
        len(mods),
        base + off_mbinfo,
    )
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", info, 64, base + off_loader)
    write_guest(machine, MBI_ADDR, bytes(info), "the multiboot information", kernel_path)

    return protected_mode_state(machine.memory, entry, rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=MBI_ADDR)
