"""A box with two real VMDK disks on two buses, for the snapshot tests."""

from __future__ import annotations

import pytest
from snaptools import DISK

from boite.box import Box


@pytest.fixture
def box(tmp_path) -> Box:
    b = Box.create(tmp_path / "vm", disk_size=DISK)
    # A second disk on another bus, so every operation handles more than one chain.
    from boite.disk import create_disk

    create_disk(tmp_path / "vm" / "data.vmdk", 2 << 20, "thin")
    b.vmx["sata0.present"] = "TRUE"
    b.vmx["sata0:1.present"] = "TRUE"
    b.vmx["sata0:1.fileName"] = "data.vmdk"
    b.vmx.save(b.vmx_path)
    return Box.open(b.dir)
