"""A guest-side virtio-mmio driver in Python, for tests, fuzzing and the device benchmark.

It does what Linux's virtio_mmio + virtio_ring drivers do: reset, negotiate features,
lay out split virtqueues in guest RAM, post descriptor chains (direct or indirect), kick
through QueueNotify and reap the used ring. Everything goes through the MMIO bus and guest
memory, exactly the paths a real guest's accesses take.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from boite.machine.bus import Bus
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)


class GuestAllocator:
    """A bump allocator over a window of guest RAM (the driver's 'kmalloc')."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"guest allocator window {self.start:#x}-{self.end:#x} is full")
        self.next = addr + size
        return addr


@dataclass
class Buffer:
    addr: int
    length: int
    writable: bool = False


class DriverQueue:
    """The driver's half of one split virtqueue."""

    def __init__(self, driver: VirtioMmioDriver, index: int, size: int, event_idx: bool) -> None:
        self.driver = driver
        self.mem = driver.memory
        self.index = index
        self.size = size
        self.event_idx = event_idx
        a = driver.alloc
        self.desc = a.alloc(16 * size, 16)
        self.avail = a.alloc(6 + 2 * size, 2)
        self.used = a.alloc(6 + 8 * size, 4)
        self.mem.view(self.desc, 16 * size)[:] = bytes(16 * size)
        self.mem.view(self.avail, 6 + 2 * size)[:] = bytes(6 + 2 * size)
        self.mem.view(self.used, 6 + 8 * size)[:] = bytes(6 + 8 * size)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chain_descs: dict[int, list[int]] = {}
        self.indirect_tables: dict[int, tuple[int, int]] = {}

    def _write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.view(table + 16 * i, 16)[:] = struct.pack("<QIHH", addr, length, flags, nxt)

    def add(self, bufs: list[Buffer], indirect: bool = False) -> int:
        """Post one chain; returns its head index."""
        if indirect:
            head = self.free.pop()
            # One table per head, reused (Linux kmallocs one per request).
            table, cap = self.indirect_tables.get(head, (0, 0))
            if cap < len(bufs):
                cap = max(len(bufs), 64)
                table = self.driver.alloc.alloc(16 * cap, 16)
                self.indirect_tables[head] = (table, cap)
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                )
                self._write_desc(table, i, b.addr, b.length, flags, i + 1)
            self._write_desc(self.desc, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.chain_descs[head] = [head]
        else:
            if len(bufs) > len(self.free):
                raise MemoryError("virtqueue is full")
            ids = [self.free.pop() for _ in bufs]
            for k, (i, b) in enumerate(zip(ids, bufs, strict=True)):
                last = k + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (
                    0 if last else VIRTQ_DESC_F_NEXT
                )
                self._write_desc(self.desc, i, b.addr, b.length, flags, 0 if last else ids[k + 1])
            head = ids[0]
            self.chain_descs[head] = ids
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.avail + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def kick(self) -> None:
        self.driver.write_reg(r.REG_QUEUE_NOTIFY, self.index)

    def reap(self) -> list[tuple[int, int]]:
        """Take (head, written length) of every chain the device has returned."""
        done = []
        used_idx = self.mem.read_u16(self.used + 2)
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.view(self.used + 4 + 8 * slot, 8))
            done.append((head, length))
            self.free.extend(self.chain_descs.pop(head, [head]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # used_event: interrupt me for the next entry.
            self.mem.write_u16(self.avail + 4 + 2 * self.size, self.last_used)
        return done


class VirtioMmioDriver:
    """Brings up one virtio-mmio device the way Linux's virtio_mmio driver does."""

    def __init__(self, bus: Bus, base: int, memory: GuestMemory, alloc: GuestAllocator) -> None:
        self.bus = bus
        self.base = base
        self.memory = memory
        self.alloc = alloc
        self.queues: list[DriverQueue] = []
        self.features = 0

    def read_reg(self, off: int) -> int:
        return self.bus.read(self.base + off, 4)

    def write_reg(self, off: int, value: int) -> None:
        self.bus.write(self.base + off, 4, value)

    def read_config(self, off: int, size: int) -> int:
        if size == 8:
            lo = self.bus.read(self.base + r.CONFIG_OFFSET + off, 4)
            hi = self.bus.read(self.base + r.CONFIG_OFFSET + off + 4, 4)
            return lo | hi << 32
        return self.bus.read(self.base + r.CONFIG_OFFSET + off, size)

    def status(self) -> int:
        return self.read_reg(r.REG_STATUS)

    def device_features(self) -> int:
        self.write_reg(r.REG_DEVICE_FEATURES_SEL, 0)
        lo = self.read_reg(r.REG_DEVICE_FEATURES)
        self.write_reg(r.REG_DEVICE_FEATURES_SEL, 1)
        hi = self.read_reg(r.REG_DEVICE_FEATURES)
        return lo | hi << 32

    def init(
        self,
        wanted: int,
        *,
        queue_sizes: list[int] | None = None,
        expect_id: int | None = None,
    ) -> int:
        """Reset, negotiate `wanted & offered`, set up every queue, DRIVER_OK."""
        if self.read_reg(r.REG_MAGIC) != r.MAGIC or self.read_reg(r.REG_VERSION) != 2:
            raise RuntimeError(f"no virtio-mmio v2 device at {self.base:#x}")
        if expect_id is not None and self.read_reg(r.REG_DEVICE_ID) != expect_id:
            raise RuntimeError(f"device at {self.base:#x} is not virtio type {expect_id}")
        self.write_reg(r.REG_STATUS, 0)
        self.write_reg(r.REG_STATUS, r.STATUS_ACKNOWLEDGE)
        self.write_reg(r.REG_STATUS, r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER)
        self.features = self.device_features() & wanted
        for sel in (0, 1):
            self.write_reg(r.REG_DRIVER_FEATURES_SEL, sel)
            self.write_reg(r.REG_DRIVER_FEATURES, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        st = r.STATUS_ACKNOWLEDGE | r.STATUS_DRIVER | r.STATUS_FEATURES_OK
        self.write_reg(r.REG_STATUS, st)
        if not self.status() & r.STATUS_FEATURES_OK:
            raise RuntimeError("device refused the features")
        event_idx = bool(self.features & (1 << r.VIRTIO_RING_F_EVENT_IDX))
        self.queues = []
        i = 0
        while True:
            self.write_reg(r.REG_QUEUE_SEL, i)
            num_max = self.read_reg(r.REG_QUEUE_NUM_MAX)
            if num_max == 0:
                break
            size = min(num_max, queue_sizes[i]) if queue_sizes and i < len(queue_sizes) else num_max
            q = DriverQueue(self, i, size, event_idx)
            self.write_reg(r.REG_QUEUE_NUM, size)
            for lo, addr in (
                (r.REG_QUEUE_DESC_LOW, q.desc),
                (r.REG_QUEUE_DRIVER_LOW, q.avail),
                (r.REG_QUEUE_DEVICE_LOW, q.used),
            ):
                self.write_reg(lo, addr & 0xFFFFFFFF)
                self.write_reg(lo + 4, addr >> 32)
            self.write_reg(r.REG_QUEUE_READY, 1)
            self.queues.append(q)
            i += 1
        self.write_reg(r.REG_STATUS, st | r.STATUS_DRIVER_OK)
        return self.features

    def ack_interrupt(self) -> int:
        isr = self.read_reg(r.REG_INTERRUPT_STATUS)
        if isr:
            self.write_reg(r.REG_INTERRUPT_ACK, isr)
        return isr


ALL_RING_FEATURES = (
    1 << r.VIRTIO_F_VERSION_1 | 1 << r.VIRTIO_RING_F_INDIRECT_DESC | 1 << r.VIRTIO_RING_F_EVENT_IDX
)


class BlkDriver(VirtioMmioDriver):
    """virtio-blk requests as Linux's virtio_blk builds them: header, data, status."""

    def __init__(self, *args, indirect: bool = False, seg_size: int = 4096, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.indirect = indirect
        self.seg_size = seg_size
        self.header = self.alloc.alloc(16, 16)
        self.status_byte = self.alloc.alloc(1, 1)

    def setup(self, extra_features: int = 0xFFFFFFFF) -> int:
        return self.init(ALL_RING_FEATURES | extra_features, expect_id=r.VIRTIO_ID_BLOCK)

    @property
    def capacity(self) -> int:
        return self.read_config(0, 8)

    def request(
        self, rtype: int, sector: int, data_addr: int = 0, length: int = 0, write: bool = False
    ) -> tuple[int, int]:
        """One request through queue 0; returns (status, bytes the device wrote)."""
        q = self.queues[0]
        self.memory.view(self.header, 16)[:] = struct.pack("<IIQ", rtype, 0, sector)
        self.memory.write_u8(self.status_byte, 0xFF)
        bufs = [Buffer(self.header, 16)]
        pos = 0
        while pos < length:
            n = min(self.seg_size, length - pos)
            bufs.append(Buffer(data_addr + pos, n, writable=not write))
            pos += n
        bufs.append(Buffer(self.status_byte, 1, writable=True))
        q.add(bufs, indirect=self.indirect)
        q.kick()
        done = q.reap()
        self.ack_interrupt()
        if len(done) != 1:
            raise RuntimeError(f"expected one completion, got {done}")
        return self.memory.read_u8(self.status_byte), done[0][1]
