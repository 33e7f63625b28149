"""A VMDK disk: a descriptor, its extents in order, and the parent chain under them."""

from __future__ import annotations

import os
import threading
from bisect import bisect_right
from pathlib import Path

from boite.disk.base import SECTOR, BlockImage
from boite.disk.descriptor import (
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    ExtentLine,
    extent_path,
    new_cid,
    parent_path,
    parse_descriptor,
)
from boite.disk.hostfile import fsync_dir, open_image_file
from boite.disk.raw import FlatExtent, HostFile, ZeroExtent
from boite.disk.sparse import MAGIC, SparseExtent, check_sparse, finish_grow
from boite.errors import DiskError, DiskFormatError

MAX_CHAIN = 64  # deeper chains are hostile or broken; VMware stops far earlier


def read_descriptor(path) -> tuple[Descriptor, bool]:
    """The descriptor of a .vmdk (embedded or a text file) and whether it is embedded."""
    path = os.fspath(path)
    fd = open_image_file(path, False)
    try:
        head = os.pread(fd, SECTOR, 0)
        if len(head) >= 4 and int.from_bytes(head[:4], "little") == MAGIC:
            ext = SparseExtent(path, read_only=True, fd=fd)
            try:
                raw = ext.descriptor_bytes()
            finally:
                ext.close()
            if raw is None:
                # a bare sparse extent: describe it as the monolithic disk it is
                d = Descriptor(create_type="monolithicSparse", cid=0xFFFFFFFE)
                d.extents.append(ExtentLine("RW", ext.header.capacity, "SPARSE", Path(path).name))
                return d, True
            d = parse_descriptor(raw, path, ext.header.desc_offset * SECTOR)
            return d, True
        if head[:4] == b"COWD":
            raise DiskFormatError(
                f"{path}: magic at offset 0 is 'COWD' (ESX sparse extent): not supported"
            )
        size = os.fstat(fd).st_size
        if size > MAX_DESCRIPTOR_BYTES:
            raise DiskFormatError(
                f"{path}: not a VMDK: no KDMV magic at offset 0 and {size} bytes is too big for a descriptor"
            )
        raw = os.pread(fd, size, 0)
        if b"createType" not in raw and b"# Disk DescriptorFile" not in raw:
            raise DiskFormatError(
                f"{path}: not a VMDK: no KDMV magic at offset 0 and no descriptor text"
            )
        return parse_descriptor(raw, path), False
    finally:
        os.close(fd)


def write_descriptor_file(path, desc: Descriptor) -> None:
    """Replace a descriptor file atomically (write, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    data = desc.to_bytes()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class VmdkDisk(BlockImage):
    """A VMDK of any kind opened as one BlockImage, reads falling through to its parents."""

    parallel_reads = True  # read_into may run in several threads at once (positioned I/O)

    def __init__(
        self,
        path,
        read_only: bool = False,
        *,
        keep_cid: bool = False,
        open_parent: bool = True,
        _chain: tuple[str, ...] = (),
    ) -> None:
        self.path = str(Path(path).resolve())
        self.read_only = read_only
        self.keep_cid = keep_cid
        self.extents: list = []
        self.starts: list[int] = []
        self.parent: VmdkDisk | None = None
        self._cid_bumped = False
        self._closed = False
        # writers (vCPU and I/O threads) serialise: allocation appends at a shared EOF.
        # Readers need no lock: a grain's table entry is set only after its data is written.
        self._wlock = threading.Lock()
        if self.path in _chain:
            raise DiskFormatError(
                f"{path}: parentFileNameHint chain loops back to {self.path} ({' -> '.join(_chain)})"
            )
        if len(_chain) >= MAX_CHAIN:
            raise DiskFormatError(
                f"{path}: parentFileNameHint chain is deeper than {MAX_CHAIN} disks"
            )
        self.descriptor, self.embedded = read_descriptor(self.path)
        try:
            self._open_extents()
            if self.descriptor.has_parent and open_parent:
                self._open_parent(_chain + (self.path,))
            if not read_only:
                self._mark_unclean()
        except BaseException:
            self._release()
            raise

    # -- opening --------------------------------------------------------------------------

    def _open_extents(self) -> None:
        d = self.descriptor
        ro = self.read_only
        pos = 0
        if self.embedded:
            ext = SparseExtent(self.path, ro)
            self.extents.append(ext)
            self.starts.append(0)
            self.size = ext.size
            if (
                d.capacity_sectors < ext.header.capacity
                and not ro
                and len(d.extents) == 1
                and finish_grow(ext, d.capacity_sectors)
            ):
                # a 'disk grow' killed after its header was written: finished here
                d.extents[0].sectors = ext.header.capacity
            if d.capacity_sectors != ext.header.capacity:
                # which one is right is for 'check --repair' to work out (the larger one
                # that the grain directories support), not for a guest to find out
                raise DiskFormatError(
                    f"{self.path}: header capacity (offset 12) is {ext.header.capacity} sectors "
                    f"but the embedded descriptor says {d.capacity_sectors}; run "
                    "'boite disk check --repair'"
                )
            return
        hosts: dict[tuple[str, bool], HostFile] = {}  # flat extents in one file share it
        paths: dict[str, Path] = {}
        for line in d.extents:
            size = line.sectors * SECTOR
            eff_ro = ro or line.access != "RW"
            if line.access == "NOACCESS":
                raise DiskError(f"{self.path}: extent {line.filename!r} is NOACCESS")
            if line.kind == "ZERO":
                ext = ZeroExtent(size)
            else:
                name = line.filename or ""
                file = paths.get(name)
                if file is None:
                    file = paths[name] = extent_path(self.path, name)
                if line.kind == "SPARSE":
                    ext = SparseExtent(file, eff_ro)
                    if ext.size < size:
                        ext.close()
                        raise DiskFormatError(
                            f"{self.path}: extent {line.filename!r} holds {ext.size // SECTOR} sectors, "
                            f"descriptor says {line.sectors} (line at offset {line.where})"
                        )
                elif line.kind in ("FLAT", "VMFS"):
                    key = (str(file), not eff_ro)
                    host = hosts.get(key)
                    if host is None:
                        host = hosts[key] = HostFile(str(file), not eff_ro)
                    ext = FlatExtent(file, size, line.offset * SECTOR, eff_ro, host)
                else:
                    raise DiskFormatError(
                        f"{self.path}: extent type {line.kind} at offset {line.where} is not "
                        "supported (ESX-only)"
                    )
            self.extents.append(ext)
            self.starts.append(pos)
            pos += size
        self.size = pos

    def _open_parent(self, chain: tuple[str, ...]) -> None:
        d = self.descriptor
        ppath = parent_path(self.path, d.parent_hint or "")
        if not ppath.exists():
            raise DiskError(f"{self.path}: parent disk {ppath} (parentFileNameHint) does not exist")
        self.parent = VmdkDisk(ppath, read_only=True, _chain=chain)
        pcid = self.parent.descriptor.cid
        if pcid != d.parent_cid:
            raise DiskFormatError(
                f"{self.path}: parentCID is {d.parent_cid:08x} but its parent {self.parent.path} has "
                f"CID {pcid:08x}: the parent changed after this child was made; refusing to read "
                "mixed data"
            )

    def _mark_unclean(self) -> None:
        for ext in self.extents:
            if isinstance(ext, SparseExtent) and not ext.read_only:
                if ext.header.unclean:
                    report = check_sparse(ext.path)
                    if report.errors:
                        raise DiskFormatError(
                            f"{ext.path}: was not closed cleanly (uncleanShutdown at offset 72) and "
                            f"is inconsistent ({report.errors[0]}); run 'boite disk check --repair'"
                        )
                ext.set_unclean(True)

    # -- BlockImage -----------------------------------------------------------------------

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(
                f"{self.path}: access at {offset}+{length} is outside the disk ({self.size} bytes)"
            )

    def _below(self, offset: int, mv: memoryview) -> None:
        """What the layers under this one hold at `offset` (zeroes past the parent's end)."""
        p = self.parent
        n = len(mv)
        if p is None or offset >= p.size:
            mv[:] = bytes(n)
            return
        inside = min(n, p.size - offset)
        p.read_into(offset, mv[:inside])
        if inside < n:
            mv[inside:] = bytes(n - inside)

    def _fallback(self, start: int):
        if self.parent is None:
            return None
        if start == 0:
            return self._below
        return lambda rel, mv: self._below(start + rel, mv)

    def read_into(self, offset: int, buf) -> None:
        mv = buf if type(buf) is memoryview and buf.format == "B" else memoryview(buf).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            self._bounds(offset, n)
        if len(self.extents) == 1:
            self.extents[0].read_into(offset, mv, self._below if self.parent is not None else None)
            return
        for ext, start, rel, pos, length in self._extent_spans(offset, n):
            ext.read_into(rel, mv[pos : pos + length], self._fallback(start))

    def _extent_spans(self, offset: int, n: int):
        """For a request of `n` bytes at `offset` that crosses extents: each extent it
        touches, that extent's start, the offset inside it, the position in the request
        and the length there."""
        pos = 0
        i = bisect_right(self.starts, offset) - 1
        while pos < n:
            start = self.starts[i]
            ext = self.extents[i]
            rel = offset + pos - start
            length = min(n - pos, ext.size - rel)
            yield ext, start, rel, pos, length
            pos += length
            i += 1

    def _before_write(self) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: disk is open read-only")
        if not self._cid_bumped:
            self._cid_bumped = True
            if not self.keep_cid:
                self.set_cid(new_cid(self.descriptor.cid))

    def set_cid(self, cid: int) -> None:
        """Give the disk a new content ID (children that name the old one stop opening)."""
        self.descriptor.set_cid(cid)
        self._save_descriptor()

    def _save_descriptor(self) -> None:
        if self.embedded:
            ext = self.extents[0]
            if ext.header.desc_offset:
                ext.write_descriptor(self.descriptor.to_bytes())
                os.fdatasync(ext.fd)
        else:
            write_descriptor_file(self.path, self.descriptor)

    def write(self, offset: int, data) -> None:
        mv = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            self._bounds(offset, n)
        with self._wlock:
            if not self._cid_bumped or self.read_only:
                self._before_write()
            if len(self.extents) == 1:
                self.extents[0].write(offset, mv, self._below if self.parent is not None else None)
            else:
                self._write_extents(offset, mv)

    def _write_extents(self, offset: int, mv: memoryview) -> None:
        for ext, start, rel, pos, length in self._extent_spans(offset, len(mv)):
            ext.write(rel, mv[pos : pos + length], self._fallback(start))

    def discard(self, offset: int, length: int) -> None:
        self._bounds(offset, length)
        with self._wlock:
            self._before_write()
            self._discard(offset, length)

    def _discard(self, offset: int, length: int) -> None:
        for ext, start, rel, _, n in self._extent_spans(offset, length):
            ext.discard(rel, n, self._fallback(start))

    def prefetch(self, offset: int, length: int) -> None:
        length = max(0, min(length, self.size - offset))
        if offset < 0 or not length:
            return
        for ext, start, rel, _, n in self._extent_spans(offset, length):
            holes = ext.prefetch(rel, n)
            if self.parent is not None:
                for a, m in holes:
                    self.parent.prefetch(start + a, m)

    def start_writeback(self) -> None:
        for ext in self.extents:
            ext.start_writeback()

    def flush(self) -> None:
        with self._wlock:
            for ext in self.extents:
                ext.flush()

    def _release(self) -> None:
        for ext in self.extents:
            try:
                ext.close()
            except OSError:
                pass
        self.extents = []
        if self.parent is not None:
            self.parent.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for ext in self.extents:
                ext.close()
        finally:
            self._release()

    # -- inspection -----------------------------------------------------------------------

    @property
    def chain(self) -> list[VmdkDisk]:
        out: list[VmdkDisk] = []
        d: VmdkDisk | None = self
        while d is not None:
            out.append(d)
            d = d.parent
        return out

    def own_ranges(self) -> list[tuple[int, int, str]]:
        """(offset, length, 'data'|'zero') ranges this layer holds, merged, in order."""
        out: list[tuple[int, int, str]] = []

        def add(off: int, n: int, kind: str) -> None:
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
                o, m, k = out[-1]
                out[-1] = (o, m + n, k)
            else:
                out.append((off, n, kind))

        for start, ext in zip(self.starts, self.extents, strict=True):
            if isinstance(ext, SparseExtent):
                gs = ext.grain_bytes
                for g, e in ext.allocated():
                    off = g * gs
                    add(start + off, min(gs, ext.size - off), "data" if e > 1 else "zero")
            elif isinstance(ext, ZeroExtent):
                add(start, ext.size, "zero")
            else:
                for off, n in ext.data_ranges():
                    add(start + off, n, "data")
        return out

    def allocated_bytes(self) -> int:
        """Host bytes this layer's files use for guest data."""
        total = 0
        for ext in self.extents:
            if isinstance(ext, SparseExtent):
                total += sum(1 for _, e in ext.allocated() if e > 1) * ext.grain_bytes
            elif isinstance(ext, FlatExtent):
                total += sum(n for _, n in ext.data_ranges())
        return total

    def files(self) -> list[str]:
        """This layer's own files: the descriptor and every extent file."""
        out = [self.path]
        for ext in self.extents:
            p = getattr(ext, "path", None)
            if p and str(Path(p).resolve()) not in out:
                out.append(str(Path(p).resolve()))
        return out
