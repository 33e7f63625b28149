"""Writing streamOptimized extents, shaped as VMware's exporter does (for OVF/OVA).

One pass, grains in increasing order: header (GD "at end"), embedded descriptor, then for
every non-zero grain a marker {LBA, size} and its zlib stream padded to a sector; after
the last grain of each grain table a GT marker and the table; at the end a GD marker and
the directory, the footer marker and footer (a header copy that locates the GD, at
EOF - 1024), and the end-of-stream marker.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array

from boite.disk.base import SECTOR
from boite.disk.hostfile import pwrite_full
from boite.disk.sparse import (
    COMPRESS_DEFLATE,
    DEFAULT_GRAIN,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    GD_AT_END,
    GTES_PER_GT,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SparseHeader,
)
from boite.errors import DiskError

STREAM_OVERHEAD = 128  # sectors before the first grain, as VMware's exporter leaves


def _meta_marker(sectors: int, kind: int) -> bytes:
    return struct.pack("<QII", sectors, 0, kind).ljust(SECTOR, b"\0")


class StreamWriter:
    def __init__(self, path, capacity_sectors: int, descriptor: bytes, level: int = 1) -> None:
        self.path = os.fspath(path)
        self.capacity = capacity_sectors
        self.grain_sectors = DEFAULT_GRAIN
        self.grain_bytes = DEFAULT_GRAIN * SECTOR
        self.level = level
        grains = -(-capacity_sectors // DEFAULT_GRAIN)
        self.gd = array("I", bytes(4 * -(-grains // GTES_PER_GT)))
        self.gt = array("I", bytes(4 * GTES_PER_GT))
        self.gt_index = 0
        self.last_grain = -1
        desc_sectors = max(20, -(-len(descriptor) // SECTOR))
        if 1 + desc_sectors > STREAM_OVERHEAD:
            raise DiskError(f"{self.path}: descriptor too long for a stream-optimized disk")
        self.header = SparseHeader(
            version=3,
            flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity=capacity_sectors,
            grain_size=DEFAULT_GRAIN,
            desc_offset=1,
            desc_size=desc_sectors,
            rgd_offset=0,
            gd_offset=GD_AT_END,
            overhead=STREAM_OVERHEAD,
            compress=COMPRESS_DEFLATE,
        )
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pwrite_full(self.fd, self.header.pack(), 0)
        pwrite_full(self.fd, descriptor.ljust(desc_sectors * SECTOR, b"\0"), SECTOR)
        self.pos = STREAM_OVERHEAD * SECTOR

    def _put(self, data: bytes) -> int:
        sector = self.pos // SECTOR
        pad = -len(data) % SECTOR
        pwrite_full(self.fd, data + bytes(pad), self.pos)
        self.pos += len(data) + pad
        return sector

    def _end_gt(self) -> None:
        if any(self.gt):
            self._put(_meta_marker(len(self.gt) * 4 // SECTOR, MARKER_GT))
            self.gd[self.gt_index] = self._put(self.gt.tobytes())
            self.gt = array("I", bytes(4 * GTES_PER_GT))

    def write_grain(self, g: int, data) -> None:
        """Add grain `g` (grains must come in increasing order; zero grains may be skipped)."""
        if g <= self.last_grain:
            raise DiskError(
                f"{self.path}: stream grains must be written in order ({g} after {self.last_grain})"
            )
        gi = g // GTES_PER_GT
        if gi != self.gt_index:
            self._end_gt()
            self.gt_index = gi
        self.last_grain = g
        comp = zlib.compress(bytes(data), self.level)
        self.gt[g % GTES_PER_GT] = self._put(
            struct.pack("<QI", g * self.grain_sectors, len(comp)) + comp
        )

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self._end_gt()
            self._put(_meta_marker(-(-len(self.gd) * 4 // SECTOR), MARKER_GD))
            gd_sector = self._put(self.gd.tobytes())
            self._put(_meta_marker(1, MARKER_FOOTER))
            footer = SparseHeader(**{**self.header.__dict__, "gd_offset": gd_sector})
            self._put(footer.pack())
            self._put(bytes(SECTOR))  # end-of-stream marker
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
