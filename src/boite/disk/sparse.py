"""Hosted sparse extents (`KDMV`): monolithicSparse, split sparse extents, deltas, streamOptimized.

Layout per VMware's "Virtual Disk Format 1.1": a 512-byte header, an optional embedded
descriptor, a redundant and a primary grain directory (GD) whose entries point at grain
tables (GT) of `numGTEsPerGT` 32-bit sector numbers, then grains. A GT entry of 0 means
"not here" (fall through to the parent), 1 means "zero grain" when the zeroed-grain flag
is set. streamOptimized extents hold zlib-compressed grains behind 12-byte markers and keep
the GD at the end, found through the footer (a header copy) at end-of-file - 1024.

Grain tables load lazily and stay cached, so opening a 2 TB disk reads only the GDs.
Table updates are kept in memory and written at flush(), after the grain data is durable:
grain data, fdatasync, primary GTs, redundant GTs, GD entries, fdatasync. A crash before a
flush loses only unflushed writes (their grains are leaked space that `check --repair`
trims); it never leaves a table entry pointing at data that was not written.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from boite.disk.base import SECTOR
from boite.disk.hostfile import (
    open_image_file,
    pread_full,
    pwrite_full,
    pwritev_full,
    start_writeback,
    will_need,
    zero_range,
)
from boite.errors import DiskError, DiskFormatError

MAGIC = 0x564D444B  # "KDMV" on disk
HEADER = struct.Struct("<IIIQQQQIQQQB4sH433x")
assert HEADER.size == SECTOR
UNCLEAN_OFFSET = 72  # byte offset of uncleanShutdown in the header

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
KNOWN_FLAGS = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
NL_CHARS = b"\n \r\n"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
COMPRESS_DEFLATE = 1

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

DEFAULT_GRAIN = 128  # sectors (64 KiB)
GTES_PER_GT = 512
MAX_GRAIN = 8192  # sectors (4 MiB); VMware uses 128, anything huge is hostile
MAX_GD_ENTRIES = 1 << 22  # 16 MiB of GD: 128 TiB with 64 KiB grains, past VMware's 62 TiB

# Fallback for ranges this extent does not hold: fill the view for the extent-relative offset.
if TYPE_CHECKING:
    from typing import TypeAlias  # 3.10+; PyPy 3.9 runs the emulator

Fallback: TypeAlias = "Callable[[int, memoryview], None] | None"


@dataclass
class SparseHeader:
    version: int = 1
    flags: int = FLAG_NL_DETECT | FLAG_RGD
    capacity: int = 0  # sectors
    grain_size: int = DEFAULT_GRAIN  # sectors
    desc_offset: int = 0
    desc_size: int = 0
    num_gtes: int = GTES_PER_GT
    rgd_offset: int = 0
    gd_offset: int = 0
    overhead: int = 0
    unclean: int = 0
    nl_chars: bytes = NL_CHARS
    compress: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.version,
            self.flags,
            self.capacity,
            self.grain_size,
            self.desc_offset,
            self.desc_size,
            self.num_gtes,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            self.unclean,
            self.nl_chars,
            self.compress,
        )

    @classmethod
    def unpack(cls, raw: bytes, path, where: int = 0) -> SparseHeader:
        if len(raw) < SECTOR:
            raise DiskFormatError(
                f"{path}: sparse header at offset {where} is truncated ({len(raw)} of 512 bytes)"
            )
        f = HEADER.unpack(raw[:SECTOR])
        if f[0] != MAGIC:
            raise DiskFormatError(
                f"{path}: magic at offset {where} is {f[0]:#010x}, expected {MAGIC:#010x} (KDMV)"
            )
        return cls(*f[1:])

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)


def _bad(path, where: int, what: str) -> DiskFormatError:
    return DiskFormatError(f"{path}: {what} (at offset {where})")


def validate_header(h: SparseHeader, path, file_size: int, where: int = 0) -> None:
    """Refuse any header field a hostile or damaged file could use against us."""
    if h.version not in (1, 2, 3):
        raise _bad(path, where + 4, f"header version is {h.version}, expected 1, 2 or 3")
    if h.flags & ~KNOWN_FLAGS:
        raise _bad(path, where + 8, f"header flags {h.flags:#x} have unknown bits")
    if h.flags & FLAG_NL_DETECT and h.nl_chars != NL_CHARS:
        raise _bad(
            path,
            where + 73,
            f"newline check bytes are {h.nl_chars!r}, expected {NL_CHARS!r} (file was mangled as text?)",
        )
    gs = h.grain_size
    if gs < 1 or gs > MAX_GRAIN or gs & (gs - 1):
        raise _bad(
            path, where + 20, f"grain size is {gs} sectors, expected a power of two 1..{MAX_GRAIN}"
        )
    if not 1 <= h.num_gtes <= 4096:
        raise _bad(
            path, where + 44, f"numGTEsPerGT is {h.num_gtes}, expected 1..4096 (512 by the spec)"
        )
    from boite.disk.descriptor import MAX_CAPACITY_SECTORS

    if h.capacity > MAX_CAPACITY_SECTORS:
        raise _bad(
            path, where + 12, f"capacity is {h.capacity} sectors, more than {MAX_CAPACITY_SECTORS}"
        )
    grains = -(-h.capacity // gs)
    gd_entries = -(-grains // h.num_gtes)
    if gd_entries > MAX_GD_ENTRIES:
        raise _bad(path, where + 12, f"capacity {h.capacity} needs {gd_entries} GD entries")
    if h.compressed and h.compress != COMPRESS_DEFLATE:
        raise _bad(path, where + 77, f"compressAlgorithm is {h.compress}, expected 1 (deflate)")
    size_sectors = -(-file_size // SECTOR)
    if h.desc_offset:
        if h.desc_size > 2048 or h.desc_offset + h.desc_size > size_sectors:
            raise _bad(
                path,
                where + 28,
                f"descriptor at sector {h.desc_offset} size {h.desc_size} lies outside the file ({file_size} bytes)",
            )
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    for name, off, at in (
        ("grain directory", h.gd_offset, 56),
        ("redundant grain directory", h.rgd_offset, 48),
    ):
        if name.startswith("redundant") and not h.flags & FLAG_RGD:
            continue
        if off == GD_AT_END and h.compressed:
            continue
        if off < 1 or off + gd_sectors > size_sectors:
            raise _bad(
                path,
                where + at,
                f"{name} at sector {off} ({gd_sectors} sectors) lies outside the file ({file_size} bytes)",
            )


def redundant_reading(h: SparseHeader, path, file_size: int) -> SparseHeader | None:
    """The header read with the redundant directory as the primary one, when that alone
    makes it valid (the primary directory's offset is what is damaged); else None."""
    if h.compressed or not h.flags & FLAG_RGD or h.rgd_offset in (0, GD_AT_END):
        return None
    alt = replace(h, gd_offset=h.rgd_offset)
    try:
        validate_header(alt, path, file_size)
    except DiskFormatError:
        return None
    return alt


class SparseExtent:
    """One KDMV file. Offsets in methods are bytes relative to the extent."""

    def __init__(self, path, read_only: bool = True, *, fd: int | None = None) -> None:
        """Open `path` (or use a duplicate of an already open `fd` for it)."""
        self.path = os.fspath(path)
        self.read_only = read_only
        self.fd = open_image_file(self.path, not read_only) if fd is None else os.dup(fd)
        try:
            self._load()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _load(self) -> None:
        size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, SECTOR, 0)
        h = SparseHeader.unpack(raw, self.path)
        self.header = h
        self.footer_offset: int | None = None
        if h.gd_offset == GD_AT_END:
            if not h.compressed:
                raise _bad(
                    self.path, 56, "GD offset says 'at end' but the extent is not stream-optimized"
                )
            if size < 3 * SECTOR:
                raise _bad(self.path, 0, "stream-optimized file too short for a footer")
            where = (size // SECTOR) * SECTOR - 2 * SECTOR
            foot = SparseHeader.unpack(os.pread(self.fd, SECTOR, where), self.path, where)
            validate_header(foot, self.path, size, where)
            if foot.gd_offset == GD_AT_END:
                raise _bad(self.path, where + 56, "footer GD offset is still 'at end'")
            self.footer_offset = where
            h = replace(foot, unclean=h.unclean)
            self.header = h
        try:
            validate_header(h, self.path, size)
        except DiskFormatError:
            alt = redundant_reading(h, self.path, size)
            if alt is None:
                raise
            # the primary directory's offset is damaged, the redundant one is sound: reads
            # go through it; writing waits for a repair that rebuilds the primary
            if not self.read_only:
                raise _bad(
                    self.path,
                    56,
                    f"grain directory offset is {h.gd_offset}, outside the file, but the "
                    "redundant directory is sound; run 'boite disk check --repair'",
                ) from None
            h = self.header = alt
        if h.compressed and not self.read_only:
            raise DiskError(
                f"{self.path}: stream-optimized (compressed) disks are read-only; convert it to thin first"
            )
        self.grain_sectors = h.grain_size
        self.grain_bytes = h.grain_size * SECTOR
        self.size = h.capacity * SECTOR
        self.ngte = h.num_gtes
        self.grains = -(-h.capacity // h.grain_size)
        self.gd_entries = -(-self.grains // self.ngte)
        self.gt_bytes = self.ngte * 4
        self.gt_sectors = -(-self.gt_bytes // SECTOR)
        self.compressed = h.compressed
        self.zero_grain = bool(h.flags & FLAG_ZERO_GRAIN)
        self.has_rgd = bool(h.flags & FLAG_RGD) and h.rgd_offset not in (0, GD_AT_END)
        self.file_size = size
        self.eof = -(-size // SECTOR) * SECTOR  # where the next grain goes
        # Lowest sector a grain may live at: past header, descriptor and (for flat
        # layouts) the preallocated tables, so a hostile entry cannot alias metadata.
        desc_end = h.desc_offset + h.desc_size if h.desc_offset else 1
        self.min_grain_sector = max(1, desc_end, 0 if self.compressed else h.overhead)
        self.gd = self._read_gd(h.gd_offset, 56)
        self.rgd = self._read_gd(h.rgd_offset, 48) if self.has_rgd else None
        self._gts: dict[int, array] = {}
        self._rgts: dict[int, array] = {}
        self._dirty: dict[int, list[int]] = {}
        self._gd_dirty: set[int] = set()
        self._wrote = False
        self._zlib_cache: tuple[int, bytes] | None = None
        max_sector = self.eof // SECTOR

        def table_ok(e: int) -> bool:
            return desc_end <= e and e + self.gt_sectors <= max_sector

        gd = self.gd
        suspect = bool(gd) and (
            min(gd) < desc_end or max(gd) + self.gt_sectors > max_sector
        )  # C-speed test first: a 2 TiB disk has 65536 entries
        holes = (
            [
                i
                for i in range(self.gd_entries)
                if not (gd[i] and table_ok(gd[i])) and self.rgd[i] and table_ok(self.rgd[i])
            ]
            if self.rgd is not None and suspect
            else []
        )
        if holes:
            # Only damage makes these (every writer sets the primary entry first): the
            # redundant directory still reaches those tables. Reads use it (qemu would read
            # zeroes there or fail); writing through half a directory waits for a repair.
            if not self.read_only:
                raise _bad(
                    self.path,
                    h.gd_offset * SECTOR + 4 * holes[0],
                    f"grain directory entry {holes[0]} is 0 or damaged but the redundant "
                    "directory names a grain table there; run 'boite disk check --repair'",
                )
            for i in holes:
                self.gd[i] = self.rgd[i]
        for i, e in enumerate(self.gd if suspect else ()):
            if e and (e < desc_end or e + self.gt_sectors > max_sector):
                raise _bad(
                    self.path,
                    h.gd_offset * SECTOR + 4 * i,
                    f"grain directory entry {i} points to sector {e}, outside the file's table area "
                    f"(sectors {desc_end}..{max_sector - self.gt_sectors})",
                )

    # -- metadata -------------------------------------------------------------------------

    def _read_gd(self, sector: int, at: int) -> array:
        gd = array("I")
        raw = os.pread(self.fd, self.gd_entries * 4, sector * SECTOR)
        if len(raw) != self.gd_entries * 4:
            raise _bad(self.path, at, f"grain directory at sector {sector} is truncated")
        gd.frombytes(raw)
        return gd

    def descriptor_bytes(self) -> bytes | None:
        h = self.header
        if not h.desc_offset or not h.desc_size:
            return None
        return os.pread(self.fd, h.desc_size * SECTOR, h.desc_offset * SECTOR)

    def write_descriptor(self, text: bytes) -> None:
        h = self.header
        room = h.desc_size * SECTOR
        if len(text) > room:
            raise DiskError(
                f"{self.path}: descriptor of {len(text)} bytes does not fit the {room} bytes embedded space"
            )
        pwrite_full(self.fd, text + bytes(room - len(text)), h.desc_offset * SECTOR)

    def set_unclean(self, flag: bool) -> None:
        pwrite_full(self.fd, bytes([1 if flag else 0]), UNCLEAN_OFFSET)
        os.fdatasync(self.fd)
        self.header.unclean = int(flag)

    def _gt(self, gi: int, raw: bytes | None = None) -> array | None:
        gt = self._gts.get(gi)
        if gt is not None:
            return gt
        sector = self.gd[gi]
        if sector == 0:
            return None
        gt = array("I")
        gt.frombytes(os.pread(self.fd, self.gt_bytes, sector * SECTOR) if raw is None else raw)
        if len(gt) != self.ngte:
            raise _bad(self.path, sector * SECTOR, f"grain table {gi} is truncated")
        self._check_gt(gi, gt, sector)
        # a reader and a writer may load the same table at once: the first stored copy wins,
        # so no entry set on it is lost
        return self._gts.setdefault(gi, gt)

    def _check_gt(self, gi: int, gt: array, sector: int) -> None:
        lo = self.min_grain_sector
        hi = self.eof // SECTOR
        if max(gt) < hi and not any(1 < e < lo for e in gt if e):
            return
        for j, e in enumerate(gt):
            if e > 1 and not lo <= e < hi:
                raise _bad(
                    self.path,
                    sector * SECTOR + 4 * j,
                    f"grain table {gi} entry {j} points to sector {e}, outside the grain area "
                    f"(sectors {lo}..{hi - 1})",
                )

    def entry(self, g: int) -> int:
        gt = self._gts.get(g // self.ngte)
        if gt is None:
            gt = self._gt(g // self.ngte)
            if gt is None:
                return 0
        return gt[g % self.ngte]

    def _set_entry(self, g: int, value: int) -> None:
        gi, j = divmod(g, self.ngte)
        gt = self._gt(gi)
        if gt is None:
            gt = self._new_gt(gi)
        gt[j] = value
        d = self._dirty.get(gi)
        if d is None:
            self._dirty[gi] = [j, j + 1]
        else:
            if j < d[0]:
                d[0] = j
            if j + 1 > d[1]:
                d[1] = j + 1

    def _new_gt(self, gi: int) -> array:
        """Give a GD slot that had no table a zeroed table (and its redundant copy) at EOF."""
        span = self.gt_sectors * SECTOR
        for gd in (self.gd, self.rgd) if self.rgd is not None else (self.gd,):
            pwrite_full(self.fd, bytes(span), self.eof)
            gd[gi] = self.eof // SECTOR
            self.eof += span
        self._gd_dirty.add(gi)
        gt = array("I", bytes(self.gt_bytes))
        self._gts[gi] = gt
        return gt

    # -- data path ------------------------------------------------------------------------

    def read_into(self, off: int, mv: memoryview, fallback: Fallback) -> None:
        gs = self.grain_bytes
        n = len(mv)
        # fast path: inside one allocated grain whose table is cached (4 KiB guest I/O)
        g = off // gs
        within = off - g * gs
        if within + n <= gs and not self.compressed:
            gt = self._gts.get(g // self.ngte)
            if gt is not None:
                e = gt[g % self.ngte]
                if e > 1:
                    if os.preadv(self.fd, [mv], e * SECTOR + within) != n:
                        pread_full(self.fd, mv, e * SECTOR + within)
                    return
        pos = 0
        fd = self.fd
        while pos < n:
            a = off + pos
            g = a // gs
            within = a - g * gs
            e = self.entry(g)
            length = min(gs - within, n - pos)
            if e > 1 and not self.compressed:
                # extend over following grains that are contiguous in the file
                host = e * SECTOR + within
                while pos + length < n:
                    e2 = self.entry(g + 1)
                    if e2 != e + self.grain_sectors:
                        break
                    g += 1
                    e = e2
                    length += min(gs, n - pos - length)
                pread_full(fd, mv[pos : pos + length], host)
            elif e > 1:
                grain = self._inflate(g, e)
                mv[pos : pos + length] = grain[within : within + length]
            elif e == 0 and fallback is not None:
                # extend over following unallocated grains: one call to the parent
                while pos + length < n and self.entry(g + 1) == 0:
                    g += 1
                    length += min(gs, n - pos - length)
                fallback(a, mv[pos : pos + length])
            else:
                mv[pos : pos + length] = bytes(length)
            pos += length

    def prefetch(self, off: int, length: int) -> list[tuple[int, int]]:
        """Start reading the grains of a range (runs contiguous in the file, one hint each);
        returns the extent-relative ranges this extent does not hold (the parent's part)."""
        gs = self.grain_bytes
        end = min(off + length, self.size)
        holes: list[tuple[int, int]] = []
        run_host, run_len = -1, 0
        g = off // gs
        while g * gs < end:
            e = self.entry(g)
            if e > 1 and not self.compressed:
                host = e * SECTOR
                if host != run_host + run_len:
                    will_need(self.fd, run_host, run_len)
                    run_host, run_len = host, 0
                run_len += gs
            elif e == 0:
                a = max(g * gs, off)
                b = min(g * gs + gs, end)
                if holes and holes[-1][0] + holes[-1][1] == a:
                    holes[-1] = (holes[-1][0], holes[-1][1] + b - a)
                else:
                    holes.append((a, b - a))
            g += 1
        if run_len:
            will_need(self.fd, run_host, run_len)
        return holes

    def start_writeback(self) -> None:
        if self._wrote and self.fd >= 0:
            start_writeback(self.fd)

    def _inflate(self, g: int, sector: int) -> bytes:
        cached = self._zlib_cache
        if cached is not None and cached[0] == g:
            return cached[1]
        where = sector * SECTOR
        head = os.pread(self.fd, 12, where)
        if len(head) != 12:
            raise _bad(self.path, where, f"grain marker for grain {g} is past the end of the file")
        lba, size = struct.unpack("<QI", head)
        if lba != g * self.grain_sectors:
            raise _bad(
                self.path, where, f"grain marker says LBA {lba}, expected {g * self.grain_sectors}"
            )
        if size == 0 or size > 2 * self.grain_bytes + 4096 or where + 12 + size > self.file_size:
            raise _bad(self.path, where + 8, f"compressed grain size {size} is impossible here")
        data = os.pread(self.fd, size, where + 12)
        # The deflate stream must end exactly where the marker says, and inflate to the
        # grain (the last one may stop at the disk's end): anything else is a damaged grain,
        # an error as in qemu-img, never data made up of what inflated before the damage.
        d = zlib.decompressobj()
        try:
            grain = d.decompress(data, self.grain_bytes)
            # a full grain may leave the stream's end (and its Adler-32) unread: read on,
            # one byte of output allowed, which would mean more than a grain
            for _ in range(len(data)):
                if d.eof or not d.unconsumed_tail:
                    break
                if d.decompress(d.unconsumed_tail, 1):
                    raise _bad(
                        self.path,
                        where + 12,
                        f"grain {g} inflates to more than {self.grain_bytes} bytes",
                    )
        except zlib.error as exc:
            raise _bad(self.path, where + 12, f"grain {g} does not inflate: {exc}") from None
        if d.unused_data:
            raise _bad(
                self.path,
                where + 8,
                f"grain {g}: its deflate stream does not end where its marker's size "
                f"({size} bytes) says",
            )
        if not d.eof:
            raise _bad(
                self.path,
                where + 8,
                f"grain {g}: its deflate stream is cut short by its marker's size ({size} bytes)",
            )
        need = min(self.grain_bytes, self.size - g * self.grain_bytes)
        if len(grain) < need:
            raise _bad(
                self.path,
                where + 12,
                f"grain {g} inflates to {len(grain)} bytes, expected {self.grain_bytes}",
            )
        if len(grain) < self.grain_bytes:
            grain += bytes(self.grain_bytes - len(grain))
        self._zlib_cache = (g, grain)
        return grain

    def write(self, off: int, data, fallback: Fallback) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: extent is open read-only")
        mv = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        gs = self.grain_bytes
        n = len(mv)
        self._wrote = True
        # fast path: inside one allocated grain whose table is cached (4 KiB guest I/O)
        g = off // gs
        within = off - g * gs
        if within + n <= gs:
            gt = self._gts.get(g // self.ngte)
            if gt is not None:
                e = gt[g % self.ngte]
                if e > 1:
                    if os.pwrite(self.fd, mv, e * SECTOR + within) != n:
                        pwrite_full(self.fd, mv, e * SECTOR + within)
                    return
        pos = 0
        fd = self.fd
        new: list[tuple[int, object]] = []
        while pos < n:
            a = off + pos
            g = a // gs
            within = a - g * gs
            length = min(gs - within, n - pos)
            e = self.entry(g)
            if e > 1:
                host = e * SECTOR + within
                while pos + length < n:
                    e2 = self.entry(g + 1)
                    if e2 != e + self.grain_sectors:
                        break
                    g += 1
                    e = e2
                    length += min(gs, n - pos - length)
                pwrite_full(fd, mv[pos : pos + length], host)
            elif length == gs:
                new.append((g, mv[pos : pos + length]))
            else:
                buf = bytearray(gs)
                if e == 0 and fallback is not None:
                    base = g * gs
                    fallback(base, memoryview(buf)[: min(gs, self.size - base)])
                buf[within : within + length] = mv[pos : pos + length]
                new.append((g, buf))
            pos += length
        if new:
            self._allocate(new)

    def _allocate(self, grains: list[tuple[int, object]]) -> None:
        for g, _ in grains:
            gi = g // self.ngte
            if self.gd[gi] == 0:
                self._new_gt(gi)
        host = self.eof
        pwritev_full(self.fd, [b for _, b in grains], host)
        sector = host // SECTOR
        for i, (g, _) in enumerate(grains):
            self._set_entry(g, sector + i * self.grain_sectors)
        self.eof = host + len(grains) * self.grain_bytes
        if self.eof > self.file_size:
            self.file_size = self.eof

    def discard(self, off: int, length: int, fallback: Fallback) -> None:
        """Make [off, off+length) read as zeroes, freeing host space of whole grains."""
        if self.read_only:
            raise DiskError(f"{self.path}: extent is open read-only")
        gs = self.grain_bytes
        end = off + length
        pos = off
        while pos < end:
            g = pos // gs
            gstart = g * gs
            gend = min(gstart + gs, self.size)
            stop = min(end, gend)
            e = self.entry(g)
            if pos == gstart and stop == gend:
                if e > 1:
                    zero_range(self.fd, e * SECTOR, gs)
                elif e == 0 and fallback is not None:
                    if self.zero_grain:
                        self._set_entry(g, 1)
                    else:
                        # a grain of zeroes that masks the parent: sparse space at EOF
                        self._alloc_hole(g)
            elif e > 1 or (e == 0 and fallback is not None):
                self.write(pos, bytes(stop - pos), fallback)
            pos = stop
        self._wrote = True

    def _alloc_hole(self, g: int) -> None:
        gi = g // self.ngte
        if self.gd[gi] == 0:
            self._new_gt(gi)
        host = self.eof
        self.eof += self.grain_bytes
        os.ftruncate(self.fd, self.eof)
        self.file_size = max(self.file_size, self.eof)
        self._set_entry(g, host // SECTOR)

    def flush(self) -> None:
        if self.read_only:
            return
        if not self._dirty and not self._gd_dirty:
            if self._wrote:
                os.fdatasync(self.fd)
                self._wrote = False
            return
        os.fdatasync(self.fd)  # grain data first: no table may point at unwritten data
        tables = [(self.gd, self._gts)]
        if self.rgd is not None:
            tables.append((self.rgd, None))
        for gd, _ in tables:
            for gi, (lo, hi) in sorted(self._dirty.items()):
                gt = self._gts[gi]
                pwrite_full(self.fd, memoryview(gt)[lo:hi], gd[gi] * SECTOR + lo * 4)
        if self._gd_dirty:
            for gd, where in ((self.gd, self.header.gd_offset), (self.rgd, self.header.rgd_offset)):
                if gd is None:
                    continue
                for gi in sorted(self._gd_dirty):
                    pwrite_full(self.fd, memoryview(gd)[gi : gi + 1], where * SECTOR + 4 * gi)
        os.fdatasync(self.fd)
        self._dirty.clear()
        self._gd_dirty.clear()
        self._wrote = False

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
            if not self.read_only and self.header.unclean:
                self.set_unclean(False)
        finally:
            os.close(self.fd)
            self.fd = -1

    # -- inspection -----------------------------------------------------------------------

    def allocated(self) -> Iterator[tuple[int, int]]:
        """(grain index, GT entry) for every grain this extent holds (entries > 0)."""
        tables = TableReader(self.fd, self.gt_bytes)
        empty = bytes(self.gt_bytes)
        for gi in range(self.gd_entries):
            gt = self._gts.get(gi)
            if gt is None:
                if not self.gd[gi]:
                    continue
                raw = tables.get(self.gd[gi])
                if raw == empty:
                    continue  # the common case: a preallocated table nobody wrote to
                gt = self._gt(gi, raw)
            elif gt.tobytes() == empty:
                continue
            base = gi * self.ngte
            for j, e in enumerate(gt):
                if e and base + j < self.grains:
                    yield base + j, e


class TableReader:
    """Grain tables through a 2 MiB window: preallocated tables lie back to back, so a
    walk over all of them costs a few large reads instead of one small read per table."""

    WINDOW = 2 << 20

    def __init__(self, fd: int, gt_bytes: int) -> None:
        self.fd = fd
        self.n = gt_bytes
        self.start = -1
        self.buf = b""

    def get(self, sector: int) -> bytes:
        off = sector * SECTOR
        if not (0 <= off - self.start and off + self.n <= self.start + len(self.buf)):
            self.buf = os.pread(self.fd, max(self.WINDOW, self.n), off)
            self.start = off
        i = off - self.start
        return self.buf[i : i + self.n]


@dataclass
class ExtentProblems:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    leaked_bytes: int = 0
    fixed: list[str] = field(default_factory=list)


MAX_REPORTED = 50  # a badly damaged disk names its first problems, then counts the rest


def _report(out: ExtentProblems, msg: str) -> None:
    if len(out.errors) < MAX_REPORTED:
        out.errors.append(msg)
    elif len(out.errors) == MAX_REPORTED:
        out.errors.append("... more errors not listed")


def check_stream_grains(ext: SparseExtent, out: ExtentProblems) -> None:
    """Inflate every grain of a stream-optimized extent: each must be a whole deflate stream
    ending where its marker says, inflating to a grain (a damaged grain reads as an error)."""
    for g, e in ext.allocated():
        if e <= 1:
            continue
        try:
            ext._inflate(g, e)
        except DiskFormatError as exc:
            _report(out, str(exc).removeprefix(f"{ext.path}: "))


def _gd_count(capacity: int, h: SparseHeader) -> int:
    grains = -(-capacity // h.grain_size)
    return -(-grains // h.num_gtes)


def _plausible_capacity(fd: int, h: SparseHeader, capacity: int, size: int) -> bool:
    """Whether the grain directories sized for `capacity` make sense in this file: they
    fit, do not overlap each other, and every entry points to a table of their own (a
    directory read too long runs into the tables it points to)."""
    n = _gd_count(capacity, h)
    if n > MAX_GD_ENTRIES:
        return False
    gd_sectors = -(-n * 4 // SECTOR)
    size_sectors = size // SECTOR
    gt_sectors = -(-h.num_gtes * 4 // SECTOR)
    desc_end = h.desc_offset + h.desc_size if h.desc_offset else 1
    offsets = [h.gd_offset] + ([h.rgd_offset] if h.flags & FLAG_RGD else [])
    regions = [(o, o + gd_sectors) for o in offsets]
    if any(o < 1 or end > size_sectors for o, end in regions):
        return False
    if len(regions) == 2 and regions[0][0] < regions[1][1] and regions[1][0] < regions[0][1]:
        return False
    for o in offsets:
        table = array("I")
        table.frombytes(os.pread(fd, n * 4, o * SECTOR))
        for e in table:
            if not e:
                continue
            if e < desc_end or e + gt_sectors > size_sectors:
                return False
            if any(e < end and a < e + gt_sectors for a, end in regions):
                return False
    return True


def _embedded_capacity(fd: int, h: SparseHeader, path) -> int | None:
    """The capacity the embedded descriptor gives (None without one)."""
    if not h.desc_offset or not h.desc_size:
        return None
    from boite.disk.descriptor import parse_descriptor

    raw = os.pread(fd, h.desc_size * SECTOR, h.desc_offset * SECTOR)
    return parse_descriptor(raw, path, h.desc_offset * SECTOR).capacity_sectors


def _fix_capacity(
    fd, h: SparseHeader, path, want: int | None, out: ExtentProblems, repair: bool
) -> bool:
    """Header capacity against the descriptor's; True when the check may go on."""
    size = os.fstat(fd).st_size
    if want is None or want == h.capacity:
        if h.capacity == 0 and size > max(h.overhead, 1) * SECTOR:
            out.errors.append(
                "header capacity (offset 12) is 0 but the file holds "
                f"{size - h.overhead * SECTOR} bytes past its metadata: the capacity is damaged "
                "and no descriptor says what it was (not repaired)"
            )
            return False
        return True
    msg = (
        f"header capacity (offset 12) is {h.capacity} sectors, but the descriptor says "
        f"{want} sectors"
    )
    if not repair:
        out.errors.append(msg)
        return False
    # the larger reading that the directories support: never one that hides grains
    fits = [
        c
        for c in sorted({h.capacity, want}, reverse=True)
        if c and _plausible_capacity(fd, h, c, size)
    ]
    if not fits:
        out.errors.append(msg + "; neither fits the grain directories (not repaired)")
        return False
    good = fits[0]
    done = []
    if good != h.capacity:
        h.capacity = good
        pwrite_full(fd, h.pack(), 0)
        done.append("the header")
    if good != want and h.desc_offset:
        from boite.disk.descriptor import parse_descriptor

        raw = os.pread(fd, h.desc_size * SECTOR, h.desc_offset * SECTOR)
        desc = parse_descriptor(raw, path, h.desc_offset * SECTOR)
        text = b""
        if len(desc.extents) == 1:
            desc.extents[0].sectors = good
            text = desc.to_bytes()
        if not text or len(text) > h.desc_size * SECTOR:
            out.errors.append(msg + "; the embedded descriptor cannot be rewritten to match")
            return False
        pwrite_full(fd, text.ljust(h.desc_size * SECTOR, b"\0"), h.desc_offset * SECTOR)
        done.append("the embedded descriptor")
    os.fsync(fd)
    out.fixed.append(
        f"{msg}: set {' and '.join(done) or 'nothing'} to {good} sectors, the larger size "
        "the grain directories support"
    )
    return True


def finish_grow(ext: SparseExtent, want: int) -> bool:
    """A writable extent whose header says more sectors than its embedded descriptor
    (`want`): what a killed grow_sparse leaves (tables and header are written and synced
    before the descriptor: the header is the grow's commit). Rewrites the descriptor to
    the header's capacity when the grain directories support it; False otherwise (then it
    is damage, for 'check --repair')."""
    h = ext.header
    fd = ext.fd
    if h.capacity <= want or not h.desc_offset:
        return False
    if not _plausible_capacity(fd, h, h.capacity, os.fstat(fd).st_size):
        return False
    out = ExtentProblems()
    return _fix_capacity(fd, h, ext.path, want, out, repair=True) and not out.errors


def check_sparse(path, repair: bool = False, expected_sectors: int | None = None) -> ExtentProblems:
    """Consistency of one sparse extent, without trusting its tables; fix what is safe to fix.

    `expected_sectors` is what the descriptor that names the extent says it holds (an
    embedded descriptor is read here). Repair never gives up data that a consistent reading
    still reaches: a capacity contradiction takes the larger size the directories support,
    a directory entry lost from one grain directory is restored from the other, a grain
    table entry lost from one table from its copy.
    """
    out = ExtentProblems()
    fd = open_image_file(os.fspath(path), repair)
    try:
        size = os.fstat(fd).st_size
        h = SparseHeader.unpack(os.pread(fd, SECTOR, 0), path)
        if h.gd_offset == GD_AT_END or h.compressed:
            ext = SparseExtent(path, read_only=True)  # validates as far as a stream can be
            try:
                check_stream_grains(ext, out)
            finally:
                ext.close()
            return out
        try:
            validate_header(h, path, size)
        except DiskFormatError as exc:
            if redundant_reading(h, path, size) is None:
                raise
            if not repair:
                out.errors.append(
                    f"{str(exc).removeprefix(f'{path}: ')}; the redundant grain directory is "
                    "sound and 'check --repair' rebuilds the primary from it"
                )
                return out
            _rebuild_primary_gd(fd, h, size)
            out.fixed.append(
                f"grain directory rebuilt from the redundant one at sector {h.gd_offset} (its "
                "offset in the header was damaged)"
            )
            size = os.fstat(fd).st_size
            validate_header(h, path, size)
        if expected_sectors is None:
            want = _embedded_capacity(fd, h, path)  # the file is the whole disk
        else:  # one extent of several: it may hold more than its line uses, never less
            want = expected_sectors if expected_sectors > h.capacity else None
        if not _fix_capacity(fd, h, path, want, out, repair):
            return out
        if out.fixed:
            validate_header(h, path, size)
        _check_tables(fd, h, path, size, out, repair)
    finally:
        os.close(fd)
    return out


def _truncation_unsafe(
    fd: int, h: SparseHeader, used: dict[int, int], data_end: int, meta_end: int, size: int
) -> str | None:
    """Why cutting the file at `data_end` might destroy grains although this header's
    reading says they are leaked (None when it is safe). A damaged grain size or table
    length makes the tables name fewer or shorter grains than they do: the last grain keeps
    at least VMware's grain size, and no 32-bit word in the table area may point past the
    cut (the tables' raw sectors, whatever this header says their shape is; the descriptor's
    text is left out, its bytes read as numbers would say anything)."""
    if used and data_end < max(used) + max(h.grain_size, DEFAULT_GRAIN):
        return (
            f"the header's grain size ({h.grain_size} sectors) is smaller than VMware's; "
            "the last grain may be longer than it says"
        )
    lo, hi = data_end, -(-size // SECTOR)
    window = 2 << 20
    first = h.desc_offset + h.desc_size if h.desc_offset else 1  # past the descriptor's text
    for off in range(first * SECTOR, meta_end * SECTOR, window):
        raw = os.pread(fd, min(window, meta_end * SECTOR - off), off)
        if not raw.strip(b"\0"):
            continue
        words = array("I")
        words.frombytes(raw[: len(raw) - len(raw) % 4])
        ordered = sorted(words)
        k = bisect_left(ordered, lo)
        if k < len(ordered) and ordered[k] < hi:
            return (
                f"the table area still holds sector numbers past sector {lo} (at byte "
                f"{off}..{off + len(raw)}); the header may be damaged"
            )
    return None


def _rebuild_primary_gd(fd: int, h: SparseHeader, size: int) -> None:
    """A new primary directory and tables at the end of the file, copied from the redundant
    ones; the header then points at it (written last)."""
    n = _gd_count(h.capacity, h)
    gt_bytes = h.num_gtes * 4
    gt_sectors = -(-gt_bytes // SECTOR)
    gd_sectors = -(-n * 4 // SECTOR)
    desc_end = h.desc_offset + h.desc_size if h.desc_offset else 1
    rgd = array("I")
    rgd.frombytes(os.pread(fd, n * 4, h.rgd_offset * SECTOR))
    at = -(-size // SECTOR)
    gd = array("I", bytes(4 * n))
    for i, e in enumerate(rgd):
        if e and desc_end <= e and e + gt_sectors <= size // SECTOR:
            raw = os.pread(fd, gt_bytes, e * SECTOR)
            pwrite_full(fd, raw.ljust(gt_sectors * SECTOR, b"\0"), at * SECTOR)
            gd[i] = at
            at += gt_sectors
    pwrite_full(fd, gd.tobytes().ljust(gd_sectors * SECTOR, b"\0"), at * SECTOR)
    os.fsync(fd)
    h.gd_offset = at
    pwrite_full(fd, h.pack(), 0)
    os.fsync(fd)


def _restore_table(fd, gd, rgd, i, at, gt_bytes, gt_sectors) -> tuple[int, int]:
    """Copy the grain table that one directory still names to sector `at` and point the
    other directory's entry there; returns the (primary, redundant) table sectors."""
    other = gd[i] or rgd[i]
    raw = os.pread(fd, gt_bytes, other * SECTOR)
    pwrite_full(fd, raw.ljust(gt_sectors * SECTOR, b"\0"), at * SECTOR)
    if not gd[i]:
        gd[i] = at
    else:
        rgd[i] = at
    return gd[i], rgd[i]


def _check_tables(
    fd: int, h: SparseHeader, path, size: int, out: ExtentProblems, repair: bool
) -> None:
    grains = -(-h.capacity // h.grain_size)
    gd_entries = -(-grains // h.num_gtes)
    gt_bytes = h.num_gtes * 4
    gt_sectors = -(-gt_bytes // SECTOR)
    size_sectors = size // SECTOR
    desc_end = h.desc_offset + h.desc_size if h.desc_offset else 1
    lo = max(1, desc_end, h.overhead)
    gs = h.grain_size

    def load_gd(sector: int) -> array:
        gd = array("I")
        gd.frombytes(os.pread(fd, gd_entries * 4, sector * SECTOR))
        return gd

    gd = load_gd(h.gd_offset)
    has_rgd = bool(h.flags & FLAG_RGD) and h.rgd_offset
    rgd = load_gd(h.rgd_offset) if has_rgd else None
    used: dict[int, int] = {}
    meta_end = max(h.overhead, desc_end)
    primary, redundant = TableReader(fd, gt_bytes), TableReader(fd, gt_bytes)
    empty = bytes(gt_bytes)

    def table_ok(e: int) -> bool:
        return desc_end <= e and e + gt_sectors <= size_sectors

    for name, table, other in (("GD", gd, rgd), ("redundant GD", rgd, gd)):
        if table is None:
            continue
        for i, e in enumerate(table):
            if not e or table_ok(e):
                continue
            if other is not None and other[i] and table_ok(other[i]):
                table[i] = 0  # damaged where the other directory is sound: restored below
                continue
            out.errors.append(
                f"{name} entry {i} points to sector {e}, outside the file (fatal: cannot repair)"
            )
    if out.errors:
        return
    end_sector = -(-size // SECTOR)  # where a restored table goes
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    # the directories themselves may lie past the overhead (grow moves them to the end)
    meta_end = max(meta_end, h.gd_offset + gd_sectors)
    if rgd is not None:
        meta_end = max(meta_end, h.rgd_offset + gd_sectors)
    meta = sorted(
        [(0, desc_end), (h.gd_offset, h.gd_offset + gd_sectors)]
        + ([(h.rgd_offset, h.rgd_offset + gd_sectors)] if rgd is not None else [])
        + [(t, t + gt_sectors) for table in (gd, rgd) if table is not None for t in table if t]
    )
    starts = [a for a, _ in meta]

    def in_metadata(sector: int) -> bool:
        k = bisect_right(starts, sector) - 1
        return k >= 0 and any(a <= sector < b for a, b in meta[max(0, k - 8) : k + 1])

    def sound(e: int) -> bool:
        return e == 1 or (lo <= e < size_sectors and not in_metadata(e))

    def overlaps_grain(sector: int, n: int, table: array) -> bool:
        """Whether [sector, sector+n) holds part of a grain `table` or earlier tables name."""
        return any(v < sector + n and sector < v + gs for v in table if sound(v) and v > 1) or any(
            v < sector + n and sector < v + gs for v in used
        )

    fixable: list[str] = []  # errors that repair fixes (they become `fixed` when repairing)
    writes: list[tuple[int, int, array, str | None]] = []  # (GD index, sector, table, note)
    gd_dirty = False
    for i in range(gd_entries):
        psec, rsec = gd[i], (rgd[i] if rgd is not None else 0)
        if rgd is not None and bool(gd[i]) != bool(rgd[i]):
            lost, kept, other = (
                ("GD", "redundant GD", rgd[i]) if not gd[i] else ("redundant GD", "GD", gd[i])
            )
            fixable.append(
                f"{lost} entry {i} is 0 or damaged but {kept} entry {i} points to grain table at "
                f"sector {other}"
            )
            if not repair:
                psec, rsec = psec or rsec, 0  # check the surviving table
            else:
                psec, rsec = _restore_table(fd, gd, rgd, i, end_sector, gt_bytes, gt_sectors)
                gd_dirty = True
                out.fixed.append(
                    f"{lost} entry {i} restored from the {kept}: its grain table copied to "
                    f"sector {end_sector}"
                )
                end_sector += gt_sectors
                size = max(size, end_sector * SECTOR)
                size_sectors = size // SECTOR
        if not psec:
            continue
        meta_end = max(meta_end, psec + gt_sectors)
        raw = primary.get(psec)
        rraw = None
        if rsec:
            rraw = redundant.get(rsec)
            meta_end = max(meta_end, rsec + gt_sectors)
        if raw == empty and (rraw is None or rraw == empty):
            continue  # an untouched preallocated table (and its copy)
        gt = array("I")
        gt.frombytes(raw)
        rgt = None
        if rraw is not None and overlaps_grain(rsec, gt_sectors, gt):
            # the redundant directory points into grain data: that is no table; its copy
            # is made afresh at the end of the file
            fixable.append(f"redundant GD entry {i} points to sector {rsec}, inside grain data")
            if repair:
                rgd[i] = rsec = end_sector
                end_sector += gt_sectors
                gd_dirty = True
                pwrite_full(fd, gt, rsec * SECTOR)
                out.fixed.append(f"redundant GT {i} made afresh at sector {rsec}")
            rraw = None
        if rraw is not None:
            rgt = array("I")
            rgt.frombytes(rraw)
            # an entry only ever goes from 0 to a grain, primary table first: a grain that
            # only the copy still names was lost from the primary, not written after it
            # ... and so is one damaged in the primary but sound in the copy
            # (a copy that says 0 where the primary names no sound grain is right too, and a
            # copy is not believed where it names a grain the primary gives to another
            # entry, or breaks the grain alignment every other grain keeps)
            names = Counter(v for v in gt if v > 1)
            seen = [v for v in names if sound(v)] + list(used)
            aligned = sum((v - lo) % gs == 0 for v in seen) >= 0.75 * len(seen)

            def fits(v: int, aligned: bool = aligned) -> bool:
                return v == 1 or not aligned or (v - lo) % gs == 0

            def believable(v: int, names: Counter = names) -> bool:
                return sound(v) and (v == 1 or (not names[v] and v not in used)) and fits(v)

            missing = [
                j
                for j in range(len(gt))
                if (not gt[j] and rgt[j] and believable(rgt[j]))
                or (
                    gt[j] > 1
                    and (not sound(gt[j]) or not fits(gt[j]))
                    and (not rgt[j] or believable(rgt[j]))
                )
                or (
                    gt[j] > 1
                    and rgt[j] != gt[j]
                    and (names[gt[j]] > 1 or not fits(gt[j]))
                    and (not rgt[j] or believable(rgt[j]))
                )
            ]
            if missing:
                fixable.append(
                    f"GT {i}: {len(missing)} entries are 0 or damaged but the redundant GT "
                    "names grains there"
                )
                for j in missing:
                    gt[j] = rgt[j]
        changed = bool(rgt is not None and gt != array("I", raw))
        for j, e in enumerate(gt):
            if e <= 1:
                continue
            g = i * h.num_gtes + j
            if e < lo or e >= size_sectors:
                problem = (
                    f"grain {g} (GT {i} entry {j}) points to sector {e}, outside the grain area "
                    f"{lo}..{size_sectors - 1}"
                )
                if e < size_sectors and not in_metadata(e):
                    # below the header's overhead but on no table: the overhead field may
                    # be what is wrong, so the entry is kept (and the file not truncated)
                    out.errors.append(problem + " (not repaired: the header may be damaged)")
                    used[e] = g
                    continue
                fixable.append(problem)
                if repair:
                    gt[j] = 0
                    changed = True
                    out.fixed.append(f"dropped grain {g} entry pointing to sector {e}")
                continue
            if e in used:
                out.errors.append(f"grains {used[e]} and {g} share sector {e}")
                continue
            used[e] = g
        if repair and changed:
            writes.append((i, psec, gt, None))
        if rgt is not None and rgt != gt:
            if repair:
                writes.append((i, rsec, gt, f"redundant GT {i} rewritten from the primary"))
            elif not changed:
                fixable.append(f"redundant GT {i} differs from the primary GT")
    if repair and writes:
        if out.errors:
            # what is left is not understood: keep both copies of every table as they are
            out.warnings.append(
                f"{len(writes)} grain tables not rewritten while other errors remain"
            )
        else:
            grains_at = sorted(used)
            for i, sector, table, note in writes:
                k = bisect_left(grains_at, sector - gs + 1)
                if k < len(grains_at) and grains_at[k] < sector + gt_sectors:
                    # the directory points into a grain: the table goes to the end instead
                    which = rgd if note else gd
                    which[i] = sector = end_sector
                    end_sector += gt_sectors
                    gd_dirty = True
                    out.fixed.append(
                        f"{'redundant ' if note else ''}GD entry {i} pointed into grain data; its "
                        f"table moved to sector {sector}"
                    )
                pwrite_full(fd, table, sector * SECTOR)
                if note:
                    out.fixed.append(note)
    if repair and gd_dirty and out.errors:
        out.warnings.append("grain directories not rewritten while other errors remain")
    elif repair and gd_dirty:
        tables = [t for table in (gd, rgd) for t in table if t]
        for where, other in ((h.gd_offset, h.rgd_offset), (h.rgd_offset, h.gd_offset)):
            end = where + gd_sectors
            if (
                where < desc_end
                or overlaps_grain(where, gd_sectors, array("I"))
                or (other < end and where < other + gd_sectors)
                or any(t < end and where < t + gt_sectors for t in tables)
            ):
                out.errors.append(
                    f"a grain directory at sector {where} (header) would overwrite the "
                    "descriptor, a table or grain data: the header is damaged (directories not "
                    "rewritten)"
                )
                break
        else:
            pwrite_full(fd, gd, h.gd_offset * SECTOR)
            pwrite_full(fd, rgd, h.rgd_offset * SECTOR)
    if not repair:
        out.errors += fixable
    # every byte past the last grain and the last table is leaked space
    data_end = max([e + gs for e in used] + [meta_end, end_sector if gd_dirty else 0])
    end = data_end * SECTOR
    if size > end:
        out.leaked_bytes = size - end
        if repair and not out.errors:
            why = _truncation_unsafe(fd, h, used, data_end, meta_end, size)
            if why:
                out.warnings.append(f"{size - end} leaked bytes not reclaimed: {why}")
            else:
                os.ftruncate(fd, end)
                out.fixed.append(f"reclaimed {size - end} leaked bytes at the end of the file")
                out.leaked_bytes = 0
    if repair and h.unclean and not out.errors:
        pwrite_full(fd, b"\0", UNCLEAN_OFFSET)
        out.fixed.append("cleared the uncleanShutdown flag")
    if repair:
        os.fsync(fd)


def create_sparse(
    path,
    capacity_sectors: int,
    descriptor: bytes | None = None,
    grain_size: int = DEFAULT_GRAIN,
    *,
    desc_sectors: int = 20,
) -> None:
    """Write an empty sparse extent with all grain tables preallocated (as qemu and VMware)."""
    h = SparseHeader(capacity=capacity_sectors, grain_size=grain_size)
    grains = -(-capacity_sectors // grain_size)
    gt_count = -(-grains // GTES_PER_GT)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    gd_sectors = -(-gt_count * 4 // SECTOR)
    if descriptor is not None:
        h.desc_offset = 1
        h.desc_size = max(desc_sectors, -(-len(descriptor) // SECTOR))
    start = h.desc_offset + h.desc_size if descriptor is not None else 1
    h.rgd_offset = start
    h.gd_offset = start + gd_sectors + gt_sectors * gt_count
    end = h.gd_offset + gd_sectors + gt_sectors * gt_count
    h.overhead = -(-end // grain_size) * grain_size
    rgd = array("I", (h.rgd_offset + gd_sectors + i * gt_sectors for i in range(gt_count)))
    gd = array("I", (h.gd_offset + gd_sectors + i * gt_sectors for i in range(gt_count)))
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pwrite_full(fd, h.pack(), 0)
        if descriptor is not None:
            pwrite_full(fd, descriptor, SECTOR)
        pwrite_full(fd, rgd, h.rgd_offset * SECTOR)
        pwrite_full(fd, gd, h.gd_offset * SECTOR)
        os.ftruncate(fd, h.overhead * SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)


def grow_sparse(path, capacity_sectors: int, descriptor: bytes | None = None) -> None:
    """Grow a (non-stream) sparse extent in place: tables for the new range are appended
    and preallocated as at creation; the GD moves to the end of the file when it outgrows
    its sectors. The header, which makes the new size visible, is written last."""
    ext = SparseExtent(path, read_only=False)
    try:
        h = ext.header
        if capacity_sectors <= h.capacity:
            return
        from boite.disk.descriptor import MAX_CAPACITY_SECTORS

        if capacity_sectors > MAX_CAPACITY_SECTORS:
            raise DiskError(
                f"{path}: {capacity_sectors} sectors is more than {MAX_CAPACITY_SECTORS}"
            )
        grains = -(-capacity_sectors // h.grain_size)
        gd_entries = -(-grains // h.num_gtes)
        old_n = ext.gd_entries
        old_sectors = -(-old_n * 4 // SECTOR)
        new_sectors = -(-gd_entries * 4 // SECTOR)
        span = ext.gt_sectors * SECTOR
        eof = ext.eof
        tables = [ext.gd] + ([ext.rgd] if ext.rgd is not None else [])
        grown = []
        for table in tables:
            t = array("I", table)
            t.extend([0] * (gd_entries - old_n))
            for i in range(old_n, gd_entries):
                if t[i] == 0:
                    t[i] = eof // SECTOR
                    eof += span
            grown.append(t)
        relocate = new_sectors > old_sectors
        offsets = [h.gd_offset] + ([h.rgd_offset] if ext.rgd is not None else [])
        if relocate:
            offsets = []
            for _ in grown:
                offsets.append(eof // SECTOR)
                eof += new_sectors * SECTOR
        os.ftruncate(ext.fd, eof)  # the new tables read as zeroes: every grain unallocated
        for t, off in zip(grown, offsets, strict=True):
            if relocate:
                pwrite_full(ext.fd, t, off * SECTOR)
            else:
                pwrite_full(ext.fd, memoryview(t)[old_n:], off * SECTOR + 4 * old_n)
        os.fsync(ext.fd)
        h.capacity = capacity_sectors
        if relocate:
            h.gd_offset = offsets[0]
            if ext.rgd is not None:
                h.rgd_offset = offsets[1]
        pwrite_full(ext.fd, h.pack(), 0)
        os.fsync(ext.fd)
        if descriptor is not None and h.desc_offset:
            ext.write_descriptor(descriptor)
            os.fsync(ext.fd)
    finally:
        ext.close()
