"""A memory snapshot of the tiny Linux guest's running shell, under the emulator: after a
revert, `start` resumes the very shell that was snapshotted (its variables included), not
a fresh boot. Everything goes through the real `boite` command and the box's control
socket, as a person at two terminals would do it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from boite import guestkit
from boite.box import Box
from boite.vmm import connect_control, control_socket_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def boite(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


class Console:
    """COM1 of a running box through its control socket."""

    def __init__(self, box: Box) -> None:
        self.sock: socket.socket = connect_control(control_socket_path(box.dir, box.name), 10)
        self.sock.sendall(json.dumps({"cmd": "console"}).encode() + b"\n")
        self.seen = b""
        self.wait_for(b"\n")  # the {"ok": true} line

    def wait_for(self, marker: bytes, timeout: float = 900) -> bytes:
        deadline = time.time() + timeout
        self.sock.settimeout(1)
        while marker not in self.seen:
            assert time.time() < deadline, self.seen[-2000:]
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            assert chunk, self.seen[-2000:]
            self.seen += chunk
        return self.seen

    def type(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def test_the_shell_resumes_after_a_revert_to_a_memory_snapshot(tmp_path):
    kit = guestkit.ensure_kit(("i386", "initrd"))
    box = Box.create(tmp_path / "sh", disk_size=None)
    box.vmx["boite.kernel"] = str(kit.i386_vmlinux)  # PVH entry, no decompressor
    box.vmx["boite.initrd"] = str(kit.initrd_i386)
    box.vmx["boite.cmdline"] = "console=ttyS0 quiet boite.shell=1"
    box.save()
    r = boite("start", box.dir, "--accel", "emu", "--detach")
    assert r.returncode == 0, r.stderr
    try:
        con = Console(box)
        con.wait_for(b"BOITE-READY")
        time.sleep(2)
        con.type("MARK=set-before-the-snapshot; echo marked-$MARK")
        con.wait_for(b"marked-set-before-the-snapshot")
        r = boite("snapshot", box.dir, "shell")
        assert r.returncode == 0, r.stderr
        con.type("MARK=changed-after; echo now-$MARK")
        con.wait_for(b"now-changed-after")
        con.close()
        assert boite("stop", box.dir, "hard").returncode == 0
        assert boite("revert", box.dir, "shell").returncode == 0
        r = boite("start", box.dir, "--accel", "emu", "--detach")
        assert r.returncode == 0, r.stderr
        con = Console(box)
        con.type("echo resumed-$MARK")
        seen = con.wait_for(b"resumed-set-before-the-snapshot", timeout=300)
        assert b"BOITE-READY" not in seen  # the same shell, not a new boot
        con.type("poweroff")
        con.close()
    finally:
        boite("stop", box.dir, "hard")
    log = (box.dir / "vmware.log").read_text()
    assert "Resuming from" in log, log[-2000:]
