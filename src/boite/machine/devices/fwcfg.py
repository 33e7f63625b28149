"""QEMU's firmware configuration device (fw_cfg), legacy I/O interface only, as x86 test
kernels (kvm-unit-tests and the like) read it to learn the CPU count and RAM size.

Ports (QEMU's docs/specs/fw_cfg.rst): 0x510 selector (a 16-bit write picks an item and
rewinds it), 0x511 data (each byte read returns the item's next byte, 0 past its end).
No DMA interface: the ID item says so (bit 1 clear). Items are the legacy ones below, in
QEMU's byte order (little-endian; the file directory's count is big-endian) and an empty
file directory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from boite.machine.device import Device
from boite.machine.state import StateRecord, uint

FW_CFG_PORT = 0x510

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


@dataclass(frozen=True)
class FwCfgState(StateRecord):
    VERSION = 1
    selector: int = uint(16)
    offset: int = uint(64)  # past the item's end it counts on (and reads 0)


class FwCfg(Device):
    name = "fw_cfg"

    def __init__(self, ram_size: int, num_cpus: int, uuid: bytes = bytes(16)) -> None:
        if len(uuid) != 16:
            raise ValueError(f"fw_cfg UUID is {len(uuid)} bytes, expected 16")
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),  # traditional interface, no DMA
            FW_CFG_UUID: bytes(uuid),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", num_cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", num_cpus),
            # no NUMA nodes: the node count, then one (zero) node per CPU
            FW_CFG_NUMA: bytes(8 * (1 + num_cpus)),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.reset()

    def reset(self) -> None:
        self.selector = 0
        self.offset = 0

    def save_state(self) -> dict[str, Any]:
        return FwCfgState(self.selector, self.offset).to_dict()

    def check_state(self, state: Any) -> FwCfgState:
        return FwCfgState.from_dict(state)

    def apply_state(self, rec: FwCfgState) -> None:
        self.selector, self.offset = rec.selector, rec.offset

    def bus_read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0  # the selector is write-only
        value = 0
        item = self.items.get(self.selector & 0x3FFF, b"")
        for i in range(size):
            byte = item[self.offset] if self.offset < len(item) else 0
            self.offset += 1
            value |= byte << (8 * i)
        return value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.selector = value & 0xFFFF
            self.offset = 0
        # writes to the data port are ignored, as in QEMU since 2.4
