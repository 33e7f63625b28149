"""Host file primitives the disk formats share: positioned I/O, hole punching, allocation maps."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

IOV_MAX = 1024
SYNC_FILE_RANGE_WRITE = 2
try:
    _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range = _libc.sync_file_range
except AttributeError:  # not Linux
    _sync_file_range = None


def will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a range into the page cache now (asynchronously):
    many of these keep many reads in flight where one synchronous read at a time keeps one."""
    if length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages back without waiting, so that the final
    fdatasync finds little left to do (its writing overlaps the copy's reading)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def open_image_file(path, writable: bool) -> int:
    """Open a disk's file; only regular files and block devices (a FIFO or a character
    device named by a hostile descriptor would block or never end)."""
    import fcntl
    import stat

    from boite.errors import DiskError, DiskFormatError

    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DiskError(f"{path}: cannot open: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise DiskFormatError(f"{path}: at offset 0: not a regular file or block device")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def fsync_dir(path) -> None:
    """Make renames and new names in a directory durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def pread_full(fd: int, mv: memoryview, offset: int) -> None:
    """Fill `mv` from `offset`; bytes past end of file read as zeroes."""
    done = 0
    n = len(mv)
    while done < n:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got == 0:
            mv[done:] = bytes(n - done)
            return
        done += got


def pwrite_full(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def pwritev_full(fd: int, bufs: list, offset: int) -> None:
    """Write a list of buffers back to back at `offset`."""
    if len(bufs) == 1:
        pwrite_full(fd, bufs[0], offset)
        return
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    done = 0
    while views:
        batch = views[:IOV_MAX]
        n = os.pwritev(fd, batch, offset + done)
        done += n
        # drop what was written (a short write leaves a partial buffer)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    assert done == total


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (reads as zeroes after); False where the filesystem can't."""
    if length <= 0:
        return True
    rc = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    return True


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make a range read as zeroes, freeing the space where possible."""
    if not punch_hole(fd, offset, length):
        chunk = bytes(min(length, 1 << 20))
        pos = 0
        while pos < length:
            n = min(len(chunk), length - pos)
            pwrite_full(fd, memoryview(chunk)[:n], offset + pos)
            pos += n


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Allocated (offset, length) ranges of a host file between start and end (SEEK_DATA)."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(start, end - start)]  # no SEEK_DATA: call everything data
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        out.append((data, hole - data))
        pos = hole
    return out


_ZEROES = bytes(1 << 20)


def is_zero(buf) -> bool:
    """True when every byte is zero (memcmp speed; memoryview comparison is per item)."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n <= len(_ZEROES):
        return mv.tobytes() == (_ZEROES if n == len(_ZEROES) else _ZEROES[:n])
    return all(is_zero(mv[i : i + len(_ZEROES)]) for i in range(0, n, len(_ZEROES)))
