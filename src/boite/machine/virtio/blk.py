"""virtio-blk (virtio 1.x, section 5.2) on a BlockImage.

Request data moves between the disk and guest RAM without an intermediate copy: the
image reads straight into memoryviews of guest RAM, and a raw file (an image that exposes
`raw_fd`, the file whose byte N is the disk's byte N) is served with one os.preadv /
os.pwritev over the whole scatter list.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any

from boite.disk.base import SECTOR, BlockImage
from boite.disk.raw import RawImage
from boite.errors import BoiteError
from boite.machine.state import StateRecord, uint
from boite.machine.virtio.mmio import VIRTIO_ID_BLOCK, VirtioBackend, bit
from boite.machine.virtio.queue import VirtQueue, VirtQueueError, gather, split_views

log = logging.getLogger("boite.virtio.blk")

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")  # discard / write-zeroes range

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take a descriptor each
SIZE_MAX = 1 << 20  # largest single segment we announce
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR
MAX_DISCARD_SEG = 32
_ZEROES = bytes(1 << 20)


@dataclass(frozen=True)
class VirtioBlkState(StateRecord):
    """Requests are served whole while the guest is paused: only the count survives."""

    VERSION = 1
    requests: int = uint(64)


class VirtioBlk(VirtioBackend):
    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(
        self, image: BlockImage, *, read_only: bool | None = None, serial: str = ""
    ) -> None:
        super().__init__()
        self.image = image
        self.read_only = bool(image.read_only if read_only is None else read_only)
        self.serial = serial.encode("ascii", "replace")[:VIRTIO_BLK_ID_BYTES]
        self.capacity = image.size // SECTOR
        # Counters for logs and the benchmark.
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.io_errors = 0

    def device_features(self) -> int:
        f = (
            bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
        )
        if self.read_only:
            f |= bit(VIRTIO_BLK_F_RO)
        else:
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        return f

    def config_bytes(self) -> bytes:
        # struct virtio_blk_config up to write_zeroes_may_unmap (5.2.4).
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity,
            SIZE_MAX,
            SEG_MAX,
            0,  # geometry: cylinders (unused: no VIRTIO_BLK_F_GEOMETRY)
            0,
            0,
            SECTOR,  # blk_size
            0,  # physical_block_exp
            0,  # alignment_offset
            1,  # min_io_size (in blocks)
            0,  # opt_io_size
            0,  # writeback
            0,  # unused0
            1,  # num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEG,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    def close(self) -> None:
        """The device owns its image once attached: flush and close it (safe twice)."""
        self.image.close()

    def save_state(self) -> dict[str, Any]:
        return VirtioBlkState(self.requests).to_dict()

    def check_state(self, state: Any) -> VirtioBlkState:
        return VirtioBlkState.from_dict(state)

    def apply_state(self, rec: VirtioBlkState) -> None:
        self.requests = rec.requests

    # --- requests -------------------------------------------------------------------
    def notify(self, queue: VirtQueue) -> None:
        served = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            written = self._serve(chain.readable, chain.writable)
            self.used(queue, chain.head, written)
            served = True
        if served:
            self.signal(queue)

    def _serve(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Do one request; returns the bytes written into the chain (data + status)."""
        self.requests += 1
        if sum(len(v) for v in readable) < _HEADER.size:
            raise VirtQueueError("virtio-blk request without a 16-byte header")
        if not writable or len(writable[-1]) == 0:
            # Drop empty trailing buffers; the status byte is the last writable byte.
            writable = [v for v in writable if len(v)]
            if not writable:
                raise VirtQueueError("virtio-blk request without a status byte")
        rtype, _reserved, sector = _HEADER.unpack(gather(readable, _HEADER.size))
        _, data_out = split_views(readable, _HEADER.size)
        last = writable[-1]
        status_view = last[len(last) - 1 :]
        data_in = writable[:-1] + ([last[:-1]] if len(last) > 1 else [])
        try:
            status, written = self._dispatch(rtype, sector, data_out, data_in)
        except (OSError, BoiteError) as e:
            # A failing disk is the guest's I/O error, not the VMM's crash.
            log.warning("virtio-blk: request type %d at sector %d failed: %s", rtype, sector, e)
            self.io_errors += 1
            status, written = VIRTIO_BLK_S_IOERR, 0
        status_view[0] = status
        return written + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.image.size

    def _dispatch(
        self, rtype: int, sector: int, data_out: list[memoryview], data_in: list[memoryview]
    ) -> tuple[int, int]:
        if rtype == VIRTIO_BLK_T_IN:
            length = sum(len(v) for v in data_in)
            if not self._range_ok(sector, length):
                return VIRTIO_BLK_S_IOERR, 0
            self._read(sector * SECTOR, data_in)
            self.bytes_read += length
            return VIRTIO_BLK_S_OK, length
        if rtype == VIRTIO_BLK_T_OUT:
            length = sum(len(v) for v in data_out)
            if self.read_only or not self._range_ok(sector, length):
                return VIRTIO_BLK_S_IOERR, 0
            self._write(sector * SECTOR, data_out)
            self.bytes_written += length
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                self.image.flush()
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            n = 0
            for v in data_in:
                k = min(len(v), VIRTIO_BLK_ID_BYTES - n)
                v[:k] = ident[n : n + k]
                n += k
            return VIRTIO_BLK_S_OK, n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self.read_only:
                return VIRTIO_BLK_S_IOERR, 0
            return self._ranges(rtype, data_out), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _ranges(self, rtype: int, data_out: list[memoryview]) -> int:
        total = sum(len(v) for v in data_out)
        if total % _SEGMENT.size or total // _SEGMENT.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_UNSUPP
        raw = gather(data_out, total)
        segments = [_SEGMENT.unpack_from(raw, i) for i in range(0, total, _SEGMENT.size)]
        for sector, count, flags in segments:
            if count > MAX_DISCARD_SECTORS or not self._range_ok(sector, count * SECTOR):
                return VIRTIO_BLK_S_IOERR
            if rtype == VIRTIO_BLK_T_DISCARD and flags:
                return VIRTIO_BLK_S_UNSUPP  # no flags are defined for discard
            if rtype == VIRTIO_BLK_T_WRITE_ZEROES and flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
        for sector, count, _flags in segments:
            offset, length = sector * SECTOR, count * SECTOR
            if rtype == VIRTIO_BLK_T_DISCARD:
                self.image.discard(offset, length)
            else:
                self._write_zeroes(offset, length)
        return VIRTIO_BLK_S_OK

    def _write_zeroes(self, offset: int, length: int) -> None:
        # discard() may leave old data, so write-zeroes writes real zeroes.
        zeroes = memoryview(_ZEROES)
        while length:
            n = min(length, len(zeroes))
            self.image.write(offset, zeroes[:n])
            offset += n
            length -= n

    def _raw_read_fd(self) -> int | None:
        """A file whose byte N is the disk's byte N, when the image has one."""
        fd = getattr(self.image, "raw_fd", None)
        if isinstance(fd, int):
            return fd
        if isinstance(self.image, RawImage) and self.image.fd >= 0:
            return self.image.fd
        return None

    def _read(self, offset: int, views: list[memoryview]) -> None:
        fd = self._raw_read_fd()
        if fd is not None and views:
            _vector_io(os.preadv, fd, views, offset)
            return
        for v in views:
            self.image.read_into(offset, v)
            offset += len(v)

    def _write(self, offset: int, views: list[memoryview]) -> None:
        # Writes go through the image unless it hands out its file (raw_fd): a RawImage
        # must see them to know flush() has work to do. Either way, no copy.
        fd = getattr(self.image, "raw_fd", None)
        if isinstance(fd, int) and views:
            _vector_io(os.pwritev, fd, views, offset)
            return
        for v in views:
            self.image.write(offset, v)
            offset += len(v)


_IOV_MAX = 1024


def _vector_io(call: Any, fd: int, views: list[memoryview], offset: int) -> None:
    """preadv/pwritev over a scatter list, finishing short transfers."""
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:_IOV_MAX]
        n = call(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short vectored I/O at offset {offset}")
        offset += n
        # Drop what was transferred; keep the rest of a partly done buffer.
        while n and pending:
            if len(pending[0]) <= n:
                n -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0
