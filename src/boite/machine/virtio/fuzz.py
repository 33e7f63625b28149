"""Structured fuzzing of virtio devices: random rings, descriptors, headers and registers.

A `VirtioFuzzer` owns a small guest (RAM, MMIO bus, one device) and plays a hostile driver:
each `step()` lays out one request described by a `RequestSpec` (descriptors with any
address, length, flag and next index, optionally an indirect table, a request header, a
forged avail index, stray register writes), kicks the device and records what happened.
The only acceptable outcomes are a completed request or DEVICE_NEEDS_RESET; any exception
that escapes the device is a bug. Used by the hypothesis tests and bench/fuzz_virtio.py.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import tempfile
import traceback
from dataclasses import dataclass, field

from boite.disk.base import BlockImage
from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.blk import VirtioBlk
from boite.machine.virtio.guestdriver import ALL_RING_FEATURES, GuestAllocator, VirtioMmioDriver
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.net import VirtioNet
from boite.machine.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

RAM = 8 << 20
BASE = 0xD000_0000
RINGS = (0x1000, 0x100000)
HEADER = 0x100000
TABLES = 0x180000
WINDOW = (0x200000, 0x700000)
DISK_SIZE = 1 << 20


@dataclass
class Desc:
    addr: int
    length: int
    flags: int
    next: int


@dataclass
class RequestSpec:
    """One hostile request. Descriptors go to table slots `slots[i]`."""

    descs: list[Desc]
    slots: list[int]
    head: int
    indirect: list[Desc] | None = None
    header: bytes = b""
    avail_jump: int | None = None  # forge avail->idx to last + this
    registers: list[tuple[int, int]] = field(default_factory=list)
    rx_frame: bytes = b""  # net: a frame arriving from the wire


class RawFile(BlockImage):
    """A scratch raw file for the fuzzed disk (exposes raw_fd for the preadv path)."""

    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        self.size = size
        self.raw_fd = self.fd

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf)
        n = os.preadv(self.fd, [view], offset)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def write(self, offset: int, data) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise AssertionError(f"write outside the disk: {offset:#x}+{len(data):#x}")
        os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise AssertionError(f"discard outside the disk: {offset:#x}+{length:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SocketWire:
    """A frame transport over a SOCK_SEQPACKET pair: the fuzzed NIC's 'wire'."""

    def __init__(self) -> None:
        self.dev_side, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev_side.setblocking(False)
        self.peer.setblocking(False)

    def fileno(self) -> int:
        return self.dev_side.fileno()

    def send(self, views: list[memoryview]) -> int:
        return self.dev_side.sendmsg(views)

    def recv_into(self, views: list[memoryview]) -> int:
        return self.dev_side.recvmsg_into(views)[0]

    def drain(self) -> int:
        n = 0
        try:
            while True:
                self.peer.recv(70000)
                n += 1
        except BlockingIOError:
            return n

    def close(self) -> None:
        self.dev_side.close()
        self.peer.close()


class VirtioFuzzer:
    def __init__(self, kind: str, workdir: str | None = None) -> None:
        self.kind = kind
        self.memory = GuestMemory.with_ram(RAM)
        self.bus = Bus("mmio")
        self._tmp = None
        if kind == "blk":
            if workdir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="boite-fuzz-")
                workdir = self._tmp.name
            self.disk_path = os.path.join(workdir, "fuzz.raw")
            self.image = RawFile(self.disk_path, DISK_SIZE)
            self.backend = VirtioBlk(self.image, serial="FUZZ")
        elif kind == "net":
            self.wire = SocketWire()
            self.backend = VirtioNet(self.wire, "00:0c:29:00:00:01")
        else:
            raise ValueError(f"unknown device kind {kind!r}")
        self.dev = VirtioMmio(self.backend, self.memory, IrqLine(5), base=BASE)
        self.bus.register(BASE, r.MMIO_SIZE, self.dev)
        self.alloc = GuestAllocator(*RINGS)
        self.drv = VirtioMmioDriver(self.bus, BASE, self.memory, self.alloc)
        self.counts: dict[str, int] = {"requests": 0, "completed": 0, "needs_reset": 0}
        self.escaped = 0
        self.first_escape = ""
        self._init_driver()

    def _init_driver(self) -> None:
        self.alloc.next = self.alloc.start
        self.drv.init(ALL_RING_FEATURES | 0xFFFFFFFF)

    def close(self) -> None:
        if self.kind == "blk":
            self.image.close()
        else:
            self.backend.close()
            self.wire.close()
        self.memory.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --- one request ----------------------------------------------------------------
    def step(self, spec: RequestSpec) -> str:
        """Play one request; returns 'completed', 'needs_reset', 'idle' or 'escaped'."""
        self.counts["requests"] += 1
        try:
            outcome = self._play(spec)
        except Exception:  # the bug we hunt: anything escaping the device
            self.escaped += 1
            if not self.first_escape:
                self.first_escape = traceback.format_exc()
            outcome = "escaped"
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if self.dev.broken or not self.drv.status() & r.STATUS_DRIVER_OK or outcome == "escaped":
            self._init_driver()
        return outcome

    def _play(self, spec: RequestSpec) -> str:
        mem = self.memory
        qi = 0 if self.kind == "blk" else (1 if not spec.rx_frame else 0)
        q = self.drv.queues[qi]
        if spec.header:
            mem.write(HEADER, spec.header[:4096])
        for d, slot in zip(spec.descs, spec.slots, strict=False):
            mem.view(q.desc + 16 * (slot % q.size), 16)[:] = struct.pack(
                "<QIHH", d.addr, d.length, d.flags, d.next
            )
        if spec.indirect:
            for i, d in enumerate(spec.indirect[:256]):
                mem.view(TABLES + 16 * i, 16)[:] = struct.pack(
                    "<QIHH", d.addr, d.length, d.flags, d.next
                )
        mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), spec.head & 0xFFFF)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        idx = q.avail_idx
        if spec.avail_jump is not None:
            idx = (self.dev.queues[qi].last_avail_idx + spec.avail_jump) & 0xFFFF
        mem.write_u16(q.avail + 2, idx)
        for off, value in spec.registers:
            self.bus.write(BASE + off, 4, value)
        q.kick()
        if self.kind == "net":
            if spec.rx_frame:
                try:
                    self.wire.peer.send(spec.rx_frame)
                except (BlockingIOError, OSError):
                    pass
                self.backend.poll_rx()
            self.wire.drain()
        if self.dev.broken:
            return "needs_reset"
        # Reap what the device returned, so the rings keep moving.
        q.last_used = mem.read_u16(q.used + 2)
        q.avail_idx = self.dev.queues[qi].last_avail_idx
        self.drv.ack_interrupt()
        return "completed"

    # --- random structured specs ----------------------------------------------------
    def random_spec(self, rng: random.Random) -> RequestSpec:
        size = self.drv.queues[0].size
        n = rng.choice((1, 2, 3, 3, 3, 4, 5, 8))
        slots = (
            rng.sample(range(size), n)
            if rng.random() < 0.8
            else [rng.randrange(size) for _ in range(n)]
        )
        sane = rng.random() < 0.6
        descs = []
        for i in range(n):
            last = i == n - 1
            if sane:
                flags = (0 if last else VIRTQ_DESC_F_NEXT) | (
                    VIRTQ_DESC_F_WRITE if i > 0 and (i == n - 1 or rng.random() < 0.5) else 0
                )
                nxt = 0 if last else slots[i + 1]
            else:
                flags = rng.randrange(8)
                nxt = rng.choice((slots[(i + 1) % n], rng.randrange(size), rng.randrange(65536)))
            if sane:
                addr = HEADER if i == 0 else rng.randrange(WINDOW[0], WINDOW[1] - 0x10000, 512)
                length = 16 if i == 0 else rng.choice((512, 4096, 512 * rng.randrange(1, 128)))
            else:
                addr, length = self._addr(rng), self._length(rng)
            if last and sane:
                length = rng.choice((1, 1, 2, length))
            descs.append(Desc(addr, length, flags, nxt))
        indirect = None
        if rng.random() < 0.15:
            m = rng.randrange(1, 12)
            indirect = [
                Desc(
                    self._addr(rng),
                    self._length(rng),
                    rng.choice(
                        (
                            VIRTQ_DESC_F_NEXT,
                            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                            rng.randrange(8),
                        )
                    ),
                    rng.choice((i + 1, rng.randrange(m + 2))),
                )
                for i in range(m)
            ]
            indirect[0] = Desc(HEADER, 16, VIRTQ_DESC_F_NEXT, 1)
            descs[0] = Desc(
                rng.choice((TABLES, TABLES, TABLES + 8, self._addr(rng))),
                rng.choice((16 * m, 16 * m, rng.randrange(0, 400))),
                VIRTQ_DESC_F_INDIRECT | rng.choice((0, 0, VIRTQ_DESC_F_NEXT)),
                0,
            )
        head = slots[0] if rng.random() < 0.95 else rng.randrange(65536)
        spec = RequestSpec(descs, slots, head, indirect, self._header(rng))
        if rng.random() < 0.02:
            spec.avail_jump = rng.randrange(65536)
        if rng.random() < 0.02:
            spec.registers.append((rng.randrange(0, 0x100, 4), rng.getrandbits(32)))
        if self.kind == "net" and rng.random() < 0.5:
            spec.rx_frame = rng.randbytes(rng.choice((14, 60, 64, 1514, rng.randrange(1, 2000))))
        return spec

    def _addr(self, rng: random.Random) -> int:
        c = rng.random()
        if c < 0.7:
            return rng.randrange(*WINDOW)
        if c < 0.8:
            return RAM - rng.randrange(1, 8192)
        if c < 0.85:
            return rng.randrange(*RINGS)
        if c < 0.95:
            return rng.getrandbits(64)
        return rng.choice((0, 0xFFFF_FFFF_FFFF_F000, 1 << 32, RAM))

    def _length(self, rng: random.Random) -> int:
        return rng.choice(
            (0, 1, 16, 511, 512, 4096, rng.randrange(1, 70000), 0xFFFFFFFF, rng.getrandbits(32))
        )

    def _header(self, rng: random.Random) -> bytes:
        if self.kind == "net":
            return rng.randbytes(12)
        cap = DISK_SIZE // 512
        rtype = rng.choice((0, 0, 1, 1, 4, 8, 11, 13, rng.getrandbits(32)))
        sector = rng.choice((0, rng.randrange(cap), cap - 1, cap, rng.getrandbits(64)))
        segs = b"".join(
            struct.pack(
                "<QII",
                rng.choice((rng.randrange(cap), rng.getrandbits(64))),
                rng.randrange(64),
                rng.choice((0, 0, 1, 7)),
            )
            for _ in range(rng.randrange(3))
        )
        return struct.pack("<IIQ", rtype, rng.getrandbits(32), sector) + segs

    def check_invariants(self) -> None:
        """Nothing outside the disk's own file was grown or touched."""
        if self.kind == "blk":
            assert os.path.getsize(self.disk_path) == DISK_SIZE
