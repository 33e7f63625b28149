"""Helpers for the operation tests: boxes that run a bare-metal guest, the real `boite`
command in child processes, and a fingerprint of what a box's snapshots hold."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from boite.box.box import Box
from boite.disk import open_disk
from conftest import kvm_available
from guests.build import assemble

# KVM runs the multiboot test guests even under kvm_pvm (no interrupts, no paging); the
# emulator where there is no /dev/kvm.
VIRTUAL_EXEC = "hardware" if kvm_available() else "software"


def make_box(parent: Path, name: str, guest: str, disk_size: int | None = 8 << 20) -> Path:
    box = Box.create(parent / name, memsize_mb=16, disk_size=disk_size)
    box.vmx["boite.kernel"] = str(assemble(guest))
    box.vmx["monitor.virtual_exec"] = VIRTUAL_EXEC
    box.save()
    return box.dir


def boite(*args, timeout: float = 120, env: dict | None = None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env=None if env is None else dict(os.environ, **env), **kw,
    )  # fmt: skip


def start_detached(box_dir: Path, env: dict | None = None) -> int:
    """`boite start --detach`; the VMM's pid."""
    proc = boite("start", box_dir, "--detach", env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split("(pid ")[1].split(")")[0])


def stop_hard(box_dir: Path) -> None:
    boite("stop", box_dir, "hard")


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def digest_of(box: Box, file_name: str) -> str:
    """What a guest reads through one disk link (its whole chain)."""
    with open_disk(box.disk_path(file_name), read_only=True) as d:
        return hashlib.sha256(d.read(0, d.size)).hexdigest()


def current_digest(box_dir: Path) -> str:
    box = Box.open(box_dir)
    return digest_of(box, box.vmx["scsi0:0.fileName"])


def snapshot_digests(box_dir: Path) -> dict[str, str]:
    """Each snapshot's name and what its disk holds."""
    from boite.snapshot import load_tree

    box = Box.open(box_dir)
    tree = load_tree(box)
    return {
        s.display_name: digest_of(box, d.file_name)
        for s in tree.snapshots.values()
        for d in s.disks
    }
