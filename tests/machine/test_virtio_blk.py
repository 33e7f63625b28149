"""virtio-blk end to end: a Python guest driver over the MMIO bus, a real file, qemu-img."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from boite.disk.base import BlockImage
from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.blk import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)
from boite.machine.virtio.guestdriver import BlkDriver, GuestAllocator
from boite.machine.virtio.mmio import VirtioMmio, mmio_cmdline

BASE = 0xD000_0000
RAM = 32 << 20
DATA = 0x100000  # where the test driver keeps request data
DATA_END = 0x900000


class RawFileImage(BlockImage):
    """A raw file as a BlockImage (test-only until the disk layer's raw image lands).

    `raw_fd` tells virtio-blk it may preadv/pwritev guest memory straight to the file.
    """

    def __init__(self, path: Path, read_only: bool = False, expose_fd: bool = True) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only
        if expose_fd:
            self.raw_fd = self.fd
        self.discarded: list[tuple[int, int]] = []

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf)
        n = os.preadv(self.fd, [view], offset)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def write(self, offset: int, data) -> None:
        os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self.discarded.append((offset, length))
        # Punch a hole where the filesystem can; old data is allowed otherwise.
        try:
            os.posix_fallocate  # noqa: B018 - presence check
            import fcntl  # noqa: F401

            _punch_hole(self.fd, offset, length)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    if libc.fallocate(
        fd,
        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    ):
        raise OSError(ctypes.get_errno(), "fallocate")


class IrqRecorder:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, gsi: int, level: bool) -> None:
        self.levels.append(level)


def make_pattern(size: int, seed: int = 1) -> bytes:
    # A pattern that differs per sector so misplaced data shows up.
    return b"".join(struct.pack("<QQ", seed, i) * 32 for i in range(size // 512))


class BlkRig:
    def __init__(self, image: BlockImage, *, indirect: bool = False, read_only=None) -> None:
        self.memory = GuestMemory.with_ram(RAM)
        self.bus = Bus("mmio")
        self.irq_log = IrqRecorder()
        self.irq = IrqLine(5, self.irq_log)
        self.blk = VirtioBlk(image, read_only=read_only, serial="BOITE-VDA-0001")
        self.dev = VirtioMmio(self.blk, self.memory, self.irq, base=BASE)
        self.bus.register(BASE, r.MMIO_SIZE, self.dev)
        self.drv = BlkDriver(
            self.bus, BASE, self.memory, GuestAllocator(0x10000, DATA), indirect=indirect
        )


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(make_pattern(4 << 20))
    return path


def test_registers_identify_a_v2_block_device(disk: Path) -> None:
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    assert d.read_reg(r.REG_MAGIC) == 0x74726976
    assert d.read_reg(r.REG_VERSION) == 2
    assert d.read_reg(r.REG_DEVICE_ID) == 2
    features = d.device_features()
    assert features & (1 << 32)  # VERSION_1
    assert features & (1 << 28) and features & (1 << 29)
    assert not features & (1 << VIRTIO_BLK_F_RO)
    assert d.read_config(0, 8) == (4 << 20) // 512
    assert d.read_config(20, 4) == 512  # blk_size
    assert d.read_config(12, 4) >= 1  # seg_max
    assert mmio_cmdline(0x1000, BASE, 5) == "virtio_mmio.device=4K@0xd0000000:5"
    assert rig.dev.cmdline() == "virtio_mmio.device=4K@0xd0000000:5"


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("expose_fd", [True, False])
def test_read_write_round_trip_checked_by_qemu_img(
    tmp_path: Path, disk: Path, indirect: bool, expose_fd: bool
) -> None:
    image = RawFileImage(disk, expose_fd=expose_fd)
    rig = BlkRig(image, indirect=indirect)
    d = rig.drv
    d.setup()
    assert d.features & (1 << 28) and d.features & (1 << 29)
    mem = rig.memory

    # Read 512 KiB at sector 100 in 4 KiB segments: must equal the file.
    status, written = d.request(VIRTIO_BLK_T_IN, 100, DATA, 512 << 10)
    assert (status, written) == (VIRTIO_BLK_S_OK, (512 << 10) + 1)
    assert mem.read(DATA, 512 << 10) == disk.read_bytes()[100 * 512 : 100 * 512 + (512 << 10)]
    assert True in rig.irq_log.levels and not rig.irq.level  # raised, then acked
    # Write a new pattern at sector 2048 and read it back through the device.
    new = make_pattern(256 << 10, seed=7)
    mem.write(DATA, new)
    assert d.request(VIRTIO_BLK_T_OUT, 2048, DATA, len(new), write=True) == (VIRTIO_BLK_S_OK, 1)
    assert d.request(VIRTIO_BLK_T_FLUSH, 0) == (VIRTIO_BLK_S_OK, 1)
    mem.write(DATA, bytes(len(new)))
    assert d.request(VIRTIO_BLK_T_IN, 2048, DATA, len(new))[0] == VIRTIO_BLK_S_OK
    assert mem.read(DATA, len(new)) == new
    image.close()

    expected = tmp_path / "expected.raw"
    want = bytearray(make_pattern(4 << 20))
    want[2048 * 512 : 2048 * 512 + len(new)] = new
    expected.write_bytes(want)
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), str(expected)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_get_id_discard_write_zeroes_and_errors(disk: Path) -> None:
    image = RawFileImage(disk)
    rig = BlkRig(image)
    d = rig.drv
    d.setup()
    mem = rig.memory
    status, written = d.request(VIRTIO_BLK_T_GET_ID, 0, DATA, 20)
    assert status == VIRTIO_BLK_S_OK and written == 21
    assert mem.read(DATA, 20).rstrip(b"\0") == b"BOITE-VDA-0001"

    # WRITE_ZEROES over sectors 8..15, DISCARD over 64..127: one 16-byte segment each.
    mem.write(DATA, struct.pack("<QII", 8, 8, 0))
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, DATA, 16, write=True)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert disk.read_bytes()[7 * 512 : 8 * 512] != bytes(512)
    mem.write(DATA, struct.pack("<QII", 64, 64, 0))
    assert d.request(VIRTIO_BLK_T_DISCARD, 0, DATA, 16, write=True)[0] == VIRTIO_BLK_S_OK
    assert image.discarded == [(64 * 512, 64 * 512)]

    # Past the end of the disk: an I/O error for the guest, not a host exception.
    cap = d.capacity
    assert d.request(VIRTIO_BLK_T_IN, cap - 1, DATA, 4096)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_OUT, cap, DATA, 512, write=True)[0] == VIRTIO_BLK_S_IOERR
    # Discard flags are reserved; an unknown request type is UNSUPP.
    mem.write(DATA, struct.pack("<QII", 0, 1, 1))
    assert d.request(VIRTIO_BLK_T_DISCARD, 0, DATA, 16, write=True)[0] == VIRTIO_BLK_S_UNSUPP
    assert d.request(99, 0)[0] == VIRTIO_BLK_S_UNSUPP
    # A partial sector is refused.
    assert d.request(VIRTIO_BLK_T_IN, 0, DATA, 100)[0] == VIRTIO_BLK_S_IOERR
    assert not rig.dev.broken
    assert d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)[0] == VIRTIO_BLK_S_OK


def test_read_only_disk_refuses_writes(disk: Path) -> None:
    before = disk.read_bytes()
    rig = BlkRig(RawFileImage(disk, read_only=True))
    d = rig.drv
    d.setup()
    assert d.features & (1 << VIRTIO_BLK_F_RO)
    rig.memory.write(DATA, b"\xaa" * 4096)
    assert d.request(VIRTIO_BLK_T_OUT, 0, DATA, 4096, write=True)[0] == VIRTIO_BLK_S_IOERR
    rig.memory.write(DATA, struct.pack("<QII", 0, 8, 0))
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, DATA, 16, write=True)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_IN, 0, DATA, 4096)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes() == before


def test_feature_negotiation_requires_version_1(disk: Path) -> None:
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.write_reg(r.REG_STATUS, 0)
    d.write_reg(r.REG_STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER)
    d.write_reg(r.REG_DRIVER_FEATURES_SEL, 0)
    d.write_reg(r.REG_DRIVER_FEATURES, 1 << 9)  # legacy driver: no VERSION_1
    d.write_reg(r.REG_DRIVER_FEATURES_SEL, 1)
    d.write_reg(r.REG_DRIVER_FEATURES, 0)
    d.write_reg(r.REG_STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER | r.STATUS_FEATURES_OK)
    assert not d.status() & r.STATUS_FEATURES_OK
    # Offering a bit the device never offered is refused too.
    d.write_reg(r.REG_DRIVER_FEATURES_SEL, 1)
    d.write_reg(r.REG_DRIVER_FEATURES, 1 | 1 << 20)
    d.write_reg(r.REG_STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER | r.STATUS_FEATURES_OK)
    assert not d.status() & r.STATUS_FEATURES_OK
    # And a proper driver gets in after a reset.
    d.setup()
    assert d.status() & r.STATUS_DRIVER_OK


def test_event_idx_suppresses_interrupts_until_used_event(disk: Path) -> None:
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.setup()
    q = d.queues[0]
    assert q.event_idx
    raised_before = rig.dev.interrupts
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)
    assert rig.dev.interrupts == raised_before + 1
    # used_event is now 1: the next completion (used idx 1 -> 2) crosses it.
    q.event_idx = False  # stop the test driver from moving used_event in reap()
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)
    assert rig.dev.interrupts == raised_before + 2
    # used_event stays behind: further completions are not signalled.
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)
    assert rig.dev.interrupts == raised_before + 2
    # Moving used_event to the current used index asks for the next one again.
    rig.memory.write_u16(q.avail + 4 + 2 * q.size, q.last_used)
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 512)
    assert rig.dev.interrupts == raised_before + 3
    # The device published avail_event for the driver's kicks.
    assert rig.memory.read_u16(q.used + 4 + 8 * q.size) == q.avail_idx


def test_interrupt_line_follows_interrupt_status(disk: Path) -> None:
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.setup()
    q = d.queues[0]
    from boite.machine.virtio.guestdriver import Buffer

    rig.memory.view(d.header, 16)[:] = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    q.add([Buffer(d.header, 16), Buffer(DATA, 512, True), Buffer(d.status_byte, 1, True)])
    q.kick()
    assert rig.irq.level
    assert d.read_reg(r.REG_INTERRUPT_STATUS) == r.INT_USED_BUFFER
    d.write_reg(r.REG_INTERRUPT_ACK, r.INT_USED_BUFFER)
    assert not rig.irq.level
    # A config change (e.g. a resized disk) raises bit 1 and bumps the generation.
    gen = d.read_reg(r.REG_CONFIG_GENERATION)
    rig.dev.config_changed()
    assert d.read_reg(r.REG_INTERRUPT_STATUS) == r.INT_CONFIG_CHANGE
    assert d.read_reg(r.REG_CONFIG_GENERATION) == gen + 1
    assert rig.irq.level


def test_reset_and_state_round_trip(disk: Path) -> None:
    rig = BlkRig(RawFileImage(disk))
    d = rig.drv
    d.setup()
    d.request(VIRTIO_BLK_T_IN, 0, DATA, 4096)
    state = rig.dev.save_state()
    # A second device loaded from the state carries on with the same rings.
    dev2 = VirtioMmio(VirtioBlk(RawFileImage(disk)), rig.memory, IrqLine(5), base=BASE)
    dev2.load_state(state)
    assert dev2.save_state() == state
    bus2 = Bus("mmio")
    bus2.register(BASE, r.MMIO_SIZE, dev2)
    d.bus = bus2
    assert d.request(VIRTIO_BLK_T_IN, 8, DATA, 4096)[0] == VIRTIO_BLK_S_OK
    # Reset through the status register clears everything.
    d.write_reg(r.REG_STATUS, 0)
    assert d.status() == 0
    d.write_reg(r.REG_QUEUE_SEL, 0)
    assert d.read_reg(r.REG_QUEUE_READY) == 0
