"""Helpers for disk tests: the real qemu tools, and a raw reference to compare against."""

from __future__ import annotations

import shutil
import subprocess

import pytest

requires_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io (Debian package qemu-utils)",
)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def qemu_io(path, *cmds: str, fmt: str = "vmdk") -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr
    return out
