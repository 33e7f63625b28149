"""Descriptor-level layouts: ZERO extents, flat extents at an offset, RDONLY extents."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from boite.disk import disk_info, open_disk
from boite.errors import DiskError

MiB = 1 << 20


def write_descriptor(path, extents: list[str]) -> None:
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n' + "\n".join(extents) + "\n"
    )


def test_zero_and_offset_flat_extents(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "d-flat.vmdk").write_bytes(b"h" * 4096 + data)
    path = tmp_path / "d.vmdk"
    write_descriptor(
        path, ['RW 2048 FLAT "d-flat.vmdk" 8', "RW 4096 ZERO", 'RDONLY 2048 FLAT "d-flat.vmdk" 8']
    )
    with open_disk(path) as d:
        assert d.size == 4 * MiB
        assert d.read(0, MiB) == data
        assert d.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert d.read(3 * MiB - 100, 200) == bytes(100) + data[:100]
        d.write(512, b"w" * 512)
        with pytest.raises(DiskError):
            d.write(MiB, b"z" * 512)  # ZERO extents have no storage
        with pytest.raises(DiskError):
            d.write(3 * MiB, b"r" * 512)  # RDONLY extent
        with pytest.raises(DiskError):
            d.discard(3 * MiB, 4096)
        d.discard(MiB, 4096)  # a ZERO extent already reads as zeroes
    assert (tmp_path / "d-flat.vmdk").read_bytes()[4096 + 512 : 4096 + 1024] == b"w" * 512
    info = disk_info(path)
    assert [e["type"] for e in info.extents] == ["FLAT", "ZERO", "FLAT"]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_flat_extents_at_offsets_agree_with_qemu(tmp_path):
    # ZERO and RDONLY extents above follow the spec alone: qemu skips extent lines without
    # a file name or not RW, libvmdk drops ZERO extents and dissect fails on them.
    data = bytes(range(256)) * 4096
    (tmp_path / "d-flat.vmdk").write_bytes(b"h" * 4096 + data + data[::-1])
    path = tmp_path / "d.vmdk"
    write_descriptor(path, ['RW 2048 FLAT "d-flat.vmdk" 2056', 'RW 2048 FLAT "d-flat.vmdk" 8'])
    with open_disk(path) as d:
        assert d.read(0, 2 * MiB) == data[::-1] + data
        d.write(MiB - 256, b"x" * 512)
    expect = tmp_path / "expect.raw"
    raw = bytearray(data[::-1] + data)
    raw[MiB - 256 : MiB + 256] = b"x" * 512
    expect.write_bytes(raw)
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(path), str(expect)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
