"""Raw images and the flat/zero extents of a VMDK: bytes at an offset of a host file."""

from __future__ import annotations

import os

from boite.disk.base import BlockImage
from boite.disk.hostfile import (
    data_ranges,
    open_image_file,
    pread_full,
    pwrite_full,
    start_writeback,
    will_need,
    zero_range,
)
from boite.errors import DiskError


class HostFile:
    """One open host file, shared by every extent of a disk that names it: a descriptor may
    list thousands of extents in one file, which must cost one descriptor and one sync."""

    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        self.fd = open_image_file(path, writable)
        self.users = 0
        self.wrote = False

    def flush(self) -> None:
        if self.wrote and self.fd >= 0:
            os.fdatasync(self.fd)
            self.wrote = False

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1


class FlatExtent:
    """`size` bytes of a host file starting at `file_offset` (FLAT/VMFS extents)."""

    compressed = False

    def __init__(
        self,
        path,
        size: int,
        file_offset: int = 0,
        read_only: bool = True,
        host: HostFile | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.size = size
        self.file_offset = file_offset
        self.read_only = read_only
        self.host = host if host is not None else HostFile(self.path, not read_only)
        self.host.users += 1
        self.fd = self.host.fd
        self._open = True

    def read_into(self, off: int, mv: memoryview, fallback=None) -> None:
        pread_full(self.fd, mv, self.file_offset + off)

    def write(self, off: int, data, fallback=None) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: extent is open read-only")
        pwrite_full(self.fd, data, self.file_offset + off)
        self.host.wrote = True

    def discard(self, off: int, length: int, fallback=None) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: extent is open read-only")
        zero_range(self.fd, self.file_offset + off, length)
        self.host.wrote = True

    def flush(self) -> None:
        self.host.flush()

    def prefetch(self, off: int, length: int) -> list[tuple[int, int]]:
        will_need(self.fd, self.file_offset + off, length)
        return []  # nothing left for a parent

    def start_writeback(self) -> None:
        if self.host.wrote:
            start_writeback(self.fd)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.fd = -1
            self.host.release()

    def data_ranges(self) -> list[tuple[int, int]]:
        """Extent-relative ranges the host file has allocated."""
        return [
            (o - self.file_offset, n)
            for o, n in data_ranges(self.fd, self.file_offset, self.file_offset + self.size)
        ]


class ZeroExtent:
    """A ZERO extent: reads as zeroes, refuses writes (VMware's semantics)."""

    compressed = False
    path = None

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_only = True

    def read_into(self, off: int, mv: memoryview, fallback=None) -> None:
        mv[:] = bytes(len(mv))

    def write(self, off: int, data, fallback=None) -> None:
        raise DiskError("write to a ZERO extent: it has no storage")

    def discard(self, off: int, length: int, fallback=None) -> None:
        pass

    def prefetch(self, off: int, length: int) -> list[tuple[int, int]]:
        return []

    def start_writeback(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RawImage(BlockImage):
    """A plain file (or block device) holding the disk's bytes one to one."""

    parallel_reads = True  # read_into may run in several threads at once (positioned I/O)

    def __init__(self, path, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.fd = open_image_file(self.path, not read_only)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._wrote = False

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise DiskError(
                f"{self.path}: access at {offset}+{length} is outside the disk ({self.size} bytes)"
            )

    def read_into(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        self._check(offset, len(mv))
        pread_full(self.fd, mv, offset)

    def write(self, offset: int, data) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: disk is open read-only")
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv))
        pwrite_full(self.fd, mv, offset)
        self._wrote = True

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: disk is open read-only")
        self._check(offset, length)
        zero_range(self.fd, offset, length)
        self._wrote = True

    def flush(self) -> None:
        if self._wrote and self.fd >= 0:
            os.fdatasync(self.fd)
            self._wrote = False

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1

    def prefetch(self, offset: int, length: int) -> None:
        will_need(self.fd, offset, length)

    def start_writeback(self) -> None:
        if self._wrote and self.fd >= 0:
            start_writeback(self.fd)

    def allocated_ranges(self) -> list[tuple[int, int]]:
        return data_ranges(self.fd, 0, self.size)
