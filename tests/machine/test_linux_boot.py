"""Linux direct boot: bzImage (32- and 64-bit entry) and vmlinux through PVH, with the
stock Debian x86_64 kernel."""

from __future__ import annotations

import struct

import pytest

from boite.machine.builder import build_machine
from boite.machine.loader import KernelFormatError, detect_protocol, parse_setup_header
from boite.machine.loader.bootstate import CMDLINE_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR
from boite.machine.machine import Machine

from .machine_kernels import *  # noqa: F403 - the fixtures

CMDLINE = "console=ttyS0 root=/dev/vda ro quiet"


def translate(m: Machine, cr3: int, va: int) -> int | None:
    """Walk 4-level page tables as the CPU would (present bits and 2 MiB/1 GiB pages)."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = m.memory.read_u64(table + ((va >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        if level in (1, 2) and entry & 0x80:
            base = entry & ~((1 << shift) - 1) & 0x000F_FFFF_FFFF_F000
            return base | (va & ((1 << shift) - 1))
        table = entry & 0x000F_FFFF_FFFF_F000
    return table | (va & 0xFFF)


def cstr(m: Machine, addr: int) -> str:
    out = bytearray()
    while (b := m.memory.read_u8(addr + len(out))) != 0:
        out.append(b)
    return out.decode()


def check_boot_params(m: Machine, data: bytes, initrd: bytes) -> None:
    bp = m.memory.read(ZERO_PAGE_ADDR, 4096)
    assert bp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    hdr_end = 0x202 + data[0x201]
    # the setup header is the kernel's, except the fields a loader must fill in
    filled = {0x1FA, 0x1FB, 0x210, 0x211, 0x214, 0x215, 0x216, 0x217, 0x224, 0x225}
    filled |= set(range(0x218, 0x220)) | set(range(0x228, 0x22C))
    for off in range(0x1F1, hdr_end):
        if off not in filled:
            assert bp[off] == data[off], hex(off)
    assert bp[0x210] == 0xFF  # type_of_loader
    assert bp[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<I", bp, 0x228)[0] == CMDLINE_ADDR
    assert cstr(m, CMDLINE_ADDR) == CMDLINE
    addr, size = struct.unpack_from("<II", bp, 0x218)
    hdr = parse_setup_header(data, "k")
    assert size == len(initrd) and addr % 4096 == 0
    assert addr + size <= hdr.initrd_addr_max + 1
    assert addr >= hdr.pref_address + hdr.init_size  # clear of the decompressed kernel
    assert m.memory.read(addr, size) == initrd
    n = bp[0x1E8]
    table = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert table == [(e.addr, e.size, e.type) for e in m.e820]
    pm = data[(hdr.setup_sects + 1) * 512 :]
    assert m.memory.read(0x100000, 4096) == pm[:4096]
    assert m.memory.read(0x100000 + len(pm) - 4096, 4096) == pm[-4096:]


def test_debian_setup_header(debian_bzimage):
    data = debian_bzimage.read_bytes()
    hdr = parse_setup_header(data, str(debian_bzimage))
    assert hdr.version >= 0x020F and hdr.supports_64bit_entry and hdr.relocatable
    assert hdr.cmdline_size >= 2047 and hdr.init_size > len(data)
    assert detect_protocol(data, str(debian_bzimage)) == "linux"


def test_bzimage_64bit_entry(debian_bzimage, tmp_path):
    initrd = tmp_path / "initrd"
    payload = bytes(range(256)) * 4096 + b"tail"
    initrd.write_bytes(payload)
    m = build_machine(256, kernel=debian_bzimage, initrd=initrd, cmdline=CMDLINE)
    data = debian_bzimage.read_bytes()
    check_boot_params(m, data, payload)
    s = m.boot_state[0]
    assert s.rip == 0x100200 and s.gpr["rsi"] == ZERO_PAGE_ADDR
    assert s.cr0 & 0x80000001 == 0x80000001 and s.cr4 & 0x20 and s.efer & 0x500 == 0x500
    cs = s.segments["cs"]
    assert (cs.l, cs.db, cs.selector) == (1, 0, 0x10)
    assert s.segments["ds"].selector == 0x18 and s.rflags == 2
    gdt = m.memory.read(s.gdt.base, s.gdt.limit + 1)
    assert struct.unpack_from("<Q", gdt, 0x10)[0] == 0x00AF9B000000FFFF
    # identity mapping covers the kernel, the zero page, the command line and the initrd
    addr = m.memory.read_u32(ZERO_PAGE_ADDR + 0x218)
    for va in (0x100200, ZERO_PAGE_ADDR, CMDLINE_ADDR, addr, 0xFFFF_F000):
        assert translate(m, s.cr3, va) == va
    m.memory.close()


def test_bzimage_32bit_entry(debian_bzimage, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 10000)
    m = build_machine(
        128, kernel=debian_bzimage, initrd=initrd, cmdline=CMDLINE, protocol="linux32"
    )
    check_boot_params(m, debian_bzimage.read_bytes(), b"x" * 10000)
    s = m.boot_state[0]
    assert s.rip == 0x100000 and s.gpr["rsi"] == ZERO_PAGE_ADDR
    assert s.gpr["rbx"] == s.gpr["rbp"] == s.gpr["rdi"] == 0
    assert s.cr0 & 0x80000001 == 1 and s.efer == 0
    assert s.segments["cs"].db == 1 and s.segments["cs"].selector == 0x10
    m.memory.close()


def test_bzimage_errors(debian_bzimage, tmp_path):
    data = bytearray(debian_bzimage.read_bytes())
    short = tmp_path / "short"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(KernelFormatError, match="truncated"):
        build_machine(128, kernel=short)
    old = bytearray(data)
    struct.pack_into("<H", old, 0x206, 0x0204)
    p = tmp_path / "old"
    p.write_bytes(old)
    with pytest.raises(KernelFormatError, match="2.04 at offset 0x206 is too old"):
        build_machine(128, kernel=p)
    no64 = bytearray(data)
    struct.pack_into("<H", no64, 0x236, 0)
    p = tmp_path / "no64"
    p.write_bytes(no64)
    with pytest.raises(KernelFormatError, match="no 64-bit entry"):
        build_machine(128, kernel=p, protocol="linux64")
    m = build_machine(128, kernel=p)  # auto falls back to the 32-bit entry
    assert m.boot_state[0].rip == 0x100000
    m.memory.close()
    with pytest.raises(KernelFormatError, match="command line is 3000 bytes"):
        build_machine(128, kernel=debian_bzimage, cmdline="x" * 3000)
    big = tmp_path / "big-initrd"
    big.write_bytes(bytes(64 << 20))
    with pytest.raises(KernelFormatError, match="initrd of .* does not fit"):
        build_machine(100, kernel=debian_bzimage, initrd=big)
    with pytest.raises(KernelFormatError, match="the kernel is .* bytes, more than guest RAM"):
        build_machine(4, kernel=debian_bzimage)


def test_vmlinux_pvh(debian_vmlinux, tmp_path):
    from boite.machine.loader.elf import parse_elf

    data = debian_vmlinux.read_bytes()
    assert detect_protocol(data, str(debian_vmlinux)) == "pvh"
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initramfs!" * 1000)
    m = build_machine(256, kernel=debian_vmlinux, initrd=initrd, cmdline=CMDLINE)
    s = m.boot_state[0]
    elf = parse_elf(data, "vmlinux")
    for ph in elf.loads():
        assert (
            m.memory.read(ph.paddr, min(ph.filesz, 4096))
            == data[ph.offset : ph.offset + min(ph.filesz, 4096)]
        )
    assert s.gpr["rbx"] == PVH_INFO_ADDR and s.cr0 & 0x80000001 == 1 and s.cr4 == 0
    assert s.segments["cs"].db == 1 and s.segments["tr"].type == 0xB
    assert (s.segments["tr"].base, s.segments["tr"].limit) == (0, 0x67)  # as PVH asks
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, n = struct.unpack(
        "<IIIIQQQQI", m.memory.read(PVH_INFO_ADDR, 52)
    )
    assert (magic, version, flags, nr, rsdp) == (0x336EC578, 1, 0, 1, 0)
    assert cstr(m, cmdline) == CMDLINE
    mod_addr, mod_size = struct.unpack("<QQ", m.memory.read(modlist, 16))
    assert m.memory.read(mod_addr, mod_size) == b"initramfs!" * 1000
    entries = [struct.unpack("<QQI", m.memory.read(memmap + 24 * i, 20)) for i in range(n)]
    assert entries == [(e.addr, e.size, e.type) for e in m.e820]
    # entry: the note's address, inside the loaded kernel
    assert s.rip == int.from_bytes(
        next(n.desc for n in elf.notes() if n.name == b"Xen" and n.type == 18), "little"
    )
    m.memory.close()


def test_elf_without_pvh_note_is_refused(multiboot_kernels, tmp_path):
    from boite.machine.loader import load_kernel

    m = build_machine(8)
    with pytest.raises(KernelFormatError, match="without a PVH entry note"):
        load_kernel(m, multiboot_kernels["elf"], protocol="pvh")
    m.memory.close()
