"""The guest tools in the kit's Linux, end to end through the CLI: exec (streams and exit
status), a binary copy both ways checked by hash, shell, info's heartbeat, a soft reset
and a soft stop that go through the tools (vmware.log says so), and the guest clock set
after a revert and an unpause."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def boite(*args, input=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        capture_output=True, timeout=timeout, input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )  # fmt: skip


def test_tools_in_the_kit_guest(tmp_path):
    from boite import guestkit
    from boite.box import Box

    kit = guestkit.ensure_kit(("i386", "initrd"))
    box = Box.create(tmp_path / "kt", disk_size=None)
    box.vmx["boite.kernel"] = str(kit.i386_vmlinux)
    box.vmx["boite.initrd"] = str(kit.initrd_i386)
    box.vmx["boite.cmdline"] = "console=ttyS0 quiet"
    box.vmx["ethernet0.present"] = "FALSE"
    box.save()
    assert boite("start", box.dir, "--detach").returncode == 0
    try:
        run = boite("exec", box.dir, "--wait", "900", "--", "sh", "-c",
                    "echo out; echo err >&2; exit 7")  # fmt: skip
        # boite's own note while the guest boots comes first, then the command's stderr.
        stderr = b"".join(
            line for line in run.stderr.splitlines(True) if not line.startswith(b"boite: waiting")
        )
        assert (run.returncode, run.stdout, stderr) == (7, b"out\n", b"err\n")
        piped = boite("exec", box.dir, "--", "sha256sum", input=b"abc" * 1000)
        assert piped.stdout.split()[0].decode() == hashlib.sha256(b"abc" * 1000).hexdigest()

        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(300_000))
        digest = hashlib.sha256(blob.read_bytes()).hexdigest()
        assert boite("cp", blob, f"{box.dir}:/tmp/blob.bin").returncode == 0
        inside = boite("exec", box.dir, "--", "sha256sum", "/tmp/blob.bin")
        assert inside.stdout.split()[0].decode() == digest
        back = tmp_path / "back.bin"
        assert boite("cp", f"{box.dir}:/tmp/blob.bin", back).returncode == 0
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest

        shell = boite("shell", box.dir, input=b"echo $((6*7)); exit 3\n")
        assert shell.returncode == 3 and b"42" in shell.stdout

        info = json.loads(boite("info", box.dir, "--json").stdout)
        assert info["tools"]["running"] and info["tools"]["agent"].startswith("boite-tools")

        # A soft reset is a reboot through the tools: a new boot (tmpfs is empty again).
        assert boite("exec", box.dir, "--", "touch", "/tmp/before-reset").returncode == 0
        reset = boite("reset", box.dir, "--json")
        assert reset.returncode == 0 and json.loads(reset.stdout)["how"] == "tools", reset
        deadline = time.monotonic() + 900
        while boite("exec", box.dir, "--wait", "900", "--", "test", "-e",
                    "/tmp/before-reset").returncode == 0:  # fmt: skip
            assert time.monotonic() < deadline, "the guest did not reboot"
            time.sleep(2)

        stop = boite("stop", box.dir, "soft")
        assert stop.returncode == 0, stop.stderr
    finally:
        boite("stop", box.dir, "hard")
    log = (box.dir / "vmware.log").read_text()
    assert "Reset (soft): the guest tools reboot the guest." in log
    assert "Soft stop: asked the guest to power off through the guest tools" in log
    assert "Soft stop: the guest powered off when asked through the guest tools" in log
    assert "Powered off (hard stop)" not in log


def _guest_clock(box_dir) -> int:
    run = boite("exec", box_dir, "--wait", "600", "--", "date", "+%s")
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def _clock_right(box_dir, slack_s: int = 5, within_s: float = 120) -> bool:
    """Whether the guest clock reads the host's (within slack_s) while `date` runs in the
    guest; asked again for a while, since the clock is set a moment after the agent's
    HELLO."""
    deadline = time.monotonic() + within_s
    while True:
        before = time.time()
        guest = _guest_clock(box_dir)
        after = time.time()
        if before - slack_s <= guest <= after + slack_s:
            return True
        if time.monotonic() > deadline:
            print(f"guest clock {guest}, host clock {before:.0f} to {after:.0f}")
            return False
        time.sleep(2)


def test_the_guest_clock_is_set_after_a_revert_to_an_old_memory_snapshot_and_unpause(tmp_path):
    """VMware Tools set the guest's clock after a revert and a resume; so do boite's. The
    snapshot is made with the guest's clock an hour behind (as an old snapshot's clock
    would be): after reverting to it while running, the guest's clock is the host's."""
    from boite import guestkit
    from boite.box import Box

    kit = guestkit.ensure_kit(("i386", "initrd"))
    box = Box.create(tmp_path / "clock", disk_size=None)
    box.vmx["boite.kernel"] = str(kit.i386_vmlinux)
    box.vmx["boite.initrd"] = str(kit.initrd_i386)
    box.vmx["boite.cmdline"] = "console=ttyS0 quiet"
    box.vmx["ethernet0.present"] = "FALSE"
    box.save()
    assert boite("start", box.dir, "--detach").returncode == 0
    try:
        assert boite("exec", box.dir, "--wait", "900", "--", "true").returncode == 0
        assert _clock_right(box.dir)  # set at the agent's first HELLO
        behind = f"@{int(time.time()) - 3600}"
        assert boite("exec", box.dir, "--", "date", "-s", behind).returncode == 0
        snap = boite("snapshot", box.dir, "an-hour-ago", "--memory")
        assert snap.returncode == 0, snap.stderr
        guest, host = _guest_clock(box.dir), time.time()
        assert 3500 < host - guest < 3700, "the snapshot holds a clock an hour behind"
        assert boite("exec", box.dir, "--", "date", "-s", f"@{int(time.time())}").returncode == 0

        revert = boite("revert", box.dir, "an-hour-ago", "--json")
        assert revert.returncode == 0, revert.stderr
        assert json.loads(revert.stdout)["memory"] is True  # the guest resumed, not rebooted
        assert _clock_right(box.dir), "after the revert"
        log = (box.dir / "vmware.log").read_text()
        assert log.count("Guest tools: the guest clock was set to the host's.") >= 2

        assert boite("exec", box.dir, "--", "date", "-s", behind).returncode == 0
        assert boite("pause", box.dir).returncode == 0
        assert boite("unpause", box.dir).returncode == 0
        assert _clock_right(box.dir), "after unpause"
    finally:
        boite("stop", box.dir, "hard")
