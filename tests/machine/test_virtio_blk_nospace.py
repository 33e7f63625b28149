"""A host filesystem that fills up under a running guest: the guest gets an I/O error for the
write that did not fit, never a false OK, and every write acknowledged before it stays readable
after the disk is closed and reopened (qemu-img agrees).

The small filesystem is a real tmpfs mounted by the test (root only, as CI runs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from boite.disk import create_disk, open_disk
from boite.machine.virtio.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

from .test_virtio_blk import DATA, BlkRig, make_pattern


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_guest_writes_past_a_full_host_filesystem_fail_and_nothing_acknowledged_is_lost(
    small_fs: Path,
) -> None:
    disk = small_fs / "guest.vmdk"
    create_disk(disk, 64 << 20, "thin")
    image = open_disk(disk)
    rig = BlkRig(image)
    d = rig.drv
    d.setup()
    chunk = 256 << 10
    acknowledged: dict[int, bytes] = {}
    failed = 0
    # 64 chunks of 256 KiB (16 MiB) into a 2 MiB filesystem: the first fit, the rest cannot.
    for i in range(64):
        data = make_pattern(chunk, seed=100 + i)
        rig.memory.write(DATA, data)
        sector = i * (chunk // 512)
        status, _ = d.request(VIRTIO_BLK_T_OUT, sector, DATA, chunk, write=True)
        assert status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR)
        if status == VIRTIO_BLK_S_OK:
            acknowledged[sector] = data
        else:
            failed += 1
    assert acknowledged, "not one write fitted: the test's filesystem is too small"
    assert failed, "every write fitted: the test's filesystem is too big to fill"
    # The device keeps serving: reads of what was acknowledged are right while it runs.
    for sector, data in acknowledged.items():
        assert d.request(VIRTIO_BLK_T_IN, sector, DATA, len(data))[0] == VIRTIO_BLK_S_OK
        assert rig.memory.read(DATA, len(data)) == data
    d.request(VIRTIO_BLK_T_FLUSH, 0)
    image.close()

    # Reopened from the files, the acknowledged data is all there and the VMDK is consistent.
    res = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    again = open_disk(disk, read_only=True)
    try:
        for sector, data in acknowledged.items():
            buf = bytearray(len(data))
            again.read_into(sector * 512, buf)
            assert bytes(buf) == data, f"acknowledged write at sector {sector} was lost"
    finally:
        again.close()
