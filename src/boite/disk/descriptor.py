"""The VMDK descriptor: the text that names a disk's extents, its CID and its parent.

Format per VMware's "Virtual Disk Format 1.1": `key=value` header lines, one line per
extent (`ACCESS SECTORS TYPE "FILE" [OFFSET]`), and the disk database (`ddb.key = "v"`).
"""

from __future__ import annotations

import codecs
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from boite.errors import DiskFormatError

NO_PARENT_CID = 0xFFFFFFFF
MAX_DESCRIPTOR_BYTES = 1 << 20  # real ones are < 2 KiB; bounds what a hostile file costs
# VMware's limit is 62 TiB; anything beyond 2^50 bytes is a corrupt or hostile capacity.
MAX_CAPACITY_SECTORS = 1 << 41

CREATE_TYPES = {
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsSparse",
    "custom",
}
EXTENT_TYPES = {"SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW"}
ACCESS_MODES = {"RW", "RDONLY", "NOACCESS"}

_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)
_KV_RE = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*)$")
# the encoding line is ASCII in every encoding a descriptor may use, so it can be found
# before the text is decoded
_ENCODING_RE = re.compile(rb'^[ \t]*encoding[ \t]*=[ \t]*"?([^"\r\n]*?)"?[ \t]*\r?$', re.MULTILINE)


@dataclass
class ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str | None = None
    offset: int = 0  # sectors into the file, for FLAT extents
    where: int = field(default=0, compare=False)  # byte offset of the line, for errors

    def render(self) -> str:
        if self.kind == "ZERO":
            return f"{self.access} {self.sectors} ZERO"
        line = f'{self.access} {self.sectors} {self.kind} "{self.filename}"'
        if self.kind in ("FLAT", "VMFS"):
            line += f" {self.offset}"
        return line


@dataclass
class Descriptor:
    create_type: str = "monolithicSparse"
    cid: int = 0
    parent_cid: int = NO_PARENT_CID
    parent_hint: str | None = None
    version: int = 1
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    # what the `encoding` key names (Workstation on Windows writes e.g. "windows-1252");
    # boite writes a descriptor back in the encoding it was read in
    encoding: str = "UTF-8"

    @property
    def capacity_sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    @property
    def has_parent(self) -> bool:
        return self.parent_cid != NO_PARENT_CID or bool(self.parent_hint)

    def set_cid(self, cid: int) -> None:
        self.cid = cid
        # VMware's 128-bit content ID ends with the CID; keep the two in step
        if "ddb.longContentID" in self.ddb:
            self.ddb["ddb.longContentID"] = secrets.token_hex(12) + f"{cid:08x}"

    def render(self) -> str:
        lines = [
            "# Disk DescriptorFile",
            f"version={self.version}",
            f'encoding="{self.encoding}"',
            f"CID={self.cid:08x}",
            f"parentCID={self.parent_cid:08x}",
            f'createType="{self.create_type}"',
        ]
        if self.parent_hint is not None:
            lines.append(f'parentFileNameHint="{self.parent_hint}"')
        lines += ["", "# Extent description"]
        lines += [e.render() for e in self.extents]
        lines += ["", "# The Disk Data Base", "#DDB", ""]
        lines += [f'{k} = "{v}"' for k, v in self.ddb.items()]
        return "\n".join(lines) + "\n"

    def to_bytes(self) -> bytes:
        """The rendered text in the descriptor's encoding (UTF-8 when a name does not fit it)."""
        try:
            return self.render().encode(self.encoding)
        except (UnicodeEncodeError, LookupError):
            self.encoding = "UTF-8"
            return self.render().encode("utf-8")


def descriptor_codec(text: bytes, path, where: int = 0) -> str:
    """The codec the descriptor's `encoding` key names (UTF-8 without one)."""
    m = _ENCODING_RE.search(text)
    if m is None:
        return "utf-8"
    name = m.group(1).decode("ascii", "replace").strip()
    at = where + m.start()
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise DiskFormatError(
            f"{path}: encoding {name!r} at offset {at} is not an encoding boite knows"
        ) from None
    # the structure (keys, quotes, digits, newlines) must read as ASCII in it
    probe = 'encoding="x" RW 0123456789\n'
    try:
        ascii_compatible = probe.encode(info.name) == probe.encode("ascii")
    except UnicodeError:
        ascii_compatible = False
    if not ascii_compatible:
        raise DiskFormatError(
            f"{path}: encoding {name!r} at offset {at} is not ASCII-compatible; a descriptor "
            "is ASCII text with names in an ASCII-compatible encoding"
        )
    return info.name


def new_cid(old: int | None = None) -> int:
    """A random content ID, never the 'no parent' marker nor the previous value."""
    while True:
        cid = secrets.randbits(32)
        if cid not in (NO_PARENT_CID, old, 0):
            return cid


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(text: bytes, path: str | os.PathLike, where: int = 0) -> Descriptor:
    """Parse descriptor bytes read from `path` at byte offset `where`."""
    if len(text) > MAX_DESCRIPTOR_BYTES:
        raise DiskFormatError(
            f"{path}: descriptor at offset {where} is {len(text)} bytes, more than {MAX_DESCRIPTOR_BYTES}"
        )
    text = text.split(b"\0", 1)[0]
    codec = descriptor_codec(text, path, where)
    try:
        body = text.decode(codec)
    except UnicodeDecodeError as exc:
        raise DiskFormatError(
            f"{path}: descriptor at offset {where + exc.start} is not {codec} text "
            "(its encoding key)"
        ) from None
    desc = Descriptor(create_type="")
    seen_cid = False
    line_offset = where
    for raw_line in body.splitlines(keepends=True):
        here = line_offset
        line_offset += len(raw_line.encode(codec))
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, kind, name, off = m.groups()
            if kind not in EXTENT_TYPES:
                raise DiskFormatError(
                    f"{path}: extent at offset {here} has type {kind!r}, expected one of {sorted(EXTENT_TYPES)}"
                )
            if kind != "ZERO" and name is None:
                raise DiskFormatError(f"{path}: {kind} extent at offset {here} names no file")
            sectors_i = int(sectors)
            if sectors_i > MAX_CAPACITY_SECTORS:
                raise DiskFormatError(
                    f"{path}: extent at offset {here} has {sectors_i} sectors, more than {MAX_CAPACITY_SECTORS}"
                )
            if name is not None and (
                not name or os.path.isabs(name) or ".." in re.split(r"[/\\]", name) or ":" in name
            ):
                raise DiskFormatError(
                    f"{path}: extent file name {name!r} at offset {here} is not a plain name next to "
                    "the descriptor (absolute, or going up with '..')"
                )
            if int(off or 0) > MAX_CAPACITY_SECTORS:
                raise DiskFormatError(
                    f"{path}: extent at offset {here} starts at sector {off}, too far"
                )
            desc.extents.append(ExtentLine(access, sectors_i, kind, name, int(off or 0), here))
            continue
        m = _KV_RE.match(line)
        if not m:
            raise DiskFormatError(
                f"{path}: descriptor line at offset {here} is not understood: {line[:60]!r}"
            )
        key, value = m.group(1), _unquote(m.group(2))
        if key.startswith("ddb."):
            desc.ddb[key] = value
        elif key == "version":
            desc.version = _int(value, path, here, key, 10)
        elif key == "CID":
            desc.cid = _int(value, path, here, key, 16)
            seen_cid = True
        elif key == "parentCID":
            desc.parent_cid = _int(value, path, here, key, 16)
        elif key == "createType":
            desc.create_type = value
        elif key == "parentFileNameHint":
            desc.parent_hint = value
        elif key == "encoding":
            desc.encoding = value
        # isNativeSnapshot, ... carry no meaning for us
    if not desc.create_type:
        raise DiskFormatError(f"{path}: descriptor at offset {where} has no createType")
    if desc.create_type not in CREATE_TYPES:
        raise DiskFormatError(
            f"{path}: createType {desc.create_type!r} at offset {where}, expected one of {sorted(CREATE_TYPES)}"
        )
    if not seen_cid:
        raise DiskFormatError(f"{path}: descriptor at offset {where} has no CID")
    if not desc.extents:
        raise DiskFormatError(f"{path}: descriptor at offset {where} lists no extents")
    if desc.capacity_sectors > MAX_CAPACITY_SECTORS:
        raise DiskFormatError(
            f"{path}: extents in the descriptor at offset {where} add up to "
            f"{desc.capacity_sectors} sectors, more than {MAX_CAPACITY_SECTORS}"
        )
    if desc.parent_cid != NO_PARENT_CID and not desc.parent_hint:
        raise DiskFormatError(f"{path}: parentCID={desc.parent_cid:08x} but no parentFileNameHint")
    return desc


def _int(value: str, path, where: int, key: str, base: int) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise DiskFormatError(
            f"{path}: {key} at offset {where} is {value!r}, expected a base-{base} number"
        ) from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise DiskFormatError(f"{path}: {key} at offset {where} is {value!r}, out of 32-bit range")
    return n


def extent_path(descriptor_path: str | os.PathLike, name: str) -> Path:
    """Where an extent file lives; refuses names that leave the descriptor's directory."""
    base = Path(descriptor_path).resolve().parent
    if not name or "\0" in name or os.path.isabs(name) or name.startswith("\\") or ":" in name[:3]:
        raise DiskFormatError(
            f"{descriptor_path}: extent file name {name!r} is absolute; expected a name next to the descriptor"
        )
    target = (base / name).resolve()
    if target.parent != base and base not in target.parents:
        raise DiskFormatError(
            f"{descriptor_path}: extent file name {name!r} leaves the disk's directory {base}"
        )
    return target


def parent_path(child_path: str | os.PathLike, hint: str) -> Path:
    """Resolve parentFileNameHint (relative to the child, or absolute as linked clones use)."""
    if not hint or "\0" in hint or not hint.lower().endswith(".vmdk"):
        raise DiskFormatError(
            f"{child_path}: parentFileNameHint {hint!r} does not name a .vmdk file"
        )
    p = Path(hint)
    if not p.is_absolute():
        p = Path(child_path).resolve().parent / p
    return p.resolve()


def geometry_ddb(capacity_sectors: int, adapter: str) -> dict[str, str]:
    """Disk database lines as VMware writes them for a new disk."""
    if adapter not in ("ide", "buslogic", "lsilogic", "legacyESX"):
        raise DiskFormatError(
            f"adapter type {adapter!r}, expected ide, buslogic, lsilogic or legacyESX"
        )
    heads = 16 if adapter == "ide" else 255
    cylinders = min(capacity_sectors // (heads * 63), 16383 if adapter == "ide" else 65535)
    return {
        "ddb.virtualHWVersion": "4",
        "ddb.geometry.cylinders": str(cylinders),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": "63",
        "ddb.adapterType": adapter,
        "ddb.toolsVersion": "0",
    }
