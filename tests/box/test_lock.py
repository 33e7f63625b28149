"""NAME.vmx.lck: racing starters, stale locks, the running-box registry."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from boite.box import Box, list_running
from boite.box.lock import BoxLock, LockHolder, hostname
from boite.errors import LockError

CTX = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    path = tmp_path / "runtime"
    monkeypatch.setenv("BOITE_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def box(tmp_path):
    return Box.create(tmp_path / "vm", disk_size=None)


def _race(vmx: str, tried: multiprocessing.Barrier, results) -> None:
    try:
        b = Box.open(vmx)
        try:
            held = b.acquire_lock()
        except LockError as exc:
            results.put(("lost", str(exc)))
            tried.wait()
            return
        results.put(("won", os.getpid()))
        tried.wait()  # hold the lock until every racer has tried
        held.__exit__(None, None, None)
    except BaseException as exc:  # report, never hang the barrier
        results.put(("crash", repr(exc)))
        tried.abort()


def _run_race(vmx: str, racers: int) -> list[tuple[str, object]]:
    tried = CTX.Barrier(racers)
    results = CTX.Queue()
    procs = [CTX.Process(target=_race, args=(vmx, tried, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(box: Box, host: str, pid: int) -> None:
    holder = LockHolder(host, pid, time.time() - 60, None, "feedfacefeedface", str(box.vmx_path))
    box._lock.path.write_bytes(holder.to_bytes())


@pytest.mark.parametrize("racers", [2, 4])
def test_racing_starters_exactly_one_wins(box, racers):
    for _round in range(5):
        results = _run_race(str(box.vmx_path), racers)
        kinds = sorted(r[0] for r in results)
        assert kinds == ["lost"] * (racers - 1) + ["won"], results
        winner = next(r[1] for r in results if r[0] == "won")
        for kind, message in results:
            if kind == "lost":
                assert f"pid {winner} on host {hostname()}" in message
        assert not box._lock.path.exists()


def test_second_start_fails_naming_the_holder(box):
    with box.acquire_lock():
        other = Box.open(box.dir)
        with pytest.raises(LockError) as err:
            other.acquire_lock()
        assert f"pid {os.getpid()} on host {hostname()}" in str(err.value)
        assert str(box.vmx_path) in str(err.value)
        holder = json.loads(box._lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == hostname()
    assert not box._lock.path.exists()
    other.acquire_lock()
    other.release_lock()


def test_stale_lock_of_a_dead_process_is_taken_over_and_logged(box):
    pid = dead_pid()
    write_lock(box, hostname(), pid)
    with box.acquire_lock() as held:
        assert held.holder is not None and held.holder.pid == os.getpid()
    box.close()
    log = (box.dir / "vmware.log").read_text()
    assert f"left by pid {pid} on host {hostname()}" in log
    assert "no longer running" in log


def test_stale_lock_raced_by_many_exactly_one_takes_it(box):
    for _round in range(3):
        write_lock(box, hostname(), dead_pid())
        results = _run_race(str(box.vmx_path), 4)
        assert sorted(r[0] for r in results) == ["lost"] * 3 + ["won"], results


def test_lock_from_another_host_is_never_broken(box):
    write_lock(box, "some-other-host.example", 1)
    with pytest.raises(LockError, match="on host some-other-host.example"):
        box.acquire_lock()


def test_reused_pid_is_seen_as_stale(box):
    # Our own pid, but with another process start time: the holder is gone.
    holder = LockHolder(hostname(), os.getpid(), time.time(), 1, "0123456789abcdef", "x")
    assert holder.is_dead_here()


def test_garbage_lock_file_is_reported_not_broken(box):
    box._lock.path.write_bytes(b"\x00garbage")
    with pytest.raises(LockError, match="does not say who holds it"):
        box.acquire_lock()
    assert box._lock.path.read_bytes() == b"\x00garbage"


def test_release_does_not_remove_someone_elses_lock(box):
    lock = BoxLock(box.vmx_path)
    lock.acquire()
    box._lock.path.unlink()
    write_lock(box, "other", 1)
    lock.release()
    assert box._lock.path.exists()


HOLDER = """
import sys, time
from boite.box import Box
box = Box.open(sys.argv[1])
box.acquire_lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_list_shows_running_boxes_and_prunes_dead_ones(box, boite_cli):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(box.dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        listed = [b.pid for b in list_running()]
        assert listed == [proc.pid]
        out = boite_cli("list", "--json", check=True)
        entries = json.loads(out.stdout)
        assert [(e["pid"], e["name"]) for e in entries] == [(proc.pid, "vm")]
        assert "vm" in boite_cli("list", check=True).stdout
        info = json.loads(boite_cli("info", box.dir, "--json", check=True).stdout)
        assert info["running"]["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list_running() == []
    assert "no box is running" in boite_cli("list", check=True).stdout
    # The dead holder's lock is stale now: the next start takes it over.
    with box.acquire_lock():
        pass
