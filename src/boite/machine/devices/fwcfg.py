"""QEMU's firmware configuration device (fw_cfg) as SeaBIOS and x86 test kernels read it.

Ports (QEMU's docs/specs/fw_cfg.rst): 0x510 selector (a 16-bit write picks an item and
rewinds it), 0x511 data (each byte read returns the item's next byte, 0 past its end),
0x514-0x51b the DMA address (big-endian; the write of the low half at 0x518 starts the
transfer). The ID item says both interfaces are there (bits 0 and 1).

Items: the legacy numbered ones below (little-endian, as QEMU), and named files from
selector 0x20 on, listed by the file directory (item 0x19: a big-endian count, then per
file a big-endian size, selector, reserved word and a 56-byte name). What the files say
(e820, bootorder, ACPI, SMBIOS...) is built by boite.machine.firmware; this device only
serves bytes.

A DMA request is a `FWCfgDmaAccess` in guest RAM: be32 control (error 0x01, read 0x02,
skip 0x04, select 0x08 with the selector in bits 16-31, write 0x10), be32 length, be64
address. Reads past an item's end give zeros (as QEMU). Writes are refused (error): no
item here is writable. A request or buffer outside guest RAM ends in the error bit, never
in a host exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from boite.errors import GuestError
from boite.machine.device import Device
from boite.machine.state import StateRecord, uint

FW_CFG_PORT = 0x510
FW_CFG_DMA_PORT = 0x514  # the device's offset 4

# Bit 14 picks the write channel (nothing here is writable); bit 15, the architecture's
# own items (0x8000 legacy ACPI tables, 0x8001 SMBIOS fields...), stays part of the key.
ITEM_MASK = 0xBFFF

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_NAME_SIZE = 56
FW_CFG_MAX_FILES = 0x1000 - FW_CFG_FILE_FIRST

DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
DMA_SIGNATURE = b"QEMU CFG"
_ZEROS = bytes(65536)


@dataclass(frozen=True)
class FwCfgState(StateRecord):
    VERSION = 2  # 2: dma_high
    selector: int = uint(16)
    offset: int = uint(64)  # past the item's end it counts on (and reads 0)
    dma_high: int = uint(32)  # the DMA address's high half, written before the low one


class FwCfg(Device):
    name = "fw_cfg"

    def __init__(
        self,
        ram_size: int,
        num_cpus: int,
        uuid: bytes = bytes(16),
        memory: Any = None,
    ) -> None:
        if len(uuid) != 16:
            raise ValueError(f"fw_cfg UUID is {len(uuid)} bytes, expected 16")
        self.memory = memory  # GuestMemory for DMA; None: the DMA interface is absent
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 3 if memory is not None else 1),
            FW_CFG_UUID: bytes(uuid),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", num_cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", num_cpus),
            # no NUMA nodes: the node count, then one (zero) node per CPU
            FW_CFG_NUMA: bytes(8 * (1 + num_cpus)),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
        }
        self.files: dict[str, int] = {}  # name -> selector
        self._update_directory()
        self.dma_high = 0
        self.reset()

    # -- the files ---------------------------------------------------------------------------
    def add_file(self, name: str, data: bytes) -> int:
        """Serve `data` as file `name` (again: replace its contents)."""
        raw = name.encode()
        if not raw or len(raw) >= FW_CFG_FILE_NAME_SIZE:
            raise ValueError(f"fw_cfg file name {name!r} must be 1-55 bytes")
        if name in self.files:
            selector = self.files[name]
        else:
            if len(self.files) >= FW_CFG_MAX_FILES:
                raise ValueError("fw_cfg: too many files")
            selector = FW_CFG_FILE_FIRST + len(self.files)
            self.files[name] = selector
        self.items[selector] = bytes(data)
        self._update_directory()
        return selector

    def file(self, name: str) -> bytes:
        """The bytes of file `name` as the firmware would read them."""
        return self.items[self.files[name]]

    def _update_directory(self) -> None:
        out = [struct.pack(">I", len(self.files))]
        for name, sel in sorted(self.files.items()):
            out.append(struct.pack(">IHH56s", len(self.items[sel]), sel, 0, name.encode()))
        self.items[FW_CFG_FILE_DIR] = b"".join(out)

    # -- Device ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self.dma_high = 0

    def save_state(self) -> dict[str, Any]:
        return FwCfgState(self.selector, self.offset, self.dma_high).to_dict()

    def check_state(self, state: Any) -> FwCfgState:
        return FwCfgState.from_dict(state)

    def apply_state(self, rec: FwCfgState) -> None:
        self.selector, self.offset, self.dma_high = rec.selector, rec.offset, rec.dma_high

    # -- the ports ------------------------------------------------------------------------
    def bus_read(self, offset: int, size: int) -> int:
        if offset == 1:
            value = 0
            item = self.items.get(self.selector & ITEM_MASK, b"")
            for i in range(size):
                byte = item[self.offset] if self.offset < len(item) else 0
                self.offset += 1
                value |= byte << (8 * i)
            return value
        if 4 <= offset < 12 and self.memory is not None:
            # the DMA register reads back the signature "QEMU CFG" (big-endian)
            sig = DMA_SIGNATURE[offset - 4 : offset - 4 + size].ljust(size, b"\0")
            return int.from_bytes(sig, "big")
        return 0  # the selector is write-only

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.select(value & 0xFFFF)
        elif self.memory is not None and offset == 4 and size == 4:
            self.dma_high = _be32(value)
        elif self.memory is not None and offset == 8 and size == 4:
            self.dma(self.dma_high << 32 | _be32(value))
            self.dma_high = 0
        elif self.memory is not None and offset == 4 and size == 8:
            self.dma(int.from_bytes(value.to_bytes(8, "little"), "big"))
        # writes to the data port are ignored, as in QEMU since 2.4

    def select(self, selector: int) -> None:
        self.selector = selector
        self.offset = 0

    # -- DMA ---------------------------------------------------------------------------------
    def dma(self, addr: int) -> None:
        """Carry out the FWCfgDmaAccess at guest physical `addr`."""
        mem = self.memory
        try:
            control, length, target = struct.unpack(">IIQ", mem.read(addr, 16))
        except GuestError:
            return  # no request to answer: nothing to write the error into
        status = 0
        try:
            if control & DMA_SELECT:
                self.select(control >> 16)
            if control & DMA_WRITE:
                status = DMA_ERROR  # no writable item
            elif control & DMA_READ:
                item = self.items.get(self.selector & ITEM_MASK, b"")
                view = mem.view(target, length)  # the whole buffer in RAM, or an error
                chunk = item[self.offset : self.offset + length]
                view[: len(chunk)] = chunk
                for at in range(len(chunk), length, len(_ZEROS)):  # past the end: zeros
                    n = min(len(_ZEROS), length - at)
                    view[at : at + n] = _ZEROS[:n]
                mem.note_dma_write(target, length)
                self.offset += length
            elif control & DMA_SKIP:
                self.offset += length
        except GuestError:
            status = DMA_ERROR
        try:
            mem.write(addr, struct.pack(">I", status))
        except GuestError:
            pass


def _be32(port_value: int) -> int:
    """A guest's outl(cpu_to_be32(x)) arrives as x byte-swapped."""
    return int.from_bytes((port_value & 0xFFFF_FFFF).to_bytes(4, "little"), "big")
