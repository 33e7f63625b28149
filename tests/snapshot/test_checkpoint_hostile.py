"""Hostile checkpoint files: every malformation is a CheckpointError naming where it is."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.accel.cpustate import CpuState
from boite.box.checkpoint import (
    GROUP_DESC,
    HEADER,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from boite.machine.memory import GuestMemory

MiB = 1 << 20


def header(ngroups: int, magic: int = 0xBED2BED2) -> bytes:
    return HEADER.pack(magic, 0, ngroups)


def one_group(stream: bytes, name: bytes = b"g", size: int | None = None) -> bytes:
    offset = HEADER.size + GROUP_DESC.size
    return header(1) + GROUP_DESC.pack(name, offset, len(stream) if size is None else size) + stream


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"\xd2\xbe\xd2", "too short"),
        (header(0, magic=0x12345678), "magic 0x12345678"),
        (header(1000), "1000 groups"),
        (header(1) + GROUP_DESC.pack(b"g", 10**12, 4), "outside the file"),
        (header(1) + GROUP_DESC.pack(b"g", 0, 4), "outside the file"),  # points at the header
        (one_group(b"\x00\x00", size=1 << 40), "outside the file"),
        (one_group(b"\x00\x00", name=b""), "empty name"),
        (one_group(b"\x00\x00", name=b"\xff\xfe"), "not ASCII"),
        (one_group(b"\x04\x01a\x01\x02"), "value of 4 bytes runs past"),
        (one_group(b"\x04\x01a\x01\x02\x03\x04"), "without the null tag"),
        (one_group(b"\x08\x01a\x01\x02\x03\x00\x00"), "runs past"),  # 8-byte value, 5 there
        (one_group(b"\x04\x00\x01\x02\x03\x04\x00\x00"), "no name"),
        (one_group(b"\x00\x10abc\x00\x00"), "header runs past"),
        (one_group(b"\xc4\x01a\x01\x00\x00\x00\x00\x00"), "header runs past"),  # 3 indices
        (one_group(b"\x3f\x01b" + struct.pack("<QQH", 1 << 62, 1, 0) + b"\x00\x00"), "block b"),
        (one_group(b"\x3f\x01b" + struct.pack("<QQH", 1, 1, 0xFFFF) + b"x\x00\x00"), "padding"),
        (one_group(b"\x3f\x01b" + struct.pack("<Q", 1)), "sizes run past"),
        (one_group(b"\x01\x01a\x01\x01\x01a\x02\x00\x00"), "appears twice"),
        (one_group(b"\x01\x01\xe9\x01\x00\x00"), "tag name is not ASCII"),
    ],
)
def test_malformed_container(data: bytes, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        Checkpoint.parse(data, "x.vmsn")


def test_duplicate_group() -> None:
    offset = HEADER.size + 2 * GROUP_DESC.size
    data = header(2) + GROUP_DESC.pack(b"g", offset, 2) * 2 + b"\x00\x00"
    with pytest.raises(CheckpointError, match="group 'g' appears twice"):
        Checkpoint.parse(data)


def valid_files(tmp_path) -> tuple[Checkpoint, GuestMemory]:
    mem = GuestMemory.with_ram(MiB)
    mem.write(0, b"boot")
    write_checkpoint(tmp_path / "v.vmsn", tmp_path / "v.vmem", [CpuState()], mem, {"d": 1})
    return Checkpoint.read(tmp_path / "v.vmsn"), mem


def rewrite(tmp_path, ckpt: Checkpoint, group: str, name: str, *indices: int, **change) -> None:
    """Replace one tag's value (or drop it) and write the file back."""
    g = ckpt.groups[group]
    tags = [t for t in g.tags if not (t.name == name and t.indices == indices)]
    g.tags.clear()
    g._index.clear()
    for t in tags:
        g.add(t)
    if "int" in change:
        g.put_int(name, change["int"], 4, *indices)
    if "block" in change:
        g.put_block(name, change["block"], *indices)
    ckpt.write(tmp_path / "v.vmsn")


@pytest.mark.parametrize(
    ("group", "name", "indices", "change", "match"),
    [
        ("memory", "regionsCount", (), {"int": 0}, "regionsCount is 0"),
        ("memory", "regionsCount", (), {"int": 1 << 20}, "regionsCount is 1048576"),
        ("memory", "regionsCount", (), {}, "no tag regionsCount"),
        ("memory", "regionsCount", (), {"int": 2}, "no tag regionPPN\\[1\\]"),
        ("memory", "regionSize", (0,), {"int": 0}, "regionSize\\[0\\] is 0"),
        ("memory", "regionSize", (0,), {"int": 1 << 30}, "the file has"),
        ("memory", "regionPageNum", (0,), {"int": 0xFFFFFFFF}, "the file has"),
        ("memory", "regionPPN", (0,), {"int": 0xFFFFFF}, "does not fit"),
        ("cpu", "cpu:numVCPUs", (), {"int": 2}, "no tag rax\\[1\\]"),
        ("cpu", "cpu:numVCPUs", (), {"int": 0xFFFFFFFF}, "at most 4096"),
        ("cpu", "rip", (0,), {"block": b"12345678"}, "is a block"),
        ("cpu", "boite:extra", (0,), {"block": b"{not json"}, "not valid JSON"),
        ("boite", "deviceState", (), {"block": b"\xff\xfe"}, "not valid JSON"),
        ("boite", "deviceState", (), {"block": json.dumps([1]).encode()}, "not a dictionary"),
        ("boite", "formatVersion", (), {"int": 99}, "formatVersion 99"),
    ],
)
def test_malformed_machine_state(tmp_path, group, name, indices, change, match) -> None:
    ckpt, mem = valid_files(tmp_path)
    rewrite(tmp_path, ckpt, group, name, *indices, **change)
    target = GuestMemory.with_ram(MiB)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / "v.vmsn", tmp_path / "v.vmem", memory=target)


def test_overlapping_regions(tmp_path) -> None:
    ckpt, _ = valid_files(tmp_path)
    mem = ckpt.groups["memory"]
    mem.tags.clear()
    mem._index.clear()
    mem.put_int("regionsCount", 2, 4)
    for i in range(2):
        mem.put_int("regionPageNum", i * 16, 4, i)
        mem.put_int("regionPPN", i * 16, 4, i)
        mem.put_int("regionSize", 32, 4, i)
    ckpt.write(tmp_path / "v.vmsn")
    with pytest.raises(CheckpointError, match="overlap in guest-physical space at 0x10000"):
        read_checkpoint(tmp_path / "v.vmsn")


def test_compressed_block_is_refused_by_name(tmp_path) -> None:
    ckpt, _ = valid_files(tmp_path)
    g = ckpt.groups["cpu"]
    data = ckpt.to_bytes()
    # Turn the deviceState block into a compressed one (value size 62) in place.
    raw = bytearray(data)
    at = raw.index(b"\x3f\x0bdeviceState")
    raw[at] = 0x3E
    (tmp_path / "v.vmsn").write_bytes(raw)
    assert g.get("rip", 0) is not None
    with pytest.raises(CheckpointError, match="compressed block"):
        read_checkpoint(tmp_path / "v.vmsn")


def test_missing_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "none.vmsn")
    valid_files(tmp_path)
    (tmp_path / "v.vmem").unlink()
    with pytest.raises(CheckpointError, match="cannot open guest RAM file"):
        read_checkpoint(tmp_path / "v.vmsn")
    (tmp_path / "empty.vmsn").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        read_checkpoint(tmp_path / "empty.vmsn")


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("valid")
    valid_files(d)
    return (d / "v.vmsn").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_files_parse_or_fail_typed(valid_bytes: bytes, data) -> None:
    raw = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        Checkpoint.parse(bytes(raw[:cut]), "fuzz.vmsn")
    except CheckpointError:
        pass


def test_huge_region_is_refused_before_allocating(tmp_path) -> None:
    ckpt, _ = valid_files(tmp_path)
    rewrite(tmp_path, ckpt, "memory", "regionSize", 0, int=0xFFFF_FFFF)  # 16 TiB of RAM
    with pytest.raises(CheckpointError, match="describes 0xffffffff000 bytes of .vmem"):
        read_checkpoint(tmp_path / "v.vmsn")


@pytest.mark.parametrize(
    ("group", "name", "indices", "change", "match"),
    [
        ("cpu", "rip", (0,), {"block_int": 1 << 64}, "vCPU 0: rip: .* is outside"),
        ("cpu", "eflags", (0,), {"int": 0x8000_0002}, "vCPU 0: rflags: 0x80000002 has bits"),
        ("cpu", "segSelector", (0, 9), {"int": 0}, "cpu 0 has segment number 9"),
        ("cpu", "IDTR", (0, 0), {"int": 0x1_0000}, "vCPU 0: idt.limit"),
        ("cpu", "CR64", (0, 8), {"int": 16}, "vCPU 0: cr8: 0x10 is outside 0x0..0xf"),
        ("cpu", "CR64", (0, 0), {"int": 0x8000_0010}, "cr0: 0x80000010 has paging on in real mode"),
        ("cpu", "CR64", (0, 0), {"int": 0x2000_0011}, "cr0: 0x20000011 has NW set without CD"),
        ("cpu", "EFER", (0,), {"int": 0x400}, "efer: 0x400: LMA must be set exactly when"),
        ("cpu", "FXSAVE", (0,), {"block": bytes(100)}, "vCPU 0: fxsave: 100 bytes, expected 0 or 512"),
        ("cpu", "pendingInterrupt", (0,), {"int": 256}, "vCPU 0: pending_interrupt"),
        ("cpu", "boite:extra", (0,), {"json": {"kvm_lapic": "00" * 1023}}, "extra.kvm_lapic: 1023 bytes, expected 1024"),
        ("cpu", "boite:extra", (0,), {"json": {"kvm_mp_state": 9}}, "extra.kvm_mp_state: 9 is not one of"),
        ("cpu", "boite:extra", (0,), {"json": {"emu": {"cpl": 4}}}, "extra.emu.cpl: 0x4 is outside 0x0..0x3"),
        ("cpu", "boite:extra", (0,), {"json": {"emu": {"dr": [0] * 7}}}, "extra.emu.dr: 7 items, expected 8"),
        ("cpu", "boite:extra", (0,), {"json": {"kvm_xcrs": {"x": 1}}}, "extra.kvm_xcrs: XCR index 'x'"),
        ("cpu", "boite:extra", (0,), {"json": {"kvm_vm": {"kvm_irqchip": ["01" + "00" * 519]}}}, "kvm_irqchip\\[0\\]: chip_id is not 0"),
        ("cpu", "boite:extra", (0,), {"json": {"surprise": 1}}, "extra.surprise: unknown field"),
        ("cpu", "boite:extra", (0,), {"block": b"[" * 100_000 + b"]" * 100_000}, "not valid JSON"),
        ("boite", "meta", (), {"json": {"vcpus": 2}}, "meta.vcpus is 2, the 'cpu' group has 1"),
        ("boite", "meta", (), {"json": {"accelerator": "qemu"}}, "meta.accelerator: 'qemu' is not one of"),
        ("boite", "meta", (), {"json": {"vmx": "***"}}, "meta.vmx: not base64"),
        ("boite", "meta", (), {"json": {"who": "me"}}, "meta.who: unknown field"),
        ("boite", "formatVersion", (), {"int": 1}, "formatVersion 1, this boite reads 2"),
    ],
)  # fmt: skip
def test_checked_vcpu_and_meta_records(tmp_path, group, name, indices, change, match) -> None:
    ckpt, _ = valid_files(tmp_path)
    if "json" in change:
        change = {"block": json.dumps(change["json"]).encode()}
    if "block_int" in change:  # a register tag wider than 8 bytes
        g = ckpt.groups[group]
        rewrite(tmp_path, ckpt, group, name, *indices)
        g.put_inline(name, change["block_int"].to_bytes(9, "little"), *indices)
        ckpt.write(tmp_path / "v.vmsn")
    else:
        rewrite(tmp_path, ckpt, group, name, *indices, **change)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / "v.vmsn", tmp_path / "v.vmem", memory=GuestMemory.with_ram(MiB))


def test_block_whose_sizes_disagree_is_refused() -> None:
    stream = b"\x3f\x01b" + struct.pack("<QQH", 1, 2, 0) + b"x\x00\x00"
    with pytest.raises(CheckpointError, match="stores 1 bytes but says 2 in memory"):
        Checkpoint.parse(one_group(stream))


def test_overlapping_groups_are_refused() -> None:
    offset = HEADER.size + 2 * GROUP_DESC.size
    data = header(2) + GROUP_DESC.pack(b"a", offset, 4) + GROUP_DESC.pack(b"b", offset + 2, 2)
    data += b"\x00\x00\x00\x00"
    with pytest.raises(CheckpointError, match="group 'b' overlaps group 'a'"):
        Checkpoint.parse(data)


def test_only_a_complete_checkpoint_is_resumed(tmp_path) -> None:
    valid_files(tmp_path)
    raw = bytearray((tmp_path / "v.vmsn").read_bytes())
    raw[:4] = (0xBED3BED3).to_bytes(4, "little")  # VMware's partial checkpoint
    (tmp_path / "v.vmsn").write_bytes(raw)
    with pytest.raises(CheckpointError, match="a partial checkpoint .* resumes only a complete"):
        read_checkpoint(tmp_path / "v.vmsn")


def test_oversized_device_state_is_refused_before_parsing(tmp_path) -> None:
    from boite.box.checkpoint import DEVICE_STATE_MAX

    ckpt, _ = valid_files(tmp_path)
    rewrite(tmp_path, ckpt, "boite", "deviceState", block=b" " * (DEVICE_STATE_MAX + 1))
    with pytest.raises(CheckpointError, match="bytes of JSON, at most"):
        read_checkpoint(tmp_path / "v.vmsn")
