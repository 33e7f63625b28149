"""Snapshot metadata that names files outside the box (issue 14, items 2 and 4): a `.vmsd`,
a `.vmx` or a shipped crash journal must never make boite delete, rename or truncate a
file outside the box directory; recovery runs before every verb that opens a box."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from snaptools import DISK

from boite.box import Box
from boite.box.paths import BoxPathError
from boite.disk import create_disk
from boite.snapshot import delete_snapshot, journal_path, revert_snapshot, take_snapshot

TIMEOUT = 120


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host file outside the box that nothing may touch."""
    v = tmp_path / "victim"
    v.mkdir()
    create_disk(v / "precious.vmdk", 1 << 20, "thin")
    (v / "precious.vmss").write_bytes(b"user data")
    (v / "precious.vmsn").write_bytes(b"user data")
    return v


def _untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == [
        "precious.vmdk", "precious.vmsn", "precious.vmss",
    ]  # fmt: skip
    assert (victim / "precious.vmss").read_bytes() == b"user data"


def _one_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.fixture
def snapped(tmp_path: Path) -> Box:
    box = Box.create(tmp_path / "vm", disk_size=DISK)
    take_snapshot(box, "a")
    return Box.open(box.dir)


def _edit_vmsd(box: Box, old: str, new: str) -> None:
    text = box.vmsd_path.read_text()
    assert old in text
    box.vmsd_path.write_text(text.replace(old, new))


def test_vmsd_snapshot_filename_outside_is_refused(snapped, victim, boite_cli):
    _edit_vmsd(snapped, 'filename = "vm-Snapshot1.vmsn"', f'filename = "{victim}/precious.vmsn"')
    for args in (("delete-snapshot", snapped.dir, "a"), ("revert", snapped.dir, "a")):
        r = boite_cli(*args, timeout=TIMEOUT)
        _one_line(r, "snapshot", "filename", "leaves the box")
    _untouched(victim)
    _edit_vmsd(snapped, f"{victim}/precious.vmsn", "../victim/precious.vmsn")
    with pytest.raises(BoxPathError, match="leaves the box"):
        delete_snapshot(Box.open(snapped.dir), "a")
    _untouched(victim)


def test_vmsd_snapshot_disk_outside_is_refused(snapped, victim, boite_cli):
    _edit_vmsd(snapped, 'disk0.fileName = "vm.vmdk"', f'disk0.fileName = "{victim}/precious.vmdk"')
    r = boite_cli("delete-snapshot", snapped.dir, "a", timeout=TIMEOUT)
    _one_line(r, "disk0.fileName", "leaves the box", "boite.allowExternalDisks")
    r = boite_cli("snapshots", snapped.dir, timeout=TIMEOUT)
    _one_line(r, "disk0.fileName")
    _untouched(victim)


def test_vmx_checkpoint_state_outside_is_never_deleted(snapped, victim, boite_cli):
    snapped.vmx["checkpoint.vmState"] = str(victim / "precious.vmss")
    snapped.save()
    r = boite_cli("revert", snapped.dir, "a", timeout=TIMEOUT)
    _one_line(r, "checkpoint.vmState", "leaves the box")
    _untouched(victim)
    snapped.vmx["checkpoint.vmState"] = "../victim/precious.vmss"
    snapped.save()
    with pytest.raises(BoxPathError, match="checkpoint.vmState"):
        revert_snapshot(Box.open(snapped.dir), "a")
    _untouched(victim)


def test_a_delta_linked_out_of_the_box_is_not_deleted(snapped, victim):
    # The current delta replaced by a link to a disk elsewhere: revert drops the current
    # state's deltas, but never through a link that leaves the box.
    current = snapped.dir / snapped.vmx["scsi0:0.fileName"]
    shutil.copy(current, victim / "precious.vmdk")
    current.unlink()
    current.symlink_to(victim / "precious.vmdk")
    with pytest.raises(BoxPathError, match="leaves the box"):
        revert_snapshot(Box.open(snapped.dir), "a")
    assert (victim / "precious.vmdk").exists()


def _journal(box: Box, record: dict) -> None:
    full = {"op": "test", "created": [], "delete": [], "consolidate": []} | record
    journal_path(box).write_text(json.dumps(full))


def _commit_record(box: Box, **extra) -> dict:
    return {
        "phase": "commit",
        "new": {"vmx": base64.b64encode(box.vmx_path.read_bytes()).decode(), "vmsd": None},
        **extra,
    }


@pytest.mark.parametrize(
    "record",
    [
        {"phase": "prepare", "created": ["../victim/precious.vmdk"]},
        {"phase": "prepare", "created": ["VICTIM/precious.vmss"]},
        {"phase": "commit-delete", "delete": ["VICTIM/precious.vmsn"]},
        {"phase": "commit-delete", "delete": ["../victim/precious.vmdk"]},
        {"phase": "commit-consolidate",
         "consolidate": [{"child": "VICTIM/precious.vmdk", "parent": "vm.vmdk", "reparent": []}]},
        {"phase": "prepare", "created": ["vm.vmx"]},
        {"phase": "prepare", "created": "vm.vmdk"},
        {"phase": "commit-new", "new": {"vmx": "not base64!", "vmsd": None}},
        {"phase": "prepare", "op": "x\u001b[2J\nrm -rf"},
    ],
)  # fmt: skip
def test_a_hostile_journal_is_refused_before_replay(snapped, victim, boite_cli, record):
    record = json.loads(json.dumps(record).replace("VICTIM", str(victim)))
    phase = record.pop("phase")
    if phase.startswith("commit"):
        record = _commit_record(snapped) | record
    else:
        record["phase"] = phase
    vmx_before = snapped.vmx_path.read_bytes()
    _journal(snapped, record)
    for verb in ("snapshots", "info", "start"):
        r = boite_cli(verb, snapped.dir, timeout=TIMEOUT)
        _one_line(r, snapped.name + ".boite-journal")
    _untouched(victim)
    assert snapped.vmx_path.read_bytes() == vmx_before
    assert (snapped.dir / "vm.vmdk").exists() and journal_path(snapped).exists()


def test_start_finishes_an_interrupted_snapshot_first(tmp_path, boite_cli):
    box = Box.create(tmp_path / "vm", memsize_mb=16, disk_size=DISK)
    # Killed right after the commit record was written (step 4: prepare, .vmsn, child,
    # commit): the .vmx still names the old link.
    env = dict(os.environ, BOITE_SNAPSHOT_KILL_AT_STEP="4")
    r = subprocess.run([sys.executable, "-m", "boite", "snapshot", str(box.dir), "a"],
                       env=env, capture_output=True, timeout=TIMEOUT)  # fmt: skip
    assert r.returncode == -9
    assert json.loads(journal_path(box).read_text())["phase"] == "commit"
    assert Box(box.vmx_path).vmx["scsi0:0.fileName"] == "vm.vmdk"
    r = boite_cli("start", box.dir, "--accel", "emu", timeout=TIMEOUT)
    # No kernel: start stops there, but only after it finished the snapshot.
    _one_line(r, "boite.kernel")
    assert not journal_path(box).exists()
    assert Box(box.vmx_path).vmx["scsi0:0.fileName"] == "vm-000001.vmdk"


def test_taking_the_lock_recovers_first(tmp_path):
    box = Box.create(tmp_path / "vm", memsize_mb=16, disk_size=DISK)
    take_snapshot(box, "a")
    opened = Box.open(box.dir)  # opened before the crash, as a start that waited would be
    vmsd = opened.vmsd_path.read_bytes().replace(b'displayName = "a"', b'displayName = "b"')
    _journal(opened, _commit_record(opened) | {"new": {
        "vmx": base64.b64encode(opened.vmx_path.read_bytes()).decode(),
        "vmsd": base64.b64encode(vmsd).decode(),
    }})  # fmt: skip
    with opened.acquire_lock(register=False):
        assert not journal_path(opened).exists()
        assert b'displayName = "b"' in opened.vmsd_path.read_bytes()


def test_a_live_operation_is_not_recovered_by_another_command(tmp_path, boite_cli):
    box = Box.create(tmp_path / "vm", memsize_mb=16, disk_size=DISK)
    # This process holds the lock, as a VMM in the middle of a snapshot would.
    with box.acquire_lock(register=False):
        _journal(box, {"phase": "prepare", "created": ["vm-000001.vmdk"]})
        r = boite_cli("info", box.dir, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert journal_path(box).exists()
    assert Box.open(box.dir).recovered == "undid an interrupted test (it had not committed)"
    assert not journal_path(box).exists()


def test_check_lists_what_a_hostile_vmsd_names(snapped, victim, boite_cli):
    _edit_vmsd(snapped, 'disk0.fileName = "vm.vmdk"', f'disk0.fileName = "{victim}/precious.vmdk"')
    _edit_vmsd(snapped, 'filename = "vm-Snapshot1.vmsn"', 'filename = "../victim/precious.vmsn"')
    r = boite_cli("check", snapped.dir, timeout=TIMEOUT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "snapshot0.disk0.fileName" in r.stdout and "snapshot0.filename" in r.stdout, r.stdout
    _untouched(victim)
