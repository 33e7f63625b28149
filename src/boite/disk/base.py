"""The one interface for everything that stores guest sectors."""

from __future__ import annotations

import abc

SECTOR = 512


class BlockImage(abc.ABC):
    """A virtual disk seen as a flat array of bytes of `size` length.

    Offsets and lengths are in bytes. Implementations may require sector alignment for
    writes (callers from devices always are); reads of any range are allowed.
    """

    size: int
    read_only: bool = False

    @abc.abstractmethod
    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill `buf` with the bytes at `offset` (unallocated ranges read as zeroes)."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset`. Durable only after flush()."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every acknowledged write durable (data and metadata)."""

    def discard(self, offset: int, length: int) -> None:  # noqa: B027 - optional by design
        """Tell the image the range is unused; afterwards it reads as zeroes or old data."""

    def prefetch(self, offset: int, length: int) -> None:  # noqa: B027 - optional by design
        """Hint that [offset, offset+length) will be read soon (start reading it now)."""

    def start_writeback(self) -> None:  # noqa: B027 - optional by design
        """Start writing what was written so far to storage, without waiting for it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the image's files; safe to call twice."""

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def __enter__(self) -> BlockImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
