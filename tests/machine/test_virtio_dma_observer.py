"""GuestMemory write observers: what devices report when they write guest RAM.

The emulator caches translated code by physical page; a device's DMA into such a page
must reach it (GuestMemory.note_dma_write). Here the reports are checked for virtio-blk
and virtio-rng, through the Python guest driver's real virtqueues: every byte a device
may have written is reported, before the used index publishes it, and nothing the device
only read.
"""

from __future__ import annotations

from pathlib import Path

from boite.disk import open_disk
from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk
from boite.machine.virtio.guestdriver import (
    ALL_RING_FEATURES,
    BlkDriver,
    Buffer,
    GuestAllocator,
    VirtioMmioDriver,
)
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.rng import VirtioRng

BASE = 0xD000_0000
DATA = 0x200000


class WriteLog:
    """An observer that keeps every report, with the used index seen at that moment."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.used_addr = 0
        self.events: list[tuple[int, int, int]] = []

    def __call__(self, gpa: int, length: int) -> None:
        used_idx = self.memory.read_u16(self.used_addr + 2) if self.used_addr else -1
        self.events.append((gpa, length, used_idx))

    def ranges(self) -> set[tuple[int, int]]:
        return {(g, n) for g, n, _ in self.events}


def _blk(tmp_path: Path, indirect: bool):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"".join(bytes([i]) * 512 for i in range(64)))
    memory = GuestMemory.with_ram(8 << 20)
    bus = Bus("mmio")
    dev = VirtioMmio(VirtioBlk(open_disk(str(raw))), memory, IrqLine(5), base=BASE)
    bus.register(BASE, r.MMIO_SIZE, dev)
    drv = BlkDriver(bus, BASE, memory, GuestAllocator(0x10000, DATA), indirect=indirect)
    drv.setup()
    return memory, dev, drv


def _kick_logged(memory: GuestMemory, q, bufs: list[Buffer], indirect: bool = False) -> WriteLog:
    """Post `bufs`, then log only what the device writes while it serves the kick."""
    q.add(bufs, indirect=indirect)
    log = WriteLog(memory)
    log.used_addr = q.used
    memory.add_write_observer(log)
    try:
        q.kick()
    finally:
        memory.remove_write_observer(log)
    return log


def test_blk_read_reports_the_data_and_status_buffers(tmp_path: Path) -> None:
    for indirect in (False, True):
        memory, dev, drv = _blk(tmp_path, indirect)
        q = drv.queues[0]
        memory.write_u8(drv.status_byte, 0xFF)
        memory.write(
            drv.header, VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little")
        )
        # 8 KiB in two segments straddling a page boundary, then the status byte.
        data = [Buffer(DATA + 0x800, 0x1000, True), Buffer(DATA + 0x1800, 0x1000, True)]
        slot = q.avail_idx % q.size
        log = _kick_logged(
            memory, q, [Buffer(drv.header, 16), *data, Buffer(drv.status_byte, 1, True)], indirect
        )
        assert memory.read(DATA + 0x800, 0x2000) == b"".join(bytes([i]) * 512 for i in range(3, 19))
        got = log.ranges()
        want = {(DATA + 0x800, 0x1000), (DATA + 0x1800, 0x1000), (drv.status_byte, 1)}
        assert want <= got, (indirect, got)
        # The used ring, up to and including the element pushed.
        assert (q.used, 4 + 8 * (slot + 1)) in got
        # EVENT_IDX: the device's avail_event write is a write too.
        assert (q.used + 4 + 8 * q.size, 2) in got
        # Nothing the device only read (the header) and nothing else.
        assert not any(g <= drv.header < g + n for g, n in got)
        assert len(got) == 5
        # Reported before the used index lets the driver see the data.
        old_idx = q.last_used
        assert all(idx == old_idx for g, n, idx in log.events if (g, n) in want)
        done = q.reap()
        assert len(done) == 1 and done[0][1] == 0x2001
        dev.backend.close()


def test_blk_write_reports_only_the_status_byte(tmp_path: Path) -> None:
    memory, dev, drv = _blk(tmp_path, False)
    q = drv.queues[0]
    memory.write(DATA, bytes(range(256)) * 16)
    memory.write(drv.header, VIRTIO_BLK_T_OUT.to_bytes(4, "little") + bytes(12))
    memory.write_u8(drv.status_byte, 0xFF)
    log = _kick_logged(
        memory, q, [Buffer(drv.header, 16), Buffer(DATA, 4096), Buffer(drv.status_byte, 1, True)]
    )
    got = log.ranges()
    assert (drv.status_byte, 1) in got
    assert not any(g < DATA + 4096 and DATA < g + n for g, n in got)  # the data was read
    assert memory.read_u8(drv.status_byte) == 0
    dev.backend.close()


def test_rng_reports_whole_writable_buffers_and_observers_come_and_go() -> None:
    memory = GuestMemory.with_ram(8 << 20)
    bus = Bus("mmio")
    dev = VirtioMmio(VirtioRng(), memory, IrqLine(8), base=BASE)
    bus.register(BASE, r.MMIO_SIZE, dev)
    drv = VirtioMmioDriver(bus, BASE, memory, GuestAllocator(0x10000, DATA))
    drv.init(ALL_RING_FEATURES, expect_id=VirtioRng.device_id)
    (q,) = drv.queues
    log = _kick_logged(memory, q, [Buffer(DATA, 64, True), Buffer(DATA + 0x3000, 0x2000, True)])
    assert {(DATA, 64), (DATA + 0x3000, 0x2000)} <= log.ranges()
    assert [n for _, n in q.reap()] == [64 + 0x2000]
    # GuestMemory's own writers report too; without observers nothing is called.
    seen: list[tuple[int, int]] = []
    obs = lambda g, n: seen.append((g, n))  # noqa: E731
    memory.add_write_observer(obs)
    memory.write(DATA, b"abc")
    memory.write_u32(DATA + 8, 1)
    memory.note_dma_write(DATA + 0x5000, 7)
    memory.remove_write_observer(obs)
    memory.write_u64(DATA, 2)
    assert seen == [(DATA, 3), (DATA + 8, 4), (DATA + 0x5000, 7)]
    assert memory.write_observers == ()
