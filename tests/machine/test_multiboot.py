"""Multiboot v1 loading, checked against what QEMU hands the same kernel."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from boite.machine.builder import build_machine
from boite.machine.loader import KernelFormatError, load_kernel
from boite.machine.loader.multiboot import MBI_ADDR, MMAP_ADDR, find_header
from boite.machine.machine import Machine

from .machine_kernels import *  # noqa: F403 - the fixtures


def cstr(m: Machine, addr: int) -> str:
    out = bytearray()
    while (b := m.memory.read_u8(addr + len(out))) != 0:
        out.append(b)
    return out.decode()


def probe_report(m: Machine) -> dict[str, str]:
    """What the probe kernel would print, read from our loaded memory the same way."""
    mem = m.memory
    info = MBI_ADDR
    rep = {
        "flags": f"{mem.read_u32(info):08x}",
        "mem_lower": f"{mem.read_u32(info + 4):08x}",
        "mem_upper": f"{mem.read_u32(info + 8):08x}",
        "cmdline": cstr(m, mem.read_u32(info + 16)),
        "mods": f"{mem.read_u32(info + 20):08x}",
        "loader": cstr(m, mem.read_u32(info + 64)),
    }
    if mem.read_u32(info + 20):
        mod = mem.read_u32(info + 24)
        start, end, cmd = mem.read_u32(mod), mem.read_u32(mod + 4), mem.read_u32(mod + 8)
        rep["mod0"] = mem.read(start, min(end - start, 64)).decode()
        rep["mod0cmd"] = cstr(m, cmd)
        rep["mod0align"] = f"{start & 0xFFF:08x}"
    entries = []
    pos, end = mem.read_u32(info + 48), mem.read_u32(info + 48) + mem.read_u32(info + 44)
    while pos < end:
        size, base, length, typ = struct.unpack("<IQQI", mem.read(pos, 24))
        entries.append(f"{base & 0xFFFFFFFF:08x}+{length & 0xFFFFFFFF:08x}:{typ}")
        pos += size + 4
    rep["mmap"] = " ".join(entries)
    return rep


def parse_serial(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert "multiboot ok" in lines, text
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.mark.parametrize("kind", ["aout", "elf"])
def test_multiboot_load_state_and_info(multiboot_kernels, tmp_path, kind):
    kernel = multiboot_kernels[kind]
    module = tmp_path / "mod.txt"
    module.write_bytes(b"hello module\n")
    m = build_machine(32, kernel=kernel, initrd=module, cmdline="a=1 b")
    state = m.boot_state[0]
    assert state.gpr["rax"] == 0x2BADB002 and state.gpr["rbx"] == MBI_ADDR
    assert state.cr0 & 1 and not state.cr0 & (1 << 31) and state.rflags == 2
    for seg in ("cs", "ds", "es", "ss"):
        s = state.segments[seg]
        assert (s.base, s.limit, s.db, s.g, s.present) == (0, 0xFFFFFFFF, 1, 1, 1)
    assert state.segments["cs"].type == 0xB
    # the GDT in memory says the same as the hidden parts
    gdt = m.memory.read(state.gdt.base, state.gdt.limit + 1)
    assert struct.unpack_from("<Q", gdt, state.segments["cs"].selector)[0] == 0x00CF9B000000FFFF
    assert struct.unpack_from("<Q", gdt, state.segments["ds"].selector)[0] == 0x00CF93000000FFFF

    data = kernel.read_bytes()
    hdr = find_header(data)
    assert hdr is not None
    if kind == "aout":
        assert state.rip == hdr.entry_addr
        assert (
            m.memory.read(0x100000, hdr.load_end_addr - 0x100000)
            == data[: hdr.load_end_addr - 0x100000]
        )
    else:
        assert m.memory.read(0x100000, 0x40) == data[0x1000:0x1040]  # .text at file 0x1000

    rep = probe_report(m)
    assert rep["flags"] == "0000024f"
    assert rep["mem_lower"] == f"{639:08x}" and rep["mem_upper"] == f"{31 * 1024:08x}"
    assert rep["cmdline"] == f"{kernel} a=1 b"
    assert rep["mods"] == "00000001"
    assert rep["mod0"] == "hello module\n" and rep["mod0cmd"] == str(module)
    assert rep["mod0align"] == "00000000"
    assert rep["loader"] == "boite"
    assert rep["mmap"] == ("00000000+0009fc00:1 0009fc00+00060400:2 00100000+01f00000:1")
    assert m.memory.read_u32(MMAP_ADDR) == 20
    m.memory.close()


@pytest.mark.skipif(shutil.which("qemu-system-i386") is None, reason="qemu-system-i386 missing")
@pytest.mark.parametrize("kind", ["aout", "elf"])
def test_probe_kernel_is_valid_under_qemu_and_sees_what_we_give(multiboot_kernels, tmp_path, kind):
    """The probe kernel runs under QEMU TCG; the fields QEMU and boite both define the same
    way (flags, module, command line, base memory) read the same."""
    kernel = multiboot_kernels[kind]
    module = tmp_path / "mod.txt"
    module.write_bytes(b"hello module\n")
    serial = tmp_path / "serial.txt"
    r = subprocess.run(
        ["qemu-system-i386", "-kernel", str(kernel), "-append", "a=1 b", "-initrd", str(module),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "32", "-no-reboot",
         "-display", "none", "-monitor", "none", "-serial", f"file:{serial}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == (0x21 << 1) | 1, r.stderr
    qemu = parse_serial(serial.read_text())
    m = build_machine(32, kernel=kernel, initrd=module, cmdline="a=1 b")
    ours = probe_report(m)
    for key in ("flags", "mem_lower", "cmdline", "mods", "mod0", "mod0cmd", "mod0align"):
        assert ours[key].strip() == qemu[key].strip(), key
    assert qemu["loader"] == "qemu" and qemu["bss"] == "00000000"
    m.memory.close()


def test_not_a_kernel_and_bad_headers(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(KernelFormatError, match="not a kernel boite can boot"):
        build_machine(8, kernel=junk)
    with pytest.raises(KernelFormatError, match="cannot read the kernel"):
        build_machine(8, kernel=tmp_path / "missing")
    magic, flags = 0x1BADB002, 0x00010000
    hdr = struct.pack("<III", magic, flags, -(magic + flags) & 0xFFFFFFFF)
    # header_addr below load_addr
    bad = tmp_path / "bad"
    bad.write_bytes(hdr + struct.pack("<IIIII", 0x100000, 0x200000, 0, 0, 0x100000))
    with pytest.raises(KernelFormatError, match="below load_addr"):
        build_machine(8, kernel=bad)
    # loads beyond RAM
    big = tmp_path / "big"
    big.write_bytes(hdr + struct.pack("<IIIII", 0x4000000, 0x4000000, 0, 0x5000000, 0x4000000))
    with pytest.raises(KernelFormatError, match="does not have"):
        build_machine(8, kernel=big)
    # overlapping the loader's tables
    low = tmp_path / "low"
    low.write_bytes(hdr + struct.pack("<IIIII", 0x8000, 0x8000, 0, 0x10000, 0x8000))
    with pytest.raises(KernelFormatError, match="overlaps"):
        build_machine(8, kernel=low)
    # no a.out kludge and not ELF
    flat = tmp_path / "flat"
    flags = 0
    flat.write_bytes(struct.pack("<III", magic, flags, -magic & 0xFFFFFFFF) + bytes(64))
    with pytest.raises(KernelFormatError, match="not ELF"):
        build_machine(8, kernel=flat)


def test_header_search_limit_and_checksum(tmp_path):
    magic, flags = 0x1BADB002, 0
    good = struct.pack("<III", magic, flags, -magic & 0xFFFFFFFF)
    assert find_header(bytes(8188) + good) is None  # must start within 8192 - 12
    assert find_header(bytes(8176) + good).offset == 8176
    assert find_header(bytes(4) + struct.pack("<III", magic, 0, 0)) is None
    assert find_header(bytes(2) + good) is None  # not 4-byte aligned


def test_elf64_multiboot_is_refused(multiboot_kernels, tmp_path):
    data = bytearray(multiboot_kernels["elf"].read_bytes())
    data[4] = 2  # claim ELFCLASS64
    data[18] = 62
    k = tmp_path / "k64"
    k.write_bytes(bytes(data))
    m = build_machine(8)
    with pytest.raises(KernelFormatError, match="32-bit"):
        load_kernel(m, k, protocol="multiboot")


def test_several_modules_as_qemu_takes_them(multiboot_kernels, tmp_path):
    from boite.machine.loader import multiboot_modules

    a, b = tmp_path / "a.bin", tmp_path / "b,c.bin"
    a.write_bytes(b"AAAA")
    b.write_bytes(b"B" * 5000)
    mods = multiboot_modules(f"{a} x=1 y, {str(b).replace(',', ',,')}")
    assert [(m.path, m.cmdline) for m in mods] == [(str(a), f"{a} x=1 y"), (str(b), str(b))]
    m = build_machine(
        16, kernel=multiboot_kernels["elf"], initrd=f"{a} x=1 y,{str(b).replace(',', ',,')}"
    )
    info = MBI_ADDR
    assert m.memory.read_u32(info + 20) == 2
    entries = m.memory.read_u32(info + 24)
    got = []
    for i in range(2):
        start, end, cmd = struct.unpack("<III", m.memory.read(entries + 16 * i, 12))
        assert start % 4096 == 0
        got.append((m.memory.read(start, end - start), cstr(m, cmd)))
    assert got == [(b"AAAA", f"{a} x=1 y"), (b"B" * 5000, str(b))]
    with pytest.raises(KernelFormatError, match="empty item"):
        multiboot_modules("a,,,")
    m.memory.close()
