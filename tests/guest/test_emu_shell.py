"""The tiny i386 Linux under `boite start --accel emu`: the busybox shell on the console
takes what a person types (here, a pipe on stdin) and `poweroff` ends the box cleanly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from boite import guestkit
from boite.box import Box

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_busybox_shell_on_the_console_under_the_emulator(tmp_path):
    kit = guestkit.ensure_kit(("i386", "initrd"))
    box = Box.create(tmp_path / "sh", disk_size=None)
    box.vmx["boite.kernel"] = str(kit.i386_vmlinux)  # PVH entry, no decompressor
    box.vmx["boite.initrd"] = str(kit.initrd_i386)
    box.vmx["boite.cmdline"] = "console=ttyS0 quiet boite.shell=1"
    box.save()
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "start", str(box.dir), "--accel", "emu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = bytearray()
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            seen.extend(chunk)
            if b"BOITE-READY" in seen:
                ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert ready.wait(1200), bytes(seen[-2000:])
        time.sleep(2)  # let the shell print its prompt
        proc.stdin.write(b"echo $((6 * 7))-from-the-shell\n")
        proc.stdin.flush()
        deadline = time.time() + 300
        while b"42-from-the-shell" not in seen and time.time() < deadline:
            time.sleep(0.5)
        assert b"42-from-the-shell" in seen, bytes(seen[-2000:])
        proc.stdin.write(b"poweroff\n")
        proc.stdin.flush()
        assert proc.wait(300) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(10)
    assert b"BOITE-POWEROFF status=0" in seen, bytes(seen[-2000:])
