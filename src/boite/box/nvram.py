"""The box's non-volatile RAM: CMOS/RTC bytes and firmware settings, in boite's own layout.

VMware's `.nvram` format is undocumented, so boite writes its own, documented here.
All integers are little-endian.

    offset  size  field
    0       8     magic b"BOITNVRM"
    8       2     version, 1
    10      2     CMOS size in bytes: 128 (one MC146818 bank) or 256 (two banks)
    12      4     length S of the settings text
    16      N     CMOS bytes, index 0 first (0x00-0x0D clock and status registers,
                  0x0E-0x7F battery-backed RAM, 0x80-0xFF the second bank)
    16+N    S     firmware settings: UTF-8 text in VMware's dictionary syntax
                  (`key = "value"` lines), e.g. `boot.order = "hdd,cdrom,net"`
    16+N+S  4     CRC-32 (zlib's) of every byte before it

A file whose magic, version, sizes or checksum do not match is refused with a
`ConfigError` naming the file and the offset; the box is never started on garbage.
The file is replaced atomically (temp file, fsync, rename, fsync directory), so a crash
leaves the old or the new contents.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from boite.box.atomic import write_atomic
from boite.box.vmxdict import VmxDict
from boite.errors import ConfigError

MAGIC = b"BOITNVRM"
VERSION = 1
CMOS_SIZES = (128, 256)
_HEADER = struct.Struct("<8sHHI")
# Settings beyond this are not firmware settings; refuse them instead of reading them.
MAX_SETTINGS = 1 << 20
MAX_FILE_BYTES = _HEADER.size + max(CMOS_SIZES) + MAX_SETTINGS + 4
BOOT_DEVICES = ("hdd", "cdrom", "net", "floppy")
DEFAULT_BOOT_ORDER = ("hdd", "cdrom", "net")


class Nvram:
    """CMOS bytes and firmware settings of one box."""

    def __init__(self, cmos: bytes | bytearray | None = None, settings: VmxDict | None = None):
        self.cmos = bytearray(cmos if cmos is not None else bytes(128))
        if len(self.cmos) not in CMOS_SIZES:
            raise ConfigError(f"CMOS is {len(self.cmos)} bytes; expected 128 or 256")
        self.settings = settings if settings is not None else VmxDict.new()
        if "boot.order" not in self.settings:
            self.boot_order = list(DEFAULT_BOOT_ORDER)

    @property
    def boot_order(self) -> list[str]:
        raw = self.settings.get("boot.order", "")
        return [d.strip() for d in raw.split(",") if d.strip()]

    @boot_order.setter
    def boot_order(self, devices: list[str]) -> None:
        for device in devices:
            if device not in BOOT_DEVICES:
                raise ConfigError(f"boot.order: {device!r} is not one of {', '.join(BOOT_DEVICES)}")
        self.settings["boot.order"] = ",".join(devices)

    def to_bytes(self) -> bytes:
        text = self.settings.to_bytes()
        body = _HEADER.pack(MAGIC, VERSION, len(self.cmos), len(text)) + bytes(self.cmos) + text
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<memory>") -> Nvram:
        if len(data) < _HEADER.size + 4:
            raise ConfigError(
                f"{source}: {len(data)} bytes is too short for an nvram file "
                f"(at least {_HEADER.size + 4 + 128})"
            )
        magic, version, cmos_size, settings_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ConfigError(f"{source}: offset 0: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ConfigError(f"{source}: offset 8: version {version}, expected {VERSION}")
        if cmos_size not in CMOS_SIZES:
            raise ConfigError(f"{source}: offset 10: CMOS size {cmos_size}, expected 128 or 256")
        if settings_len > MAX_SETTINGS:
            raise ConfigError(
                f"{source}: offset 12: settings length {settings_len}, expected <= {MAX_SETTINGS}"
            )
        end = _HEADER.size + cmos_size + settings_len
        if len(data) != end + 4:
            raise ConfigError(f"{source}: file is {len(data)} bytes; the header promises {end + 4}")
        (crc,) = struct.unpack_from("<I", data, end)
        if crc != zlib.crc32(data[:end]):
            raise ConfigError(
                f"{source}: offset {end}: checksum {crc:#010x} does not match the contents "
                f"({zlib.crc32(data[:end]):#010x}); the file is damaged"
            )
        cmos = data[_HEADER.size : _HEADER.size + cmos_size]
        settings = VmxDict.parse(data[_HEADER.size + cmos_size : end], f"{source} (settings)")
        return cls(cmos, settings)

    @classmethod
    def load(cls, path: str | Path) -> Nvram:
        from boite.box.paths import read_regular

        path = Path(path)
        try:
            data = read_regular(path, MAX_FILE_BYTES, what="nvram file")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        return cls.from_bytes(data, str(path))

    def save(self, path: str | Path) -> None:
        write_atomic(path, self.to_bytes())
