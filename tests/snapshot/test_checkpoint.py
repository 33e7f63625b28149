"""The checkpoint container (.vmsn/.vmss) and the machine state boite keeps in it."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.accel.cpustate import GPR_NAMES, CpuState, DescriptorTable, Segment
from boite.box.checkpoint import (
    GROUP_DESC,
    HEADER,
    MAGIC,
    MAGIC_OLD,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from boite.errors import SnapshotError
from boite.machine.memory import GuestMemory

MiB = 1 << 20


def sample_cpu(n: int = 0) -> CpuState:
    st = CpuState()
    st.gpr = {reg: (i + 1) * 0x1111_0000_0000 + n for i, reg in enumerate(GPR_NAMES)}
    st.rip = 0x7C00 + n
    st.rflags = 0x246
    st.segments = {
        "cs": Segment(selector=0x8, base=0, limit=0xFFFFFFFF, type=0xB, db=0, l=1, g=1),
        "ds": Segment(selector=0x10, base=0x1000, limit=0xFFFFF, type=3, db=1, g=1),
        "ss": Segment(selector=0x10, base=0, limit=0xFFFF, unusable=1),
        "tr": Segment(selector=0x18, base=0xFFFF_8000_0000_1000, limit=0x67, type=0xB, s=0),
        "ldt": Segment(selector=0, type=2, s=0, present=0),
    }
    st.gdt = DescriptorTable(base=0xFFFF_FFFF_8000_0000, limit=0x27)
    st.idt = DescriptorTable(base=0x2000, limit=0xFFF)
    st.cr0, st.cr2, st.cr3, st.cr4, st.cr8 = 0x80050033, 0xDEAD000, 0x1AD000, 0x6F8, 2
    st.efer = 0xD01
    st.msrs = {0xC0000080: 0xD01, 0x174: 0x10, 0xC0000100: 0x7FFF_0000}
    st.fxsave = bytes(range(256)) * 2
    st.halted = n % 2 == 1
    st.pending_interrupt = 0x20 if n == 0 else None
    st.extra = (
        {
            "kvm_mp_state": 3,
            "kvm_lapic": "ab" * 1024,
            "emu": {"cpl": 0},
            "interrupt_bitmap": [0, 1 << 63, 0, 0],
        }
        if n == 0
        else {}
    )
    return st


def patterned_memory() -> GuestMemory:
    """Two regions (one above 4 GiB, as a PC's RAM above the hole), data and zero pages."""
    mem = GuestMemory()
    mem.add_region(0, 2 * MiB)
    mem.add_region(1 << 32, 1 * MiB)
    mem.write(0x0, b"\xaa" * 4096)
    mem.write(0x5000, os.urandom(3 * 4096))
    mem.write(0x1FF000 + 4095, b"\x01")  # last byte of the low region only
    mem.write(0x10_0000, bytes(4095) + b"\x02")  # a page whose last byte alone is set
    mem.write(0x10_2000, b"\x00\x00\x03" + bytes(4093))  # a page set in the middle
    mem.write((1 << 32) + 0x3000, b"high memory")
    return mem


def test_container_round_trip() -> None:
    ckpt = Checkpoint()
    g = ckpt.group("example")
    g.put_int("one", 0xAB, 1)
    g.put_int("four", 0xDEADBEEF, 4, 7)
    g.put_int("eight", 1 << 63, 8, 1, 2, 3)
    g.put_inline("bytes", b"x" * 61)
    g.put_inline("flag", b"")
    g.put_block("blob", os.urandom(1000), 4)
    ckpt.group("second").put_block("empty", b"")
    data = ckpt.to_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xBED2BED2
    back = Checkpoint.parse(data)
    assert list(back.groups) == ["example", "second"]
    for a, b in zip(ckpt.groups["example"], back.groups["example"], strict=True):
        assert (a.name, a.indices, a.value, a.block) == (b.name, b.indices, b.value, b.block)
    assert back.groups["example"].int("eight", 1, 2, 3) == 1 << 63
    assert back.groups["example"].int("four", 7) == 0xDEADBEEF
    assert back.groups["second"].bytes("empty") == b""
    assert back.to_bytes() == data


def test_old_magic_has_32_bit_block_sizes() -> None:
    ckpt = Checkpoint(magic=MAGIC_OLD)
    ckpt.group("g").put_block("b", b"hello")
    data = ckpt.to_bytes()
    stream = data[HEADER.size + GROUP_DESC.size :]
    # flags, name length, name, u32 stored size, u32 size in memory, u16 padding, data
    assert stream[:3] == bytes((63, 1)) + b"b"
    assert struct.unpack_from("<IIH", stream, 3) == (5, 5, 0)
    assert Checkpoint.parse(data).groups["g"].bytes("b") == b"hello"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.text("abcdefghijklmnopqrstuvwxyz:", min_size=1, max_size=20),
            st.lists(st.integers(0, 2**32 - 1), max_size=3),
            st.one_of(st.binary(max_size=61), st.binary(max_size=300)),
            st.booleans(),
        ),
        max_size=20,
        unique_by=lambda t: (t[0], tuple(t[1])),
    )
)
def test_container_round_trip_property(tags) -> None:
    ckpt = Checkpoint()
    g = ckpt.group("g")
    for name, indices, value, block in tags:
        if block or len(value) > 61:
            g.put_block(name, value, *indices)
        else:
            g.put_inline(name, value, *indices)
    back = Checkpoint.parse(ckpt.to_bytes()).groups["g"]
    assert [(t.name, t.indices, t.value, t.block) for t in back] == [
        (t.name, t.indices, t.value, t.block) for t in g
    ]


def test_machine_round_trip(tmp_path) -> None:
    mem = patterned_memory()
    cpus = [sample_cpu(0), sample_cpu(1)]
    devices = {
        "uart0": {"lcr": 3, "fifo": b"\x00abc", "pending": [1, 2]},
        "rtc": {"cmos": bytes(128)},
    }
    vmsn, vmem = tmp_path / "box-Snapshot1.vmsn", tmp_path / "box-Snapshot1.vmem"
    write_checkpoint(
        vmsn, vmem, [cpus[0], cpus[1].to_dict()], mem, devices, meta={"accelerator": "kvm"}
    )
    saved = read_checkpoint(vmsn)
    assert [c.to_dict() for c in saved.cpu_states] == [c.to_dict() for c in cpus]
    assert saved.device_state == devices
    assert saved.meta == {"accelerator": "kvm"}
    assert saved.regions == [(0, 0, 2 * MiB), (1 << 32, 2 * MiB, MiB)]
    for r in mem.regions:
        assert saved.memory.read(r.gpa, r.size) == mem.read(r.gpa, r.size)
    saved.memory.close()


def test_load_into_dirty_memory_zeroes_holes(tmp_path) -> None:
    mem = patterned_memory()
    write_checkpoint(tmp_path / "a.vmsn", tmp_path / "a.vmem", [CpuState()], mem, {})
    target = GuestMemory()
    target.add_region(0, 2 * MiB)
    target.add_region(1 << 32, 1 * MiB)
    for r in target.regions:
        target.write(r.gpa, b"\xff" * r.size)  # a running guest's RAM, about to be reverted
    read_checkpoint(tmp_path / "a.vmsn", tmp_path / "a.vmem", memory=target)
    for r in mem.regions:
        assert target.read(r.gpa, r.size) == mem.read(r.gpa, r.size)


def test_vmem_is_sparse(tmp_path) -> None:
    mem = GuestMemory.with_ram(64 * MiB)
    mem.write(0x10_0000, b"kernel" * 1000)
    mem.write(60 * MiB, b"\x01")
    write_checkpoint(tmp_path / "s.vmsn", tmp_path / "s.vmem", [CpuState()], mem, {})
    st_ = os.stat(tmp_path / "s.vmem")
    assert st_.st_size == 64 * MiB
    assert st_.st_blocks * 512 <= 1 * MiB  # two touched areas, not 64 MiB
    fd = os.open(tmp_path / "s.vmem", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0x10_0000  # the zero pages before it are holes
    finally:
        os.close(fd)


def test_region_too_big_for_target_memory(tmp_path) -> None:
    mem = patterned_memory()
    write_checkpoint(tmp_path / "a.vmsn", tmp_path / "a.vmem", [CpuState()], mem, {})
    small = GuestMemory.with_ram(1 * MiB)
    with pytest.raises(CheckpointError, match="does not fit"):
        read_checkpoint(tmp_path / "a.vmsn", tmp_path / "a.vmem", memory=small)


def test_checkpoint_error_is_a_snapshot_error() -> None:
    assert issubclass(CheckpointError, SnapshotError)


def test_magic_is_written_little_endian(tmp_path) -> None:
    write_checkpoint(tmp_path / "m.vmsn", tmp_path / "m.vmem", [], GuestMemory.with_ram(MiB), {})
    assert (tmp_path / "m.vmsn").read_bytes()[:4] == b"\xd2\xbe\xd2\xbe"
    assert int.from_bytes(b"\xd2\xbe\xd2\xbe", "little") == MAGIC


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (tmpfs)")
def test_vmem_on_tmpfs(tmp_path) -> None:
    """tmpfs may refuse O_DIRECT; the same files come out through plain I/O."""
    import tempfile

    mem = patterned_memory()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        write_checkpoint(f"{d}/t.vmsn", f"{d}/t.vmem", [CpuState()], mem, {})
        saved = read_checkpoint(f"{d}/t.vmsn")
        for r in mem.regions:
            assert saved.memory.read(r.gpa, r.size) == mem.read(r.gpa, r.size)
        saved.memory.close()


def test_plain_io_fallback_when_direct_is_refused(tmp_path) -> None:
    """An O_DIRECT transfer the kernel refuses (EINVAL) is retried as plain I/O."""
    from boite.box.vmem import _File

    f = _File(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    try:
        unaligned = memoryview(bytearray(b"abc" * 1000))[1:]  # not block-aligned anywhere
        f.pwrite_all(unaligned, 3)
        assert (tmp_path / "x").read_bytes()[3:] == bytes(unaligned)
        buf = bytearray(len(unaligned))
        assert f.pread_all(memoryview(buf), 3) == len(unaligned)
        assert bytes(buf) == bytes(unaligned)
        assert not f.direct
    finally:
        f.close()


def test_device_state_keeps_its_types(tmp_path) -> None:
    """What JSON has no form for comes back as it went in: bytes, tuples, number keys."""
    state = {
        "pic": {"irr": 0x21, "regs": {0: 1, 7: (2, 3)}, "pending": [(1, b"\x00")]},
        "odd": {"$bytes": "not a tag here"},
        "flags": {True: "x", None: 1.5},
    }
    mem = GuestMemory.with_ram(MiB)
    write_checkpoint(tmp_path / "d.vmsn", tmp_path / "d.vmem", [CpuState()], mem, state)
    assert read_checkpoint(tmp_path / "d.vmsn").device_state == state
    with pytest.raises(CheckpointError, match="not plain data"):
        write_checkpoint(tmp_path / "e.vmsn", tmp_path / "e.vmem", [], mem, {"x": object()})
    assert not list(tmp_path.glob("*e.vm*"))  # refused before anything was written


def test_a_pc_machine_device_state_round_trips(tmp_path) -> None:
    builder = pytest.importorskip("boite.machine.builder")
    machine = builder.build_machine(memsize_mb=16)
    state = machine.save_device_state()
    write_checkpoint(
        tmp_path / "pc.vmsn", tmp_path / "pc.vmem", [CpuState()], machine.memory, state
    )
    saved = read_checkpoint(tmp_path / "pc.vmsn")
    assert saved.device_state == state
    builder.build_machine(memsize_mb=16).load_device_state(saved.device_state)
    saved.memory.close()
