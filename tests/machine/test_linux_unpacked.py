"""A stock bzImage unpacked on the host (`protocol="linux-unpacked"`): Debian's i386
kernel's payload decompressed by boite, its segments where its own decompressor would
put them, the vCPU at startup_32 with ESI at boot_params; hostile payloads refused."""

from __future__ import annotations

import lzma
import struct

import pytest

from boite import guestkit
from boite.machine.builder import build_machine
from boite.machine.loader import (
    KernelFormatError,
    choose_unpack,
    extract_payload,
    parse_setup_header,
)
from boite.machine.loader.bootstate import ZERO_PAGE_ADDR
from boite.machine.loader.elf import parse_elf


@pytest.fixture(scope="module")
def debian686() -> guestkit.Kit:
    try:
        return guestkit.ensure_kit(["debian-686"])
    except guestkit.KitError as e:
        pytest.skip(f"Debian's linux-image-686 is not to be had here: {e}")


def test_unpacked_kernel_is_where_its_decompressor_would_put_it(debian686, tmp_path) -> None:
    path = debian686.debian686_vmlinuz
    data = path.read_bytes()
    hdr = parse_setup_header(data, str(path))
    initrd = bytes(range(256)) * 1000
    (tmp_path / "initrd").write_bytes(initrd)
    m = build_machine(256, kernel=path, initrd=tmp_path / "initrd",
                      cmdline="console=ttyS0", protocol="linux-unpacked")  # fmt: skip
    try:
        elf = parse_elf(extract_payload(data, str(path)), str(path))
        for p in elf.loads():
            assert m.memory.read(p.paddr, p.filesz) == elf.segment_bytes(p)
            assert not any(m.memory.read(p.paddr + p.filesz, p.memsz - p.filesz))
        assert min(p.paddr for p in elf.loads()) == hdr.pref_address
        st = m.boot_state[0]
        assert st.rip == elf.entry and st.gpr["rsi"] == ZERO_PAGE_ADDR
        assert st.cr0 & 1 and not st.cr0 & 0x80000000  # protected mode, paging off
        addr, size = struct.unpack_from("<II", m.memory.read(ZERO_PAGE_ADDR, 4096), 0x218)
        assert size == len(initrd) and addr >= hdr.pref_address + hdr.init_size
        assert m.memory.read(addr, size) == initrd
    finally:
        m.memory.close()


def _with_payload(data: bytes, payload: bytes) -> bytes:
    """The bzImage with its payload replaced (offset and length fields updated)."""
    hdr = parse_setup_header(data, "k")
    start = hdr.setup_size + hdr.payload_offset
    out = bytearray(data[:start] + payload)
    struct.pack_into("<I", out, 0x24C, len(payload))  # payload_length
    out += bytes(-len(out) % 16)
    struct.pack_into("<I", out, 0x1F4, (len(out) - hdr.setup_size) // 16)  # syssize
    return bytes(out)


@pytest.mark.parametrize(
    "payload, words",
    [
        (lzma.compress(b"\0" * (64 << 20)), "more than"),  # a decompression bomb
        (lzma.compress(b"not an ELF at all"), "ELF"),
        (b"\xfd7zXZ\x00" + b"\x55" * 100, "does not decompress"),
    ],
    ids=["bomb", "not-elf", "corrupt"],
)
def test_hostile_payloads_are_refused(debian686, tmp_path, payload, words) -> None:
    data = _with_payload(debian686.debian686_vmlinuz.read_bytes(), payload)
    k = tmp_path / "vmlinuz"
    k.write_bytes(data)
    with pytest.raises(KernelFormatError, match=words):
        build_machine(64, kernel=k, protocol="linux-unpacked")


def test_auto_unpacks_a_32bit_xz_bzimage_under_the_emulator_only(debian686) -> None:
    path = str(debian686.debian686_vmlinuz)
    choice = choose_unpack(path, "auto", emulator=True)
    assert choice.unpack and "xz payload" in choice.reason
    assert not choose_unpack(path, "auto", emulator=False).unpack
    assert choose_unpack(path, "true", emulator=False).unpack
    off = choose_unpack(path, "false", emulator=True)
    assert not off.unpack and "off" in off.reason


def test_auto_leaves_what_cannot_be_unpacked(debian686, tmp_path) -> None:
    data = debian686.debian686_vmlinuz.read_bytes()
    k64 = bytearray(data)
    struct.pack_into("<H", k64, 0x236, 0x1)  # XLF_KERNEL_64: a 64-bit kernel
    unknown = _with_payload(data, b"\x02\x21\x4c\x18" + bytes(64))  # lz4
    cases = {"64": (bytes(k64), "64-bit"), "lz4": (unknown, "not gzip, xz or lzma"),
             "elf": (b"\x7fELF" + bytes(0x300), "not a Linux bzImage")}  # fmt: skip
    for name, (blob, words) in cases.items():
        (tmp_path / name).write_bytes(blob)
        choice = choose_unpack(str(tmp_path / name), "auto", emulator=True)
        assert not choice.unpack and words in choice.reason, (name, choice)
        with pytest.raises(KernelFormatError, match=words):
            choose_unpack(str(tmp_path / name), "true", emulator=True)


def test_box_key_kernel_unpack(tmp_path) -> None:
    from boite.box.config import BoxConfig
    from boite.box.vmxdict import VmxDict
    from boite.errors import ConfigError

    def setting(value: str | None) -> str:
        text = 'config.version = "8"\n' + (
            f'boite.kernelUnpack = "{value}"\n' if value is not None else ""
        )
        return BoxConfig(VmxDict.parse(text, source="t.vmx")).kernel_unpack

    assert [setting(v) for v in (None, "auto", "TRUE", "FALSE", "yes")] == [
        "auto", "auto", "true", "false", "true"]  # fmt: skip
    with pytest.raises(ConfigError, match='boite.kernelUnpack = .sometimes.: expected "auto"'):
        setting("sometimes")


def test_builder_unpacks_for_the_emulator_and_says_so(debian686) -> None:
    path = debian686.debian686_vmlinuz
    elf = parse_elf(extract_payload(path.read_bytes(), str(path)), str(path))
    m = build_machine(256, kernel=path, cmdline="console=ttyS0")  # emulated_irqchip: emu
    try:
        assert m.boot_state[0].rip == elf.entry
        assert m.kernel_note.startswith("unpacked on the host (xz payload)")
    finally:
        m.memory.close()
    m = build_machine(256, kernel=path, emulated_irqchip=False)  # KVM's machine
    try:
        assert m.boot_state[0].rip == 0x100000  # the bzImage's own 32-bit entry
        assert "hardware virtualization" in m.kernel_note
    finally:
        m.memory.close()
    m = build_machine(256, kernel=path, kernel_unpack="false")
    try:
        assert m.boot_state[0].rip == 0x100000 and "off" in m.kernel_note
    finally:
        m.memory.close()


def test_box_kernel_unpack_false_boots_the_bzimage_entry(debian686, tmp_path) -> None:
    from boite.box.box import Box

    box = Box.create(str(tmp_path / "b"), memsize_mb=256, cpus=1, disk_size=None)
    box.vmx["boite.kernel"] = str(debian686.debian686_vmlinuz)
    box.vmx["boite.kernelUnpack"] = "FALSE"
    box.save()
    m = build_machine(box=Box.open(str(tmp_path / "b")))
    try:
        assert m.boot_state[0].rip == 0x100000 and "off" in m.kernel_note
    finally:
        m.memory.close()


def test_cli_kernel_unpack_refuses_what_it_cannot_unpack(debian686, boite_cli, tmp_path) -> None:
    k = tmp_path / "lz4"
    lz4 = b"\x02\x21\x4c\x18" + bytes(64)
    k.write_bytes(_with_payload(debian686.debian686_vmlinuz.read_bytes(), lz4))
    r = boite_cli("boot", k, "--accel", "emu", "--kernel-unpack", timeout=120)
    assert r.returncode != 0
    assert "cannot unpack this kernel on the host" in r.stderr and "not gzip, xz or lzma" in (
        r.stderr
    )
    assert "Traceback" not in r.stderr
