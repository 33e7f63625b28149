"""Helpers for snapshot tests: read and write a box's disks as the guest sees them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from boite.box import Box
from boite.disk import open_disk

DISK = 4 << 20


def disk_bytes(path: Path | str) -> bytes:
    with open_disk(path, read_only=True) as d:
        return d.read(0, d.size)


def digest(path: Path | str) -> str:
    return hashlib.sha256(disk_bytes(path)).hexdigest()


def write_disk(box: Box, offset: int, data: bytes, node: str = "scsi0:0") -> None:
    """Write through the box's current link, as the guest would."""
    name = box.vmx[f"{node}.fileName"]
    with open_disk(box.disk_path(name)) as d:
        d.write(offset, data)
        d.flush()


@pytest.fixture(name="box")
def box_fixture(tmp_path) -> Box:
    """A box with two real VMDK disks on two buses."""
    b = Box.create(tmp_path / "vm", disk_size=DISK)
    # A second disk on another bus, so every operation handles more than one chain.
    from boite.disk import create_disk

    create_disk(tmp_path / "vm" / "data.vmdk", 2 << 20, "thin")
    b.vmx["sata0.present"] = "TRUE"
    b.vmx["sata0:1.present"] = "TRUE"
    b.vmx["sata0:1.fileName"] = "data.vmdk"
    b.vmx.save(b.vmx_path)
    return Box.open(b.dir)
