"""virtio-blk and ATA on real VMDKs (made by qemu-img and by boite), checked by qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_ata import AtaPio
from test_virtio_blk import DATA, BlkRig, make_pattern

from boite.disk import create_disk, open_disk
from boite.machine.bus import Bus
from boite.machine.devices.ata import AtaChannel, AtaDrive
from boite.machine.irq import IrqLine
from boite.machine.virtio.blk import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

SIZE = 16 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def make_vmdk(tmp_path: Path, maker: str, name: str) -> tuple[Path, Path]:
    """A VMDK holding a known pattern in its first 4 MiB, and the raw 'expected' twin."""
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(make_pattern(4 << 20, seed=21) + bytes(SIZE - (4 << 20)))
    vmdk = tmp_path / f"{name}.vmdk"
    if maker == "qemu-img":
        res = qemu_img(
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            str(raw),
            str(vmdk),
        )
        assert res.returncode == 0, res.stderr
    elif maker == "raw":  # boite's RawImage: the preadv-into-guest-RAM path
        vmdk = tmp_path / f"{name}.img"
        vmdk.write_bytes(raw.read_bytes())
    else:
        create_disk(vmdk, SIZE, "thin")
        with open_disk(vmdk) as img:
            img.write(0, raw.read_bytes()[: 4 << 20])
    return vmdk, raw


def compare(vmdk: Path, raw: Path) -> None:
    fmt = ["-f", "raw"] if vmdk.suffix == ".img" else []
    res = qemu_img("compare", *fmt, "-F", "raw", str(vmdk), str(raw))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("maker", ["qemu-img", "boite", "raw"])
def test_virtio_blk_on_a_vmdk(tmp_path: Path, maker: str) -> None:
    vmdk, raw = make_vmdk(tmp_path, maker, "vda")
    image = open_disk(vmdk)
    rig = BlkRig(image, indirect=True)
    d = rig.drv
    d.setup()
    assert d.capacity == SIZE // 512
    # Read the known pattern through the device.
    assert d.request(VIRTIO_BLK_T_IN, 0, DATA, 256 << 10)[0] == VIRTIO_BLK_S_OK
    assert rig.memory.read(DATA, 256 << 10) == raw.read_bytes()[: 256 << 10]
    # Write into allocated and unallocated grains, flush, close.
    want = bytearray(raw.read_bytes())
    for sector in (8, 12 << 11):  # inside the pattern; past it (a fresh grain)
        data = make_pattern(64 << 10, seed=sector)
        rig.memory.write(DATA, data)
        assert (
            d.request(VIRTIO_BLK_T_OUT, sector, DATA, len(data), write=True)[0] == VIRTIO_BLK_S_OK
        )
        want[sector * 512 : sector * 512 + len(data)] = data
    assert d.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    image.close()
    raw.write_bytes(want)
    compare(vmdk, raw)


@pytest.mark.parametrize("maker", ["qemu-img", "boite"])
def test_ata_on_a_vmdk(tmp_path: Path, maker: str) -> None:
    vmdk, raw = make_vmdk(tmp_path, maker, "sda")
    image = open_disk(vmdk)
    pio = Bus("pio")
    ch = AtaChannel(IrqLine(14), AtaDrive(image))
    ch.register(pio)
    d = AtaPio(pio, width=4)
    w = d.identify()
    assert w[100] | w[101] << 16 == SIZE // 512
    assert d.read(0, 64, ext=True) == raw.read_bytes()[: 64 * 512]
    want = bytearray(raw.read_bytes())
    for lba in (3, 10 << 11):
        data = make_pattern(32 * 512, seed=lba)
        d.write(lba, data, ext=True)
        want[lba * 512 : lba * 512 + len(data)] = data
    d.command(0xEA)  # FLUSH CACHE EXT
    image.close()
    raw.write_bytes(want)
    compare(vmdk, raw)
