"""Cloning a box, as `vmrun clone SRC DST full|linked [-snapshot=NAME]` does.

A clone is a new machine: a new uuid.bios (and uuid.location), new generated MACs, its
own displayName, no suspend state, no snapshots. Its disks are

- full: a flattened copy of each disk chain (the current state, or as of a snapshot);
- linked: a delta disk per disk whose parent is the source snapshot's frozen link (the
  clone says `boite.allowExternalDisks = "TRUE"`: those parents live in the source). The
  source records the clone under that snapshot (`snapshotN.boite.linkedClones`, a `;`
  list of .vmx paths) and `delete_snapshot` refuses to remove a snapshot that a clone
  still hangs from.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from boite.box import Box
from boite.box.atomic import fsync_dir, write_atomic
from boite.box.config import format_vmware_uuid, generated_mac
from boite.box.vmxdict import VmxDict
from boite.errors import BoxError, SnapshotError

CLONES_KEY = "boite.linkedClones"
# Keys a clone does not inherit: they belong to the source's running or saved state, or
# would make two boxes share a host resource.
_DROPPED_SUFFIXES = (".vnet",)
_DROPPED_KEYS = ("checkpoint.vmstate", "uuid.action", "extendedconfigfile", "nvram")


def linked_clones(snapshot) -> list[str]:
    """The .vmx paths of linked clones that hang from `snapshot` and still exist."""
    value = snapshot.other.get(CLONES_KEY, "")
    return [p for p in value.split(";") if p and Path(p).exists()]


def clone_box(
    source: Box, dest: str | Path, *, linked: bool = False, snapshot: str | None = None
) -> Box:
    from boite.disk import convert_disk, create_child
    from boite.launch import running_control
    from boite.snapshot import load_tree, snapshot_disks

    dest = Path(dest)
    if dest.exists():
        raise BoxError(f"clone: {dest} exists already")
    if linked and snapshot is None:
        raise BoxError(
            "clone --linked needs --snapshot NAME: a linked clone's disks are children of "
            "that snapshot's (read-only) disks"
        )
    tree = load_tree(source)
    snap = tree.find(snapshot) if snapshot is not None else None
    # A VMM runs it (the caller holds the box's operation lock either way: the box lock
    # when it is off, the VMM's when it runs; see launch.clone).
    if snap is None and running_control(source) is not None:
        raise BoxError(
            f"{source.name} is running: clone it from a snapshot (--snapshot NAME), whose "
            "disks no longer change, or stop it first"
        )
    # Which file each disk slot starts from.
    if snap is not None:
        starts = {d.node: d.file_name for d in snap.disks}
    else:
        starts = {d.key: d.file_name for d in source.config.disks if d.file_name}
    if linked:
        # Every linked disk must be a VMDK link of the snapshot.
        covered = {node for node, _ in snapshot_disks(source.config, str(source.vmx_path))}
        missing = [d.key for d in source.config.disks if d.file_name and d.key not in covered]
        if missing:
            raise SnapshotError(
                f"clone --linked: {', '.join(missing)} are not in snapshot {snapshot!r} "
                "(independent or non-VMDK disks): make a full clone"
            )

    name = dest.name
    vmx = VmxDict.parse(source.vmx.to_bytes(), str(source.vmx_path))
    for key in list(vmx):
        folded = key.casefold()
        if folded in _DROPPED_KEYS or folded.endswith(_DROPPED_SUFFIXES):
            del vmx[key]
    uuid_bios = secrets.token_bytes(16)
    vmx["displayName"] = name
    vmx["uuid.bios"] = format_vmware_uuid(uuid_bios)
    vmx["uuid.location"] = format_vmware_uuid(secrets.token_bytes(16))
    for nic in source.config.nics:
        prefix = f"ethernet{nic.index}"
        if (vmx.get(f"{prefix}.addressType") or "generated").lower() != "static":
            offset = int(vmx.get(f"{prefix}.generatedAddressOffset") or 0)
            vmx[f"{prefix}.generatedAddress"] = generated_mac(uuid_bios, offset)
            vmx[f"{prefix}.addressType"] = "generated"

    if linked:
        # Its disks' parents are the source's files, outside this box: say so, as
        # docs/security.md asks of a box that reaches out.
        vmx["boite.allowExternalDisks"] = "TRUE"
    # Built in a hidden staging directory and renamed into place last, so a clone killed
    # half-way leaves no half-made box under the name the user asked for.
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(dest)
    staging = dest.parent / f".{name}.cloning-{os.getpid()}"
    staging.mkdir()
    try:
        for i, (node, file_name) in enumerate(sorted(starts.items())):
            src_path = Path(file_name)
            src_path = src_path if src_path.is_absolute() else source.dir / src_path
            suffix = src_path.suffix if src_path.suffix else ".vmdk"
            new_name = f"{name}{'' if i == 0 else f'-{i}'}{'.vmdk' if linked else suffix}"
            if linked:
                create_child(src_path, staging / new_name)
            else:
                convert_disk(src_path, staging / new_name)
            vmx[f"{node}.fileName"] = new_name
        write_atomic(staging / f"{name}.vmx", vmx.to_bytes())
        fsync_dir(staging)
        if linked and snap is not None:
            # Recorded before the clone exists: a kill in between leaves a record that
            # names no box (linked_clones skips it), never a clone the source forgot.
            _record_clone(source, snap.uid, str(dest.resolve() / f"{name}.vmx"))
        try:
            os.rename(staging, dest)
        except OSError as exc:
            raise BoxError(f"clone: {dest} appeared while the clone was made") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return Box.open(dest)


def _remove_dead_staging(dest: Path) -> None:
    """Staging directories of earlier clones to `dest` whose process is gone (killed)."""
    for leftover in dest.parent.glob(f".{dest.name}.cloning-*"):
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _record_clone(source: Box, uid: int, vmx_path: str) -> None:
    from boite.snapshot import _Locked, load_tree

    with _Locked(source, live_holder_here(source)):
        tree = load_tree(source)
        snap = tree.snapshots[uid]
        clones = linked_clones(snap) + [vmx_path]
        snap.other[CLONES_KEY] = ";".join(dict.fromkeys(clones))
        write_atomic(source.vmsd_path, tree.to_vmsd().to_bytes())


def live_holder_here(box: Box) -> bool:
    """True when a VMM holds the box's lock (it owns the .vmsd then; writing the clone
    record is safe: the VMM does not rewrite the tree unless asked)."""
    from boite.launch import live_holder

    return live_holder(box) is not None
