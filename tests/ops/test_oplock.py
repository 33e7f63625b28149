"""Issue 14 item 1 and issue 13: operations on a box's files never interleave.

A running box's VMM serializes snapshot, revert, delete-snapshot, suspend and its own
power-off under one operation lock; a stopped box's operations hold the box lock and a
second command waits for it. Each test runs the real `boite` command against a box whose
guest is a bare-metal program from tests/guests.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from opstools import (
    boite,
    current_digest,
    make_box,
    snapshot_digests,
    start_detached,
    stop_hard,
    wait_for,
)

from boite.box.box import Box
from boite.disk import open_disk
from boite.snapshot import check_snapshot_tree, load_tree

PAIRS = int(os.environ.get("BOITE_OPLOCK_PAIRS", "20"))


@pytest.fixture
def spin_box(tmp_path):
    box_dir = make_box(tmp_path, "spin", "mb_spin")
    yield box_dir
    stop_hard(box_dir)


def _snapshot_pairs(box_dir: Path, pairs: int) -> list[subprocess.CompletedProcess]:
    """`boite snapshot B aN & boite snapshot B bN` for each N, both at once."""
    results = []
    for n in range(pairs):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "boite", "snapshot", str(box_dir), f"{side}{n}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for side in "ab"
        ]
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _assert_sound(box_dir: Path, names: set[str]) -> None:
    """Every snapshot is in the tree, every disk link it and the .vmx name exists, the
    chains are whole, and `boite check` agrees."""
    box = Box.open(box_dir)
    tree = load_tree(box)
    assert {s.display_name for s in tree.snapshots.values()} == names
    assert check_snapshot_tree(box) == []
    for s in tree.snapshots.values():
        assert (box_dir / s.filename).exists(), s.filename
        for d in s.disks:
            assert Path(box.disk_path(d.file_name)).exists(), d.file_name
    check = boite("check", box_dir)
    assert check.returncode == 0, check.stdout + check.stderr


def test_concurrent_snapshot_pairs_on_a_running_box_are_serialized(spin_box):
    """Before the lock: 6 of 20 boxes broken, the second snapshot deleting the delta the
    VMM went on writing. Now every pair gives two snapshots, in some order."""
    start_detached(spin_box)
    pairs = 3
    results = _snapshot_pairs(spin_box, pairs)
    assert [r.returncode for r in results] == [0] * (2 * pairs), [r.stderr for r in results]
    stop_hard(spin_box)
    _assert_sound(spin_box, {f"{side}{n}" for n in range(pairs) for side in "ab"})
    # The box starts again, on the last snapshot's delta.
    start_detached(spin_box)


@pytest.mark.slow
def test_twenty_concurrent_snapshot_pairs(spin_box):
    start_detached(spin_box)
    results = _snapshot_pairs(spin_box, PAIRS)
    assert [r.returncode for r in results] == [0] * (2 * PAIRS), [r.stderr for r in results]
    waited = sum("waiting for it to finish" in r.stderr for r in results)
    print(f"{PAIRS} pairs: {waited} requests said they waited for the other")
    stop_hard(spin_box)
    _assert_sound(spin_box, {f"{side}{n}" for n in range(PAIRS) for side in "ab"})
    start_detached(spin_box)


def test_concurrent_snapshots_of_a_stopped_box_wait_for_each_other(tmp_path):
    box_dir = make_box(tmp_path, "off", "mb_spin")
    results = _snapshot_pairs(box_dir, 2)
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    _assert_sound(box_dir, {"a0", "b0", "a1", "b1"})


def _snapshot_under_way(box_dir: Path, name: str) -> subprocess.Popen:
    """`boite snapshot BOX NAME` in the background, once the VMM is working on it."""
    from boite.vmm import control_request

    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "snapshot", str(box_dir), name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ctl = box_dir / f"{box_dir.name}.ctl"
    assert wait_for(
        lambda: control_request(ctl, {"cmd": "status"})["status"]["operation"] is not None
    )
    return proc


def test_a_second_request_waits_with_a_message_then_is_refused_clearly(spin_box):
    """The VMM's lock waits `wait_s` for a running operation, then refuses naming it."""
    from boite.vmm import control_request

    ctl = spin_box / "spin.ctl"
    # A slow snapshot: 0.3 s between journal steps (the kill tests' delay hook).
    start_detached(spin_box, env={"BOITE_SNAPSHOT_STEP_DELAY": "0.3"})
    slow = _snapshot_under_way(spin_box, "slow")
    from boite.errors import BoxError

    with pytest.raises(BoxError, match=r"busy: snapshot 'slow' has been running"):
        control_request(ctl, {"cmd": "snapshot", "name": "impatient", "wait_s": 0.1})
    waiting = boite("snapshot", spin_box, "patient")
    assert waiting.returncode == 0, waiting.stderr
    assert "busy with snapshot 'slow'; waiting for it to finish" in waiting.stderr
    assert slow.wait(60) == 0
    stop_hard(spin_box)
    _assert_sound(spin_box, {"slow", "patient"})


def test_hard_stop_during_a_live_snapshot_lets_it_finish(tmp_path):
    """Before: the power-off closed guest RAM under the snapshot's feet (BufferError) and
    the VMM died with a traceback. Now the stop waits for the operation, which commits."""
    box_dir = make_box(tmp_path, "big", "mb_spin")
    box = Box.open(box_dir)
    box.vmx["memsize"] = "256"  # a RAM image that takes a moment to write
    box.save()
    start_detached(box_dir, env={"BOITE_SNAPSHOT_STEP_DELAY": "0.2"})
    snap = _snapshot_under_way(box_dir, "live")
    stop = boite("stop", box_dir, "hard")
    assert stop.returncode == 0, stop.stderr
    out, err = snap.communicate(timeout=60)
    assert snap.returncode == 0, err
    log = (box_dir / "vmware.log").read_text()
    assert "Power-off waits for the running operation (snapshot 'live')" in log
    assert "BufferError" not in log and "Traceback" not in log
    assert "Power off complete, exit status 0." in log
    _assert_sound(box_dir, {"live"})
    start_detached(box_dir)  # resumable / startable afterwards
    stop_hard(box_dir)


def _write_current(box_dir: Path, data: bytes, offset: int = 0) -> None:
    box = Box.open(box_dir)
    with open_disk(box.disk_path(box.vmx["scsi0:0.fileName"])) as d:
        d.write(offset, data)
        d.flush()


def test_revert_and_delete_snapshot_while_running(tmp_path):
    """Issue 13: as VMware allows. A memory snapshot resumes, a disk-only one restarts
    the box; delete-snapshot folds the running delta into its parent and the guest's
    disk follows it. No snapshot's data changes."""
    box_dir = make_box(tmp_path, "live", "mb_spin")
    rng = random.Random(13)
    _write_current(box_dir, rng.randbytes(65536))
    boite("snapshot", box_dir, "disk-only", check=True)  # stopped: disks only
    _write_current(box_dir, rng.randbytes(65536), 4096)
    start_detached(box_dir)
    for args in (("mem",), ("after", "--no-memory")):
        r = boite("snapshot", box_dir, *args)
        assert r.returncode == 0, r.stderr
    before = snapshot_digests(box_dir)
    r = boite("revert", box_dir, "mem", "--json")
    assert r.returncode == 0, r.stderr
    assert '"running": true' in r.stdout and '"memory": true' in r.stdout
    r = boite("revert", box_dir, "disk-only")
    assert r.returncode == 0 and "the box restarted" in r.stdout, r.stdout + r.stderr
    assert current_digest(box_dir) == before["disk-only"]
    r = boite("delete-snapshot", box_dir, "after")
    assert r.returncode == 0, r.stderr
    r = boite("delete-snapshot", box_dir, "disk-only")  # the running delta's parent
    assert r.returncode == 0, r.stderr
    from boite.vmm import control_request

    assert control_request(box_dir / "live.ctl", {"cmd": "status"})["status"]["state"] == (
        "running"
    )
    log = (box_dir / "vmware.log").read_text()
    assert log.count("Running again after a revert.") == 2
    stop_hard(box_dir)
    assert snapshot_digests(box_dir) == {"mem": before["mem"]}
    assert current_digest(box_dir) == before["disk-only"]
    _assert_sound(box_dir, {"mem"})


def test_operations_while_a_box_is_paused_or_gone(spin_box):
    """A snapshot of a paused box keeps it paused; a request after the VMM has gone says
    the box is not running."""
    from boite.vmm import control_request

    start_detached(spin_box)
    ctl = spin_box / "spin.ctl"
    control_request(ctl, {"cmd": "pause"})
    assert boite("snapshot", spin_box, "paused").returncode == 0
    assert control_request(ctl, {"cmd": "status"})["status"]["state"] == "paused"
    stop_hard(spin_box)
    r = boite("suspend", spin_box)
    assert r.returncode == 1 and "not running" in r.stderr


def test_200_concurrent_control_requests_are_all_answered(spin_box):
    """Before: a listen backlog of 8 and a thread per request; 190 of 200 failed."""
    from boite.vmm import control_request

    start_detached(spin_box)
    ctl = spin_box / "spin.ctl"
    answers: list[str] = []
    errors: list[str] = []
    barrier = threading.Barrier(200)

    def ask() -> None:
        barrier.wait()
        try:
            answers.append(control_request(ctl, {"cmd": "status"}, timeout=60)["status"]["state"])
        except Exception as exc:  # noqa: BLE001 - counted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and answers == ["running"] * 200


def test_the_control_socket_bounds_a_request_and_survives_emfile(tmp_path):
    """A line longer than 64 KiB is refused; running out of descriptors (EMFILE) slows
    the accept loop down instead of ending it (before: the loop died for good)."""
    script = tmp_path / "emfile.py"
    script.write_text(EMFILE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["too-long", "refused", "after-emfile", "answered"]


EMFILE_SCRIPT = r"""
import json, os, resource, socket, sys, time
from pathlib import Path
from boite.vmm import ControlServer, Vmm, control_request

tmp = Path(sys.argv[1])
vmm = Vmm(lambda: None, lambda: type("A", (), {"name": "none", "close": lambda s: None})(),
          name="emfile")
server = ControlServer(vmm, tmp / "e.ctl")
server.start()

sock = socket.socket(socket.AF_UNIX)
sock.connect(str(tmp / "e.ctl"))
sock.sendall(b'{"cmd": "status", "pad": "' + b"x" * 70000 + b'"}\n')
reply = sock.makefile("rb").readline()
print("too-long", "refused" if b"longer than 65536 bytes" in reply else reply[:80])
sock.close()

# Use up every descriptor, connect (the client socket exists already), let the accept
# loop hit EMFILE a few times, then give descriptors back: the request is answered.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
client = socket.socket(socket.AF_UNIX)
client.settimeout(30)
filler = []
try:
    while True:
        filler.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
client.connect(str(tmp / "e.ctl"))
client.sendall(b'{"cmd": "status"}\n')
time.sleep(0.5)
for fd in filler:
    os.close(fd)
data = b""
while not data.endswith(b"\n"):
    chunk = client.recv(4096)
    if not chunk:
        break
    data += chunk
print("after-emfile", "answered" if json.loads(data)["ok"] else data)
print(control_request(tmp / "e.ctl", {"cmd": "status"})["ok"], file=sys.stderr)
"""


def test_disk_grow_and_compact_take_the_box_lock(spin_box):
    """Growing a disk under a running VMM would change it behind the guest's back: refused;
    on a stopped box the command holds the box lock like any operation."""
    start_detached(spin_box)
    for verb in (("grow", "-s", "16M"), ("compact",)):
        r = boite("disk", verb[0], *verb[1:], spin_box / "spin.vmdk")
        assert r.returncode == 1 and "is running and has its disks open" in r.stderr, r.stderr
    stop_hard(spin_box)
    r = boite("disk", "grow", "-s", "16M", spin_box / "spin.vmdk")
    assert r.returncode == 0, r.stderr
    assert not (spin_box / "spin.vmx.lck").exists()
    with open_disk(spin_box / "spin.vmdk", read_only=True) as d:
        assert d.size == 16 << 20


def test_idle_connections_cannot_hold_every_handler_slot(tmp_path):
    """At most MAX_CLIENTS connections are served at once; one that says nothing is
    closed after IDLE_TIMEOUT_S, so a request behind a wall of idle ones is answered."""
    import socket

    from boite.vmm import ControlServer, Vmm, control_request

    class Small(ControlServer):
        MAX_CLIENTS = 4
        IDLE_TIMEOUT_S = 0.5

    class NoAccel:
        name = "none"

        def close(self) -> None:
            pass

    vmm = Vmm(lambda: None, NoAccel, name="idle")
    server = Small(vmm, tmp_path / "i.ctl")
    server.start()
    try:
        idle = []
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(tmp_path / "i.ctl"))
            idle.append(s)
        assert control_request(tmp_path / "i.ctl", {"cmd": "status"}, timeout=30)["ok"]
        assert all(s.recv(1) == b"" for s in idle[:4])  # closed by the server
    finally:
        server.close()


def test_clone_of_a_running_box_runs_under_its_operation_lock(spin_box, tmp_path):
    """A clone of a running box copies a snapshot's disks inside the VMM, under the lock
    that a concurrent delete-snapshot of that snapshot must wait for."""
    start_detached(spin_box)
    assert boite("snapshot", spin_box, "base").returncode == 0
    r = boite("clone", spin_box, tmp_path / "copy", "--snapshot", "base")
    assert r.returncode == 0, r.stderr
    assert "Clone requested through the control socket." in (spin_box / "vmware.log").read_text()
    assert boite("check", tmp_path / "copy").returncode == 0
    r = boite("clone", spin_box, tmp_path / "linked", "--linked", "--snapshot", "base")
    assert r.returncode == 0, r.stderr
    r = boite("delete-snapshot", spin_box, "base")  # a linked clone hangs from it
    assert r.returncode == 1 and "linked clone" in r.stderr, r.stderr


def test_start_during_an_offline_operation_says_the_box_is_busy(tmp_path):
    """`boite start` while `boite snapshot` works on the stopped box's files: refused with
    what holds it, not "already running"."""
    box_dir = make_box(tmp_path, "busy", "mb_spin")
    slow = subprocess.Popen(
        [sys.executable, "-m", "boite", "snapshot", str(box_dir), "slow"],
        env=dict(os.environ, BOITE_SNAPSHOT_STEP_DELAY="0.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_for(lambda: (box_dir / "busy.vmx.lck").exists())
    r = boite("start", box_dir, "--detach")
    assert r.returncode == 1 and "is busy: another boite command" in r.stderr, r.stderr
    assert slow.wait(60) == 0
    start_detached(box_dir)
    stop_hard(box_dir)
