"""The guest tools in the kit's Linux, end to end through the CLI: exec (streams and exit
status), a binary copy both ways checked by hash, ip, shell, info's heartbeat, and a soft
stop that goes through the tools (vmware.log says so)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

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
        assert (run.returncode, run.stdout, run.stderr) == (7, b"out\n", b"err\n")
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

        stop = boite("stop", box.dir, "soft")
        assert stop.returncode == 0, stop.stderr
    finally:
        boite("stop", box.dir, "hard")
    log = (box.dir / "vmware.log").read_text()
    assert "Soft stop: asked the guest to power off through the guest tools" in log
    assert "Soft stop: the guest powered off when asked through the guest tools" in log
    assert "Powered off (hard stop)" not in log
