"""virtio over PCI, the modern interface (virtio 1.x, section 4.1), around the same
`VirtioBackend`s as virtio-mmio.

The function is 1af4:(0x1040 + device type), revision 1 (a non-transitional device: no
legacy I/O registers). One 32-bit memory BAR (BAR 4, 16 KiB, placed by the firmware)
holds the four structures the vendor capabilities point at:

  +0x0000  common configuration (features, status, queue select/size/enable/addresses)
  +0x1000  ISR status (read to clear: bit 0 used buffer, bit 1 configuration change)
  +0x2000  device-specific configuration (the backend's config space)
  +0x3000  notifications, 4 bytes per queue (notify_off_multiplier 4, queue_notify_off
           = the queue's index)

Interrupts are INTx only (pin A, routed by the PIIX3's PIRQ registers): there is no
MSI-X capability, so `msix_config` and `queue_msix_vector` read NO_VECTOR (0xFFFF) and
Linux's virtio_pci falls back to its shared INTx handler, which reads the ISR.

The queue and feature logic is `VirtioMmio`'s (the same state machine and the same
protocol checks: a violation puts the device in DEVICE_NEEDS_RESET); this module maps
the PCI layout onto it.

Boot path for SeaBIOS's bootorder: `/pci@i0cf8/scsi@SLOT/disk@0,0` (virtio-blk).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from boite.machine.bus import BusWindow
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.pci.function import BAR_MEM, Bar, PciFunction
from boite.machine.state import Opaque, StateRecord, checked
from boite.machine.virtio import mmio as m
from boite.machine.virtio.mmio import VirtioBackend, VirtioMmio

VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
BAR_INDEX = 4
BAR_SIZE = 0x4000
COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
NO_VECTOR = 0xFFFF
CAP_VENDOR = 0x09
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE = 1, 2, 3, 4

PCI_CLASS = {m.VIRTIO_ID_BLOCK: 0x010000, m.VIRTIO_ID_NET: 0x020000}

# common configuration field offsets -> the virtio-mmio register that does the same
_WRITE_MAP = {
    0x00: m.REG_DEVICE_FEATURES_SEL,
    0x08: m.REG_DRIVER_FEATURES_SEL,
    0x0C: m.REG_DRIVER_FEATURES,
    0x14: m.REG_STATUS,
    0x16: m.REG_QUEUE_SEL,
    0x18: m.REG_QUEUE_NUM,
    0x20: m.REG_QUEUE_DESC_LOW,
    0x24: m.REG_QUEUE_DESC_HIGH,
    0x28: m.REG_QUEUE_DRIVER_LOW,
    0x2C: m.REG_QUEUE_DRIVER_HIGH,
    0x30: m.REG_QUEUE_DEVICE_LOW,
    0x34: m.REG_QUEUE_DEVICE_HIGH,
}
COMMON_SIZE = 0x38


class VirtioPci(PciFunction):
    def __init__(self, backend: VirtioBackend, memory: GuestMemory, *, name: str) -> None:
        self.name = name
        # The core's interrupt line is this function's INTx pin.
        self.core = VirtioMmio(
            backend, memory, IrqLine(-1, lambda _gsi, level: self.set_intx(level)), name=name
        )
        self.backend = backend
        self.window = BusWindow(self.window_read, self.window_write)
        super().__init__(
            VIRTIO_VENDOR, MODERN_DEVICE_BASE + backend.device_id,
            PCI_CLASS.get(backend.device_id, 0xFF0000), revision=1, interrupt_pin=1,
            bars={BAR_INDEX: Bar(BAR_MEM, BAR_SIZE, self.window)},
            subsystem=(VIRTIO_VENDOR, 0x1100),
        )  # fmt: skip

    def _defaults(self) -> None:
        super()._defaults()
        caps = (
            (0x40, CAP_COMMON, COMMON, COMMON_SIZE),
            (0x50, CAP_ISR, ISR, 1),
            (0x60, CAP_DEVICE, DEVICE, 0x1000),
            (0x70, CAP_NOTIFY, NOTIFY, NOTIFY_MULTIPLIER * len(self.core.queues)),
        )
        for at, kind, offset, length in reversed(caps):
            body = struct.pack("<BBBBHII", 16 if kind != CAP_NOTIFY else 20, kind, BAR_INDEX,
                               0, 0, offset, length)  # fmt: skip
            if kind == CAP_NOTIFY:
                body += struct.pack("<I", NOTIFY_MULTIPLIER)
            self.add_capability(CAP_VENDOR, at, body)

    def close(self) -> None:
        self.core.close()

    # -- the BAR --------------------------------------------------------------------------
    def _common_bytes(self) -> bytes:
        c = self.core
        q = c._queue()
        fsel, dsel = c.device_features_sel, c.driver_features_sel
        offered = (c.offered >> (32 * fsel)) & 0xFFFF_FFFF if fsel < 2 else 0
        driver = (c.driver_features >> (32 * dsel)) & 0xFFFF_FFFF if dsel < 2 else 0
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ",
            fsel & 0xFFFF_FFFF, offered, dsel & 0xFFFF_FFFF, driver, NO_VECTOR, len(c.queues),
            c.status & 0xFF, c.config_generation & 0xFF, c.queue_sel & 0xFFFF,
            q.size if q else 0, NO_VECTOR, int(q.ready) if q else 0,
            c.queue_sel & 0xFFFF if q else 0,
            q.desc_addr if q else 0, q.avail_addr if q else 0, q.used_addr if q else 0,
        )  # fmt: skip

    def window_read(self, offset: int, size: int) -> int:
        c = self.core
        with c.lock:
            c.register_reads += 1
            if offset < COMMON + COMMON_SIZE:
                raw = self._common_bytes()[offset : offset + size]
                return int.from_bytes(raw.ljust(size, b"\0"), "little")
            if offset == ISR:
                isr = c.interrupt_status
                c.interrupt_status = 0
                c._update_irq()
                return isr
            if DEVICE <= offset < NOTIFY:
                return c.backend.read_config(offset - DEVICE, size)
            return 0

    def window_write(self, offset: int, size: int, value: int) -> None:
        c = self.core
        if NOTIFY <= offset < NOTIFY + NOTIFY_MULTIPLIER * len(c.queues):
            c.bus_write(m.REG_QUEUE_NOTIFY, 4, (offset - NOTIFY) // NOTIFY_MULTIPLIER)
            return
        if DEVICE <= offset < NOTIFY:
            with c.lock:
                if not c.broken:
                    c.backend.write_config(offset - DEVICE, size, value)
            return
        if offset >= COMMON + COMMON_SIZE:
            return
        if size == 8 and offset in (0x20, 0x28, 0x30):
            self.window_write(offset, 4, value & 0xFFFF_FFFF)
            self.window_write(offset + 4, 4, value >> 32)
            return
        if offset == 0x1C:  # queue_enable
            with c.lock:
                if value & 1:
                    c.bus_write(m.REG_QUEUE_READY, 4, 1)
            return
        reg = _WRITE_MAP.get(offset)
        if reg is not None:
            c.bus_write(reg, 4, value)

    # -- Device ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.core.reset()
        super().reset()

    def extra_state(self) -> StateRecord:
        return VirtioPciState(self.core.save_state())

    def check_extra(self, raw: Any) -> Any:
        rec = VirtioPciState.from_dict(raw, "extra", versioned=False)
        return self.core.check_state(rec.virtio)  # the transport's own checked record

    def apply_extra(self, rec: Any) -> None:
        self.core.apply_state(rec)

    @staticmethod
    def boot_path(slot: int) -> str:
        return f"/pci@i0cf8/scsi@{slot:x}/disk@0,0"


@dataclass(frozen=True)
class VirtioPciState(StateRecord):
    virtio: Any = checked(Opaque())  # the VirtioMmio core's record, checked by it


VirtioPci.extra_record = VirtioPciState
