"""Peers that read and write VMDKs independently of boite: qemu-img/qemu-io, libvmdk, dissect."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io (Debian package qemu-utils)",
)


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def qemu_io(path, *cmds: str, fmt: str = "vmdk") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "fail" not in text.lower() and "error" not in text.lower(), text
    return text


class Reference:
    """A sparse raw file receiving the same writes as the disk under test."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            f.truncate(size)
        self.ranges: list[tuple[int, int]] = []

    def write(self, off: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        self.ranges.append((off, len(data)))

    def read(self, off: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def probe_ranges(self, rng: random.Random, extra: int = 8) -> list[tuple[int, int]]:
        """Every written range, a margin around them, and a few random ranges."""
        out = []
        for off, n in self.ranges:
            a = max(0, off - 700)
            out.append((a, min(self.size, off + n + 700) - a))
        for _ in range(extra):
            n = rng.randrange(1, 200_000)
            out.append((rng.randrange(0, self.size - n), n))
        return out


def random_writes(
    disk, ref: Reference, rng: random.Random, count: int, hot: list[int] = ()
) -> None:
    """Random writes (some sector-aligned, some not, some around `hot` offsets)."""
    for i in range(count):
        n = rng.choice([512, 4096, 65536, 70000, 300_000, rng.randrange(1, 5000)])
        if hot and i % 3 == 0:
            off = max(0, min(ref.size - n, rng.choice(hot) - rng.randrange(0, n)))
        else:
            off = rng.randrange(0, ref.size - n)
        if i % 2:
            off -= off % 512
            n = max(512, n - n % 512)
        data = rng.randbytes(n)
        disk.write(off, data)
        ref.write(off, data)


def pyvmdk_open(path: Path, chain: list[Path] = ()):
    """libvmdk handle of `path` with its parents (top first in `chain`), CIDs checked by libvmdk."""
    import pyvmdk

    handles = []
    for p in [path, *chain]:
        h = pyvmdk.handle()
        h.open(str(p))
        h.open_extent_data_files()
        handles.append(h)
    for child, parent in zip(handles, handles[1:], strict=False):
        child.set_parent(parent)
    return handles[0], handles


def peer_reads(path: Path, chain: list[Path], ref: Reference, rng: random.Random) -> None:
    """libvmdk and dissect.hypervisor read the same bytes as the reference."""
    from dissect.hypervisor.disk.vmdk import VMDK

    top, handles = pyvmdk_open(path, chain)
    d = VMDK(path)
    try:
        assert top.get_media_size() == ref.size
        for off, n in ref.probe_ranges(rng):
            want = ref.read(off, n)
            assert top.read_buffer_at_offset(n, off) == want, f"libvmdk differs at {off}+{n}"
            d.seek(off)
            assert d.read(n) == want, f"dissect differs at {off}+{n}"
    finally:
        for h in handles:
            h.close()
