"""Just enough ELF (32- and 64-bit, little-endian) to load a kernel: program headers and
notes. Every offset and size is checked against the file: a kernel file is input."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from boite.machine.loader.errors import KernelFormatError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4


@dataclass(frozen=True)
class ProgramHeader:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfNote:
    name: bytes
    type: int
    desc: bytes


@dataclass
class ElfImage:
    path: str
    data: bytes
    elfclass: int
    machine: int
    entry: int
    phdrs: list[ProgramHeader]

    @property
    def bits(self) -> int:
        return 64 if self.elfclass == ELFCLASS64 else 32

    def segment_bytes(self, ph: ProgramHeader) -> bytes:
        return self.data[ph.offset : ph.offset + ph.filesz]

    def loads(self) -> list[ProgramHeader]:
        return [p for p in self.phdrs if p.type == PT_LOAD and p.memsz > 0]

    def notes(self) -> list[ElfNote]:
        out: list[ElfNote] = []
        for ph in self.phdrs:
            if ph.type != PT_NOTE:
                continue
            buf = self.segment_bytes(ph)
            pos = 0
            while pos + 12 <= len(buf):
                namesz, descsz, ntype = struct.unpack_from("<III", buf, pos)
                pos += 12
                name_end = pos + namesz
                desc_start = pos + ((namesz + 3) & ~3)
                desc_end = desc_start + descsz
                if desc_end > len(buf):
                    raise KernelFormatError(
                        f"{self.path}: ELF note at file offset {ph.offset + pos - 12:#x} runs "
                        f"past its segment ({namesz}+{descsz} bytes, segment {ph.filesz})"
                    )
                out.append(
                    ElfNote(buf[pos:name_end].rstrip(b"\0"), ntype, buf[desc_start:desc_end])
                )
                pos = desc_start + ((descsz + 3) & ~3)
        return out


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes, path: str) -> ElfImage:
    if not is_elf(data):
        raise KernelFormatError(f"{path}: not an ELF file (found {data[:4]!r} at offset 0)")
    if len(data) < 0x34:
        raise KernelFormatError(f"{path}: ELF header truncated ({len(data)} bytes)")
    elfclass, endian = data[4], data[5]
    if endian != 1:
        raise KernelFormatError(f"{path}: big-endian ELF (EI_DATA={endian}); expected x86 (1)")
    if elfclass == ELFCLASS32:
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = (
            struct.unpack_from("<HHIIIIIHHH", data, 16)
        )
        ph_fmt, ph_size = "<IIIIIIII", 32
    elif elfclass == ELFCLASS64:
        if len(data) < 0x40:
            raise KernelFormatError(f"{path}: ELF64 header truncated ({len(data)} bytes)")
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = (
            struct.unpack_from("<HHIQQQIHHH", data, 16)
        )
        ph_fmt, ph_size = "<IIQQQQQQ", 56
    else:
        raise KernelFormatError(f"{path}: ELF class {elfclass} at offset 4; expected 1 or 2")
    if e_phnum and e_phentsize < ph_size:
        raise KernelFormatError(
            f"{path}: ELF program header size {e_phentsize}; expected at least {ph_size}"
        )
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise KernelFormatError(
            f"{path}: ELF program headers at {e_phoff:#x} ({e_phnum} x {e_phentsize}) run past "
            f"the end of the file ({len(data)} bytes)"
        )
    phdrs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if elfclass == ELFCLASS32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, _ = struct.unpack_from(
                ph_fmt, data, off
            )
        else:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
                ph_fmt, data, off
            )
        ph = ProgramHeader(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags)
        if ph.type in (PT_LOAD, PT_NOTE) and (
            ph.offset + ph.filesz > len(data) or ph.filesz > ph.memsz and ph.type == PT_LOAD
        ):
            raise KernelFormatError(
                f"{path}: ELF program header {i} (file offset {ph.offset:#x}, {ph.filesz} bytes, "
                f"memsz {ph.memsz}) does not fit the file ({len(data)} bytes)"
            )
        phdrs.append(ph)
    del e_type
    return ElfImage(path, data, elfclass, e_machine, e_entry, phdrs)
