"""The `.vmem` file: guest RAM as VMware keeps it beside a checkpoint.

The file is the guest's RAM regions laid end to end (the `memory` group of the .vmsn says
where each region sits in guest-physical space). boite writes it sparse: the file is sized
first, zero pages are never written (they stay holes), and the rest goes out in large
sequential writes straight from guest memory, with no copy. Reading back asks the file
system where the data is (SEEK_DATA/SEEK_HOLE) and reads only that, straight into guest
memory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from boite.box.checkpoint import PAGE_SIZE, CheckpointError, fsync_dir
from boite.machine.memory import GuestMemory, MemoryRegion

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_BLOCK = bytes(1 << 20)  # zero runs are skipped a MiB at a time where they can be
WRITE_MAX = 64 << 20  # one pwrite; large enough to stream, small enough to stay responsive

Layout = list[tuple[int, int, int]]  # (guest-physical address, .vmem offset, size)


def data_runs(region: MemoryRegion) -> list[tuple[int, int]]:
    """(offset, length) of every run of non-zero pages in the region.

    A page whose first or last 8 bytes are non-zero is data without looking further (most
    touched pages); only the others are compared whole, and zero areas a MiB at a time.
    (A copy and a memcmp beat memoryview's own comparison, which goes byte by byte.)
    """
    view = region.view
    words = view.cast("Q")
    size = region.size
    page_words = PAGE_SIZE // 8
    block = len(ZERO_BLOCK)
    runs: list[tuple[int, int]] = []
    run_start = -1
    pos = 0
    while pos < size:
        w = pos >> 3
        if words[w] or words[w + page_words - 1]:
            zero_len = 0
        elif (
            pos % block == 0
            and pos + block <= size
            and view[pos : pos + block].tobytes() == ZERO_BLOCK
        ):
            zero_len = block
        elif view[pos : pos + PAGE_SIZE].tobytes() == ZERO_PAGE:
            zero_len = PAGE_SIZE
        else:
            zero_len = 0
        if zero_len:
            if run_start >= 0:
                runs.append((run_start, pos - run_start))
                run_start = -1
            pos += zero_len
        else:
            if run_start < 0:
                run_start = pos
            pos += PAGE_SIZE
    if run_start >= 0:
        runs.append((run_start, size - run_start))
    return runs


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data[:WRITE_MAX], offset)
        data = data[n:]
        offset += n


def write_vmem(path: str | os.PathLike[str], memory: GuestMemory, durable: bool = True) -> Layout:
    """Write every RAM region of `memory` to `path` (atomically, via a temporary file);
    return the layout the .vmsn's `memory` group must describe."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    layout: Layout = []
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, memory.size)
        file_offset = 0
        for region in memory.regions:
            layout.append((region.gpa, file_offset, region.size))
            for start, length in data_runs(region):
                _pwrite_all(fd, region.view[start : start + length], file_offset + start)
            file_offset += region.size
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return layout


def _data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, end) of the data extents of the file within [start, end)."""
    extents = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            return [(start, end)]  # the file system cannot say: read it all
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        extents.append((data, hole))
        pos = hole
    return extents


def read_vmem(
    path: str | os.PathLike[str],
    memory: GuestMemory,
    layout: Layout,
    memory_is_zero: bool = False,
) -> None:
    """Fill `memory` from the .vmem at `path` as `layout` says. Pages the file holds as
    holes are zeroed unless `memory_is_zero` says they already are."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open guest RAM file: {exc.strerror}") from None
    try:
        file_size = os.fstat(fd).st_size
        for gpa, offset, size in layout:
            if offset + size > file_size:
                raise CheckpointError(
                    f"{path}: region at guest {gpa:#x} needs .vmem bytes "
                    f"{offset:#x}..{offset + size:#x}, the file has {file_size:#x}"
                )
            if not memory.contains(gpa, size):
                raise CheckpointError(
                    f"{path}: region {gpa:#x}+{size:#x} does not fit the machine's guest RAM"
                )
            dest = memory.view(gpa, size)
            filled = 0
            for data, data_end in _data_extents(fd, offset, offset + size):
                if not memory_is_zero:
                    _zero(dest, filled, data - offset)
                _pread_all(fd, dest[data - offset : data_end - offset], data, path)
                filled = data_end - offset
            if not memory_is_zero:
                _zero(dest, filled, size)
    finally:
        os.close(fd)


def _zero(dest: memoryview, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(ZERO_BLOCK))
        dest[start : start + n] = ZERO_BLOCK[:n] if n != len(ZERO_BLOCK) else ZERO_BLOCK
        start += n


def _pread_all(fd: int, dest: memoryview, offset: int, path: object) -> None:
    while dest:
        n = os.preadv(fd, [dest[:WRITE_MAX]], offset)
        if n == 0:
            raise CheckpointError(f"{path}: ends at {offset:#x}, inside guest RAM it describes")
        dest = dest[n:]
        offset += n
