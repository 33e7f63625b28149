"""Snapshots: the `.vmsd` tree, delta disks, and crash-safe operations on them.

VMware keeps a box's snapshots in NAME.vmsd (the tree), NAME-SnapshotN.vmsn (each
snapshot's state: the .vmx as it was, and for a running box vCPUs, devices, and guest RAM
in NAME-SnapshotN.vmem) and chains of delta VMDKs. Taking a snapshot freezes every disk's
current link (it becomes a parent nothing writes) and gives it a child NAME-00000N.vmdk that
the .vmx then names; `snapshotN.diskK.fileName` records the frozen link.

Every operation is atomic through a journal (NAME.boite-journal): it first names the files
it will create (a crash before the commit record deletes them: the box is as before), then
records the complete outcome (new .vmx and .vmsd, disks to consolidate, files to delete) as
its commit point; a crash after that is finished from the record (the box is as after).
`recover()` runs before every operation and when a tree is read or checked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boite.box import paths
from boite.box.atomic import fsync_dir, write_atomic
from boite.box.config import BoxConfig
from boite.box.limits import Problem
from boite.box.lock import BoxLock
from boite.box.vmxdict import VmxDict
from boite.errors import BoiteError, CheckpointError, ConfigError, SnapshotError

if TYPE_CHECKING:
    from boite.box.box import Box
    from boite.machine.memory import GuestMemory

JOURNAL_SUFFIX = ".boite-journal"
MAX_SNAPSHOTS = 496  # VMware's limit on snapshots in one tree
MRU_KEEP = 5
_SNAP_KEY = re.compile(r"snapshot(\d+)\.(.+)", re.I)
_DISK_KEY = re.compile(r"disk(\d+)\.(filename|node)", re.I)
_CHILD_NAME = re.compile(r"^(?P<stem>.*?)(?:-(?P<n>\d{6}))?\.vmdk$", re.I)

# Test hooks for the kill tests (tests/snapshot/test_kill.py), read once at import: a delay
# between steps widens the windows a random SIGKILL can land in, and KILL_AT_STEP makes the
# process kill itself at one step boundary. Neither changes what is written.
_STEP_DELAY = float(os.environ.get("BOITE_SNAPSHOT_STEP_DELAY", "0") or 0)
_KILL_AT_STEP = int(os.environ.get("BOITE_SNAPSHOT_KILL_AT_STEP", "0") or 0)
_steps_done = 0


def _step() -> None:
    global _steps_done
    _steps_done += 1
    if _steps_done == _KILL_AT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    if _STEP_DELAY:
        time.sleep(_STEP_DELAY)


# -- the tree --------------------------------------------------------------------------------


@dataclass
class SnapshotDisk:
    file_name: str  # the frozen link, as the .vmx named it
    node: str  # the disk slot: scsi0:0, nvme0:1 ...


@dataclass
class Snapshot:
    uid: int
    display_name: str
    filename: str  # the .vmsn
    parent: int | None = None
    description: str = ""
    create_time_us: int = 0  # microseconds since the epoch
    disks: list[SnapshotDisk] = field(default_factory=list)
    type: str | None = None
    other: dict[str, str] = field(default_factory=dict)  # keys boite does not interpret
    where: str = ""  # its key prefix in the .vmsd (`snapshot3`), for error messages

    @property
    def create_time(self) -> float:
        return self.create_time_us / 1e6


class SnapshotTree:
    """The contents of a .vmsd: the snapshots, which one "you are here" hangs from, and the
    most-recently-used list. Built from and written to the VMware dictionary syntax."""

    def __init__(self) -> None:
        self.snapshots: dict[int, Snapshot] = {}
        self.current: int | None = None
        self.last_uid = 0
        self.mru: list[int] = []
        self.other: dict[str, str] = {}
        self.encoding = "UTF-8"

    # -- reading --------------------------------------------------------------------------

    @classmethod
    def from_vmsd(cls, vmsd: VmxDict) -> SnapshotTree:
        tree = cls()
        tree.encoding = vmsd.encoding
        src = vmsd.source
        raw: dict[int, dict[str, str]] = {}
        for key in vmsd:
            value = vmsd[key]
            folded = key.casefold()
            m = _SNAP_KEY.fullmatch(key)
            if m:
                raw.setdefault(int(m.group(1)), {})[m.group(2)] = value
            elif folded == "snapshot.current":
                tree.current = _int(src, key, value) if value.strip() else None
            elif folded == "snapshot.lastuid":
                tree.last_uid = _int(src, key, value)
            elif folded == "snapshot.numsnapshots":
                pass  # derived: checked against the entries below
            elif re.fullmatch(r"snapshot\.mru\d+\.uid", folded):
                tree.mru.append(_int(src, key, value))
            else:
                tree.other[key] = value
        declared = vmsd.get("snapshot.numSnapshots")
        for index in sorted(raw):
            keys = {k.casefold(): (k, v) for k, v in raw[index].items()}
            where = f"snapshot{index}"

            def get(name: str, default: str | None = None, keys=keys, where=where) -> str:
                if name.casefold() in keys:
                    return keys[name.casefold()][1]
                if default is None:
                    raise ConfigError(f"{src}: {where}.{name} is missing")
                return default

            uid = _int(src, f"{where}.uid", get("uid"))
            parent_text = get("parent", "").strip()
            high = _int(src, f"{where}.createTimeHigh", get("createTimeHigh", "0"))
            low = _int(src, f"{where}.createTimeLow", get("createTimeLow", "0"))
            disks: dict[int, dict[str, str]] = {}
            other: dict[str, str] = {}
            for folded, (spelled, value) in keys.items():
                dm = _DISK_KEY.fullmatch(folded)
                if dm:
                    disks.setdefault(int(dm.group(1)), {})[dm.group(2)] = value
                elif folded not in _KNOWN_SNAPSHOT_KEYS:
                    other[spelled] = value
            num_disks = _int(src, f"{where}.numDisks", get("numDisks", str(len(disks))))
            if sorted(disks) != list(range(num_disks)):
                raise ConfigError(
                    f"{src}: {where}.numDisks is {num_disks} but disk entries "
                    f"{sorted(disks)} are given"
                )
            snap_disks = []
            for k in range(num_disks):
                if "filename" not in disks[k] or "node" not in disks[k]:
                    raise ConfigError(f"{src}: {where}.disk{k} needs both fileName and node")
                snap_disks.append(SnapshotDisk(disks[k]["filename"], disks[k]["node"]))
            snap = Snapshot(
                uid=uid,
                display_name=get("displayName", ""),
                filename=get("filename", ""),
                parent=_int(src, f"{where}.parent", parent_text) if parent_text else None,
                description=get("description", ""),
                create_time_us=(high << 32) | (low & 0xFFFF_FFFF),
                disks=snap_disks,
                type=keys["type"][1] if "type" in keys else None,
                other=other,
                where=where,
            )
            if uid in tree.snapshots:
                raise ConfigError(f"{src}: {where}.uid {uid} is used by two snapshots")
            tree.snapshots[uid] = snap
        if declared is not None and _int(src, "snapshot.numSnapshots", declared) != len(
            tree.snapshots
        ):
            raise ConfigError(
                f"{src}: snapshot.numSnapshots is {declared} but {len(tree.snapshots)} "
                "snapshots are described"
            )
        tree.validate(src)
        return tree

    def validate(self, src: str = ".vmsd") -> None:
        for snap in self.snapshots.values():
            if snap.parent is not None and snap.parent not in self.snapshots:
                raise ConfigError(
                    f"{src}: snapshot {snap.uid} ({snap.display_name!r}) names parent "
                    f"{snap.parent}, which does not exist"
                )
            seen = {snap.uid}
            p = snap.parent
            while p is not None:
                if p in seen:
                    raise ConfigError(f"{src}: the snapshot tree loops through uid {p}")
                seen.add(p)
                p = self.snapshots[p].parent
        if self.current is not None and self.current not in self.snapshots:
            raise ConfigError(
                f"{src}: snapshot.current is {self.current}, which is no snapshot's uid"
            )
        if self.snapshots and self.last_uid < max(self.snapshots):
            raise ConfigError(
                f"{src}: snapshot.lastUID {self.last_uid} is below uid {max(self.snapshots)}"
            )

    # -- writing --------------------------------------------------------------------------

    def to_vmsd(self) -> VmxDict:
        """A fresh .vmsd, keys in VMware's order (it rewrites the whole file too)."""
        d = VmxDict.new(self.encoding)
        if self.snapshots or self.last_uid:
            d["snapshot.lastUID"] = str(self.last_uid)
        if self.current is not None:
            d["snapshot.current"] = str(self.current)
        for i, snap in enumerate(sorted(self.snapshots.values(), key=lambda s: s.uid)):
            p = f"snapshot{i}"
            d[f"{p}.uid"] = str(snap.uid)
            d[f"{p}.filename"] = snap.filename
            if snap.parent is not None:
                d[f"{p}.parent"] = str(snap.parent)
            d[f"{p}.displayName"] = snap.display_name
            if snap.description:
                d[f"{p}.description"] = snap.description
            if snap.type is not None:
                d[f"{p}.type"] = snap.type
            high, low = snap.create_time_us >> 32, snap.create_time_us & 0xFFFF_FFFF
            d[f"{p}.createTimeHigh"] = str(high)
            d[f"{p}.createTimeLow"] = str(low - (1 << 32) if low >= 1 << 31 else low)
            d[f"{p}.numDisks"] = str(len(snap.disks))
            for k, disk in enumerate(snap.disks):
                d[f"{p}.disk{k}.fileName"] = disk.file_name
                d[f"{p}.disk{k}.node"] = disk.node
            for key, value in snap.other.items():
                d[f"{p}.{key}"] = value
        if self.snapshots:
            d["snapshot.numSnapshots"] = str(len(self.snapshots))
        for i, uid in enumerate(u for u in self.mru if u in self.snapshots):
            d[f"snapshot.mru{i}.uid"] = str(uid)
        for key, value in self.other.items():
            d[key] = value
        return d

    def touch_mru(self, uid: int) -> None:
        self.mru = [uid] + [u for u in self.mru if u != uid and u in self.snapshots]
        del self.mru[MRU_KEEP:]

    # -- walking --------------------------------------------------------------------------

    def children(self, uid: int | None) -> list[Snapshot]:
        return sorted((s for s in self.snapshots.values() if s.parent == uid), key=lambda s: s.uid)

    def find(self, name: str) -> Snapshot:
        """A snapshot by display name, or by uid written `#N` or `uid:N`."""
        m = re.fullmatch(r"(?:#|uid:)(\d+)", name)
        if m and int(m.group(1)) in self.snapshots:
            return self.snapshots[int(m.group(1))]
        found = [s for s in self.snapshots.values() if s.display_name == name]
        if not found:
            names = ", ".join(repr(s.display_name) for s in self.snapshots.values()) or "none"
            raise SnapshotError(f"no snapshot named {name!r} (snapshots: {names})")
        if len(found) > 1:
            uids = ", ".join(f"#{s.uid}" for s in found)
            raise SnapshotError(
                f"{len(found)} snapshots are named {name!r}; name one by uid ({uids})"
            )
        return found[0]

    def ancestors(self, uid: int | None) -> Iterator[Snapshot]:
        while uid is not None:
            snap = self.snapshots[uid]
            yield snap
            uid = snap.parent


_KNOWN_SNAPSHOT_KEYS = {
    "uid", "filename", "displayname", "description", "parent", "createtimehigh",
    "createtimelow", "numdisks", "type",
}  # fmt: skip


def _int(src: str, key: str, value: str) -> int:
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise ConfigError(f"{src}: {key} = {value!r}: expected a whole number") from None


def load_tree(box: Box, *, check_paths: bool = True) -> SnapshotTree:
    """The box's snapshot tree; with `check_paths`, every file it names is resolved and
    confined first (box/paths.py): a .vmsd naming files outside the box is refused."""
    vmsd = box.vmsd_path
    if not vmsd.exists() and not vmsd.is_symlink():
        return SnapshotTree()
    tree = SnapshotTree.from_vmsd(VmxDict.load(vmsd))
    if check_paths:
        src = str(vmsd)
        for s in tree.snapshots.values():
            if s.filename:
                paths.owned(box.dir, s.filename, source=src, key=f"{s.where}.filename")
            for k, d in enumerate(s.disks):
                paths.disk_file(box, d.file_name, source=src, key=f"{s.where}.disk{k}.fileName")
    return tree


def _vmx_disks(box: Box) -> list[tuple[str, str]]:
    """The .vmx's snapshot disks, each checked against the path policy."""
    disks = snapshot_disks(box.config, str(box.vmx_path))
    for node, name in disks:
        paths.disk_file(box, name, source=str(box.vmx_path), key=f"{node}.fileName")
    return disks


# -- the disks of a box ---------------------------------------------------------------------


def snapshot_disks(config: BoxConfig, source: str = ".vmx") -> list[tuple[str, str]]:
    """(node, fileName) of every disk a snapshot covers: present hard disks that are not
    independent (VMware leaves independent disks out of snapshots)."""
    out = []
    for slot in config.disks:
        if (slot.mode or "").lower().startswith("independent"):
            continue
        assert slot.file_name is not None
        if "://" in slot.file_name:
            raise SnapshotError(
                f"{source}: {slot.key}.fileName = {slot.file_name!r}: a remote disk cannot have "
                'snapshots; mark it independent (mode = "independent-persistent")'
            )
        if not slot.file_name.lower().endswith(".vmdk"):
            raise SnapshotError(
                f"{source}: {slot.key}.fileName = {slot.file_name!r}: snapshots need VMDK "
                "disks (delta links are VMDKs); convert it with `boite disk convert`"
            )
        out.append((slot.key, slot.file_name))
    return out


def _parent_link(path: Path) -> Path | None:
    from boite.disk.descriptor import parent_path
    from boite.disk.vmdk import read_descriptor

    desc, _ = read_descriptor(path)
    if not desc.has_parent:
        return None
    return parent_path(path, desc.parent_hint or "")


def _link_files(path: Path) -> list[Path]:
    from boite.disk.ops import VmdkFiles

    try:
        return VmdkFiles(path)
    except BoiteError:
        return [path]


def _name_in_box(box: Box, path: Path) -> str:
    """How the .vmx/.vmsd name a disk file: relative to the box when it is inside it."""
    try:
        return str(path.resolve().relative_to(box.dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _same(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def next_child_name(box: Box, frozen: str, taken: set[str]) -> str:
    """VMware's name for a new delta: the base disk's name with the next free -00000N,
    beside it when it is in the box, else in the box directory (as VMware puts deltas in
    the VM's working directory): boite creates files only inside the box."""
    m = _CHILD_NAME.match(Path(frozen).name)
    stem = m.group("stem") if m else Path(frozen).stem
    folder = Path(frozen).parent
    if Path(frozen).is_absolute() or ".." in folder.parts:
        folder = Path(".")
    for n in range(1, 1_000_000):
        name = (
            str(folder / f"{stem}-{n:06d}.vmdk") if str(folder) != "." else f"{stem}-{n:06d}.vmdk"
        )
        path = box.disk_path(name)
        assert isinstance(path, Path)
        # lexists: a dangling link under that name would send the new delta elsewhere.
        if name.casefold() not in taken and not os.path.lexists(path):
            taken.add(name.casefold())
            return name
    raise SnapshotError(f"{frozen}: no free delta disk name left")


# -- the journal ----------------------------------------------------------------------------


def journal_path(box: Box) -> Path:
    return box.dir / f"{box.name}{JOURNAL_SUFFIX}"


def needs_recovery(box: Box) -> bool:
    """Whether a crash left a journal or a temporary file for `recover` to handle."""
    if os.path.lexists(journal_path(box)):
        return True
    names = (journal_path(box).name, box.vmx_path.name, f"{box.name}.vmsd")
    return any(next(box.dir.glob(f".{name}.tmp-*"), None) is not None for name in names)


# A journal holds the new .vmx and .vmsd (16 MiB each at most), base64: a bound to read it.
MAX_JOURNAL_BYTES = 64 << 20


def _check_record(box: Box, record: Any) -> None:
    """Check a journal record before anything in it is used: its shape, and every file it
    names (created, deleted, consolidated) is one boite made inside the box. Raises
    SnapshotError (shape) or BoxPathError (a name), both naming the journal and the key."""
    src = str(journal_path(box))
    protected = (box.vmx_path.name, f"{box.name}.vmsd")

    def damaged(why: str) -> SnapshotError:
        return SnapshotError(
            f"{src}: damaged snapshot journal ({why}); boite cannot tell whether the "
            "interrupted operation committed. Inspect it, then remove it by hand."
        )

    def names(key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise damaged(f"{key} is not a list of file names")
        return value

    def own(key: str, value: str) -> None:
        paths.owned(box.dir, value, source=src, key=key, protected=protected)

    if not isinstance(record, dict):
        raise damaged("not a JSON object")
    if record.get("phase") not in ("prepare", "commit"):
        raise damaged(f"phase {record.get('phase')!r}")
    if not re.fullmatch(r"[a-z][a-z-]{0,31}", str(record.get("op", "operation"))):
        raise damaged("op is not an operation's name")  # it is printed: no escapes, no lines
    for i, name in enumerate(names("created", record.get("created", []))):
        own(f"created[{i}]", name)
    if record["phase"] != "commit":
        return
    new = record.get("new")
    if not isinstance(new, dict):
        raise damaged("new is missing")
    for key in ("vmx", "vmsd"):
        value = new.get(key)
        if value is None and key == "vmsd":
            continue
        if not isinstance(value, str):
            raise damaged(f"new.{key} is not a string")
        try:
            VmxDict.parse(base64.b64decode(value, validate=True), f"{src} new.{key}")
        except (ValueError, ConfigError) as exc:
            raise damaged(f"new.{key}: {exc}") from None
    for i, name in enumerate(names("delete", record.get("delete", []))):
        own(f"delete[{i}]", name)
    steps = record.get("consolidate", [])
    if not isinstance(steps, list):
        raise damaged("consolidate is not a list")
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise damaged(f"consolidate[{i}] is not an object")
        for key in ("child", "parent"):
            if not isinstance(step.get(key), str):
                raise damaged(f"consolidate[{i}].{key} is not a file name")
        own(f"consolidate[{i}].child", step["child"])
        # The parent takes the child's data: a link in the box, or an external disk the
        # .vmx allows.
        paths.disk_file(box, step["parent"], source=src, key=f"consolidate[{i}].parent")
        for j, name in enumerate(names(f"consolidate[{i}].reparent", step.get("reparent", []))):
            own(f"consolidate[{i}].reparent[{j}]", name)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _write_journal(box: Box, record: dict[str, Any]) -> None:
    _check_record(box, record)  # what boite writes obeys the rules it checks on replay
    write_atomic(journal_path(box), json.dumps(record, indent=1).encode())


def _read_journal(box: Box) -> dict[str, Any] | None:
    """The journal, checked (`_check_record`) before anything in it is used."""
    path = journal_path(box)
    try:
        # Not through a link, not a FIFO, not more than a journal can be.
        data = paths.read_regular(path, MAX_JOURNAL_BYTES, what="snapshot journal", nofollow=True)
    except FileNotFoundError:
        return None
    except paths.FileKindError as exc:
        raise SnapshotError(f"{exc}; inspect it, then remove it by hand") from None
    try:
        record = json.loads(data)
    except ValueError as exc:
        # write_atomic never leaves a partial journal; a damaged one was edited by hand.
        raise SnapshotError(
            f"{path}: damaged snapshot journal ({exc}); boite cannot tell whether the "
            "interrupted operation committed. Inspect it, then remove it by hand."
        ) from None
    _check_record(box, record)
    return record


def _unlink_in_box(box: Box, path: Path) -> None:
    """Remove one directory entry boite made in the box (a link is removed, never
    followed); an entry outside the box or of another kind stays."""
    parent = os.path.realpath(path.parent)
    if parent != str(paths.real_dir(box.dir)) and not paths.is_inside(box.dir, parent):
        return
    if path.suffix.lower() not in paths.OWNED_SUFFIXES and ".tmp-" not in path.name:
        return
    path.unlink(missing_ok=True)


def _remove_with_temps(box: Box, path: Path) -> None:
    for p in [path, *path.parent.glob(f".{path.name}.tmp-*")]:
        _unlink_in_box(box, p)


def _rollback(box: Box, record: dict[str, Any]) -> None:
    for name in reversed(record.get("created", [])):
        target = box.dir / name
        for f in _link_files(target) if target.suffix == ".vmdk" and target.exists() else []:
            if not _same(f, target):
                _unlink_in_box(box, f)
        _remove_with_temps(box, target)
    fsync_dir(box.dir)
    journal_path(box).unlink(missing_ok=True)
    fsync_dir(box.dir)


def _apply_commit(box: Box, record: dict[str, Any]) -> None:
    """Finish a committed operation. Every step can run again after a crash."""
    from boite.disk import commit_child_into_parent, set_parent
    from boite.disk.descriptor import parent_path
    from boite.disk.vmdk import read_descriptor

    for step in record.get("consolidate", []):
        child, parent = box.dir / step["child"], box.dir / step["parent"]
        if child.exists():
            cdesc, _ = read_descriptor(child)
            pdesc, _ = read_descriptor(parent)
            # The commit writes into the child's own parent link: it must be the one the
            # journal names (checked against the policy), not one a descriptor redirects.
            if not cdesc.has_parent or not _same(
                parent_path(child, cdesc.parent_hint or ""), parent
            ):
                raise SnapshotError(
                    f"{journal_path(box)}: consolidate: {step['child']} is not a delta of "
                    f"{step['parent']}; not committing it"
                )
            # The parent gets a new CID as the last act of a commit: if the child no longer
            # matches it, the data is already in the parent.
            if cdesc.parent_cid == pdesc.cid:
                commit_child_into_parent(child)
            _step()
        for link in step.get("reparent", []):
            path = box.dir / link
            if path.exists():
                set_parent(path, parent)
        _step()
    write_atomic(box.vmx_path, base64.b64decode(record["new"]["vmx"]))
    _step()
    if record["new"].get("vmsd") is not None:  # None: the operation leaves the tree alone
        write_atomic(box.vmsd_path, base64.b64decode(record["new"]["vmsd"]))
        _step()
    for name in record.get("delete", []):
        target = box.dir / name
        files = _link_files(target) if target.suffix == ".vmdk" and target.exists() else [target]
        for f in files:
            _unlink_in_box(box, f)
        _step()
    fsync_dir(box.dir)
    journal_path(box).unlink(missing_ok=True)
    fsync_dir(box.dir)


def recover(box: Box) -> str | None:
    """Finish or undo an operation a crash interrupted; say which, or None if none was."""
    # A crash inside an atomic write leaves its temporary file; the real file is intact.
    for name in (journal_path(box).name, box.vmx_path.name, f"{box.name}.vmsd"):
        for tmp in box.dir.glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)
    record = _read_journal(box)
    if record is None:
        return None
    op = record.get("op", "operation")
    if record["phase"] == "prepare":
        _rollback(box, record)
        outcome = f"undid an interrupted {op} (it had not committed)"
    else:
        _apply_commit(box, record)
        outcome = f"finished an interrupted {op} (it had committed)"
    _reload(box)
    return outcome


def _reload(box: Box) -> None:
    box.vmx = VmxDict.load(box.vmx_path)
    box.config = BoxConfig(box.vmx)
    box._vmsd = None


class _Operation:
    """One journaled change of a box: prepare (name the files to create), create them,
    commit (record the outcome), apply."""

    def __init__(self, box: Box, op: str, created: list[str]) -> None:
        self.box = box
        self.record: dict[str, Any] = {"op": op, "phase": "prepare", "created": created}
        _write_journal(box, self.record)
        _step()

    def commit(
        self,
        vmx: VmxDict,
        tree: SnapshotTree | None,
        delete: list[str] | None = None,
        consolidate: list[dict[str, Any]] | None = None,
    ) -> None:
        self.record.update(
            phase="commit",
            new={
                "vmx": _b64(vmx.to_bytes()),
                "vmsd": _b64(tree.to_vmsd().to_bytes()) if tree is not None else None,
            },
            delete=list(delete or []),
            consolidate=list(consolidate or []),
        )
        _write_journal(self.box, self.record)
        _step()
        _apply_commit(self.box, self.record)
        _reload(self.box)

    def abort(self) -> None:
        _rollback(self.box, self.record)


class _Locked:
    """Hold the box's lock for an offline operation (a running box is the VMM's)."""

    def __init__(self, box: Box, already_held: bool) -> None:
        self.lock = None if already_held else BoxLock(box.vmx_path)

    def __enter__(self) -> _Locked:
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


# -- operations -----------------------------------------------------------------------------


@dataclass
class MachineState:
    """A paused machine's state for a memory snapshot or a suspend (what the VMM hands over)."""

    cpu_states: list[Any]  # CpuState or dicts in its format
    memory: GuestMemory
    device_state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def take_snapshot(
    box: Box,
    name: str,
    description: str = "",
    machine: MachineState | None = None,
    *,
    lock_held: bool = False,
    now: Callable[[], float] = time.time,
) -> Snapshot:
    """Freeze every disk, record the snapshot (with RAM and devices when `machine` is given)."""
    from boite.box.checkpoint import BOITE_FORMAT_VERSION, Checkpoint, write_checkpoint
    from boite.disk import create_child

    if not name.strip():
        raise SnapshotError("a snapshot needs a name")
    with _Locked(box, lock_held):
        recover(box)
        tree = load_tree(box)
        if len(tree.snapshots) >= MAX_SNAPSHOTS:
            raise SnapshotError(f"{box.vmsd_path}: {MAX_SNAPSHOTS} snapshots is the most a box has")
        if box.vmx.get("checkpoint.vmState", "").lower().endswith(".vmss"):
            raise SnapshotError(
                f"{box.vmx_path}: the box is suspended ({box.vmx['checkpoint.vmState']}); "
                "start it (it resumes) or revert before taking a snapshot"
            )
        disks = _vmx_disks(box)
        for node, file_name in disks:
            path = box.disk_path(file_name)
            if not Path(path).exists():
                raise SnapshotError(f"{box.vmx_path}: {node}.fileName: {path} does not exist")
        uid = tree.last_uid + 1
        vmsn = f"{box.name}-Snapshot{uid}.vmsn"
        vmem = f"{box.name}-Snapshot{uid}.vmem"
        taken = {f.casefold() for _, f in disks}
        children = {node: next_child_name(box, f, taken) for node, f in disks}
        created = [*children.values(), vmsn] + ([vmem] if machine else [])
        op = _Operation(box, "snapshot", created)
        try:
            if machine is not None:
                write_checkpoint(
                    box.dir / vmsn,
                    box.dir / vmem,
                    machine.cpu_states,
                    machine.memory,
                    machine.device_state,
                    meta={**machine.meta, "vmx": _b64(box.vmx.to_bytes())},
                )
            else:
                ckpt = Checkpoint()
                g = ckpt.group("boite")
                g.put_int("formatVersion", BOITE_FORMAT_VERSION, 4)
                g.put_block("meta", json.dumps({"vmx": _b64(box.vmx.to_bytes())}).encode())
                ckpt.write(box.dir / vmsn)
            _step()
            for node, file_name in disks:
                create_child(box.disk_path(file_name), box.disk_path(children[node]))
                _step()
            snap = Snapshot(
                uid=uid,
                display_name=name,
                filename=vmsn,
                parent=tree.current,
                description=description,
                create_time_us=int(now() * 1e6),
                disks=[SnapshotDisk(f, node) for node, f in disks],
                type=None if machine is not None else "1",
            )
            tree.snapshots[uid] = snap
            tree.last_uid = uid
            tree.current = uid
            tree.touch_mru(uid)
            vmx = VmxDict.parse(box.vmx.to_bytes(), str(box.vmx_path))
            for node, child in children.items():
                vmx[f"{node}.fileName"] = child
        except BaseException:
            op.abort()
            raise
        op.commit(vmx, tree)
        return snap


def _saved_vmx(box: Box, snap: Snapshot) -> VmxDict | None:
    """The .vmx as it was when the snapshot was taken (kept in its .vmsn)."""
    from boite.box.checkpoint import Checkpoint, read_meta

    if not snap.filename:
        return None
    path = paths.owned(box.dir, snap.filename, source=str(box.vmsd_path),
                       key=f"{snap.where}.filename")  # fmt: skip
    if not path.exists():
        return None
    _, meta = read_meta(Checkpoint.read(path), str(path))
    vmx = meta.vmx_bytes()
    return None if vmx is None else VmxDict.parse(vmx, str(box.vmx_path))


def _referenced_links(box: Box, tree: SnapshotTree, vmx: VmxDict) -> set[str]:
    names = {d.file_name for s in tree.snapshots.values() for d in s.disks}
    names |= {f for _, f in snapshot_disks(BoxConfig(vmx), str(box.vmx_path))}
    return {os.path.realpath(box.disk_path(n)) for n in names}


def _needed_links(box: Box, tree: SnapshotTree, vmx: VmxDict) -> set[str]:
    """Every disk file some snapshot or the current state reads: the named links and all
    their parents."""
    needed: set[str] = set()
    for link in _referenced_links(box, tree, vmx):
        path: Path | None = Path(link)
        while path is not None and os.path.realpath(path) not in needed:
            needed.add(os.path.realpath(path))
            try:
                path = _parent_link(path)
            except BoiteError:
                path = None
    return needed


def revert_snapshot(box: Box, name: str, *, lock_held: bool = False) -> Snapshot:
    """Go back to a snapshot: the current state's own deltas are dropped, every disk gets a
    fresh child of the snapshot's frozen link, and the .vmx is the snapshot's again. A
    memory snapshot is then resumed by the next `start` (checkpoint.vmState)."""
    from boite.box.checkpoint import Checkpoint, check_resumable
    from boite.disk import create_child

    with _Locked(box, lock_held):
        recover(box)
        tree = load_tree(box)
        snap = tree.find(name)
        vmx = _saved_vmx(box, snap) or VmxDict.parse(box.vmx.to_bytes(), str(box.vmx_path))
        old_disks = _vmx_disks(box)
        suspend_files = _suspend_files(box)
        taken = {f.casefold() for _, f in snapshot_disks(box.config)}
        taken |= {d.file_name.casefold() for d in snap.disks}
        children = {d.node: next_child_name(box, d.file_name, taken) for d in snap.disks}
        op = _Operation(box, "revert", list(children.values()))
        try:
            for d in snap.disks:
                create_child(box.disk_path(d.file_name), box.disk_path(children[d.node]))
                _step()
            for d in snap.disks:
                vmx[f"{d.node}.fileName"] = children[d.node]
                vmx[f"{d.node}.present"] = "TRUE"
            vmsn = box.dir / snap.filename
            has_memory = vmsn.exists() and "memory" in Checkpoint.read(vmsn).groups
            if has_memory:
                check_resumable(vmsn)  # a damaged state is refused now, not at the next start
            _drop_suspend_keys(vmx)
            if has_memory:
                vmx["checkpoint.vmState"] = snap.filename
                vmx["checkpoint.vmState.readOnly"] = "TRUE"
            tree.current = snap.uid
            tree.touch_mru(snap.uid)
            # The current state's own deltas hold only what this revert throws away.
            keep = _needed_links(box, tree, vmx)
            delete = [
                _deletable(box, f, f"{node}.fileName")
                for node, f in old_disks
                if os.path.realpath(box.disk_path(f)) not in keep
            ]
            delete = [name for name in delete if name is not None]
            delete += suspend_files
        except BaseException:
            op.abort()
            raise
        op.commit(vmx, tree, delete=delete)
        return snap


def _deletable(box: Box, file_name: str, key: str) -> str | None:
    """How the journal names a disk link to delete: its name in the box, checked (a
    link boite made); None for an external disk, which boite never deletes."""
    real = os.path.realpath(box.disk_path(file_name))
    if not paths.is_inside(box.dir, real):
        return None
    name = _name_in_box(box, Path(real))
    paths.owned(box.dir, name, source=str(box.vmx_path), key=key)
    return name


def delete_snapshot(box: Box, name: str, *, lock_held: bool = False) -> Snapshot:
    """Remove a snapshot from the tree, consolidating its delta disks the way VMware does:
    a frozen link that one other link depends on takes that link's data (child committed
    into parent) and its place; one that nothing depends on is deleted; one that several
    links depend on stays as their shared parent. No data a remaining snapshot or the
    current state reads is lost."""
    from boite.disk.descriptor import parent_path
    from boite.disk.vmdk import read_descriptor

    with _Locked(box, lock_held):
        recover(box)
        tree = load_tree(box)
        snap = tree.find(name)
        from boite.clone import linked_clones

        clones = linked_clones(snap)
        if clones:
            raise SnapshotError(
                f"{box.vmx_path}: snapshot {snap.display_name!r} has linked clones whose disks "
                f"hang from it ({', '.join(clones)}): delete those boxes first"
            )
        vmx = VmxDict.parse(box.vmx.to_bytes(), str(box.vmx_path))
        # Children of the deleted snapshot hang from its parent now.
        del tree.snapshots[snap.uid]
        for s in tree.snapshots.values():
            if s.parent == snap.uid:
                s.parent = snap.parent
        if tree.current == snap.uid:
            tree.current = snap.parent
        tree.mru = [u for u in tree.mru if u != snap.uid]

        # Every disk link anything still reads, and who is whose parent among them.
        users = _link_users(box, tree, vmx)
        all_links = _all_links(
            box, tree, vmx, extra=[box.disk_path(d.file_name) for d in snap.disks]
        )
        children_of: dict[str, list[str]] = {}
        for link in all_links:
            try:
                desc, _ = read_descriptor(link)
            except BoiteError:
                continue
            if desc.has_parent:
                parent = os.path.realpath(parent_path(link, desc.parent_hint or ""))
                children_of.setdefault(parent, []).append(link)

        delete: list[str] = []
        consolidate: list[dict[str, Any]] = []
        for d in snap.disks:
            frozen = os.path.realpath(box.disk_path(d.file_name))
            if frozen in users:
                continue  # another snapshot or the current state names this very link
            deps = children_of.get(frozen, [])
            if not paths.is_inside(box.dir, frozen):
                if len(deps) != 1 or not paths.is_inside(box.dir, deps[0]):
                    continue  # an external disk is never deleted, nor its own children
            if not deps:
                delete.append(_name_in_box(box, Path(frozen)))
            elif len(deps) == 1:
                child = deps[0]
                if not paths.is_inside(box.dir, child):
                    continue  # its dependent lives elsewhere: leave the link as it is
                consolidate.append(
                    {
                        "child": _name_in_box(box, Path(child)),
                        "parent": _name_in_box(box, Path(frozen)),
                        "reparent": [
                            _name_in_box(box, Path(g)) for g in children_of.get(child, [])
                        ],
                    }
                )
                delete.append(_name_in_box(box, Path(child)))
                _rename_link(box, tree, vmx, child, frozen)
            # With several dependents the link stays: it is their shared parent.
        delete.append(snap.filename)
        vmem = Path(snap.filename).with_suffix(".vmem")
        if (box.dir / vmem).exists():
            delete.append(str(vmem))
        if vmx.get("checkpoint.vmState") == snap.filename:
            _drop_suspend_keys(vmx)
        op = _Operation(box, "delete-snapshot", [])
        op.commit(vmx, tree, delete=delete, consolidate=consolidate)
        return snap


def _link_users(box: Box, tree: SnapshotTree, vmx: VmxDict) -> set[str]:
    return _referenced_links(box, tree, vmx)


def _all_links(box: Box, tree: SnapshotTree, vmx: VmxDict, extra: list[Any]) -> list[str]:
    """Every disk file reachable from the tree, the .vmx and `extra`, parents included."""
    out: list[str] = []
    seen: set[str] = set()
    starts = [Path(x) for x in _referenced_links(box, tree, vmx)] + [Path(x) for x in extra]
    for start in starts:
        path: Path | None = start
        while path is not None:
            real = os.path.realpath(path)
            if real in seen:
                break
            seen.add(real)
            out.append(real)
            try:
                path = _parent_link(Path(real))
            except BoiteError:
                path = None
    return out


def _rename_link(box: Box, tree: SnapshotTree, vmx: VmxDict, old: str, new: str) -> None:
    """Every reference to the link `old` (snapshot disks, the .vmx) names `new` instead."""
    new_name = _name_in_box(box, Path(new))
    for s in tree.snapshots.values():
        for d in s.disks:
            if os.path.realpath(box.disk_path(d.file_name)) == old:
                d.file_name = new_name
    for node, f in snapshot_disks(BoxConfig(vmx), str(box.vmx_path)):
        if os.path.realpath(box.disk_path(f)) == old:
            vmx[f"{node}.fileName"] = new_name


# -- suspend ---------------------------------------------------------------------------------


def _drop_suspend_keys(vmx: VmxDict) -> None:
    for key in ("checkpoint.vmState", "checkpoint.vmState.readOnly"):
        if key in vmx:
            del vmx[key]


def _suspend_files(box: Box) -> list[str]:
    """The suspend state files the .vmx names (a .vmss and its .vmem), if any: files
    boite made in the box (BoxPathError otherwise)."""
    state = box.vmx.get("checkpoint.vmState", "")
    if not state or not state.lower().endswith(".vmss"):
        return []
    return _state_files(box, state)


def _state_files(box: Box, state: str) -> list[str]:
    """A used-up suspend state (.vmss and .vmem) to delete: checked like every name."""
    files = [state, str(Path(state).with_suffix(".vmem"))]
    for f in files:
        paths.owned(box.dir, f, source=str(box.vmx_path), key="checkpoint.vmState")
    return files


def suspend_paths(box: Box) -> tuple[Path, Path]:
    return box.dir / f"{box.name}.vmss", box.dir / f"{box.name}.vmem"


def write_suspend_state(box: Box, machine: MachineState, *, lock_held: bool = True) -> Path:
    """Save a paused machine as NAME.vmss + NAME.vmem and point the .vmx at it (the VMM then
    powers off); journaled like every snapshot operation, so a crash leaves either no
    suspend state or a complete one the .vmx names."""
    from boite.box.checkpoint import write_checkpoint

    vmss, vmem = suspend_paths(box)
    with _Locked(box, lock_held):
        recover(box)
        op = _Operation(box, "suspend", [vmss.name, vmem.name])
        try:
            write_checkpoint(vmss, vmem, machine.cpu_states, machine.memory,
                             machine.device_state, meta=machine.meta)  # fmt: skip
            _step()
            vmx = VmxDict.parse(box.vmx.to_bytes(), str(box.vmx_path))
            _drop_suspend_keys(vmx)
            vmx["checkpoint.vmState"] = vmss.name
        except BaseException:
            op.abort()
            raise
        op.commit(vmx, None)
    return vmss


def resume_state(box: Box) -> Path | None:
    """The checkpoint `start` must resume from: a suspend state, or the memory snapshot a
    revert went back to. None for a cold boot."""
    state = box.vmx.get("checkpoint.vmState", "")
    if not state:
        return None
    path = paths.inside(box.dir, state, source=str(box.vmx_path), key="checkpoint.vmState")
    if not path.exists():
        raise SnapshotError(
            f"{box.vmx_path}: checkpoint.vmState names {state}, which does not exist; "
            "remove the key to boot the box cold"
        )
    return path


def resumed(box: Box, *, lock_held: bool = True) -> None:
    """The VMM resumed from `resume_state`: a suspend state is used up (removed, as VMware
    does); a snapshot's state stays for the next revert."""
    state = box.vmx.get("checkpoint.vmState", "")
    if not state:
        return
    read_only = box.vmx.get("checkpoint.vmState.readOnly", "").upper() == "TRUE"
    with _Locked(box, lock_held):
        vmx = VmxDict.parse(box.vmx.to_bytes(), str(box.vmx_path))
        _drop_suspend_keys(vmx)
        delete = [] if read_only else _state_files(box, state)
        _Operation(box, "resume", []).commit(vmx, None, delete=delete)


# -- looking at the tree ---------------------------------------------------------------------


def tree_as_dict(box: Box) -> dict[str, Any]:
    tree = load_tree(box)

    def node(s: Snapshot) -> dict[str, Any]:
        return {
            "uid": s.uid,
            "name": s.display_name,
            "description": s.description,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.create_time)),
            "file": s.filename,
            "memory": (box.dir / Path(s.filename).with_suffix(".vmem")).exists(),
            "disks": [{"node": d.node, "fileName": d.file_name} for d in s.disks],
            "current": s.uid == tree.current,
            "children": [node(c) for c in tree.children(s.uid)],
        }

    return {
        "box": box.name,
        "current": tree.current,
        "snapshots": [node(s) for s in tree.children(None)],
        "disks": [{"node": n, "fileName": f} for n, f in snapshot_disks(box.config)],
        "suspended": box.vmx.get("checkpoint.vmState") or None,
    }


def render_tree(data: dict[str, Any]) -> str:
    """The tree as text, one snapshot a line; `you are here` hangs from the current one."""
    lines = [data["box"]]
    here = "└─ ▶ you are here"

    def walk(nodes: list[dict[str, Any]], prefix: str) -> None:
        for i, n in enumerate(nodes):
            last = i == len(nodes) - 1
            extra = [here] if n["current"] else []
            mark = " [memory]" if n["memory"] else ""
            desc = f" — {n['description']}" if n["description"] else ""
            lines.append(
                f"{prefix}{'└─' if last else '├─'} {n['name']} (#{n['uid']}, {n['created']}){mark}{desc}"
            )
            child_prefix = prefix + ("   " if last else "│  ")
            if extra:
                tail = not n["children"]
                lines.append(child_prefix + (here if tail else "├─ ▶ you are here"))
            walk(n["children"], child_prefix)

    if data["current"] is None:
        lines.append(here)
    walk(data["snapshots"], "")
    if not data["snapshots"]:
        lines.append("(no snapshots)")
    if data.get("suspended"):
        lines.append(f"(the next start resumes from {data['suspended']})")
    return "\n".join(lines)


def check_snapshot_tree(box: Box) -> list[Problem]:
    """Everything wrong with a box's snapshots: the .vmsd itself, missing files, CID chains
    that do not hold, and a .vmx that does not hang from the current snapshot."""
    from boite.box.checkpoint import Checkpoint
    from boite.disk import disk_info

    problems: list[Problem] = []
    vmsd_name = box.vmsd_path.name
    record = None
    try:
        record = _read_journal(box)
    except SnapshotError as exc:
        problems.append(Problem(journal_path(box).name, "damaged", "no journal", str(exc)))
    if record is not None:
        problems.append(
            Problem(
                journal_path(box).name,
                f"{record.get('op')} ({record['phase']})",
                "no interrupted operation",
                "a snapshot operation was interrupted; any `boite snapshots` finishes or undoes it",
            )
        )
    try:
        tree = load_tree(box)
    except BoiteError as exc:
        return [*problems, Problem(vmsd_name, "", "a readable snapshot tree", str(exc))]

    def disk_problem(key: str, file_name: str, expect_parent: str | None) -> None:
        path = box.disk_path(file_name)
        if not Path(path).exists():
            problems.append(Problem(key, file_name, "an existing disk", f"{path} does not exist"))
            return
        try:
            info = disk_info(path)
        except BoiteError as exc:
            problems.append(Problem(key, file_name, "a readable disk", str(exc)))
            return
        if not info.chain_ok:
            problems.append(
                Problem(key, file_name, "a CID chain that holds", str(info.chain_error))
            )
            return
        if expect_parent is not None:
            want = os.path.realpath(box.disk_path(expect_parent))
            chain = [os.path.realpath(c["path"]) for c in info.chain[1:]]
            if want not in chain:
                problems.append(
                    Problem(
                        key,
                        file_name,
                        f"a delta of {expect_parent}",
                        f"{file_name} does not descend from {expect_parent}, the link its "
                        "snapshot froze",
                    )
                )

    for s in tree.snapshots.values():
        where = f"{vmsd_name}: snapshot #{s.uid} ({s.display_name})"
        if s.filename:
            vmsn = box.dir / s.filename
            if not vmsn.exists():
                problems.append(
                    Problem(
                        where + " filename",
                        s.filename,
                        "an existing .vmsn",
                        f"{vmsn} does not exist",
                    )
                )
            else:
                try:
                    ckpt = Checkpoint.read(vmsn)
                    if "memory" in ckpt.groups:
                        vmem = vmsn.with_suffix(".vmem")
                        if not vmem.exists():
                            problems.append(
                                Problem(
                                    where,
                                    s.filename,
                                    "its .vmem beside it",
                                    f"{vmem} does not exist",
                                )
                            )
                except CheckpointError as exc:
                    problems.append(
                        Problem(where + " filename", s.filename, "a valid checkpoint", str(exc))
                    )
        parent = tree.snapshots.get(s.parent) if s.parent is not None else None
        for d in s.disks:
            expect = None
            if parent is not None:
                expect = next((p.file_name for p in parent.disks if p.node == d.node), None)
            disk_problem(f"{where} {d.node}", d.file_name, expect)
    current = tree.snapshots.get(tree.current) if tree.current is not None else None
    try:
        vmx_disks = snapshot_disks(box.config, str(box.vmx_path))
    except BoiteError as exc:
        return [*problems, Problem(box.vmx_path.name, "", "snapshottable disks", str(exc))]
    for node, f in vmx_disks:
        expect = None
        if current is not None:
            expect = next((d.file_name for d in current.disks if d.node == node), None)
        disk_problem(f"{box.vmx_path.name}: {node}.fileName", f, expect)
        if expect is not None and os.path.realpath(box.disk_path(f)) == os.path.realpath(
            box.disk_path(expect)
        ):
            problems.append(
                Problem(
                    f"{box.vmx_path.name}: {node}.fileName",
                    f,
                    "a child of the frozen link",
                    f"the .vmx writes to {f}, which snapshot #{current.uid} froze",  # type: ignore[union-attr]
                )
            )
    if current is not None:
        nodes = {n for n, _ in vmx_disks}
        for d in current.disks:
            if d.node not in nodes:
                problems.append(
                    Problem(
                        f"{vmsd_name}: snapshot #{current.uid}",
                        d.node,
                        "a disk in the .vmx",
                        f"the current snapshot has disk {d.node}, the .vmx has none there",
                    )  # fmt: skip
                )
    state = box.vmx.get("checkpoint.vmState")
    real = None
    if state:
        with contextlib.suppress(BoiteError):  # a name that leaves the box: Box.check says so
            real = paths.inside(box.dir, state, source=str(box.vmx_path), key="checkpoint.vmState")
    if state and real is not None and not real.exists():
        problems.append(
            Problem(
                f"{box.vmx_path.name}: checkpoint.vmState",
                state,
                "an existing state file",
                f"{box.dir / state} does not exist",
            )
        )
    return problems


# -- a running box: what the VMM calls ---------------------------------------------------
#
# Disks are found where the machine's devices keep them: an `image` (a BlockImage) on a
# device, on a virtio transport's `backend`, or on an ATA channel's `drives`. A snapshot
# flushes each, freezes its link, and swaps in the new delta link (the guest is paused).


def _wait_paused(vmm: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while vmm.state.value != "paused":
        if vmm.state.value in ("stopped", "stopping") or time.monotonic() > deadline:
            raise SnapshotError(f"{vmm.name}: the VMM did not pause ({vmm.state.value})")
        time.sleep(0.002)


class _Paused:
    """Pause a running VMM for the duration of a `with` block (no-op if already paused).
    It resumes only a guest it paused and that is still paused: a stop or a restart that
    came meanwhile wins."""

    def __init__(self, vmm: Any) -> None:
        self.vmm = vmm
        self.was_running = False

    def __enter__(self) -> _Paused:
        if self.vmm.state.value == "running":
            self.vmm.pause()
            self.was_running = True
        _wait_paused(self.vmm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.was_running and self.vmm.state.value == "paused":
            self.vmm.resume()


def capture_machine(vmm: Any) -> MachineState:
    """The state of a paused VMM's machine: vCPUs, devices, and (by reference) its RAM."""
    machine = vmm.machine
    if machine is None:
        raise SnapshotError(f"{vmm.name}: no machine is powered on")
    return MachineState(
        cpu_states=vmm.accel.save_cpu_state(),
        memory=machine.memory,
        device_state=machine.save_device_state(),
        meta={"accelerator": vmm.accel.name, "vcpus": machine.num_vcpus},
    )


def disk_holders(machine: Any) -> list[Any]:
    """Every object among the machine's devices that holds a disk as `.image`."""
    from boite.disk.base import BlockImage

    holders: list[Any] = []
    for dev in machine.devices.values():
        for obj in (dev, getattr(dev, "backend", None), *(getattr(dev, "drives", None) or ())):
            image = getattr(obj, "image", None) if obj is not None else None
            if isinstance(image, BlockImage) and all(obj is not h for h in holders):
                holders.append(obj)
    return holders


def _flush_disks(machine: Any) -> None:
    for holder in disk_holders(machine):
        holder.image.flush()


def _holders_by_node(vmm: Any, box: Box) -> list[tuple[Any, str]]:
    """The disk holders of the running machine, each with the .vmx slot it serves."""
    nodes = {
        os.path.realpath(box.disk_path(f)): node
        for node, f in snapshot_disks(box.config, str(box.vmx_path))
    }
    found = []
    for holder in disk_holders(vmm.machine):
        path = getattr(holder.image, "path", None)
        if path is not None and os.path.realpath(path) in nodes:
            found.append((holder, nodes[os.path.realpath(path)]))
    return found


def _repoint_disks(holders: list[tuple[Any, str]], box: Box) -> None:
    """Move each device onto the link its slot names now (a snapshot made a new delta, a
    delete consolidated the running delta into its parent). The guest is paused and the
    disks flushed."""
    from boite.disk import open_disk

    for holder, node in holders:
        target = os.path.realpath(box.disk_path(box.vmx[f"{node}.fileName"]))
        if os.path.realpath(holder.image.path) == target:
            continue
        old = holder.image
        holder.image = open_disk(target)
        old.close()


def snapshot_running(
    vmm: Any, box: Box, name: str, description: str = "", memory: bool = True
) -> Snapshot:
    """Snapshot a running box from inside its VMM: pause, flush the disks, save vCPUs,
    devices and RAM (with `memory`), freeze the disks, move the devices onto the new
    links, resume. The caller holds the VMM's operation lock."""
    with _Paused(vmm):
        moving = _holders_by_node(vmm, box)
        _flush_disks(vmm.machine)
        state = capture_machine(vmm) if memory else None
        snap = take_snapshot(box, name, description, machine=state, lock_held=True)
        _repoint_disks(moving, box)
        return snap


def revert_running(vmm: Any, box: Box, name: str) -> tuple[Snapshot, bool]:
    """Revert a running box, as VMware does: the machine restarts from the snapshot, and
    a memory snapshot's guest resumes where it was (a disk-only one boots again). Returns
    the snapshot and whether its memory state was resumed."""
    with _Paused(vmm) as paused:
        _flush_disks(vmm.machine)
        snap = revert_snapshot(box, name, lock_held=True)
        state = resume_state(box)

        def restore(machine: Any, accel: Any) -> None:
            assert state is not None
            restore_machine(machine, accel, state)

        vmm.rebuild(restore if state is not None else None)
        paused.was_running = False  # it runs again, rebuilt
    if state is not None:
        resumed(box)
        tools = getattr(vmm, "guest_tools", None)
        if tools is not None:  # the guest's clock is the snapshot's: set it again
            tools.resync()
    return snap, state is not None


def delete_snapshot_running(vmm: Any, box: Box, name: str) -> Snapshot:
    """Delete a snapshot of a running box: consolidation may fold the running delta into
    its parent, so the guest is paused and its disks follow the new names."""
    with _Paused(vmm):
        moving = _holders_by_node(vmm, box)
        _flush_disks(vmm.machine)
        snap = delete_snapshot(box, name, lock_held=True)
        _repoint_disks(moving, box)
        return snap


def suspend_running(vmm: Any, box: Box) -> Path:
    """Write NAME.vmss + NAME.vmem from a running box's VMM, then power it off."""
    with _Paused(vmm) as paused:
        _flush_disks(vmm.machine)
        path = write_suspend_state(box, capture_machine(vmm))
        paused.was_running = False  # it powers off instead of resuming
    vmm.stop(soft=False)
    return path


def unportable_state(states: list[Any], accel_name: str) -> list[str]:
    """What of the saved vCPU state the accelerator `accel_name` cannot hold. KVM holds
    everything the emulator saves. The emulator is a 32-bit CPU: no long mode, no upper
    register halves, no r8-r15, and it keeps no FPU/SSE image, no LAPIC and none of KVM's
    VM-wide state (those `extra` blobs are ignored; the emulator's PIC/PIT devices carry
    their own state)."""
    from boite.accel.kvm import abi

    if accel_name != "emu":
        return []
    problems = []
    for n, st in enumerate(states):
        if st.efer & (1 << 10):
            problems.append(f"vCPU {n} is in 64-bit long mode (EFER.LMA)")
        wide = [r for r, v in st.gpr.items() if v >> 32] + (["rip"] if st.rip >> 32 else [])
        if wide:
            problems.append(f"vCPU {n} has 64-bit values in {', '.join(wide)}")
        # It runs vCPU 0 only: the others must be waiting for INIT/SIPI (as its
        # load_cpu_state checks too late for a restore that must be all or nothing).
        parked = (st.extra.get("emu") or {}).get("parked") or st.extra.get("kvm_mp_state") in (
            abi.KVM_MP_STATE_UNINITIALIZED, abi.KVM_MP_STATE_INIT_RECEIVED,
        )  # fmt: skip
        if n and not parked:
            problems.append(f"vCPU {n} was running, and the emulator runs only vCPU 0")
    return problems


def restore_machine(machine: Any, accel: Any, path: Path) -> None:
    """Put a checkpoint into a machine whose accelerator was just created, all or nothing:
    the container, every vCPU, the RAM layout and every device's record are checked
    before the first byte of RAM or register changes; then RAM, devices, and the vCPUs
    (after devices, so interrupt state lands on restored devices)."""
    from boite.box.checkpoint import check_resumable, load_saved_memory

    saved = check_resumable(path)  # and its .vmem holds every region
    unportable = unportable_state(saved.cpu_states, getattr(accel, "name", ""))
    if unportable:
        raise CheckpointError(
            f"{path}: the {accel.name} accelerator cannot resume this state: "
            f'{"; ".join(unportable)} (resume it with monitor.virtual_exec = "hardware")'
        )
    if len(saved.cpu_states) != machine.num_vcpus:
        raise CheckpointError(
            f"{path}: {len(saved.cpu_states)} vCPUs saved, the machine has {machine.num_vcpus}"
        )
    ram = sorted((r.gpa, r.size) for r in machine.memory.regions)
    held = sorted((gpa, size) for gpa, _, size in saved.regions)
    if held != ram:
        raise CheckpointError(
            f"{path}: group 'memory' holds RAM {_ranges(held)}, this machine has "
            f"{_ranges(ram)} (was memsize changed?)"
        )
    try:
        records = machine.check_device_state(saved.device_state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    load_saved_memory(saved, path.with_suffix(".vmem"), machine.memory)
    machine.apply_device_state(records)
    accel.load_cpu_state([s.to_dict() for s in saved.cpu_states])


def _ranges(spans: list[tuple[int, int]]) -> str:
    return ", ".join(f"{gpa:#x}+{size:#x}" for gpa, size in spans)


def resuming_accelerator(
    factory: Callable[[], Any], path: Path, on_restored: Callable[[], None] | None = None
) -> Callable[[], Any]:
    """An accelerator factory for `Vmm` whose first machine starts from a checkpoint
    instead of its boot state; later ones (a guest reset) boot normally."""
    pending = [True]

    def make() -> Any:
        accel = factory()
        if not pending[0]:
            return accel
        pending[0] = False
        create = accel.create

        def create_and_restore(machine: Any, config: Any = None) -> None:
            create(machine, config)
            restore_machine(machine, accel, path)
            if on_restored is not None:
                on_restored()

        accel.create = create_and_restore  # this one instance resumes; its class is untouched
        return accel

    return make


RUNNING_COMMANDS = ("snapshot", "suspend", "revert", "delete-snapshot", "clone")


def handle_control_request(vmm: Any, box: Box, request: dict[str, Any]) -> dict[str, Any] | None:
    """The control socket's snapshot commands, for the VMM's ControlServer to delegate to:
    {"cmd": "snapshot", "name", "description", "memory"}, {"cmd": "suspend"},
    {"cmd": "revert", "name"}, {"cmd": "delete-snapshot", "name"}, {"cmd": "clone",
    "dest", "linked", "snapshot"} (boite.clone.clone_box); each may carry
    "wait_s", how long to wait for an operation already running (default 120 s). Returns
    None for any other command. Each runs under the VMM's operation lock."""
    from boite.vmm import OPERATION_WAIT_S

    cmd = request.get("cmd")
    if cmd not in RUNNING_COMMANDS:
        return None
    wait = request.get("wait_s", OPERATION_WAIT_S)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 3600:
        raise SnapshotError(f"wait_s {wait!r}: expected seconds from 0 to 3600")
    name = str(request.get("name", ""))
    what = f"{cmd} {name!r}" if name else cmd
    with vmm.operation.hold(what, wait_s=float(wait)):
        if vmm.state.value not in ("running", "paused"):
            raise SnapshotError(f"{vmm.name} is {vmm.state.value}: {cmd} needs it running")
        vmm.log(f"{what[0].upper()}{what[1:]} requested through the control socket.")
        if cmd == "snapshot":
            snap = snapshot_running(
                vmm, box, name, str(request.get("description", "")),
                memory=bool(request.get("memory", True)),
            )  # fmt: skip
            return {"ok": True, "uid": snap.uid, "name": snap.display_name}
        if cmd == "revert":
            snap, resumed_memory = revert_running(vmm, box, name)
            return {"ok": True, "uid": snap.uid, "name": snap.display_name,
                    "memory": resumed_memory}  # fmt: skip
        if cmd == "delete-snapshot":
            snap = delete_snapshot_running(vmm, box, name)
            return {"ok": True, "uid": snap.uid, "name": snap.display_name}
        if cmd == "clone":  # from a snapshot: its disks stay still under the lock
            from boite.clone import clone_box

            snapshot = request.get("snapshot")
            made = clone_box(
                box, str(request.get("dest", "")), linked=bool(request.get("linked")),
                snapshot=str(snapshot) if snapshot is not None else None,
            )  # fmt: skip
            return {"ok": True, "box": str(made.dir)}
        path = suspend_running(vmm, box)
        return {"ok": True, "file": path.name}


def control_server(vmm: Any, box: Box, path: Path, log: Callable[[str], None] | None = None) -> Any:
    """The VMM's ControlServer, also serving `snapshot` and `suspend` for this box: what
    `boite start` runs so that `boite snapshot` / `boite suspend` reach a running box."""
    from boite.vmm import ControlServer

    class SnapshotControlServer(ControlServer):
        def _handle(self, cmd: Any, request: dict[str, Any]) -> dict[str, Any]:
            reply = handle_control_request(self.vmm, box, request)
            return reply if reply is not None else super()._handle(cmd, request)

    return SnapshotControlServer(vmm, path, log)
