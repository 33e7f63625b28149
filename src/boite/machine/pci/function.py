"""A PCI function: its 256-byte configuration space, its BARs and its INTx pin.

Configuration space layout (PCI Local Bus Specification 3.0, 6.1): vendor/device IDs,
command/status, class code, header type, six BARs at 0x10-0x27, subsystem IDs at 0x2c,
interrupt line/pin at 0x3c. A function declares its identity and the size and kind of
each BAR; the firmware (or the OS) writes the addresses. Nothing here assigns an address:
a BAR is mapped on the port or MMIO bus only once it holds one and the command register
enables its space.

Writable bits are kept in `wmask` (one mask byte per config byte), as QEMU's PCIDevice
does: BAR bits below the size read as zero, read-only registers stay put, and a function's
own registers are made writable by `writable(offset, mask_bytes)`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.errors import CheckpointError
from boite.machine.bus import BusDevice
from boite.machine.device import Device
from boite.machine.state import Opaque, StateRecord, checked, data, flag

# Red Hat / QEMU's subsystem IDs: SeaBIOS recognises an emulated board by them.
SUBSYSTEM_VENDOR_QEMU = 0x1AF4
SUBSYSTEM_QEMU = 0x1100

VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG = 0x08, 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
CAPABILITIES = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x08, 0x10

BAR_IO, BAR_MEM = "io", "mem"


@dataclass(frozen=True)
class Bar:
    """What a BAR decodes: `size` bytes (a power of two) of I/O or 32-bit memory space,
    answered by `handler` (offsets from the BAR's start)."""

    kind: str
    size: int
    handler: BusDevice

    def __post_init__(self) -> None:
        if self.kind not in (BAR_IO, BAR_MEM):
            raise ValueError(f"BAR kind {self.kind!r}")
        if self.size < (4 if self.kind == BAR_IO else 16) or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two big enough")


class PciFunction(Device):
    """Base of every PCI function. Subclasses call `super().__init__(...)` with their
    identity and BARs, then override `config_written` for their own registers."""

    name = "pci-function"

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        header_type: int = 0,
        interrupt_pin: int = 0,
        bars: dict[int, Bar] | None = None,
        subsystem: tuple[int, int] = (SUBSYSTEM_VENDOR_QEMU, SUBSYSTEM_QEMU),
    ) -> None:
        self.bars: dict[int, Bar] = dict(bars or {})
        for n in self.bars:
            if not 0 <= n < 6:
                raise ValueError(f"BAR {n}: a type 0 header has BARs 0-5")
        self.identity = (vendor_id, device_id, class_code, revision, header_type, interrupt_pin)
        self.subsystem = subsystem
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        # Set by PciBus.add: (re)maps BARs, and drives the INTx wire.
        self.on_mapping_change: Callable[[PciFunction], None] | None = None
        self.on_intx: Callable[[PciFunction, bool], None] | None = None
        self.intx_level = False
        self._defaults()

    # -- identity ----------------------------------------------------------------------
    def _defaults(self) -> None:
        vendor, device, cls, rev, htype, pin = self.identity
        c = self.config
        c[:] = bytes(256)
        self.wmask[:] = bytes(256)
        struct.pack_into("<HH", c, VENDOR_ID, vendor, device)
        c[REVISION] = rev
        c[CLASS_PROG : CLASS_PROG + 3] = cls.to_bytes(3, "little")
        c[HEADER_TYPE] = htype
        struct.pack_into("<HH", c, SUBSYSTEM_VENDOR_ID, *self.subsystem)
        c[INTERRUPT_PIN] = pin
        struct.pack_into("<H", self.wmask, COMMAND, 0x0407)  # I/O, memory, master, INTx off
        self.wmask[INTERRUPT_LINE] = 0xFF
        for n, bar in self.bars.items():
            low = 0x1 if bar.kind == BAR_IO else 0x0  # 32-bit, non-prefetchable memory
            struct.pack_into("<I", c, BAR0 + 4 * n, low)
            struct.pack_into("<I", self.wmask, BAR0 + 4 * n, ~(bar.size - 1) & 0xFFFF_FFFF)

    def writable(self, offset: int, mask: bytes) -> None:
        """Let the guest write the bits of `mask` at `offset` (a function's own registers)."""
        self.wmask[offset : offset + len(mask)] = mask

    def add_capability(self, cap_id: int, offset: int, body: bytes) -> None:
        """Chain a capability at `offset` (its ID and next pointer, then `body`)."""
        c = self.config
        c[offset] = cap_id
        c[offset + 1] = c[CAPABILITIES]
        c[offset + 2 : offset + 2 + len(body)] = body
        c[CAPABILITIES] = offset
        struct.pack_into("<H", c, STATUS, struct.unpack_from("<H", c, STATUS)[0] | STATUS_CAP_LIST)

    # -- configuration space -------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if offset + size > 256:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset + size > 256:
            return
        old_cmd = self.command
        old_bars = bytes(self.config[BAR0 : BAR0 + 24])
        for i in range(size):
            m = self.wmask[offset + i]
            b = (value >> (8 * i)) & 0xFF
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)
        if (old_cmd ^ self.command) & (CMD_IO | CMD_MEMORY) or old_bars != bytes(
            self.config[BAR0 : BAR0 + 24]
        ):
            if self.on_mapping_change is not None:
                self.on_mapping_change(self)
        if (old_cmd ^ self.command) & CMD_INTX_DISABLE:
            self._drive_intx()
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """Hook for a function's own registers (after the write has landed)."""

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.config, COMMAND)[0])

    def bar_address(self, n: int) -> int | None:
        """Where BAR `n` decodes now, or None (unprogrammed, or its space is disabled)."""
        bar = self.bars.get(n)
        if bar is None:
            return None
        raw = struct.unpack_from("<I", self.config, BAR0 + 4 * n)[0]
        if bar.kind == BAR_IO:
            addr = raw & 0xFFFC
            enabled = self.command & CMD_IO
        else:
            addr = raw & 0xFFFF_FFF0
            enabled = self.command & CMD_MEMORY
        if not enabled or addr == 0 or addr + bar.size > (1 << 32):
            return None
        return addr

    # -- INTx -------------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """The function's interrupt condition; the wire follows it unless INTx is disabled."""
        self.intx_level = level
        status = struct.unpack_from("<H", self.config, STATUS)[0]
        status = status | STATUS_INTERRUPT if level else status & ~STATUS_INTERRUPT
        struct.pack_into("<H", self.config, STATUS, status)
        self._drive_intx()

    def _drive_intx(self) -> None:
        if self.on_intx is not None and self.config[INTERRUPT_PIN]:
            self.on_intx(self, self.intx_level and not self.command & CMD_INTX_DISABLE)

    # -- Device ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._defaults()
        self.intx_level = False
        if self.on_mapping_change is not None:
            self.on_mapping_change(self)
        self._drive_intx()

    # Subclasses with registers beyond the configuration space name their record here and
    # implement extra_state() / apply_extra(record).
    extra_record: type[StateRecord] | None = None

    def extra_state(self) -> StateRecord:
        raise NotImplementedError

    def apply_extra(self, rec: Any) -> None:
        """Put the subclass's registers in place (after the configuration space)."""

    def save_state(self) -> dict[str, Any]:
        extra = self.extra_state().to_dict(versioned=False) if self.extra_record else {}
        return PciFunctionState(bytes(self.config), self.intx_level, extra).to_dict()

    def check_state(self, state: Any) -> PciFunctionState:
        rec = PciFunctionState.from_dict(state)
        if rec.config[:4] != bytes(self.config[:4]):
            raise CheckpointError(
                f"config: saved for PCI function {rec.config[:4].hex()} (vendor:device, "
                f"little-endian), this is {bytes(self.config[:4]).hex()}: another function"
            )
        if self.extra_record is None:
            if rec.extra:
                raise CheckpointError("extra: this PCI function keeps no other registers")
            return rec
        return dataclasses.replace(rec, extra=self.check_extra(rec.extra))

    def check_extra(self, raw: Any) -> Any:
        assert self.extra_record is not None
        return self.extra_record.from_dict(raw, "extra", versioned=False)

    def apply_state(self, rec: PciFunctionState) -> None:
        self.config[:] = rec.config
        self.intx_level = rec.intx
        if self.extra_record is not None:
            self.apply_extra(rec.extra)
        if self.on_mapping_change is not None:
            self.on_mapping_change(self)
        self._drive_intx()


@dataclass(frozen=True)
class PciFunctionState(StateRecord):
    """The 256-byte configuration space, the INTx condition, and what the function keeps
    beyond them (`extra`: its own record, checked by the function)."""

    VERSION = 1
    config: bytes = data(max_len=256, exact=256)
    intx: bool = flag()
    extra: Any = checked(Opaque())
