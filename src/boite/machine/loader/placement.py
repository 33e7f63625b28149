"""Where a loader may put things in guest RAM, and putting them there with clear errors."""

from __future__ import annotations

from boite.machine.loader.errors import KernelFormatError
from boite.machine.machine import E820_RAM, Machine

PAGE = 4096


def ram_ranges(machine: Machine) -> list[tuple[int, int]]:
    """Usable RAM as (start, end) pairs: the e820 map's RAM entries that are backed by
    guest memory (or the memory regions themselves when no map was built)."""
    if machine.e820:
        out = []
        for e in sorted(machine.e820, key=lambda e: e.addr):
            if e.type == E820_RAM and machine.memory.contains(e.addr, e.size):
                out.append((e.addr, e.addr + e.size))
        return out
    return [(r.gpa, r.end) for r in machine.memory.regions]


def write_guest(machine: Machine, gpa: int, data: bytes, what: str, path: str) -> None:
    if not machine.memory.contains(gpa, len(data)):
        raise KernelFormatError(
            f"{path}: {what} needs guest RAM at {gpa:#x}-{gpa + len(data):#x}, which this "
            f"machine ({machine.memory.size >> 20} MiB) does not have"
        )
    machine.memory.write(gpa, data)


def zero_guest(machine: Machine, gpa: int, size: int, what: str, path: str) -> None:
    if size <= 0:
        return
    if not machine.memory.contains(gpa, size):
        raise KernelFormatError(
            f"{path}: {what} needs guest RAM at {gpa:#x}-{gpa + size:#x}, which this "
            f"machine ({machine.memory.size >> 20} MiB) does not have"
        )
    view = machine.memory.view(gpa, size)
    view[:] = bytes(size)


def place_high(machine: Machine, size: int, *, above: int, below: int, what: str, path: str) -> int:
    """The highest page-aligned address where `size` bytes fit in one RAM range, wholly at
    or above `above` and below `below` (QEMU's and GRUB's habit for an initrd)."""
    best = None
    for start, end in ram_ranges(machine):
        top = min(end, below)
        addr = (top - size) & ~(PAGE - 1)
        if addr >= max(start, above) and size <= top - max(start, above):
            best = addr if best is None else max(best, addr)
    if best is None:
        raise KernelFormatError(
            f"{path}: {what} of {size} bytes does not fit in guest RAM between {above:#x} and "
            f"{below:#x} ({machine.memory.size >> 20} MiB of RAM); give the machine more memory"
        )
    return best
