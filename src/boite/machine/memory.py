"""Guest physical memory: mmap-backed regions, zero-copy views, every access bounds-checked."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

from boite.errors import GuestError


@dataclass
class MemoryRegion:
    gpa: int
    size: int
    mm: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Contiguous regions of guest RAM. `view(gpa, n)` returns a memoryview, never a copy.

    Any access that is not wholly inside one region raises GuestError: a guest can name
    any address, and the host must never touch outside what it gave the guest.

    Write observers hear of every write that does not come from a vCPU (device DMA, the
    VMM), as `(gpa, length)`, possibly on a device thread: an emulator that caches
    translated code must drop what such a write replaced. `write` and `write_uN` report
    themselves; whoever writes through a `view` calls `note_dma_write` once the data is
    in (VirtQueue.push does, for a chain's device-writable buffers).
    """

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []
        # Replaced, never mutated, so a device thread can iterate it while another adds.
        self.write_observers: tuple[Callable[[int, int], None], ...] = ()

    @classmethod
    def with_ram(
        cls, size: int, hole_start: int = 0xC000_0000, hole_end: int = 1 << 32
    ) -> GuestMemory:
        """RAM of `size` bytes from 0, split around the 32-bit PCI/MMIO hole as a PC does."""
        mem = cls()
        low = min(size, hole_start)
        mem.add_region(0, low)
        if size > low:
            mem.add_region(hole_end, size - low)
        return mem

    def add_region(self, gpa: int, size: int) -> MemoryRegion:
        if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
            raise ValueError(f"guest memory region {gpa:#x}+{size:#x} is not page-aligned")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"guest memory region {gpa:#x}+{size:#x} overlaps {r.gpa:#x}")
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region = MemoryRegion(gpa, size, mm, memoryview(mm))
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def add_write_observer(self, fn: Callable[[int, int], None]) -> None:
        """Call `fn(gpa, length)` after each write to guest RAM by anything but a vCPU."""
        self.write_observers = (*self.write_observers, fn)

    def remove_write_observer(self, fn: Callable[[int, int], None]) -> None:
        self.write_observers = tuple(f for f in self.write_observers if f != fn)

    def note_dma_write(self, gpa: int, length: int) -> None:
        """Bytes gpa..gpa+length were written behind the vCPUs' backs (a device, the VMM)."""
        for fn in self.write_observers:
            fn(gpa, length)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def region_at(self, gpa: int) -> MemoryRegion | None:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        return None

    def contains(self, gpa: int, length: int) -> bool:
        r = self.region_at(gpa)
        return r is not None and length >= 0 and gpa + length <= r.end

    def view(self, gpa: int, length: int) -> memoryview:
        r = self.region_at(gpa)
        if r is None or length < 0 or gpa + length > r.end:
            raise GuestError(f"guest physical access {gpa:#x}+{length:#x} is outside guest RAM")
        off = gpa - r.gpa
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data
        if self.write_observers:
            self.note_dma_write(gpa, len(data))

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF
        if self.write_observers:
            self.note_dma_write(gpa, 1)

    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2)[:] = (value & 0xFFFF).to_bytes(2, "little")
        if self.write_observers:
            self.note_dma_write(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4)[:] = (value & 0xFFFF_FFFF).to_bytes(4, "little")
        if self.write_observers:
            self.note_dma_write(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8)[:] = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        if self.write_observers:
            self.note_dma_write(gpa, 8)

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            r.mm.close()
        self.regions.clear()
