"""Split virtqueues (virtio 1.x, section 2.7), read and written straight in guest RAM.

The guest owns the rings and can put anything in them, so every index, address, length
and flag is checked before it is used. A violation raises `VirtQueueError` (a GuestError);
the transport then marks the device DEVICE_NEEDS_RESET and stops serving it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from boite.errors import CheckpointError, GuestError
from boite.machine.memory import GuestMemory
from boite.machine.state import StateRecord, flag, uint

# Descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# avail->flags and used->flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# A single buffer is never larger than this; Linux never sends more than a few MiB per
# request, and a cap keeps a hostile length from turning into a host allocation.
MAX_BUFFER_LEN = 1 << 30
# Indirect tables are at most this many descriptors (the spec bounds them by the queue
# size the ring would allow: 2**15).
MAX_INDIRECT = 1 << 15
MAX_QUEUE_SIZE = 1 << 15


class VirtQueueError(GuestError):
    """The guest broke the virtqueue protocol (bad index, address, length or flag)."""


@dataclass
class DescChain:
    """One request: the device-readable buffers, then the device-writable ones.

    `readable` and `writable` are memoryviews straight into guest RAM, in chain order;
    `writable_ranges` are the writable buffers as (guest physical address, length).
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    writable_ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


def split_views(views: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a scatter list at byte `at` without copying (the head is shorter if short)."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for v in views:
        n = len(v)
        if at <= 0:
            tail.append(v)
        elif n <= at:
            head.append(v)
            at -= n
        else:
            head.append(v[:at])
            tail.append(v[at:])
            at = 0
    return head, tail


def gather(views: list[memoryview], limit: int) -> bytes:
    """Copy the first `limit` bytes of a scatter list (for small headers only)."""
    out = bytearray()
    for v in views:
        if len(out) >= limit:
            break
        out += v[: limit - len(out)]
    return bytes(out)


def scatter(views: list[memoryview], data: bytes | memoryview) -> int:
    """Copy `data` into a scatter list; returns the bytes written (may be short)."""
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
    return pos


@dataclass(frozen=True)
class VirtQueueState(StateRecord):
    """A queue's registers and the device's ring positions. A queue that is not ready
    holds what the driver wrote so far (checked when it makes the queue ready); a ready
    one must have a layout inside guest RAM (`VirtQueue.check_state`)."""

    size: int = uint(32)
    ready: bool = flag()
    desc_addr: int = uint(64)
    avail_addr: int = uint(64)
    used_addr: int = uint(64)
    last_avail_idx: int = uint(16)
    used_idx: int = uint(16)
    signalled_used: int = uint(16)
    signalled_valid: bool = flag()
    event_idx: bool = flag()
    indirect: bool = flag()


class VirtQueue:
    """One split virtqueue: descriptor table, available ring, used ring."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int = 256) -> None:
        if max_size <= 0 or max_size & (max_size - 1) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"virtqueue max size {max_size} is not a power of two <= 32768")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        # Features the transport negotiated; set before the queue is enabled.
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        # The used index at our last interrupt decision (for EVENT_IDX suppression).
        self.signalled_used = 0
        self.signalled_valid = False
        # Device-writable ranges of the chains popped and not pushed yet, by head: push()
        # reports them to the memory's write observers (see GuestMemory.note_dma_write).
        self._inflight: dict[int, list[tuple[int, int]]] = {}

    # --- state -------------------------------------------------------------------
    def save_state(self) -> VirtQueueState:
        return VirtQueueState.of(self)

    def check_state(self, rec: VirtQueueState) -> None:
        """A live queue's layout must be one `validate()` accepts in this guest's RAM."""
        if rec.ready:
            problem = self._layout_problem(rec.size, rec.desc_addr, rec.avail_addr, rec.used_addr)
            if problem is not None:
                raise CheckpointError(problem)

    def apply_state(self, rec: VirtQueueState) -> None:
        rec.put(self)
        self._inflight = {}

    # --- enabling ------------------------------------------------------------------
    def validate(self) -> None:
        """Check the layout the driver wrote before the queue goes live."""
        problem = self._layout_problem(self.size, self.desc_addr, self.avail_addr, self.used_addr)
        if problem is not None:
            raise VirtQueueError(f"virtqueue {self.index}: {problem}")

    def _layout_problem(self, n: int, desc: int, avail: int, used: int) -> str | None:
        if n <= 0 or n & (n - 1) or n > self.max_size:
            return f"size {n} is not a power of two <= {self.max_size}"
        for name, addr, align, length in (
            ("descriptor table", desc, 16, DESC_SIZE * n),
            ("available ring", avail, 2, 6 + 2 * n),
            ("used ring", used, 4, 6 + 8 * n),
        ):
            if addr % align:
                return f"{name} at {addr:#x} is not {align}-byte aligned"
            if not self.memory.contains(addr, length):
                return f"{name} {addr:#x}+{length:#x} is outside guest RAM"
        return None

    # --- the available side --------------------------------------------------------
    def avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_addr + 2)

    def has_pending(self) -> bool:
        return self.ready and self._pending() > 0

    def _pending(self) -> int:
        pending = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtQueueError(
                f"virtqueue {self.index}: avail idx {self.avail_idx()} is {pending} ahead of "
                f"{self.last_avail_idx}, more than the queue size {self.size}"
            )
        return pending

    def pop(self) -> DescChain | None:
        """Take the next available chain, validated, or None when the ring is empty."""
        if not self.ready or self._pending() == 0:
            return None
        slot = self.last_avail_idx % self.size
        head = self.memory.read_u16(self.avail_addr + 4 + 2 * slot)
        chain = self._walk(head)
        if chain.writable_ranges:
            self._inflight[head] = chain.writable_ranges
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: ask to be notified once the driver makes the next one available.
            self.memory.write_u16(self.used_addr + 4 + 8 * self.size, self.last_avail_idx)
        return chain

    def _ram_view(self, addr: int, length: int) -> memoryview:
        """GuestMemory.view without the per-call lookups (regions are fixed once running)."""
        for gpa, end, view in self._regions():
            if gpa <= addr < end:
                if length < 0 or addr + length > end:
                    break
                return view[addr - gpa : addr - gpa + length]
        raise VirtQueueError(
            f"virtqueue {self.index}: buffer {addr:#x}+{length:#x} is outside guest RAM"
        )

    def _regions(self) -> list[tuple[int, int, memoryview]]:
        if self._region_cache is None or len(self._region_cache) != len(self.memory.regions):
            self._region_cache = [(r.gpa, r.gpa + r.size, r.view) for r in self.memory.regions]
        return self._region_cache

    _region_cache: list[tuple[int, int, memoryview]] | None = None

    def _walk(self, head: int) -> DescChain:
        if head >= self.size:
            raise VirtQueueError(
                f"virtqueue {self.index}: head index {head} >= queue size {self.size}"
            )
        chain = DescChain(head)
        count, i = self.size, head
        table = self._ram_view(self.desc_addr, DESC_SIZE * count)
        unpack = _DESC.unpack_from
        in_indirect = False
        seen = 0
        while True:
            seen += 1
            if seen > count:
                raise VirtQueueError(
                    f"virtqueue {self.index}: chain from head {head} is longer than {count} "
                    "descriptors (a loop?)"
                )
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtQueueError(
                        f"virtqueue {self.index}: indirect descriptor without "
                        "VIRTIO_RING_F_INDIRECT_DESC"
                    )
                if in_indirect:
                    raise VirtQueueError(
                        f"virtqueue {self.index}: indirect descriptor inside an indirect table"
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtQueueError(
                        f"virtqueue {self.index}: indirect descriptor with NEXT set"
                    )
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtQueueError(
                        f"virtqueue {self.index}: indirect table length {length} is not a "
                        f"multiple of 16 in 16..{MAX_INDIRECT * DESC_SIZE}"
                    )
                # No alignment rule for indirect tables (Linux kmallocs them 8-aligned).
                if not self.memory.contains(addr, length):
                    raise VirtQueueError(
                        f"virtqueue {self.index}: indirect table {addr:#x}+{length:#x} is "
                        "outside guest RAM"
                    )
                table, count, i = self._ram_view(addr, length), length // DESC_SIZE, 0
                in_indirect = True
                seen = 0
                continue
            self._add_buffer(chain, addr, length, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise VirtQueueError(
                    f"virtqueue {self.index}: next index {nxt} >= table size {count}"
                )
            i = nxt

    def _add_buffer(self, chain: DescChain, addr: int, length: int, flags: int) -> None:
        if length > MAX_BUFFER_LEN:
            raise VirtQueueError(
                f"virtqueue {self.index}: buffer length {length:#x} exceeds {MAX_BUFFER_LEN:#x}"
            )
        view = self._ram_view(addr, length)
        if flags & VIRTQ_DESC_F_WRITE:
            chain.writable.append(view)
            chain.writable_ranges.append((addr, length))
        else:
            if chain.writable:
                raise VirtQueueError(
                    f"virtqueue {self.index}: device-readable buffer after a device-writable "
                    f"one in chain {chain.head}"
                )
            chain.readable.append(view)

    # --- the used side -------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes filled in.

        The chain's whole device-writable part is reported to the memory's write observers
        (the device may have written any of it, whatever `written` says), before the used
        index that lets the driver look at the data, or run it.
        """
        mem = self.memory
        ranges = self._inflight.pop(head, None)
        slot = self.used_idx % self.size
        mem.view(self.used_addr + 4 + 8 * slot, 8)[:] = _USED_ELEM.pack(head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if mem.write_observers:
            if ranges:
                for gpa, length in ranges:
                    mem.note_dma_write(gpa, length)
            mem.note_dma_write(self.used_addr, 4 + 8 * (slot + 1))  # flags, idx .. element
        # The element must be visible before the index that publishes it; CPython's
        # stores to the mmap happen in program order.
        mem.view(self.used_addr + 2, 2)[:] = self.used_idx.to_bytes(2, "little")

    def needs_interrupt(self) -> bool:
        """Whether the driver asked to hear about the used entries pushed since last time."""
        if not self.event_idx:
            return not self.memory.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
        new = self.used_idx
        old = self.signalled_used
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        if not valid:
            return True
        used_event = self.memory.read_u16(self.avail_addr + 4 + 2 * self.size)
        # vring_need_event(): did new_idx step past used_event since old?
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def set_notify_suppressed(self, suppressed: bool) -> None:
        """Without EVENT_IDX, tell the driver whether we want kicks (used->flags)."""
        if not self.event_idx:
            self.memory.write_u16(self.used_addr, VIRTQ_USED_F_NO_NOTIFY if suppressed else 0)
