"""Lifecycle verbs as users of vmrun/virsh know them: pause/unpause (seen by info and
list), reset, clone (full and linked), list --all, and `check` on a copied box."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import requires_kvm
from guests.build import assemble


def boite(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def make_box(tmp_path, name="spin", disk="1M"):
    from boite.box.box import Box

    args = ["create", tmp_path / name, "--memsize", "16", "--disk", disk,
            "--kernel", assemble("mb_spin")]  # fmt: skip
    assert boite(*args).returncode == 0
    return Box.open(tmp_path / name)


@pytest.fixture
def running_box(tmp_path):
    box = make_box(tmp_path)
    proc = boite("start", box.dir, "--detach", "--accel", "kvm")
    assert proc.returncode == 0, proc.stderr
    yield box
    boite("stop", box.dir, "hard")


@requires_kvm
def test_pause_and_unpause_show_in_info_and_list(running_box, tmp_path):
    paused = boite("pause", running_box.dir, "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout) == {"ok": True, "box": "spin", "state": "paused"}
    info = json.loads(boite("info", running_box.dir, "--json").stdout)
    assert info["state"] == "paused"
    listed = json.loads(boite("list", "--all", tmp_path, "--json").stdout)
    assert [(b["name"], b["state"]) for b in listed] == [("spin", "paused")]
    assert boite("unpause", running_box.dir).returncode == 0
    assert json.loads(boite("info", running_box.dir, "--json").stdout)["state"] == "running"
    again = boite("unpause", running_box.dir, "--json")
    assert again.returncode == 1 and "not paused" in json.loads(again.stdout)["error"]["message"]


@requires_kvm
def test_reset_hard_and_soft_without_tools(running_box):
    hard = boite("reset", running_box.dir, "hard", "--json")
    assert hard.returncode == 0, hard.stderr
    assert json.loads(hard.stdout)["how"] == "hard"
    soft = boite("reset", running_box.dir)
    assert soft.returncode == 0, soft.stderr
    assert "no guest tools" in soft.stdout  # said truthfully: it was a hard one
    log = (running_box.dir / "vmware.log").read_text()
    assert log.count("Reset (hard) requested") == 2
    assert "Reset (soft): no guest tools to ask" in log
    status = json.loads(boite("info", running_box.dir, "--json").stdout)
    assert status["state"] == "running"


def test_list_all_states_off_and_suspended(tmp_path):
    make_box(tmp_path, "a", disk="0")
    b = make_box(tmp_path, "b", disk="0")
    b.vmx["checkpoint.vmState"] = "b.vmss"
    b.save()
    listed = json.loads(boite("list", "--all", tmp_path, "--json").stdout)
    assert {r["name"]: r["state"] for r in listed} == {"a": "off", "b": "suspended"}
    text = boite("list", "--all", tmp_path).stdout
    assert "NAME" in text and "suspended" in text


def test_full_clone_is_a_new_machine(tmp_path):
    src = make_box(tmp_path, "src")
    out = boite("clone", src.dir, tmp_path / "copy", "--json")
    assert out.returncode == 0, out.stderr
    from boite.box.box import Box

    copy = Box.open(tmp_path / "copy")
    assert copy.vmx["displayName"] == "copy"
    assert copy.vmx["uuid.bios"] != src.vmx["uuid.bios"]
    assert copy.config.nics[0].mac != src.config.nics[0].mac
    assert boite("check", copy.dir).returncode == 0, boite("check", copy.dir).stdout
    assert boite("disk", "info", copy.dir / "copy.vmdk").returncode == 0


def test_linked_clone_hangs_from_the_snapshot_which_then_stays(tmp_path):
    src = make_box(tmp_path, "src")
    assert boite("snapshot", src.dir, "base").returncode == 0
    refused = boite("clone", src.dir, tmp_path / "nosnap", "--linked")
    assert refused.returncode == 1 and "--snapshot" in refused.stderr
    out = boite("clone", src.dir, tmp_path / "linked", "--linked", "--snapshot", "base")
    assert out.returncode == 0, out.stderr
    from boite.disk.vmdk import read_descriptor

    desc, _ = read_descriptor(tmp_path / "linked" / "linked.vmdk")
    assert desc.parent_hint is not None and desc.parent_hint.endswith("src.vmdk")
    assert boite("check", tmp_path / "linked").returncode == 0
    refused = boite("delete-snapshot", src.dir, "base")
    assert refused.returncode == 1 and "linked clones" in refused.stderr
    shutil.rmtree(tmp_path / "linked")
    assert boite("delete-snapshot", src.dir, "base").returncode == 0


@requires_kvm
def test_check_catches_a_copied_box_that_clashes_with_a_running_one(running_box, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(
        running_box.dir, copy, ignore=shutil.ignore_patterns("*.lck", "*.ctl", "*.tools")
    )
    proc = boite("check", copy, "--json")
    keys = {p["key"] for p in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert {"uuid.bios", "ethernet MAC"} <= keys
    clone = boite("clone", running_box.dir, tmp_path / "fresh")
    assert clone.returncode == 1 and "--snapshot" in clone.stderr  # running: disks change
    # A clone of the running box (from a snapshot) is a new machine: check finds no clash.
    assert boite("snapshot", running_box.dir, "base").returncode == 0
    clone = boite("clone", running_box.dir, tmp_path / "fresh", "--snapshot", "base")
    assert clone.returncode == 0, clone.stderr
    checked = boite("check", tmp_path / "fresh", "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout) == [], checked.stdout


def test_check_names_a_nic_that_cannot_attach(tmp_path, monkeypatch):
    box = make_box(tmp_path, "nic", disk="0")
    box.vmx["ethernet0.connectionType"] = "nat"
    box.save()
    monkeypatch.setenv("PATH", "/nonexistent")  # no passt on this PATH
    monkeypatch.setenv("BOITE_CACHE", str(tmp_path / "cache"))  # nor a built one
    monkeypatch.delenv("BOITE_PASST", raising=False)
    proc = subprocess.run(
        [sys.executable, "-m", "boite", "check", str(box.dir)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "passt" in proc.stdout


@requires_kvm
def test_info_names_each_nics_host_side(tmp_path):
    """`info` says what each NIC is joined to on the host: passt (its pid and forwards)
    for NAT, the TAP's name for host-only, each with the NIC's MAC. The VMM runs in a
    network namespace of its own (its TAP must not touch the host's)."""
    from boite.machine.netback.passt import find_passt

    if find_passt() is None or shutil.which("unshare") is None:
        pytest.skip("needs passt and unshare")
    box = make_box(tmp_path, "nets", disk="0")
    box.vmx["ethernet0.connectionType"] = "nat"
    box.vmx["ethernet0.boite.forward"] = "tcp:18181:80"
    box.vmx["ethernet1.present"] = "TRUE"
    box.vmx["ethernet1.connectionType"] = "hostonly"
    box.vmx["ethernet1.addressType"] = "static"
    box.vmx["ethernet1.address"] = "00:50:56:00:00:02"
    box.save()
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    start = subprocess.run(
        [*unshare, sys.executable, "-m", "boite", "start", str(box.dir), "--detach",
         "--accel", "kvm"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if start.returncode != 0 and ("Operation not permitted" in start.stderr
                                  or "/dev/net/tun" in start.stderr):  # fmt: skip
        pytest.skip(f"no namespace or TAP here: {start.stderr.strip()[-200:]}")
    try:
        assert start.returncode == 0, start.stderr
        info = json.loads(boite("info", box.dir, "--json").stdout)
        nat, hostonly = info["host_nics"]
        assert (nat["key"], nat["backend"], nat["forwards"]) == (
            "ethernet0", "passt", ["tcp:18181:80"])  # fmt: skip
        assert nat["mac"] == box.config.nics[0].mac and nat["pid"] > 0
        assert nat["passt"] == find_passt() and nat["passt_version"].startswith("passt ")
        assert (hostonly["key"], hostonly["backend"], hostonly["mac"]) == (
            "ethernet1", "tap", "00:50:56:00:00:02")  # fmt: skip
        assert hostonly["tap"]
        text = boite("info", box.dir).stdout
        assert f"TAP {hostonly['tap']} (MAC 00:50:56:00:00:02)" in text, text
        assert "forwards tcp:18181:80" in text, text
    finally:
        boite("stop", box.dir, "hard")


@requires_kvm
def test_the_library_runs_a_box_without_the_cli(tmp_path):
    """boite.launch is what the CLI calls: a Python caller starts, pauses, snapshots,
    reverts and stops a box with it (exec and cp: tests/net/inside.py)."""
    from boite import launch

    box = make_box(tmp_path, "lib")
    pid = launch.start(box.dir, "kvm")
    try:
        status = launch.status(box.dir)
        assert status is not None and status["state"] == "running" and status["pid"] == pid
        launch.pause(box.dir)
        assert launch.status(box.dir)["state"] == "paused"
        launch.resume(box.dir)
        assert launch.status(box.dir)["state"] == "running"
        taken = launch.snapshot(box.dir, "lib-snap")
        assert taken.name == "lib-snap"
        reverted = launch.revert(box.dir, "lib-snap")
        assert reverted.running and reverted.memory
        stopped = launch.stop(box.dir, "hard")
        assert stopped.how == "hard"
        assert launch.status(box.dir) is None
    finally:
        if launch.status(box.dir) is not None:
            launch.stop(box.dir, "hard")


def test_check_names_a_read_only_disk_and_vcpus_the_emulator_cannot_run(tmp_path):
    from boite.accel.emu import EmuAccelerator

    box = make_box(tmp_path, "ro", disk="1M")
    stream = box.dir / "ro-stream.vmdk"
    made = boite("disk", "convert", "-t", "stream", box.dir / "ro.vmdk", stream, "--json")
    assert made.returncode == 0 and json.loads(made.stdout)["type"] == "streamOptimized", made
    key = next(k for k, v in box.vmx.items() if k.endswith(".fileName") and v == "ro.vmdk")
    box.vmx[key] = stream.name
    box.vmx["monitor.virtual_exec"] = "software"
    box.vmx["numvcpus"] = str(EmuAccelerator.max_vcpus + 1)
    box.save()
    proc = boite("check", box.dir, "--json")
    assert proc.returncode == 1
    found = {p["key"]: p for p in json.loads(proc.stdout)}
    assert "streamOptimized" in found[key]["message"], found
    assert found["numvcpus"]["value"] == str(EmuAccelerator.max_vcpus + 1), found


@requires_kvm
def test_a_killed_vmm_is_seen_as_off_and_its_lock_taken_over(tmp_path):
    import signal
    import time

    from boite import launch

    box = make_box(tmp_path, "killed", disk="0")
    pid = launch.start(box.dir, "kvm")
    try:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the VMM is the child of this process: reap it so its pid is free
            if os.waitpid(pid, os.WNOHANG)[0] == pid or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        info = json.loads(boite("info", box.dir, "--json").stdout)
        assert info["state"] == "off", info
        listed = json.loads(boite("list", "--all", tmp_path, "--json").stdout)
        assert [(r["name"], r["state"]) for r in listed] == [("killed", "off")]
        again = boite("start", box.dir, "--detach", "--accel", "kvm")
        assert again.returncode == 0, again.stderr  # the stale lock is taken over
    finally:
        boite("stop", box.dir, "hard")
