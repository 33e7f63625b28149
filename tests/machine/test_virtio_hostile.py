"""A hostile guest: every broken ring ends in DEVICE_NEEDS_RESET, never a host exception."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from boite.machine.irq import IrqLine
from boite.machine.virtio import mmio as r
from boite.machine.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from boite.machine.virtio.guestdriver import BlkDriver, GuestAllocator
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

from .test_virtio_blk import DATA, BlkRig, RawFileImage, make_pattern

RO, W, N, IND = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def rig(tmp_path: Path) -> BlkRig:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(make_pattern(1 << 20))
    rig = BlkRig(RawFileImage(disk))
    rig.disk = disk
    rig.drv.setup()
    return rig


def put(rig: BlkRig, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    rig.memory.view(table + 16 * i, 16)[:] = struct.pack("<QIHH", addr, length, flags, nxt)


def publish(rig: BlkRig, head: int, count: int = 1) -> None:
    """Make `head` available `count` times and kick, as a (buggy or evil) driver would."""
    q = rig.drv.queues[0]
    for _ in range(count):
        rig.memory.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
    rig.memory.write_u16(q.avail + 2, q.avail_idx)
    q.kick()


def header(rig: BlkRig) -> int:
    rig.memory.view(rig.drv.header, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    return rig.drv.header


def assert_needs_reset(rig: BlkRig, words: str) -> None:
    d = rig.drv
    assert d.status() & r.STATUS_DEVICE_NEEDS_RESET
    assert d.read_reg(r.REG_INTERRUPT_STATUS) & r.INT_CONFIG_CHANGE
    assert rig.irq.level
    assert rig.dev.broken and words in rig.dev.violations[-1], rig.dev.violations
    # A broken device serves nothing until reset...
    used_before = rig.memory.read_u16(d.queues[0].used + 2)
    d.queues[0].kick()
    assert rig.memory.read_u16(d.queues[0].used + 2) == used_before
    # ... and a reset brings it back, working.
    d.setup()
    assert not d.status() & r.STATUS_DEVICE_NEEDS_RESET
    assert d.request(VIRTIO_BLK_T_IN, 0, DATA, 4096)[0] == VIRTIO_BLK_S_OK
    assert rig.memory.read(DATA, 4096) == rig.disk.read_bytes()[:4096]


def test_descriptor_loop(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, N, 1)
    put(rig, q.desc, 1, DATA, 512, N, 0)  # back to 0: a loop
    publish(rig, 0)
    assert_needs_reset(rig, "longer than")


def test_chain_longer_than_queue_in_indirect_table(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    table = 0x800000
    for i in range(4):
        put(rig, table, i, DATA, 512, W | N, (i + 1) % 4)  # loops inside the table
    put(rig, q.desc, 0, table, 64, IND, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "longer than")


def test_buffer_outside_guest_ram(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, N, 1)
    put(rig, q.desc, 1, (32 << 20) - 256, 512, W | N, 2)  # runs past the end of RAM
    put(rig, q.desc, 2, rig.drv.status_byte, 1, W, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "outside guest RAM")


def test_huge_length(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, N, 1)
    put(rig, q.desc, 1, DATA, 0xFFFF_FFFF, W, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "exceeds")


def test_address_wraps_64_bits(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, 0xFFFF_FFFF_FFFF_FF00, 0x200, N, 1)
    put(rig, q.desc, 1, DATA, 1, W, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "outside guest RAM")


def test_readable_after_writable(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, N, 1)
    put(rig, q.desc, 1, DATA, 512, W | N, 2)
    put(rig, q.desc, 2, DATA + 512, 512, RO, 0)  # device-readable after writable
    publish(rig, 0)
    assert_needs_reset(rig, "device-readable buffer after")


def test_request_without_status_byte(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, RO, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "status byte")


def test_head_and_next_index_out_of_range(rig: BlkRig) -> None:
    publish(rig, 999)
    assert_needs_reset(rig, "head index")
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, header(rig), 16, N, 4000)
    publish(rig, 0)
    assert_needs_reset(rig, "next index")


def test_avail_index_from_the_future(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    rig.memory.write_u16(q.avail + 2, q.size + 5)
    q.kick()
    assert_needs_reset(rig, "more than the queue size")


def test_indirect_inside_indirect(rig: BlkRig) -> None:
    q = rig.drv.queues[0]
    outer, inner = 0x800000, 0x801000
    put(rig, inner, 0, header(rig), 16, RO, 0)
    put(rig, outer, 0, inner, 16, IND, 0)
    put(rig, q.desc, 0, outer, 16, IND, 0)
    publish(rig, 0)
    assert_needs_reset(rig, "inside an indirect")


@pytest.mark.parametrize(
    ("length", "addr", "words"),
    [
        (24, 0x800000, "multiple of 16"),
        (0, 0x800000, "multiple of 16"),
        (32, (32 << 20) - 16, "outside guest RAM"),
    ],
)
def test_bad_indirect_tables(rig: BlkRig, length: int, addr: int, words: str) -> None:
    q = rig.drv.queues[0]
    put(rig, q.desc, 0, addr, length, IND, 0)
    publish(rig, 0)
    assert_needs_reset(rig, words)


def test_indirect_table_needs_no_alignment(rig: BlkRig) -> None:
    """Linux kmallocs indirect tables 8-byte aligned; the spec asks no more."""
    q = rig.drv.queues[0]
    table = 0x800008
    put(rig, table, 0, header(rig), 16, N, 1)
    put(rig, table, 1, DATA, 512, W | N, 2)
    put(rig, table, 2, rig.drv.status_byte, 1, W, 0)
    put(rig, q.desc, 0, table, 48, IND, 0)
    publish(rig, 0)
    assert not rig.dev.broken, rig.dev.violations
    assert rig.memory.read_u8(rig.drv.status_byte) == VIRTIO_BLK_S_OK
    assert rig.memory.read(DATA, 512) == rig.disk.read_bytes()[:512]


def test_indirect_without_the_feature(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    rig = BlkRig(RawFileImage(disk), indirect=True)
    rig.disk = disk
    rig.drv.setup(extra_features=0)
    rig.drv.features = 0
    rig.drv.init(1 << r.VIRTIO_F_VERSION_1)  # no INDIRECT_DESC
    with pytest.raises(RuntimeError):
        rig.drv.request(VIRTIO_BLK_T_IN, 0, DATA, 512)  # nothing completes
    assert "without VIRTIO_RING_F_INDIRECT_DESC" in rig.dev.violations[-1]


@pytest.mark.parametrize(
    ("num", "words"), [(100, "power of two"), (512, "power of two <= 256"), (0, "power of two")]
)
def test_bad_queue_sizes(tmp_path: Path, num: int, words: str) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.write_reg(r.REG_STATUS, 0)
    d.write_reg(r.REG_STATUS, 3)
    d.write_reg(r.REG_DRIVER_FEATURES_SEL, 1)
    d.write_reg(r.REG_DRIVER_FEATURES, 1)
    d.write_reg(r.REG_STATUS, 3 | r.STATUS_FEATURES_OK)
    d.write_reg(r.REG_QUEUE_SEL, 0)
    d.write_reg(r.REG_QUEUE_NUM, num)
    d.write_reg(r.REG_QUEUE_DESC_LOW, 0x10000)
    d.write_reg(r.REG_QUEUE_DRIVER_LOW, 0x20000)
    d.write_reg(r.REG_QUEUE_DEVICE_LOW, 0x30000)
    d.write_reg(r.REG_QUEUE_READY, 1)
    assert d.status() & r.STATUS_DEVICE_NEEDS_RESET
    assert words in rig.dev.violations[-1]
    assert d.read_reg(r.REG_QUEUE_READY) == 0


@pytest.mark.parametrize(
    ("reg", "addr", "words"),
    [
        (r.REG_QUEUE_DESC_LOW, 0x10008, "not 16-byte aligned"),
        (r.REG_QUEUE_DRIVER_LOW, 0x20001, "not 2-byte aligned"),
        (r.REG_QUEUE_DEVICE_LOW, 0x30002, "not 4-byte aligned"),
        (r.REG_QUEUE_DEVICE_HIGH, 0x7, "outside guest RAM"),
    ],
)
def test_misaligned_or_outside_rings(tmp_path: Path, reg: int, addr: int, words: str) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.write_reg(r.REG_STATUS, 0)
    d.write_reg(r.REG_STATUS, 3)
    d.write_reg(r.REG_DRIVER_FEATURES_SEL, 1)
    d.write_reg(r.REG_DRIVER_FEATURES, 1)
    d.write_reg(r.REG_STATUS, 3 | r.STATUS_FEATURES_OK)
    d.write_reg(r.REG_QUEUE_NUM, 256)
    d.write_reg(r.REG_QUEUE_DESC_LOW, 0x10000)
    d.write_reg(r.REG_QUEUE_DRIVER_LOW, 0x20000)
    d.write_reg(r.REG_QUEUE_DEVICE_LOW, 0x30000)
    d.write_reg(reg, addr)
    d.write_reg(r.REG_QUEUE_READY, 1)
    assert d.status() & r.STATUS_DEVICE_NEEDS_RESET
    assert words in rig.dev.violations[-1]


def test_driver_ok_before_features_ok_and_bad_notify(rig: BlkRig) -> None:
    d = rig.drv
    d.write_reg(r.REG_QUEUE_NOTIFY, 7)  # no queue 7
    assert "notify for queue 7" in rig.dev.violations[-1]
    d.write_reg(r.REG_STATUS, 0)
    d.write_reg(r.REG_STATUS, 3 | r.STATUS_DRIVER_OK)
    assert d.status() & r.STATUS_DEVICE_NEEDS_RESET


def test_odd_register_accesses_are_harmless(rig: BlkRig) -> None:
    bus, base = rig.bus, 0xD000_0000
    for off in range(0, 0x100, 1):
        for size in (1, 2, 8):
            bus.read(base + off, size)
            bus.write(base + off, size, 0xFFFF_FFFF_FFFF_FFFF)
    for off in range(0x100, 0x1000, 0x3F):
        bus.read(base + off, 4)
        bus.write(base + off, 4, 0xFFFFFFFF)
    assert not rig.dev.broken
    assert rig.drv.request(VIRTIO_BLK_T_IN, 0, DATA, 512)[0] == VIRTIO_BLK_S_OK


def test_other_device_keeps_running(rig: BlkRig, tmp_path: Path) -> None:
    """One device's violation leaves its neighbour on the same bus untouched."""
    disk2 = tmp_path / "two.raw"
    disk2.write_bytes(make_pattern(1 << 20, seed=3))
    base2 = 0xD000_1000
    dev2 = VirtioMmio(VirtioBlk(RawFileImage(disk2)), rig.memory, IrqLine(6), base=base2)
    rig.bus.register(base2, r.MMIO_SIZE, dev2)
    drv2 = BlkDriver(rig.bus, base2, rig.memory, GuestAllocator(0x900000, 0xA00000))
    drv2.setup()
    publish(rig, 4321)
    assert rig.dev.broken
    assert drv2.request(VIRTIO_BLK_T_IN, 1, 0xA00000, 512)[0] == VIRTIO_BLK_S_OK
    assert rig.memory.read(0xA00000, 512) == disk2.read_bytes()[512:1024]
    assert not dev2.broken
