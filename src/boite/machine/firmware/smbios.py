"""SMBIOS 2.8 structures for the firmware (`etc/smbios/smbios-tables` and the 31-byte
entry point `etc/smbios/smbios-anchor`, which SeaBIOS completes with the table's address
and its own type 0 BIOS structure).

Structures: type 1 (system: manufacturer, product, the box's `uuid.bios`), type 3
(chassis), type 32 (boot status: no errors), type 127 (end of table). Per the SMBIOS
2.6+ rule, the UUID's first three fields are stored little-endian: `uuid_bytes` is the
UUID in its usual (big-endian, as printed) byte order.
"""

from __future__ import annotations

import struct

MANUFACTURER = "boite"
PRODUCT = "boite PC"


def _strings(*items: str) -> bytes:
    if not items:
        return b"\0\0"
    return b"".join(s.encode("ascii", "replace") + b"\0" for s in items) + b"\0"


def _smbios_uuid(uuid_bytes: bytes) -> bytes:
    a, b, c = struct.unpack(">IHH", uuid_bytes[:8])
    return struct.pack("<IHH", a, b, c) + uuid_bytes[8:]


def structures(uuid_bytes: bytes, serial: str = "") -> list[bytes]:
    if len(uuid_bytes) != 16:
        raise ValueError("an SMBIOS UUID is 16 bytes")
    handle = iter(range(0x100, 0x200))
    serial_index = 3 if serial else 0
    t1 = struct.pack("<BBHBBBB16sBBB", 1, 27, next(handle), 1, 2, 0, serial_index,
                     _smbios_uuid(uuid_bytes), 6, 0, 0)  # fmt: skip
    t1 += _strings(MANUFACTURER, PRODUCT, *([serial] if serial else []))
    t3 = struct.pack("<BBHBBBBBBBBBIBBBB", 3, 0x15, next(handle), 1, 1, 0, 0, 0, 3, 3, 3,
                     2, 0, 0, 0, 0, 0) + _strings(MANUFACTURER)  # fmt: skip
    t32 = struct.pack("<BBH6sB", 32, 11, next(handle), bytes(6), 0) + _strings()
    t127 = struct.pack("<BBH", 127, 4, next(handle)) + _strings()
    return [t1, t3, t32, t127]


def build_smbios(uuid_bytes: bytes, serial: str = "") -> tuple[bytes, bytes]:
    """(tables, anchor) for fw_cfg."""
    items = structures(uuid_bytes, serial)
    tables = b"".join(items)
    max_size = max(len(s) for s in items)
    tail = bytearray(struct.pack("<5sBHIHB", b"_DMI_", 0, len(tables), 0, len(items), 0x28))
    tail[5] = (-sum(tail)) & 0xFF
    anchor = bytearray(struct.pack("<4sBBBBHB5s", b"_SM_", 0, 31, 2, 8, max_size, 0, bytes(5)))
    anchor += tail
    anchor[4] = (-sum(anchor)) & 0xFF
    return tables, bytes(anchor)
