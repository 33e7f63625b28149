"""SIGKILL at random moments of every operation on a box, then `boite start` first.

For a running box the operation runs in its VMM (snapshot, revert, delete-snapshot,
suspend): the VMM is killed while it works. For `disk grow`, `disk compact` and `clone`
(full and linked) the command itself is killed on a stopped box. After each kill the very next command is `boite start`, which must
start the box; then every snapshot must hold exactly the data it held before, and the
current state must be the one from before the operation or the one after it: 0 broken
boxes, 0 lost deltas. BOITE_OPS_KILLS kills per operation (20 by default: 160 in all).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opstools import (
    boite,
    current_digest,
    make_box,
    snapshot_digests,
    start_detached,
    stop_hard,
)

from boite.box.box import Box
from boite.disk import open_disk
from boite.snapshot import check_snapshot_tree

KILLS = int(os.environ.get("BOITE_OPS_KILLS", "20"))
# A pause between the journal's steps inside the VMM widens the windows a kill can hit.
STEP_DELAY = {"BOITE_SNAPSHOT_STEP_DELAY": "0.05"}


def _write(box_dir: Path, data: bytes, offset: int) -> None:
    box = Box.open(box_dir)
    with open_disk(box.disk_path(box.vmx["scsi0:0.fileName"])) as d:
        d.write(offset, data)
        d.flush()


def _state(box_dir: Path) -> tuple[dict[str, str], str]:
    box = Box.open(box_dir)
    assert check_snapshot_tree(box) == [], box_dir
    for name in {box.vmx["scsi0:0.fileName"]}:
        assert Path(box.disk_path(name)).exists()
    return snapshot_digests(box_dir), current_digest(box_dir)


def _run_killed(args: list[str], victim_pid: int | None, after: float) -> None:
    """Run `boite ARGS`, SIGKILL the VMM (or the command itself) `after` seconds in."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        pass
    for pid in (victim_pid, proc.pid):
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(60)
    if victim_pid is not None:
        deadline = time.monotonic() + 30
        while _alive(victim_pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()


def _timed(args: list[str]) -> float:
    t0 = time.monotonic()
    r = boite(*args)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("op", ["snapshot", "revert", "delete-snapshot", "suspend"])
def test_kill_the_vmm_during_a_live_operation_then_start(tmp_path, op):
    rng = random.Random(op)
    box_dir = make_box(tmp_path, "k", "mb_spin")
    _write(box_dir, rng.randbytes(256 << 10), 0)
    assert boite("snapshot", box_dir, "base").returncode == 0
    _write(box_dir, rng.randbytes(256 << 10), 128 << 10)
    assert boite("snapshot", box_dir, "mid").returncode == 0
    _write(box_dir, rng.randbytes(64 << 10), 512 << 10)
    pid = start_detached(box_dir, env=STEP_DELAY)
    seen = {"before": 0, "after": 0}
    duration = None
    try:
        for n in range(KILLS + 1):
            if op == "delete-snapshot":  # a snapshot whose delta the running one hangs on
                assert boite("snapshot", box_dir, f"d{n}").returncode == 0
            snaps, current = _state(box_dir)
            target = "base" if n % 2 else "mid"  # reverts alternate: each one changes data
            args = {
                "snapshot": ["snapshot", box_dir, f"s{n}"],
                "revert": ["revert", box_dir, target],
                "delete-snapshot": ["delete-snapshot", box_dir, f"d{n}"],
                "suspend": ["suspend", box_dir],
            }[op]
            after = {
                "snapshot": ({**snaps, f"s{n}": current}, current),
                "revert": (snaps, snaps[target]),
                "delete-snapshot": ({k: v for k, v in snaps.items() if k != f"d{n}"}, current),
                "suspend": (snaps, current),
            }[op]
            if duration is None:  # the first run is whole: how long an operation takes
                duration = _timed(args)
                got = _state(box_dir) if op != "suspend" else None
                if op == "suspend":
                    pid = start_detached(box_dir, env=STEP_DELAY)  # resumes
                    got = _state(box_dir)
                assert got == after
                continue
            _run_killed(args, pid, rng.uniform(0.2, duration * 1.2))
            # The first command after the kill: the box must start.
            r = boite("start", box_dir, "--detach", env=STEP_DELAY)
            assert r.returncode == 0, f"kill {n}: the box does not start: {r.stderr}"
            pid = int(r.stdout.split("(pid ")[1].split(")")[0])
            got = _state(box_dir)
            if op == "suspend":  # the disks are the same; the start says what it resumed
                resumed = "Resuming from k.vmss" in (box_dir / "vmware.log").read_text()
                assert got == after
                seen["after" if resumed else "before"] += 1
            elif got == (snaps, current):
                seen["before"] += 1
            else:
                assert got == after, f"kill {n}: neither before nor after the {op}"
                seen["after"] += 1
    finally:
        stop_hard(box_dir)
    assert boite("check", box_dir).returncode == 0
    print(f"{op}: {KILLS} kills of the VMM, outcomes {seen}")
    assert sum(seen.values()) == KILLS


@pytest.mark.slow
def test_kill_disk_grow_then_start(tmp_path):
    rng = random.Random(5)
    box_dir = make_box(tmp_path, "g", "mb_spin")
    _write(box_dir, rng.randbytes(1 << 20), 0)
    disk = box_dir / "g.vmdk"
    size = 8 << 20
    duration = _timed(["disk", "grow", "-s", str(size + (1 << 20)), disk])
    size += 1 << 20
    seen = {"before": 0, "after": 0}
    for n in range(KILLS):
        before = current_digest(box_dir)
        _run_killed(["disk", "grow", "-s", str(size + (1 << 20)), disk], None,
                    rng.uniform(0.1, duration * 1.2))  # fmt: skip
        r = boite("start", box_dir, "--detach")
        assert r.returncode == 0, f"kill {n}: the box does not start: {r.stderr}"
        stop_hard(box_dir)
        with open_disk(disk, read_only=True) as d:
            grown = d.size
            head = d.read(0, size)
        assert grown in (size, size + (1 << 20)), grown
        # What the guest saw before the grow is all there (the grown tail reads zero).
        assert hashlib.sha256(head).hexdigest() == before, f"kill {n}: data changed"
        assert boite("check", box_dir).returncode == 0
        seen["after" if grown > size else "before"] += 1
        size = grown
    print(f"disk grow: {KILLS} kills, outcomes {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("linked", [False, True], ids=["full", "linked"])
def test_kill_clone_then_start_both(tmp_path, linked):
    """A killed `clone` leaves the source as it was and either no clone or a whole one
    (never a half-made box under the new name); a linked clone that exists is recorded in
    the source, so the snapshot it hangs from cannot be deleted under it."""
    rng = random.Random(11 + linked)
    src = make_box(tmp_path, "src", "mb_spin", disk_size=32 << 20)
    _write(src, rng.randbytes(8 << 20), 0)
    assert boite("snapshot", src, "base").returncode == 0
    _write(src, rng.randbytes(1 << 20), 4 << 20)
    snaps, current = _state(src)
    extra = ["--linked", "--snapshot", "base"] if linked else []
    duration = _timed(["clone", src, tmp_path / "first", *extra])
    seen = {"none": 0, "whole": 0}
    for n in range(KILLS):
        dest = tmp_path / f"c{n}"
        _run_killed(["clone", src, dest, *extra], None, rng.uniform(0.05, duration * 1.2))
        assert _state(src) == (snaps, current), f"kill {n}: the source changed"
        if dest.exists():
            want = snaps["base"] if linked else current
            assert current_digest(dest) == want, f"kill {n}: the clone holds other data"
            r = boite("start", dest, "--detach")
            assert r.returncode == 0, f"kill {n}: the clone does not start: {r.stderr}"
            stop_hard(dest)
            seen["whole"] += 1
        else:
            # The same clone again works: the killed one's leftovers are no obstacle.
            assert boite("clone", src, dest, *extra).returncode == 0
            seen["none"] += 1
        assert not list(tmp_path.glob(f".c{n}.cloning-*")) or not dest.exists()
    r = boite("start", src, "--detach")
    assert r.returncode == 0, r.stderr
    stop_hard(src)
    if linked:
        r = boite("delete-snapshot", src, "base")
        assert r.returncode != 0 and "clone" in r.stderr.lower(), r.stderr
    print(f"clone ({'linked' if linked else 'full'}): {KILLS} kills, outcomes {seen}")


@pytest.mark.slow
def test_kill_disk_compact_then_start(tmp_path):
    rng = random.Random(13)
    box_dir = make_box(tmp_path, "c", "mb_spin", disk_size=32 << 20)
    disk = box_dir / "c.vmdk"
    seen = {"done": 0, "killed": 0}
    for n in range(KILLS):
        # Data, then zeroes over part of it: grains compact can drop.
        _write(box_dir, rng.randbytes(6 << 20), 0)
        _write(box_dir, bytes(3 << 20), rng.randrange(0, 3) << 20)
        before = current_digest(box_dir)
        if n == 0:
            duration = _timed(["disk", "compact", disk])
            assert current_digest(box_dir) == before
            continue
        _run_killed(["disk", "compact", disk], None, rng.uniform(0.05, duration * 1.2))
        r = boite("start", box_dir, "--detach")
        assert r.returncode == 0, f"kill {n}: the box does not start: {r.stderr}"
        stop_hard(box_dir)
        assert current_digest(box_dir) == before, f"kill {n}: data changed"
        assert boite("check", box_dir).returncode == 0
        seen["killed"] += 1
    print(f"disk compact: {KILLS - 1} kills, outcomes {seen}")
