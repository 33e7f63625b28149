"""The virtio-mmio transport, register layout version 2 (virtio 1.x, section 4.2.2).

`VirtioMmio` is the bus-facing device: it owns the registers, the queues, feature
negotiation and the interrupt line. A `VirtioBackend` (blk, net, console, rng) supplies the
device type, its features and config space, and serves its queues.

A guest that breaks the protocol puts the device in DEVICE_NEEDS_RESET: the status bit is
set, a config-change interrupt is raised, the event is logged and the device serves no more
requests until the driver resets it. Nothing escapes to the VMM.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

from boite.errors import CheckpointError, GuestError
from boite.machine.device import Device
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.state import (
    KeepsNoState,
    Nested,
    Opaque,
    StateRecord,
    bits,
    checked,
    flag,
    items,
    uint,
)
from boite.machine.virtio.queue import VirtQueue, VirtQueueState, scatter

log = logging.getLogger("boite.virtio")

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU": Linux does not care; keeps guest tools that match it happy
MMIO_SIZE = 0x1000
CONFIG_OFFSET = 0x100

# Register offsets.
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC

# Device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Interrupt status bits.
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

# Transport-level feature bits.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Device ids.
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4


MAX_QUEUES = 64  # more than any backend has


def bit(n: int) -> int:
    return 1 << n


def mmio_cmdline(size: int, base: int, irq: int) -> str:
    """The kernel parameter that announces one virtio-mmio device to Linux."""
    if size % 1024 == 0:
        sz = f"{size // 1024}K"
    else:
        sz = str(size)
    return f"virtio_mmio.device={sz}@{base:#x}:{irq}"


class VirtioBackend(KeepsNoState):
    """What a virtio device type supplies. Subclasses serve their queues in `notify`.
    Its state is a versioned record of its own (none unless it overrides the three state
    methods), checked with the transport's before anything is restored."""

    device_id = 0
    name = "virtio"
    # Per-queue maximum sizes; the number of queues is len(queue_sizes).
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(self) -> None:
        self.transport: VirtioMmio | None = None

    # Features the device offers (device-specific bits; the transport adds its own).
    def device_features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset + size > len(data):
            return 0
        return int.from_bytes(data[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Most config fields are read-only; writes are ignored."""

    def config_bytes(self) -> bytes:
        return b""

    def activate(self, queues: list[VirtQueue], features: int) -> None:
        """The driver set DRIVER_OK: the queues are live."""

    def notify(self, queue: VirtQueue) -> None:
        """The driver kicked `queue`: serve what is available."""

    def reset(self) -> None:
        """The driver reset the device: forget in-flight state."""

    # Helpers for subclasses.
    def used(self, queue: VirtQueue, head: int, written: int) -> None:
        queue.push(head, written)

    def signal(self, queue: VirtQueue) -> None:
        assert self.transport is not None
        self.transport.signal_used(queue)

    def deliver(self, queue: VirtQueue, pending: bytearray) -> int:
        """Move bytes from `pending` into the driver's receive buffers on `queue` (a byte
        stream: console input, a port's data), interrupting once; the bytes moved."""
        moved = 0
        while pending and queue.ready:
            chain = queue.pop()
            if chain is None:
                break
            n = scatter(chain.writable, pending)
            del pending[:n]
            moved += n
            self.used(queue, chain.head, n)
        if moved:
            self.signal(queue)
        return moved


@dataclass(frozen=True)
class VirtioMmioState(StateRecord):
    """The transport's registers, its queues, and the backend's own versioned record
    (checked by the backend: `VirtioMmio.check_state`)."""

    VERSION = 1
    status: int = uint(8)
    device_features_sel: int = uint(32)
    driver_features_sel: int = uint(32)
    driver_features: int = uint(64)  # what the driver wrote; checked at FEATURES_OK
    features: int = uint(64)  # what was accepted
    queue_sel: int = uint(32)
    interrupt_status: int = bits(INT_USED_BUFFER | INT_CONFIG_CHANGE)
    config_generation: int = uint(32)
    broken: bool = flag()
    queues: tuple[VirtQueueState, ...] = items(Nested(VirtQueueState), max_len=MAX_QUEUES)
    backend: Any = checked(Opaque())

    def validate(self) -> None:
        if self.broken and not self.status & STATUS_DEVICE_NEEDS_RESET:
            raise self.invalid("status", "a broken device without DEVICE_NEEDS_RESET")
        if not self.broken and self.status & STATUS_DRIVER_OK:
            if not self.status & STATUS_FEATURES_OK:
                raise self.invalid("status", "DRIVER_OK without FEATURES_OK")
            if not self.features & bit(VIRTIO_F_VERSION_1):
                raise self.invalid("features", "a live device without VIRTIO_F_VERSION_1")


class VirtioMmio(Device):
    """A virtio device on the MMIO bus: registers at `base`, config space at +0x100."""

    def __init__(
        self,
        backend: VirtioBackend,
        memory: GuestMemory,
        irq: IrqLine,
        *,
        base: int = 0,
        name: str | None = None,
    ) -> None:
        self.backend = backend
        backend.transport = self
        self.memory = memory
        self.irq = irq
        self.base = base
        self.name = name or backend.name
        self.queues = [VirtQueue(memory, i, n) for i, n in enumerate(backend.queue_sizes)]
        # One lock: vCPU threads (register accesses) and backend threads (net RX, console
        # input) both change queue and interrupt state.
        self.lock = threading.RLock()
        self.offered = (
            backend.device_features()
            | bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
        )
        # Counters: what the benchmark and logs look at.
        self.register_reads = 0
        self.register_writes = 0
        self.notifies = 0
        self.interrupts = 0
        self.reset_count = 0
        self.violations: list[str] = []
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.broken = False
        for q in self.queues:
            q.reset()
            q.event_idx = False
            q.indirect = False

    def close(self) -> None:
        """Power-off: the backend lets go of its host resources (disk, TAP, threads)."""
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    def cmdline(self, irq: int | None = None) -> str:
        return mmio_cmdline(MMIO_SIZE, self.base, self.irq.gsi if irq is None else irq)

    # --- Device ---------------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.backend.reset()
            self._reset_registers()
            self._update_irq()
            self.reset_count += 1

    def save_state(self) -> dict[str, Any]:
        with self.lock:
            return VirtioMmioState.of(
                self,
                queues=tuple(q.save_state() for q in self.queues),
                backend=self.backend.save_state(),
            ).to_dict()

    def check_state(self, state: Any) -> VirtioMmioState:
        rec = VirtioMmioState.from_dict(state)
        if len(rec.queues) != len(self.queues):
            raise CheckpointError(
                f"queues: {len(rec.queues)} saved, {self.name} has {len(self.queues)}"
            )
        if rec.features & ~self.offered:
            raise CheckpointError(
                f"features: {rec.features:#x} has bits {rec.features & ~self.offered:#x} "
                f"that {self.name} does not offer"
            )
        for i, (q, qs) in enumerate(zip(self.queues, rec.queues, strict=True)):
            try:
                q.check_state(qs)
            except CheckpointError as exc:
                raise CheckpointError(f"queues[{i}]: {exc}") from None
            if qs.ready and (
                qs.event_idx != bool(rec.features & bit(VIRTIO_RING_F_EVENT_IDX))
                or qs.indirect != bool(rec.features & bit(VIRTIO_RING_F_INDIRECT_DESC))
            ):
                raise CheckpointError(
                    f"queues[{i}]: ring features differ from the negotiated {rec.features:#x}"
                )
        try:
            backend = self.backend.check_state(rec.backend)
        except CheckpointError as exc:
            raise CheckpointError(f"backend.{exc}") from None
        return dataclasses.replace(rec, backend=backend)

    def apply_state(self, rec: VirtioMmioState) -> None:
        with self.lock:
            rec.put(self, "queues", "backend")
            for q, qs in zip(self.queues, rec.queues, strict=True):
                q.apply_state(qs)
            self.backend.apply_state(rec.backend)
            if self.status & STATUS_DRIVER_OK and not self.broken:
                self.backend.activate(self.queues, self.features)
            self._update_irq()

    # --- interrupts -----------------------------------------------------------------
    def _update_irq(self) -> None:
        self.irq.set(self.interrupt_status != 0)

    def signal_used(self, queue: VirtQueue) -> None:
        """Raise the used-buffer interrupt if the driver wants it (EVENT_IDX / NO_INTERRUPT)."""
        with self.lock:
            try:
                wanted = queue.needs_interrupt()
            except GuestError as e:
                self.needs_reset(str(e))
                return
            if wanted:
                self.interrupt_status |= INT_USED_BUFFER
                self.interrupts += 1
                self._update_irq()

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.interrupt_status |= INT_CONFIG_CHANGE
            self.interrupts += 1
            self._update_irq()

    def needs_reset(self, reason: str) -> None:
        """The guest broke the protocol: stop serving it until it resets the device."""
        with self.lock:
            if not self.broken:
                log.warning("%s at %#x: %s; device needs reset", self.name, self.base, reason)
                if len(self.violations) < 64:
                    self.violations.append(reason)
            self.broken = True
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self.backend.reset()
            self.config_changed()

    def run_backend(self, fn: Any, *args: Any) -> None:
        """Call into the backend, turning a guest's protocol violation into NEEDS_RESET."""
        with self.lock:
            if self.broken:
                return
            try:
                fn(*args)
            except GuestError as e:
                self.needs_reset(str(e))

    # --- registers ------------------------------------------------------------------
    def _queue(self) -> VirtQueue | None:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def bus_read(self, offset: int, size: int) -> int:
        with self.lock:
            self.register_reads += 1
            if offset >= CONFIG_OFFSET:
                return self.backend.read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4:
                return 0  # registers are 32-bit only (4.2.2.2)
            q = self._queue()
            if offset == REG_MAGIC:
                return MAGIC
            if offset == REG_VERSION:
                return VERSION
            if offset == REG_DEVICE_ID:
                return self.backend.device_id
            if offset == REG_VENDOR_ID:
                return VENDOR_ID
            if offset == REG_DEVICE_FEATURES:
                if self.device_features_sel > 1:
                    return 0
                return (self.offered >> (32 * self.device_features_sel)) & 0xFFFFFFFF
            if offset == REG_QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == REG_QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == REG_INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == REG_STATUS:
                return self.status
            if offset == REG_CONFIG_GENERATION:
                return self.config_generation
            if offset == REG_SHM_LEN_LOW or offset == REG_SHM_LEN_HIGH:
                return 0xFFFFFFFF  # no shared memory regions
            if offset == REG_SHM_BASE_LOW or offset == REG_SHM_BASE_HIGH:
                return 0xFFFFFFFF
            if q is not None:
                for reg, attr, shift in _QUEUE_ADDR_REGS:
                    if offset == reg:
                        return (getattr(q, attr) >> shift) & 0xFFFFFFFF
                if offset == REG_QUEUE_NUM:
                    return q.size
            return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.register_writes += 1
            if offset >= CONFIG_OFFSET:
                if not self.broken:
                    self.backend.write_config(offset - CONFIG_OFFSET, size, value)
                return
            if size != 4 or offset % 4:
                return
            if offset == REG_QUEUE_NOTIFY:
                self.notifies += 1
                self._notify(value & 0xFFFF)
            elif offset == REG_INTERRUPT_ACK:
                self.interrupt_status &= ~value
                self._update_irq()
            elif offset == REG_STATUS:
                self._write_status(value & 0xFF)
            elif offset == REG_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == REG_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == REG_DRIVER_FEATURES:
                if self.status & STATUS_FEATURES_OK:
                    return  # features are frozen once accepted
                if self.driver_features_sel < 2:
                    shift = 32 * self.driver_features_sel
                    self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (
                        value << shift
                    )
            elif offset == REG_QUEUE_SEL:
                self.queue_sel = value
            elif offset == REG_SHM_SEL:
                pass
            else:
                self._write_queue_reg(offset, value)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None:
            return
        if offset == REG_QUEUE_READY:
            if value & 1 and not q.ready:
                q.event_idx = bool(self.features & bit(VIRTIO_RING_F_EVENT_IDX))
                q.indirect = bool(self.features & bit(VIRTIO_RING_F_INDIRECT_DESC))
                try:
                    q.validate()
                except GuestError as e:
                    self.needs_reset(str(e))
                    return
                q.ready = True
            elif not value & 1:
                q.ready = False
            return
        if q.ready:
            return  # a live queue's layout cannot change (4.2.3.2)
        if offset == REG_QUEUE_NUM:
            q.size = value  # checked when the queue is made ready
            return
        for reg, attr, shift in _QUEUE_ADDR_REGS:
            if offset == reg:
                old = getattr(q, attr)
                mask = 0xFFFFFFFF << shift
                setattr(q, attr, (old & ~mask) | (value << shift))
                return

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.backend.reset()
            self._reset_registers()
            self._update_irq()
            self.reset_count += 1
            return
        if self.broken:
            # Only a reset brings a broken device back; keep NEEDS_RESET visible.
            self.status = value | STATUS_DEVICE_NEEDS_RESET
            return
        added = value & ~self.status
        if added & STATUS_FEATURES_OK:
            ok = self.driver_features & ~self.offered == 0 and self.driver_features & bit(
                VIRTIO_F_VERSION_1
            )
            if not ok:
                log.warning(
                    "%s: driver features %#x rejected (offered %#x, VERSION_1 required)",
                    self.name,
                    self.driver_features,
                    self.offered,
                )
                value &= ~STATUS_FEATURES_OK
            else:
                self.features = self.driver_features
        if added & STATUS_DRIVER_OK:
            if not value & STATUS_FEATURES_OK:
                self.status = value & ~STATUS_DRIVER_OK
                self.needs_reset("DRIVER_OK set before FEATURES_OK")
                return
            self.status = value
            try:
                self.backend.activate(self.queues, self.features)
            except GuestError as e:
                self.needs_reset(str(e))
            return
        self.status = value

    def _notify(self, index: int) -> None:
        if self.broken or not self.status & STATUS_DRIVER_OK:
            return
        if index >= len(self.queues):
            self.needs_reset(f"notify for queue {index}, device has {len(self.queues)}")
            return
        q = self.queues[index]
        if not q.ready:
            return
        try:
            self.backend.notify(q)
        except GuestError as e:
            self.needs_reset(str(e))


_QUEUE_ADDR_REGS = (
    (REG_QUEUE_DESC_LOW, "desc_addr", 0),
    (REG_QUEUE_DESC_HIGH, "desc_addr", 32),
    (REG_QUEUE_DRIVER_LOW, "avail_addr", 0),
    (REG_QUEUE_DRIVER_HIGH, "avail_addr", 32),
    (REG_QUEUE_DEVICE_LOW, "used_addr", 0),
    (REG_QUEUE_DEVICE_HIGH, "used_addr", 32),
)
