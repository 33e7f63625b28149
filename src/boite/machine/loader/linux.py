"""Linux bzImage direct boot through the x86 boot protocol (Documentation/arch/x86/boot.rst),
version 2.06 or later, with the 32-bit or the 64-bit entry point.

The protected-mode kernel goes to 1 MiB (code32_start), the zero page (boot_params) with
the setup header, e820 map, command line and initrd to the addresses in `bootstate`; the
initrd goes as high as it fits below `initrd_addr_max` and the top of low RAM.
"""

from __future__ import annotations

import lzma
import os
import stat
import struct
import zlib
from dataclasses import dataclass

from boite.accel.cpustate import CpuState
from boite.machine.loader.bootstate import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    ZERO_PAGE_ADDR,
    long_mode_state,
    protected_mode_state,
)
from boite.machine.loader.elf import EM_386, parse_elf
from boite.machine.loader.errors import KernelFormatError
from boite.machine.loader.placement import place_high, write_guest, zero_guest
from boite.machine.machine import Machine

HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_VERSION = 0x0206
KERNEL_LOAD_ADDR = 0x100000

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

TYPE_OF_LOADER_UNDEFINED = 0xFF
E820_MAX_ENTRIES = 128
# boot_params offsets
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that a loader needs."""

    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    xloadflags: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * 512

    @property
    def supports_64bit_entry(self) -> bool:
        return self.version >= 0x020C and bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    return (
        len(data) >= 0x210
        and data[0x202:0x206] == HDRS_MAGIC
        and struct.unpack_from("<H", data, 0x1FE)[0] == BOOT_FLAG
    )


def parse_setup_header(data: bytes, path: str, whole: bool = True) -> SetupHeader:
    """The setup header of a bzImage; with `whole` (the default) `data` is the whole
    file and its size is checked against the header's."""
    if len(data) < 0x210:
        raise KernelFormatError(
            f"{path}: {len(data)} bytes is too short for a Linux kernel (setup header ends "
            f"past 0x210)"
        )
    flag = struct.unpack_from("<H", data, 0x1FE)[0]
    if data[0x202:0x206] != HDRS_MAGIC or flag != BOOT_FLAG:
        raise KernelFormatError(
            f"{path}: not a Linux bzImage: expected boot flag 0xaa55 at offset 0x1fe and "
            f"'HdrS' at 0x202, found {flag:#06x} and {data[0x202:0x206]!r}"
        )
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_VERSION:
        raise KernelFormatError(
            f"{path}: Linux boot protocol {version >> 8}.{version & 0xFF:02d} at offset 0x206 is "
            f"too old; boite needs 2.06 or later"
        )
    if len(data) < 0x268:
        raise KernelFormatError(f"{path}: setup header truncated ({len(data)} bytes)")
    setup_sects = data[0x1F1] or 4
    loadflags = data[0x211]
    hdr = SetupHeader(
        version=version,
        setup_sects=setup_sects,
        syssize=struct.unpack_from("<I", data, 0x1F4)[0],
        loadflags=loadflags,
        code32_start=struct.unpack_from("<I", data, 0x214)[0],
        initrd_addr_max=struct.unpack_from("<I", data, 0x22C)[0],
        kernel_alignment=struct.unpack_from("<I", data, 0x230)[0],
        relocatable=bool(data[0x234]),
        cmdline_size=struct.unpack_from("<I", data, 0x238)[0],
        xloadflags=struct.unpack_from("<H", data, 0x236)[0] if version >= 0x020C else 0,
        payload_offset=struct.unpack_from("<I", data, 0x248)[0] if version >= 0x0208 else 0,
        payload_length=struct.unpack_from("<I", data, 0x24C)[0] if version >= 0x0208 else 0,
        pref_address=struct.unpack_from("<Q", data, 0x258)[0] if version >= 0x020A else 0,
        init_size=struct.unpack_from("<I", data, 0x260)[0] if version >= 0x020A else 0,
    )
    if not loadflags & LOADED_HIGH:
        raise KernelFormatError(
            f"{path}: a zImage (loadflags {loadflags:#04x} at 0x211 without LOADED_HIGH); "
            f"only bzImage kernels are supported"
        )
    if not whole:
        return hdr
    if hdr.setup_size >= len(data):
        raise KernelFormatError(
            f"{path}: setup code of {hdr.setup_sects} sectors (offset 0x1f1) leaves no kernel in "
            f"a {len(data)}-byte file"
        )
    pm_size = len(data) - hdr.setup_size
    if hdr.syssize * 16 > pm_size:
        raise KernelFormatError(
            f"{path}: truncated: the setup header's syssize says {hdr.syssize * 16} bytes of "
            f"protected-mode kernel, the file has {pm_size}"
        )
    return hdr


def extract_payload(data: bytes, path: str, limit: int = 1 << 30) -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage (protocol 2.08+): gzip, xz or lzma,
    at most `limit` bytes of it (a kernel file is input: no decompression bomb)."""
    hdr = parse_setup_header(data, path)
    if not hdr.payload_length:
        raise KernelFormatError(f"{path}: boot protocol {hdr.version_str} has no payload fields")
    start = hdr.setup_size + hdr.payload_offset
    blob = data[start : start + hdr.payload_length]
    if len(blob) != hdr.payload_length:
        raise KernelFormatError(
            f"{path}: payload at {start:#x}+{hdr.payload_length:#x} runs past the end of the file"
        )
    try:
        if blob[:2] == b"\x1f\x8b":
            z = zlib.decompressobj(wbits=31)
            out = z.decompress(blob, limit + 1)
        elif blob[:6] == b"\xfd7zXZ\x00":
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob, limit + 1)
        elif blob[:3] == b"\x5d\x00\x00":
            out = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob, limit + 1)
        else:
            raise KernelFormatError(
                f"{path}: payload compression with magic {blob[:4].hex()} is not gzip, xz or lzma"
            )
    except (zlib.error, lzma.LZMAError) as e:
        raise KernelFormatError(f"{path}: payload at {start:#x} does not decompress: {e}") from e
    if len(out) > limit:
        raise KernelFormatError(
            f"{path}: payload decompresses to more than {limit} bytes (the kernel's own bound)"
        )
    return out


# `boite.kernelUnpack` / `boite boot --kernel-unpack`: when boite unpacks a bzImage itself.
UNPACK_SETTINGS = ("auto", "true", "false")
_PAYLOAD_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"))


@dataclass(frozen=True)
class UnpackChoice:
    """Whether boite unpacks this kernel on the host, and why (for vmware.log and -v)."""

    unpack: bool
    reason: str


def choose_unpack(path: str, setting: str, emulator: bool) -> UnpackChoice:
    """Decide for `setting` ("auto", "true", "false"): "auto" unpacks when the emulator
    runs the guest and the kernel is a 32-bit bzImage with a gzip, xz or lzma payload
    (where its own decompressor would take minutes of emulated time; under KVM it takes
    milliseconds); "true" unpacks such a kernel whatever the accelerator and refuses any
    other; "false" never unpacks. Reads only the setup header and the payload's magic."""
    if setting not in UNPACK_SETTINGS:
        raise ValueError(f"kernel unpack setting {setting!r}: expected one of {UNPACK_SETTINGS}")
    if setting == "false":
        return UnpackChoice(False, "kernel unpacking is off")
    problem, compression = _unpackable(path)
    if problem is not None:
        if setting == "true":
            raise KernelFormatError(f"{path}: cannot unpack this kernel on the host: {problem}")
        return UnpackChoice(False, f"not unpacked: {problem}")
    if setting == "auto" and not emulator:
        return UnpackChoice(False, "not unpacked: hardware virtualization decompresses it fast")
    return UnpackChoice(
        True, f"unpacked on the host ({compression} payload), entered at startup_32"
    )


def _unpackable(path: str) -> tuple[str | None, str]:
    """(why this file cannot be unpacked or None, the payload's compression)."""
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return "not a regular file", ""
            head = fh.read(0x268)
            if not is_bzimage(head):
                return "not a Linux bzImage", ""
            try:
                hdr = parse_setup_header(head + b"\0" * (0x268 - len(head)), path, whole=False)
            except KernelFormatError as e:
                return str(e), ""
            if hdr.supports_64bit_entry:
                return "a 64-bit kernel (unpacking enters 32-bit kernels)", ""
            if not hdr.payload_length:
                return f"boot protocol {hdr.version_str} has no payload fields", ""
            fh.seek(hdr.setup_size + hdr.payload_offset)
            blob = fh.read(min(hdr.payload_length, 1 << 20))
    except OSError as e:
        return f"cannot read it: {e.strerror}", ""
    name = next((n for prefix, n in _PAYLOAD_MAGIC if blob.startswith(prefix)), None)
    if name is None:
        return f"payload compression {blob[:4].hex()} is not gzip, xz or lzma", ""
    # The header can say "no 64-bit entry" of a 64-bit kernel: look at the ELF itself
    # (its first bytes; the payload's first megabyte holds far more than that).
    try:
        if name == "gzip":
            head = zlib.decompressobj(wbits=31).decompress(blob, 20)
        else:
            fmt = lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE
            head = lzma.LZMADecompressor(fmt).decompress(blob, 20)
    except (zlib.error, lzma.LZMAError) as e:
        return f"the payload does not decompress: {e}", ""
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return "the payload is not an ELF file", ""
    if head[4] != 1 or struct.unpack_from("<H", head, 18)[0] != EM_386:
        return "the payload is not a 32-bit x86 ELF", ""
    return None, name


def load_linux(
    machine: Machine,
    kernel_path: str,
    data: bytes,
    cmdline: str = "",
    initrd: bytes | None = None,
    entry: str = "auto",
    unpack: bool = False,
) -> CpuState:
    """Load a bzImage; `entry` is "32", "64" or "auto" (64 when the kernel has it).

    With `unpack`, boite does the decompressor's work on the host: the payload's vmlinux
    is decompressed here, its segments are placed at their physical addresses (the
    kernel's LOAD_PHYSICAL_ADDR, where its own decompressor would put it without KASLR,
    so no relocation is needed) and the vCPU starts at the ELF entry (startup_32) with
    ESI at boot_params, as the decompressor leaves it. Under the emulator this saves the
    minutes an XZ decompression takes in emulated code; the kernel itself runs unchanged.
    """
    hdr = parse_setup_header(data, kernel_path)
    if unpack:
        return _load_unpacked(machine, kernel_path, data, hdr, cmdline, initrd, entry)
    if entry == "auto":
        entry = "64" if hdr.supports_64bit_entry else "32"
    if entry == "64" and not hdr.supports_64bit_entry:
        raise KernelFormatError(
            f"{kernel_path}: kernel has no 64-bit entry point (boot protocol "
            f"{hdr.version_str}, xloadflags {hdr.xloadflags:#x}); use the 32-bit entry"
        )
    if entry not in ("32", "64"):
        raise ValueError(f"entry {entry!r}: expected '32', '64' or 'auto'")

    pm = data[hdr.setup_size :]
    write_guest(machine, KERNEL_LOAD_ADDR, pm, "the protected-mode kernel", kernel_path)
    # Where the kernel will be once it decompressed itself: from 1 MiB, or from
    # pref_address (LOAD_PHYSICAL_ADDR, where the decompressor writes); the initrd must
    # stay clear of both.
    kernel_end = KERNEL_LOAD_ADDR + max(len(pm), hdr.init_size)
    if hdr.pref_address:
        kernel_end = max(kernel_end, hdr.pref_address + hdr.init_size)
    _write_boot_params(machine, kernel_path, data, hdr, cmdline, initrd, kernel_end)
    if entry == "64":
        return long_mode_state(machine.memory, KERNEL_LOAD_ADDR + 0x200, rsi=ZERO_PAGE_ADDR)
    return protected_mode_state(machine.memory, KERNEL_LOAD_ADDR, rsi=ZERO_PAGE_ADDR)


def _load_unpacked(
    machine: Machine,
    kernel_path: str,
    data: bytes,
    hdr: SetupHeader,
    cmdline: str,
    initrd: bytes | None,
    entry: str,
) -> CpuState:
    if entry == "64":
        raise KernelFormatError(
            f"{kernel_path}: unpacking on the host enters a 32-bit kernel at startup_32; "
            "boot a 64-bit kernel through its bzImage entry"
        )
    # The decompressed kernel is at most init_size bytes where it runs (its own bound).
    elf = parse_elf(extract_payload(data, kernel_path, limit=max(hdr.init_size, 1 << 20)),
                    kernel_path)  # fmt: skip
    if elf.machine != EM_386 or elf.bits != 32:
        raise KernelFormatError(
            f"{kernel_path}: the payload is an ELF for machine {elf.machine} ({elf.bits}-bit); "
            "unpacking needs a 32-bit x86 kernel"
        )
    loads = elf.loads()
    if not loads:
        raise KernelFormatError(f"{kernel_path}: the payload has no loadable segments")
    start = min(p.paddr for p in loads)
    if hdr.pref_address and start != hdr.pref_address:
        raise KernelFormatError(
            f"{kernel_path}: the payload's first segment is at {start:#x}, not at the "
            f"setup header's pref_address {hdr.pref_address:#x}"
        )
    kernel_end = start + hdr.init_size
    for p in loads:
        if p.paddr + p.memsz > kernel_end:
            raise KernelFormatError(
                f"{kernel_path}: payload segment at {p.paddr:#x}+{p.memsz:#x} runs past "
                f"init_size ({hdr.init_size:#x} bytes from {start:#x})"
            )
        write_guest(machine, p.paddr, elf.segment_bytes(p), "a kernel segment", kernel_path)
        zero_guest(machine, p.paddr + p.filesz, p.memsz - p.filesz, "a kernel bss", kernel_path)
    if not start <= elf.entry < kernel_end:
        raise KernelFormatError(
            f"{kernel_path}: the payload's entry {elf.entry:#x} is outside the kernel"
        )
    _write_boot_params(machine, kernel_path, data, hdr, cmdline, initrd, kernel_end)
    return protected_mode_state(machine.memory, elf.entry, rsi=ZERO_PAGE_ADDR)


def _write_boot_params(
    machine: Machine,
    kernel_path: str,
    data: bytes,
    hdr: SetupHeader,
    cmdline: str,
    initrd: bytes | None,
    kernel_end: int,
) -> None:
    """The command line, the initrd (above `kernel_end`) and the zero page."""
    raw_cmdline = cmdline.encode()
    limit = hdr.cmdline_size
    if len(raw_cmdline) > limit or len(raw_cmdline) >= CMDLINE_MAX:
        raise KernelFormatError(
            f"{kernel_path}: the kernel command line is {len(raw_cmdline)} bytes; this kernel "
            f"takes at most {limit} (setup header cmdline_size at 0x238)"
        )
    if b"\0" in raw_cmdline:
        raise KernelFormatError(f"{kernel_path}: the kernel command line contains a NUL byte")
    write_guest(machine, CMDLINE_ADDR, raw_cmdline + b"\0", "the command line", kernel_path)

    bp = bytearray(4096)
    hdr_end = 0x202 + data[0x201]
    bp[0x1F1:hdr_end] = data[0x1F1:hdr_end]
    bp[0x1F1] = hdr.setup_sects
    struct.pack_into("<H", bp, 0x1FA, 0xFFFF)  # vid_mode: "normal"
    bp[0x210] = TYPE_OF_LOADER_UNDEFINED
    struct.pack_into("<I", bp, 0x214, KERNEL_LOAD_ADDR)  # code32_start: where it is
    bp[0x211] = (hdr.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS
    struct.pack_into("<H", bp, 0x224, 0xFE00)  # heap_end_ptr (real-mode setup only)
    struct.pack_into("<I", bp, 0x228, CMDLINE_ADDR)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, 0)

    if initrd is not None:
        max_addr = hdr.initrd_addr_max if hdr.version >= 0x0203 else 0x37FF_FFFF
        addr = place_high(
            machine,
            len(initrd),
            above=kernel_end,
            below=min(max_addr + 1, 1 << 32),
            what="the initrd",
            path=kernel_path,
        )
        write_guest(machine, addr, initrd, "the initrd", kernel_path)
        struct.pack_into("<II", bp, 0x218, addr & 0xFFFF_FFFF, len(initrd) & 0xFFFF_FFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32, len(initrd) >> 32)

    e820 = sorted(machine.e820, key=lambda e: e.addr)
    if len(e820) > E820_MAX_ENTRIES:
        raise KernelFormatError(
            f"{kernel_path}: the memory map has {len(e820)} entries; boot_params holds "
            f"{E820_MAX_ENTRIES}"
        )
    bp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, e.addr, e.size, e.type)
    write_guest(machine, ZERO_PAGE_ADDR, bytes(bp), "boot_params", kernel_path)
