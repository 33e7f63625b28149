"""A boite-made VMDK served by a real qemu-nbd: open_disk('nbd://...') reads and writes it,
and `convert` pulls the remote disk into a local thin VMDK."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import pytest

from boite.disk import convert_disk, create_disk, open_disk

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None, reason="needs qemu-nbd (qemu-utils)"
)
MiB = 1 << 20


def test_open_disk_nbd_url_and_convert(tmp_path):
    path = tmp_path / "remote.vmdk"
    create_disk(path, 8 * MiB)
    rng = random.Random(9)
    data = rng.randbytes(300_000)
    with open_disk(path) as d:
        d.write(MiB + 512, data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "vmdk",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "-x",
            "d",
            "--persistent",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.025)
        url = f"nbd://127.0.0.1:{port}/d"
        with open_disk(url) as remote:
            assert remote.size == 8 * MiB
            assert remote.read(MiB + 512, len(data)) == data
            remote.write(0, b"n" * 4096)
            remote.flush()
        local = tmp_path / "local.vmdk"
        convert_disk(url, local, "thin")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with open_disk(local, read_only=True) as d:
        assert d.read(0, 4096) == b"n" * 4096
        assert d.read(MiB + 512, len(data)) == data
    with open_disk(path, read_only=True) as d:
        assert d.read(0, 4096) == b"n" * 4096
