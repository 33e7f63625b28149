"""VMware's checkpoint format: the `.vmsn` (snapshot) and `.vmss` (suspend) state files.

Layout (little-endian), as VMware writes it and volatility3/crash read it:

    header      u32 magic (0xbed2bed2), u32 version, u32 group count
    group table count x { char name[64]; u64 offset; u64 size }
    groups      each a stream of tags ending with the null tag (two zero bytes)

A tag starts with a flags byte (bits 7-6: number of u32 indices, bits 5-0: value size)
and a name-length byte, then the name, the indices, and the value. A value size of 0-61
means the value follows inline; 63 means a block: u64 stored size, u64 size in memory,
u16 padding length, the padding, the bytes; 62 is a compressed block. The oldest magic
(0xbed0bed0) has u32 block sizes.

Guest RAM lives in the companion `.vmem` file (see vmem.py); the `memory` group only
describes how it maps (`regionsCount`, `regionPPN`, `regionPageNum`, `regionSize`).
This module knows the container; `write_checkpoint`/`read_checkpoint` give it a machine's
meaning: vCPU registers in group `cpu`, boite's device state in group `boite`.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boite.accel.cpustate import GPR_NAMES, CpuState, DescriptorTable, Segment
from boite.errors import CheckpointError
from boite.machine.memory import GuestMemory
from boite.machine.state import Choice, Int, StateRecord, Text, checked

MAGIC = 0xBED2BED2  # what boite writes: a complete checkpoint, 64-bit block sizes
MAGIC_OLD = 0xBED0BED0  # pre-64-bit checkpoints: u32 block sizes
MAGIC_PARTIAL = 0xBED3BED3
MAGIC_RESTORED = 0xBAD1BAD1  # VMware marks a .vmss it has resumed from
MAGIC_NORESTORE = 0xBAD2BAD2
KNOWN_MAGICS = {
    MAGIC: "checkpoint",
    MAGIC_OLD: "old (32-bit) checkpoint",
    MAGIC_PARTIAL: "partial checkpoint",
    MAGIC_RESTORED: "restored checkpoint",
    MAGIC_NORESTORE: "no-restore checkpoint",
}
# volatility3's VMware layer accepts only these; crash also accepts MAGIC_NORESTORE.
VOLATILITY_MAGICS = (MAGIC_OLD, MAGIC_RESTORED, MAGIC, MAGIC_PARTIAL)

# VMware's readers ignore the header's version word; boite writes 0 and never interprets it.
HEADER_VERSION = 0
HEADER = struct.Struct("<III")
GROUP_DESC = struct.Struct("<64sQQ")
GROUP_NAME_MAX = 63  # NUL-terminated in 64 bytes

VALSIZE_BLOCK = 63
VALSIZE_COMPRESSED_BLOCK = 62
INLINE_MAX = 61
INDICES_MAX = 3
NULL_TAG = b"\x00\x00"
PAGE_SIZE = 4096

# Version 2: every device state is a versioned record (machine/state.py) and the meta
# record is checked. Version 1 files hold unchecked device state and are not resumed.
BOITE_FORMAT_VERSION = 2
META_FORMAT_VERSIONS = (1, 2)  # the meta block (the .vmx a snapshot was taken with) is alike
# JSON blocks bigger than this are not a state boite wrote (the largest device queues are
# a few MiB); refused before parsing.
DEVICE_STATE_MAX = 64 << 20
META_MAX = 16 << 20
CPU_EXTRA_MAX = 1 << 20


@dataclass(frozen=True)
class Tag:
    """One tagged value of a group: `name[i][j]...` = value."""

    name: str
    indices: tuple[int, ...]
    value: bytes
    block: bool = False
    compressed: bool = False
    offset: int = 0  # where the tag starts in the file (0 for tags built in memory)

    def as_int(self, source: str = "checkpoint") -> int:
        if self.block:
            raise CheckpointError(
                f"{source}: tag {self.label} at offset {self.offset:#x} is a block, expected "
                "an inline number"
            )
        return int.from_bytes(self.value, "little")

    @property
    def label(self) -> str:
        return self.name + "".join(f"[{i}]" for i in self.indices)


class CheckpointGroup:
    """A named stream of tags. Lookups are by (name, indices); order is kept for writing."""

    def __init__(self, name: str) -> None:
        if not name or len(name.encode("ascii", "replace")) > GROUP_NAME_MAX:
            raise ValueError(f"checkpoint group name {name!r} must be 1-{GROUP_NAME_MAX} bytes")
        self.name = name
        self.tags: list[Tag] = []
        self._index: dict[tuple[str, tuple[int, ...]], Tag] = {}

    def __iter__(self) -> Iterator[Tag]:
        return iter(self.tags)

    def __len__(self) -> int:
        return len(self.tags)

    def add(self, tag: Tag) -> None:
        key = (tag.name, tag.indices)
        if key in self._index:
            raise CheckpointError(f"group {self.name!r}: tag {tag.label} appears twice")
        self.tags.append(tag)
        self._index[key] = tag

    def get(self, name: str, *indices: int) -> Tag | None:
        return self._index.get((name, tuple(indices)))

    def int(self, name: str, *indices: int, default: int | None = None) -> int:
        tag = self.get(name, *indices)
        if tag is None:
            if default is not None:
                return default
            label = name + "".join(f"[{i}]" for i in indices)
            raise CheckpointError(f"group {self.name!r} has no tag {label}")
        return tag.as_int(f"group {self.name!r}")

    def bytes(self, name: str, *indices: int) -> bytes | None:
        tag = self.get(name, *indices)
        if tag is None:
            return None
        if tag.compressed:
            raise CheckpointError(
                f"group {self.name!r}: tag {tag.label} at offset {tag.offset:#x} is a "
                "compressed block, which boite cannot decompress"
            )
        return tag.value

    # -- building -----------------------------------------------------------------------

    def put_int(self, name: str, value: int, size: int, *indices: int) -> None:
        if value < 0 or value >= 1 << (8 * size):
            raise ValueError(f"tag {name}: {value:#x} does not fit in {size} bytes")
        self.add(Tag(name, _check_indices(name, indices), value.to_bytes(size, "little")))

    def put_inline(self, name: str, value: bytes, *indices: int) -> None:
        if len(value) > INLINE_MAX:
            raise ValueError(f"tag {name}: inline values hold at most {INLINE_MAX} bytes")
        self.add(Tag(name, _check_indices(name, indices), bytes(value)))

    def put_block(self, name: str, data: bytes, *indices: int) -> None:
        self.add(Tag(name, _check_indices(name, indices), bytes(data), block=True))


def _check_indices(name: str, indices: Sequence[int]) -> tuple[int, ...]:
    if len(indices) > INDICES_MAX:
        raise ValueError(f"tag {name}: at most {INDICES_MAX} indices, got {len(indices)}")
    for i in indices:
        if not 0 <= i < 1 << 32:
            raise ValueError(f"tag {name}: index {i} is not a u32")
    if not name or len(name.encode("ascii")) > 255:
        raise ValueError(f"tag name {name!r} must be 1-255 ASCII bytes")
    return tuple(indices)


def encode_tag(tag: Tag, wide_blocks: bool = True) -> bytes:
    name = tag.name.encode("ascii")
    nidx = len(tag.indices)
    idx = struct.pack(f"<{nidx}I", *tag.indices)
    if not tag.block:
        flags = (nidx << 6) | len(tag.value)
        return bytes((flags, len(name))) + name + idx + tag.value
    valsize = VALSIZE_COMPRESSED_BLOCK if tag.compressed else VALSIZE_BLOCK
    flags = (nidx << 6) | valsize
    # Stored size, size in memory, no padding: volatility3 assumes the padding is empty.
    sizes = struct.pack("<QQH" if wide_blocks else "<IIH", len(tag.value), len(tag.value), 0)
    return bytes((flags, len(name))) + name + idx + sizes + tag.value


class Checkpoint:
    """A whole checkpoint file: header and named groups, in file order."""

    def __init__(self, magic: int = MAGIC, version: int = HEADER_VERSION) -> None:
        self.magic = magic
        self.version = version
        self.groups: dict[str, CheckpointGroup] = {}

    def group(self, name: str) -> CheckpointGroup:
        """The group called `name`, created (at the end) if missing."""
        if name not in self.groups:
            self.groups[name] = CheckpointGroup(name)
        return self.groups[name]

    def to_bytes(self) -> bytes:
        wide = self.magic != MAGIC_OLD
        streams = [
            b"".join(encode_tag(t, wide) for t in g.tags) + NULL_TAG for g in self.groups.values()
        ]
        out = bytearray(HEADER.pack(self.magic, self.version, len(self.groups)))
        offset = HEADER.size + GROUP_DESC.size * len(self.groups)
        for g, stream in zip(self.groups.values(), streams, strict=True):
            out += GROUP_DESC.pack(g.name.encode("ascii"), offset, len(stream))
            offset += len(stream)
        for stream in streams:
            out += stream
        return bytes(out)

    def write(self, path: str | os.PathLike[str], durable: bool = True) -> None:
        """Write atomically: a temporary file renamed over `path`."""
        _atomic_write(Path(path), self.to_bytes(), durable)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Checkpoint:
        from boite.box.paths import FileKindError, open_regular

        path = Path(path)
        try:
            fd = open_regular(path, what="checkpoint")
        except FileKindError as exc:
            raise CheckpointError(str(exc)) from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror}") from exc
        try:
            with open(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise CheckpointError(f"{path}: empty file, expected a VMware checkpoint")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    return cls.parse(mm, str(path))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror}") from exc

    @classmethod
    def parse(cls, data: bytes | mmap.mmap, source: str = "checkpoint") -> Checkpoint:
        """Parse a checkpoint; every offset and length is checked against the data."""
        end = len(data)
        if end < HEADER.size:
            raise CheckpointError(
                f"{source}: {end} bytes is too short for a checkpoint header ({HEADER.size})"
            )
        magic, version, ngroups = HEADER.unpack_from(data, 0)
        if magic not in KNOWN_MAGICS:
            expected = ", ".join(f"{m:#x}" for m in KNOWN_MAGICS)
            raise CheckpointError(
                f"{source}: offset 0: magic {magic:#010x} is not a VMware checkpoint "
                f"(expected one of {expected})"
            )
        table_end = HEADER.size + ngroups * GROUP_DESC.size
        if table_end > end:
            raise CheckpointError(
                f"{source}: offset 8: {ngroups} groups need a {table_end}-byte table, "
                f"the file has {end} bytes"
            )
        ckpt = cls(magic, version)
        wide = magic != MAGIC_OLD
        spans: dict[str, tuple[int, int]] = {}
        for i in range(ngroups):
            at = HEADER.size + i * GROUP_DESC.size
            raw_name, offset, size = GROUP_DESC.unpack_from(data, at)
            name_bytes = raw_name.split(b"\0", 1)[0]
            try:
                name = name_bytes.decode("ascii")
            except UnicodeDecodeError:
                raise CheckpointError(
                    f"{source}: offset {at:#x}: group {i} name {name_bytes!r} is not ASCII"
                ) from None
            if not name:
                raise CheckpointError(f"{source}: offset {at:#x}: group {i} has an empty name")
            if name in ckpt.groups:
                raise CheckpointError(f"{source}: offset {at:#x}: group {name!r} appears twice")
            if offset < table_end or offset > end or size > end - offset:
                raise CheckpointError(
                    f"{source}: offset {at:#x}: group {name!r} spans {offset:#x}+{size:#x}, "
                    f"outside the file's tag area {table_end:#x}..{end:#x}"
                )
            for other, (o_start, o_end) in spans.items():
                if offset < o_end and o_start < offset + size:
                    raise CheckpointError(
                        f"{source}: offset {at:#x}: group {name!r} overlaps group {other!r}"
                    )
            spans[name] = (offset, offset + size)
            group = CheckpointGroup(name)
            for tag in _parse_tags(data, offset, offset + size, wide, f"{source}: group {name!r}"):
                group.add(tag)
            ckpt.groups[name] = group
        return ckpt


def _parse_tags(
    data: bytes | mmap.mmap, pos: int, end: int, wide: bool, where: str
) -> Iterator[Tag]:
    while True:
        if pos + 2 > end:
            raise CheckpointError(
                f"{where}: offset {pos:#x}: tag stream runs past the group's end {end:#x} "
                "without the null tag"
            )
        flags, name_len = data[pos], data[pos + 1]
        if flags == 0 and name_len == 0:
            return
        start = pos
        nidx = flags >> 6
        valsize = flags & 0x3F
        if name_len == 0:
            raise CheckpointError(
                f"{where}: offset {pos:#x}: tag with flags {flags:#x} has no name"
            )
        head_end = pos + 2 + name_len + 4 * nidx
        if head_end > end:
            raise CheckpointError(f"{where}: offset {pos:#x}: tag header runs past {end:#x}")
        try:
            name = bytes(data[pos + 2 : pos + 2 + name_len]).decode("ascii")
        except UnicodeDecodeError:
            raise CheckpointError(f"{where}: offset {pos:#x}: tag name is not ASCII") from None
        indices = struct.unpack_from(f"<{nidx}I", data, pos + 2 + name_len)
        pos = head_end
        if valsize < VALSIZE_COMPRESSED_BLOCK:
            if pos + valsize > end:
                raise CheckpointError(
                    f"{where}: offset {start:#x}: tag {name} value of {valsize} bytes runs "
                    f"past {end:#x}"
                )
            yield Tag(name, indices, bytes(data[pos : pos + valsize]), offset=start)
            pos += valsize
            continue
        sizes = struct.Struct("<QQH" if wide else "<IIH")
        if pos + sizes.size > end:
            raise CheckpointError(
                f"{where}: offset {start:#x}: block {name} sizes run past {end:#x}"
            )
        nbytes, in_memory, pad = sizes.unpack_from(data, pos)
        if valsize == VALSIZE_BLOCK and in_memory != nbytes:
            raise CheckpointError(
                f"{where}: offset {start:#x}: block {name} stores {nbytes} bytes but says "
                f"{in_memory} in memory (only a compressed block differs)"
            )
        pos += sizes.size + pad
        if pos > end or nbytes > end - pos:
            raise CheckpointError(
                f"{where}: offset {start:#x}: block {name} of {nbytes} bytes (+{pad} padding) "
                f"runs past the group's end {end:#x}"
            )
        yield Tag(
            name,
            indices,
            bytes(data[pos : pos + nbytes]),
            block=True,
            compressed=valsize == VALSIZE_COMPRESSED_BLOCK,
            offset=start,
        )
        pos += nbytes


def _atomic_write(path: Path, data: bytes, durable: bool) -> None:
    from boite.box.paths import create_private

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crash (or a planted link): never followed
    fd = create_private(tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# The machine's meaning: vCPUs in group "cpu", RAM layout in "memory", devices in "boite".
# ---------------------------------------------------------------------------------------

# VMware's segment numbering (SegmentName: ES, CS, SS, DS, FS, GS, LDTR, TR).
VMWARE_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
CONTROL_REGISTERS = (0, 2, 3, 4, 8)


def _segment_attributes(s: Segment) -> int:
    """Pack a segment's hidden attributes the way VMX access rights do."""
    return (
        (s.type & 0xF)
        | (s.s & 1) << 4
        | (s.dpl & 3) << 5
        | (s.present & 1) << 7
        | (s.avl & 1) << 12
        | (s.l & 1) << 13
        | (s.db & 1) << 14
        | (s.g & 1) << 15
        | (s.unusable & 1) << 16
    )


def _segment_from(selector: int, base: int, limit: int, ar: int) -> Segment:
    return Segment(
        selector=selector,
        base=base,
        limit=limit,
        type=ar & 0xF,
        s=ar >> 4 & 1,
        dpl=ar >> 5 & 3,
        present=ar >> 7 & 1,
        avl=ar >> 12 & 1,
        l=ar >> 13 & 1,
        db=ar >> 14 & 1,
        g=ar >> 15 & 1,
        unusable=ar >> 16 & 1,
    )


def put_cpu_states(group: CheckpointGroup, states: Sequence[CpuState]) -> None:
    """Write vCPU registers under VMware's tag names where it has them (cpu:numVCPUs, rax..r15,
    rip, eflags, CR64, IDTR — what crash reads) and boite's names for the rest."""
    group.put_int("cpu:numVCPUs", len(states), 4)
    for n, st in enumerate(states):
        for reg in GPR_NAMES:
            group.put_int(reg, st.gpr.get(reg, 0), 8, n)
        group.put_int("rip", st.rip, 8, n)
        group.put_int("eflags", st.rflags, 4 if st.rflags < 1 << 32 else 8, n)
        for cr, value in zip(
            CONTROL_REGISTERS, (st.cr0, st.cr2, st.cr3, st.cr4, st.cr8), strict=True
        ):
            group.put_int("CR64", value, 8, n, cr)
        for name, table in (("IDTR", st.idt), ("GDTR", st.gdt)):
            group.put_int(name, table.limit, 4, n, 0)
            group.put_int(name, table.base & 0xFFFF_FFFF, 4, n, 1)
            group.put_int(name, table.base >> 32, 4, n, 2)
        for seg_name, seg in st.segments.items():
            if seg_name not in VMWARE_SEGMENTS:
                raise ValueError(f"cpu {n}: unknown segment register {seg_name!r}")
            s = VMWARE_SEGMENTS.index(seg_name)
            group.put_int("segSelector", seg.selector, 2, n, s)
            group.put_int("segBase", seg.base, 8, n, s)
            group.put_int("segLimit", seg.limit, 4, n, s)
            group.put_int("segAttributes", _segment_attributes(seg), 4, n, s)
        group.put_int("EFER", st.efer, 8, n)
        group.put_int("apicBase", st.apic_base, 8, n)
        for msr, value in sorted(st.msrs.items()):
            group.put_int("MSR", value, 8, n, msr)
        if st.fxsave:
            group.put_block("FXSAVE", st.fxsave, n)
        group.put_int("halted", int(st.halted), 1, n)
        if st.pending_interrupt is not None:
            group.put_int("pendingInterrupt", st.pending_interrupt, 4, n)
        if st.extra:
            group.put_block("boite:extra", _json_bytes(st.extra), n)


def get_cpu_states(group: CheckpointGroup) -> list[CpuState]:
    """Every vCPU's state, each field checked (`accel/statecheck.py`)."""
    from boite.accel.statecheck import check_cpu_state

    count = group.int("cpu:numVCPUs")
    if count > 4096:
        raise CheckpointError(f"group 'cpu': cpu:numVCPUs is {count}, boite allows at most 4096")
    msrs: dict[int, dict[int, int]] = {}
    segments: dict[int, set[int]] = {}
    for tag in group:
        if tag.name == "MSR" and len(tag.indices) == 2:
            msrs.setdefault(tag.indices[0], {})[tag.indices[1]] = tag.as_int()
        elif tag.name == "segSelector" and len(tag.indices) == 2:
            segments.setdefault(tag.indices[0], set()).add(tag.indices[1])
    states = []
    for n in range(count):
        gi = group.int
        st = CpuState(
            gpr={reg: gi(reg, n) for reg in GPR_NAMES},
            rip=gi("rip", n),
            rflags=gi("eflags", n),
            cr0=gi("CR64", n, 0),
            cr2=gi("CR64", n, 2),
            cr3=gi("CR64", n, 3),
            cr4=gi("CR64", n, 4),
            cr8=gi("CR64", n, 8, default=0),
            efer=gi("EFER", n, default=0),
            apic_base=gi("apicBase", n, default=0xFEE00900),
            halted=bool(gi("halted", n, default=0)),
        )
        st.idt = DescriptorTable(
            base=gi("IDTR", n, 1) | gi("IDTR", n, 2) << 32, limit=gi("IDTR", n, 0)
        )
        st.gdt = DescriptorTable(
            base=gi("GDTR", n, 1, default=0) | gi("GDTR", n, 2, default=0) << 32,
            limit=gi("GDTR", n, 0, default=0xFFFF),
        )
        for s in sorted(segments.get(n, ())):
            if s >= len(VMWARE_SEGMENTS):
                raise CheckpointError(f"group 'cpu': cpu {n} has segment number {s} (max 7)")
            st.segments[VMWARE_SEGMENTS[s]] = _segment_from(
                gi("segSelector", n, s),
                gi("segBase", n, s),
                gi("segLimit", n, s),
                gi("segAttributes", n, s),
            )
        st.msrs = msrs.get(n, {})
        st.fxsave = group.bytes("FXSAVE", n) or b""
        if group.get("pendingInterrupt", n) is not None:
            st.pending_interrupt = gi("pendingInterrupt", n)
        extra = group.bytes("boite:extra", n)
        if extra is not None:
            st.extra = _json_load(extra, f"group 'cpu': boite:extra[{n}]", CPU_EXTRA_MAX)
        check_cpu_state(st, n)
        states.append(st)
    return states


# Device state is plain data, kept as JSON without loss: what JSON has no form for travels
# tagged: bytes as {"$bytes": base64}, tuples as {"$tuple": [...]}, dicts whose keys are
# not all strings (register files keyed by number) as {"$dict": [[key, value], ...]}.
_TAGS = ("$bytes", "$tuple", "$dict")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return {"$tuple": [_to_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [_to_plain(v) for v in sorted(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (
            len(obj) == 1 and next(iter(obj)) in _TAGS
        ):
            return {k: _to_plain(v) for k, v in obj.items()}
        return {"$dict": [[_to_plain(k), _to_plain(v)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"device state holds a {type(obj).__name__}, which is not plain data")


def _json_hook(d: dict[str, Any]) -> Any:
    if len(d) == 1:
        tag, value = next(iter(d.items()))
        if tag == "$bytes":
            return base64.b64decode(value)
        if tag == "$tuple":
            return tuple(value)
        if tag == "$dict":
            return {(tuple(k) if isinstance(k, list) else k): v for k, v in value}
    return d


def _json_bytes(value: Any) -> bytes:
    try:
        return json.dumps(_to_plain(value), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save machine state: {exc}") from None


def _json_load(data: bytes, where: str, limit: int) -> Any:
    if len(data) > limit:
        raise CheckpointError(f"{where}: {len(data)} bytes of JSON, at most {limit}")
    try:
        return json.loads(data, object_hook=_json_hook)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{where}: not valid JSON device/CPU state: {str(exc)[:80]}"
        ) from None


@dataclass
class SavedMachine:
    """What a checkpoint holds, read back: vCPUs, device state, and the RAM it was loaded into."""

    cpu_states: list[CpuState]
    device_state: dict[str, Any]
    memory: GuestMemory
    regions: list[tuple[int, int, int]] = field(default_factory=list)  # (gpa, vmem offset, size)
    meta: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(
    path_vmsn: str | os.PathLike[str],
    path_vmem: str | os.PathLike[str],
    cpu_states: Sequence[CpuState | dict[str, Any]],
    memory: GuestMemory,
    device_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    durable: bool = True,
) -> None:
    """Save a paused machine: RAM to `path_vmem` (sparse), the rest to `path_vmsn`.

    The .vmem is written first and the .vmsn last, each through a temporary file and a
    rename, so a checkpoint file that exists always has its RAM beside it.
    """
    from boite.box.vmem import write_vmem

    states = [s if isinstance(s, CpuState) else CpuState.from_dict(s) for s in cpu_states]
    # Everything that can fail on the caller's data is built before a byte is written.
    ckpt = Checkpoint()
    put_cpu_states(ckpt.group("cpu"), states)
    mem = ckpt.group("memory")
    boite = ckpt.group("boite")
    boite.put_int("formatVersion", BOITE_FORMAT_VERSION, 4)
    boite.put_block("deviceState", _json_bytes(device_state))
    boite.put_block("meta", _json_bytes(meta or {}))
    layout = write_vmem(path_vmem, memory, durable=durable)
    # Region tags first: volatility3 walks this group and must meet them before any block.
    mem.put_int("regionsCount", len(layout), 4)
    for i, (gpa, file_offset, size) in enumerate(layout):
        mem.put_int("regionPageNum", file_offset // PAGE_SIZE, 4, i)
        mem.put_int("regionPPN", gpa // PAGE_SIZE, 4, i)
        mem.put_int("regionSize", size // PAGE_SIZE, 4, i)
    ckpt.write(path_vmsn, durable=durable)


def read_layout(ckpt: Checkpoint, source: str) -> list[tuple[int, int, int]]:
    """The (gpa, .vmem offset, size) regions the `memory` group describes, checked."""
    mem = ckpt.groups.get("memory")
    if mem is None:
        raise CheckpointError(f"{source}: no 'memory' group")
    count = mem.int("regionsCount")
    if not 1 <= count <= 64:
        raise CheckpointError(
            f"{source}: group 'memory': regionsCount is {count}, expected 1 to 64"
        )
    layout = []
    for i in range(count):
        ppn, page_num, pages = (
            mem.int("regionPPN", i),
            mem.int("regionPageNum", i),
            mem.int("regionSize", i),
        )
        if pages == 0:
            raise CheckpointError(f"{source}: group 'memory': regionSize[{i}] is 0")
        layout.append((ppn * PAGE_SIZE, page_num * PAGE_SIZE, pages * PAGE_SIZE))
    for which in (0, 1):  # neither guest ranges nor .vmem ranges may overlap
        spans = sorted((r[which], r[which] + r[2]) for r in layout)
        for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
            if b_start < a_end:
                kind = "guest-physical" if which == 0 else ".vmem"
                raise CheckpointError(
                    f"{source}: group 'memory': regions overlap in {kind} space at {b_start:#x}"
                )
    return layout


@dataclass(frozen=True)
class CheckpointMeta(StateRecord):
    """The `meta` block: how the state was taken. Each key may be absent."""

    accelerator: str | None = checked(Choice("kvm", "emu"), default=None)
    vcpus: int | None = checked(Int(1, 4096), default=None)
    vmx: str | None = checked(Text(META_MAX), default=None)  # the .vmx, base64

    def validate(self) -> None:
        self.vmx_bytes()

    def vmx_bytes(self) -> bytes | None:
        if self.vmx is None:
            return None
        try:
            return base64.b64decode(self.vmx, validate=True)
        except ValueError:
            raise self.invalid("vmx", "not base64") from None


def read_meta(ckpt: Checkpoint, source: str) -> tuple[dict[str, Any], CheckpointMeta]:
    """The `boite` group's meta block as data and as a checked record ({} without one)."""
    group = ckpt.groups.get("boite")
    raw = group.bytes("meta") if group is not None else None
    if group is None or raw is None:
        return {}, CheckpointMeta()
    version = group.int("formatVersion")
    if version not in META_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{source}: group 'boite': formatVersion {version}, this boite reads "
            f"{BOITE_FORMAT_VERSION}"
        )
    meta = _json_load(raw, f"{source}: meta", META_MAX)
    try:
        rec = CheckpointMeta.from_dict(meta, "meta", versioned=False)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: group 'boite': {exc}") from None
    return meta, rec


@dataclass
class SavedState:
    """A checkpoint's vCPUs, device state and RAM layout, read and checked; no RAM yet."""

    source: str
    cpu_states: list[CpuState]
    device_state: dict[str, Any]
    regions: list[tuple[int, int, int]]
    meta: dict[str, Any]


def read_saved_state(path_vmsn: str | os.PathLike[str]) -> SavedState:
    """Everything of a checkpoint but its RAM, each part checked: the container, the vCPU
    states, the RAM layout, the format version and the meta record. Device state comes
    back as data for `Machine.check_device_state`, which knows the devices."""
    source = str(path_vmsn)
    ckpt = Checkpoint.read(path_vmsn)
    if ckpt.magic != MAGIC:
        raise CheckpointError(
            f"{source}: a {KNOWN_MAGICS[ckpt.magic]} ({ckpt.magic:#010x}); boite resumes "
            f"only a complete one ({MAGIC:#010x})"
        )
    if "cpu" not in ckpt.groups:
        raise CheckpointError(f"{source}: no 'cpu' group")
    states = get_cpu_states(ckpt.groups["cpu"])
    layout = read_layout(ckpt, source)
    device_state: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    boite = ckpt.groups.get("boite")
    if boite is not None:
        version = boite.int("formatVersion")
        if version != BOITE_FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: group 'boite': formatVersion {version}, this boite reads "
                f"{BOITE_FORMAT_VERSION}"
            )
        raw = boite.bytes("deviceState")
        if raw is not None:
            device_state = _json_load(raw, f"{source}: deviceState", DEVICE_STATE_MAX)
        if not isinstance(device_state, dict):
            raise CheckpointError(f"{source}: group 'boite': device state is not a dictionary")
        meta, rec = read_meta(ckpt, source)
        if rec.vcpus is not None and rec.vcpus != len(states):
            raise CheckpointError(
                f"{source}: group 'boite': meta.vcpus is {rec.vcpus}, the 'cpu' group has "
                f"{len(states)}"
            )
    return SavedState(source, states, device_state, layout, meta)


def check_resumable(path_vmsn: Path) -> SavedState:
    """A memory snapshot that a revert may point the box at: the checkpoint reads back
    whole (`read_saved_state`) and its .vmem holds every region. The devices are checked
    when a machine is built for it (`Machine.check_device_state`, at resume)."""
    saved = read_saved_state(path_vmsn)
    vmem = path_vmsn.with_suffix(".vmem")
    try:
        size = os.stat(vmem).st_size
    except OSError as exc:
        raise CheckpointError(f"{vmem}: cannot open guest RAM file: {exc.strerror}") from None
    end = max(offset + length for _, offset, length in saved.regions)
    if end > size:
        raise CheckpointError(
            f"{path_vmsn}: group 'memory' describes {end:#x} bytes of .vmem, {vmem} has {size:#x}"
        )
    return saved


def read_checkpoint(
    path_vmsn: str | os.PathLike[str],
    path_vmem: str | os.PathLike[str] | None = None,
    memory: GuestMemory | None = None,
    memory_is_zero: bool = False,
) -> SavedMachine:
    """Load a checkpoint. RAM goes into `memory` (every region must fit in it) or, when
    none is given, into a new GuestMemory shaped like the checkpoint's regions.
    `memory_is_zero` says the given memory is fresh, so holes in the .vmem need no zeroing."""
    saved = read_saved_state(path_vmsn)
    if path_vmem is None:
        path_vmem = Path(path_vmsn).with_suffix(".vmem")
    memory = load_saved_memory(saved, path_vmem, memory, memory_is_zero)
    return SavedMachine(saved.cpu_states, saved.device_state, memory, saved.regions, saved.meta)


def load_saved_memory(
    saved: SavedState,
    path_vmem: str | os.PathLike[str],
    memory: GuestMemory | None = None,
    memory_is_zero: bool = False,
) -> GuestMemory:
    """Read a checkpoint's RAM from its .vmem into `memory` (or a new GuestMemory)."""
    from boite.box.vmem import read_vmem

    source, layout = saved.source, saved.regions
    created = memory is None
    if memory is None:
        # Allocate only what the .vmem really holds: a hostile .vmsn can name terabytes.
        try:
            vmem_size = os.stat(path_vmem).st_size
        except OSError as exc:
            raise CheckpointError(
                f"{path_vmem}: cannot open guest RAM file: {exc.strerror}"
            ) from None
        end = max(offset + size for _, offset, size in layout)
        if end > vmem_size:
            raise CheckpointError(
                f"{source}: group 'memory' describes {end:#x} bytes of .vmem, "
                f"{path_vmem} has {vmem_size:#x}"
            )
        memory = GuestMemory()
        try:
            for gpa, _, size in layout:
                memory.add_region(gpa, size)
        except (ValueError, OSError) as exc:
            memory.close()
            raise CheckpointError(
                f"{source}: cannot allocate guest RAM it describes: {exc}"
            ) from None
        memory_is_zero = True
    try:
        read_vmem(path_vmem, memory, layout, memory_is_zero=memory_is_zero)
    except BaseException:
        if created:
            memory.close()
        raise
    return memory
