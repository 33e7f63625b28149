"""Port-I/O and MMIO buses: an address range maps to the device that answers it."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol


class BusDevice(Protocol):
    """What a bus calls. `offset` is relative to the start of the registered range."""

    def bus_read(self, offset: int, size: int) -> int: ...

    def bus_write(self, offset: int, size: int, value: int) -> None: ...


class StringIoDevice(BusDevice, Protocol):
    """A device that may also take a whole `rep ins`/`rep outs` run in one call (an ATA
    data register moving a sector): the same effect as `count` single accesses."""

    def read_string(self, offset: int, size: int, count: int) -> bytes: ...

    def write_string(self, offset: int, size: int, data: bytes) -> None: ...


class Bus:
    """Non-overlapping ranges of a port or physical address space.

    Unclaimed reads return all ones (as an open PC bus does) and unclaimed writes are
    dropped; `unclaimed` counts them so tests and logs can see a guest probing.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []
        self._origin: list[int] = []  # the address the device sees as offset 0
        self.unclaimed = 0
        # Bumped on every (un)register, so callers may cache lookups (the KVM exit path).
        self.version = 0

    def register(self, base: int, length: int, device: BusDevice, offset: int = 0) -> None:
        """`device` answers `base..base+length`; it sees offsets from `offset` up (a
        register that sits apart from the device's others, as the i8042's 0x64, is
        registered alone with the offset it has inside the device)."""
        if length <= 0:
            raise ValueError(f"{self.name}: empty range at {base:#x}")
        i = bisect.bisect_right(self._starts, base)
        if i > 0:
            pb, pl, pd = self._entries[i - 1]
            if pb + pl > base:
                raise ValueError(f"{self.name}: {base:#x}+{length:#x} overlaps {pd!r} at {pb:#x}")
        if i < len(self._entries) and base + length > self._entries[i][0]:
            raise ValueError(f"{self.name}: {base:#x}+{length:#x} overlaps {self._entries[i][2]!r}")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, length, device))
        self._origin.insert(i, base - offset)
        self.version += 1

    def unregister(self, base: int) -> None:
        i = bisect.bisect_left(self._starts, base)
        if i < len(self._starts) and self._starts[i] == base:
            del self._starts[i]
            del self._entries[i]
            del self._origin[i]
            self.version += 1

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        """(origin, device) for `addr`: the device is called with `addr - origin`."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, length, dev = self._entries[i]
            if addr < base + length:
                return self._origin[i], dev
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self.unclaimed += 1
            return (1 << (8 * size)) - 1
        base, dev = hit
        return dev.bus_read(addr - base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self.unclaimed += 1
            return
        base, dev = hit
        dev.bus_write(addr - base, size, value & ((1 << (8 * size)) - 1))

    def read_string(self, addr: int, size: int, count: int) -> bytes | None:
        """`count` reads of `size` bytes at `addr` as one string, or None when the
        device there has no string read (the caller then reads one at a time)."""
        hit = self.find(addr)
        if hit is None:
            return None
        base, dev = hit
        fn = getattr(dev, "read_string", None)  # optional: StringIoDevice
        if fn is None:
            return None
        data = fn(addr - base, size, count)
        if len(data) != size * count:
            raise ValueError(f"{self.name}: {dev!r} returned {len(data)} bytes for {count}x{size}")
        return data

    def write_string(self, addr: int, size: int, data: bytes) -> bool:
        """`len(data) // size` writes at `addr` in one call; False when the device there
        has no string write (nothing was written)."""
        hit = self.find(addr)
        if hit is None:
            return False
        base, dev = hit
        fn = getattr(dev, "write_string", None)  # optional: StringIoDevice
        if fn is None:
            return False
        fn(addr - base, size, data)
        return True

    def devices(self) -> list[tuple[int, int, BusDevice]]:
        return list(self._entries)


class BusWindow:
    """A bus device made of two functions: a register block that belongs to a larger
    device (a PCI function's BAR, the PM block) answered by that device's methods."""

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]):
        self.bus_read = read
        self.bus_write = write
