"""SIGKILL at any moment of a snapshot operation leaves the box as before or as after.

Each operation runs as the real `boite` command in a child process and is killed, first at
every step boundary in turn (the process kills itself there), then at random moments until
BOITE_KILL_SECONDS (20 by default) have passed for the operation. After each kill the next
boite command's recovery runs, and the box must match the state before the operation or
the state after an uninterrupted run: same tree, same data in every snapshot and in the
current state, same files, and `check_snapshot_tree` clean.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from snaptools import box_fixture, digest, write_disk  # noqa: F401 - the `box` fixture

from boite.box import Box
from boite.snapshot import check_snapshot_tree, load_tree, recover, revert_snapshot, take_snapshot

BUDGET = float(os.environ.get("BOITE_KILL_SECONDS", "20"))
MiB = 1 << 20


def fingerprint(box_dir: Path) -> dict:
    box = Box.open(box_dir)
    recover(box)
    box = Box.open(box_dir)
    tree = load_tree(box)
    return {
        "current": tree.current,
        "snapshots": {
            uid: (
                s.display_name,
                s.parent,
                {d.node: digest(box.disk_path(d.file_name)) for d in s.disks},
            )
            for uid, s in tree.snapshots.items()
        },
        "disks": {
            n: digest(box.disk_path(box.vmx[f"{n}.fileName"])) for n in ("scsi0:0", "sata0:1")
        },
        "vmx": {k: box.vmx[k] for k in box.vmx if not k.lower().startswith("checkpoint")},
        # The box lock's own files (NAME.vmx.lck and the per-process file it links from,
        # which a SIGKILL can leave behind) and logs are not the snapshot's business.
        "files": sorted(
            p.name
            for p in box_dir.iterdir()
            if ".lck" not in p.name and not p.name.endswith(".log")
        ),
        "problems": [str(p) for p in check_snapshot_tree(box)],
    }


@pytest.fixture
def template(box: Box) -> Path:
    """A box with a tree: a - b (where the current state hangs), data in every delta."""
    rng = random.Random(7)
    write_disk(box, 0, rng.randbytes(2 * MiB))
    write_disk(box, 0, rng.randbytes(MiB), node="sata0:1")
    take_snapshot(box, "a")
    write_disk(box, MiB, rng.randbytes(MiB))
    take_snapshot(box, "b")
    write_disk(box, 512 * 1024, rng.randbytes(MiB))
    write_disk(box, 0, rng.randbytes(4096), node="sata0:1")
    return box.dir


OPERATIONS = {
    "snapshot": (["snapshot"], ["c"]),
    "revert": (["revert"], ["a"]),
    "delete-consolidate": (["delete-snapshot"], ["b"]),  # b's link has one dependent
    "delete-shared": (["delete-snapshot"], ["a"]),
}


def command(op: str, box_dir: Path) -> list[str]:
    verb, rest = OPERATIONS[op]
    return [*verb, str(box_dir), *rest]


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_kill_anywhere(template: Path, tmp_path: Path, op: str) -> None:
    if op == "delete-shared":
        # Give a two children (b, and a branch) so its frozen link is shared.
        revert_snapshot(Box.open(template), "a")
        write_disk(Box.open(template), 0, b"branch" * 100)
        take_snapshot(Box.open(template), "branch")
    before = fingerprint(template)

    def trial(name: str) -> Path:
        d = tmp_path / name / "vm"
        shutil.copytree(template, d)
        return d

    deadline = time.monotonic() + BUDGET  # step kills and random kills together
    ref = trial("reference")
    t0 = time.monotonic()
    rc, err = _run(ref, op, {"BOITE_SNAPSHOT_STEP_DELAY": "0.02"}, None)
    duration = time.monotonic() - t0
    assert rc == 0, err
    after = fingerprint(ref)
    assert after != before

    seen = {"before": 0, "after": 0}

    def check(d: Path) -> None:
        got = fingerprint(d)
        if got == before:
            seen["before"] += 1
        else:
            diff = {k: (got[k], before[k]) for k in got if got[k] != before[k]}
            assert got == after, f"{d}: neither before nor after; differs from before in {diff}"
            seen["after"] += 1
        shutil.rmtree(d.parent)

    # Every step boundary, deterministically.
    step = 1
    while True:
        d = trial(f"step{step}")
        rc, err = _run(d, op, {"BOITE_SNAPSHOT_KILL_AT_STEP": str(step)}, None)
        check(d)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, err
        step += 1
    assert step > 2 and seen["before"] and seen["after"]

    # Then random moments, for the time budget.
    rng = random.Random(op)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        d = trial(f"random{n}")
        _run(d, op, {"BOITE_SNAPSHOT_STEP_DELAY": "0.02"}, rng.uniform(0, duration * 1.1))
        check(d)
    print(f"{op}: {step} step kills, {n} random kills, outcomes {seen}")


def _run(d: Path, op: str, env: dict[str, str], kill_after: float | None):
    env = dict(os.environ, **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", *command(op, d)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


LIVE = Path(__file__).resolve().parent / "livebox.py"


def live_fingerprint(box_dir: Path) -> dict:
    from boite.box.checkpoint import read_checkpoint

    box = Box.open(box_dir)
    recover(box)
    box = Box.open(box_dir)
    tree = load_tree(box)
    state = box.vmx.get("checkpoint.vmState")
    rbx = []
    for name in [s.filename for s in tree.snapshots.values()] + ([state] if state else []):
        saved = read_checkpoint(box_dir / name)  # complete and loadable, or not there
        rbx.append(saved.cpu_states[0].gpr["rbx"])
        saved.memory.close()
    return {
        "snapshots": sorted(s.display_name for s in tree.snapshots.values()),
        "state": state,
        "rbx": rbx,
        "files": sorted(
            p.name
            for p in box_dir.iterdir()
            if ".lck" not in p.name and not p.name.endswith(".log")
        ),
        "problems": [str(p) for p in check_snapshot_tree(box)],
    }


@pytest.mark.slow
@pytest.mark.parametrize("op", ["snapshot", "suspend"])
def test_kill_a_live_memory_operation(tmp_path: Path, op: str) -> None:
    """A memory snapshot or a suspend of a running guest, killed anywhere: afterwards
    there is no trace of it, or a complete state that loads (the guest had counted to 300)."""
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "emu"
    template = tmp_path / "template" / "live"
    template.parent.mkdir()
    Box.create(template, disk_size=0)
    before = live_fingerprint(template)
    deadline = time.monotonic() + BUDGET / 2  # each try boots a VM: fewer, costlier tries

    def run(name: str, env: dict[str, str], kill_after: float | None) -> tuple[Path, int]:
        d = tmp_path / name / "live"
        shutil.copytree(template, d)
        proc = subprocess.Popen(
            [sys.executable, str(LIVE), str(d), op, accel],
            env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        if kill_after is not None:
            assert proc.stdout is not None
            proc.stdout.readline()  # "paused": the operation starts now
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        return d, proc.returncode

    ref, rc = run("reference", {}, None)
    after = live_fingerprint(ref)
    assert rc == 0 and after != before and after["rbx"] == [300]
    seen = {"before": 0, "after": 0}

    def check(d: Path) -> None:
        got = live_fingerprint(d)
        if got == before:
            seen["before"] += 1
        else:
            assert got == after, f"{d}: neither before nor after: {got}"
            seen["after"] += 1
        shutil.rmtree(d.parent)

    step = 1
    while True:
        d, rc = run(f"step{step}", {"BOITE_SNAPSHOT_KILL_AT_STEP": str(step)}, None)
        check(d)
        if rc == 0:
            break
        step += 1
    assert step > 2 and seen["before"] and seen["after"]
    rng = random.Random(op)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        d, _ = run(f"random{n}", {"BOITE_SNAPSHOT_STEP_DELAY": "0.02"}, rng.uniform(0, 0.3))
        check(d)
    print(f"live {op}: {step} step kills, {n} random kills, outcomes {seen}")
