"""Bare-metal guests with minimal virtio-blk and ATA drivers, under KVM and the emulator.

Each guest (tests/guests/vblk32.asm, ata32.asm) reads sectors 0-7 of a VMDK, writes their
bitwise NOT to sectors 64-71, flushes, reads them back and compares; the host then checks
the VMDK with qemu-img compare against the expected raw image.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from boite.accel.base import StopReason
from boite.disk import open_disk
from conftest import requires_kvm

SIZE = 8 << 20


def _kvm():
    from boite.accel.kvm import KvmAccelerator

    return KvmAccelerator(irqchip=False, ap_start="entry")


def _emu():
    from boite.accel.emu import EmuAccelerator

    return EmuAccelerator()


def _pattern() -> bytes:
    return b"".join(i.to_bytes(4, "little") * 128 for i in range(SIZE // 512))


@pytest.fixture
def vmdk(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(_pattern())
    vmdk = tmp_path / "disk.vmdk"
    res = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    return vmdk, raw


ACCELS = [pytest.param(_kvm, id="kvm", marks=requires_kvm), pytest.param(_emu, id="emu")]


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("kind", ["virtio", "ata"])
def test_bare_metal_driver(vmdk: tuple[Path, Path], kind: str, accel) -> None:
    from guests.diskguest import run

    path, raw = vmdk
    result = run(kind, str(path), accel)
    assert result.result.reason == StopReason.SHUTDOWN, (result.result, result.output)
    assert result.result.exit_status == (0x21 << 1) | 1, (result.result, result.output)
    assert b"read, wrote, flushed, read back" in result.output
    want = bytearray(raw.read_bytes())
    want[64 * 512 : 72 * 512] = bytes(b ^ 0xFF for b in want[:4096])
    raw.write_bytes(want)
    res = subprocess.run(
        ["qemu-img", "compare", "-F", "raw", str(path), str(raw)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    with open_disk(path) as img:
        assert img.read(64 * 512, 4096) == bytes(want[64 * 512 : 72 * 512])
