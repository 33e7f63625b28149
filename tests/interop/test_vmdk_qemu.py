"""qemu-img/qemu-io made disks read and written by boite, and boite's disks checked by qemu,
libvmdk (pyvmdk, which checks the CID chain) and dissect.hypervisor."""

from __future__ import annotations

import random

import pytest
from vmdkpeers import (
    Reference,
    peer_reads,
    pyvmdk_open,
    qemu_img,
    qemu_io,
    random_writes,
    requires_qemu,
)

from boite.disk import convert_disk, create_child, create_disk, disk_info, open_disk
from boite.errors import DiskError, DiskFormatError

pytestmark = requires_qemu

MiB = 1 << 20
GiB = 1 << 30


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


# qemu splits at 4194304 sectors (2 GiB), VMware at 4192256: 5 GiB crosses both kinds.
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
WRITES = [  # (offset, length, pattern) written by qemu-io
    (0, 65536, 0x11),
    (2 * GiB - 8192, 16384, 0x22),  # across the first extent boundary
    (4 * GiB + 12288, 8192, 0x33),
    (5 * GiB - 4096, 4096, 0x44),  # the last sectors
    (123 * MiB + 512, 1536, 0x55),  # part of one grain
]


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_made_disk_read_and_written_by_boite(tmp_path, subformat):
    path = tmp_path / "q.vmdk"
    out = qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", path, "5G")
    assert out.returncode == 0, out.stderr
    qemu_io(path, *(f"write -P {p:#x} {o} {n}" for o, n, p in WRITES))
    with open_disk(path) as d:
        assert d.size == 5 * GiB
        for o, n, p in WRITES:
            assert d.read(o, n) == pattern(p, n), (o, n)
            if o + n < 5 * GiB and o + n != 2 * GiB + 8192:
                assert d.read(o + n, 512) == bytes(512)
        assert d.read(3 * GiB, 65536) == bytes(65536)
        # boite writes into qemu's disk, qemu-io reads the pattern back
        d.write(3 * GiB + 4096, pattern(0x66, 70000 - 70000 % 512))
        d.write(2 * GiB - 512, pattern(0x77, 1024))
    qemu_io(path, "read -P 0x66 3221229568 69632", "read -P 0x77 2147483136 1024")
    assert qemu_img("check", path).returncode == 0


def test_qemu_zeroed_grains_read_as_zero(tmp_path):
    path = tmp_path / "z.vmdk"
    assert qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", path, "64M").returncode == 0
    qemu_io(path, "write -P 0x5a 0 1M", "write -z 65536 131072", "write -z 4M 64k")
    with open_disk(path, read_only=True) as d:
        assert d.extents[0].zero_grain
        assert d.read(0, 65536) == pattern(0x5A, 65536)
        assert d.read(65536, 131072) == bytes(131072)
        assert d.read(196608, 65536) == pattern(0x5A, 65536)


def test_qemu_stream_optimized_read_by_boite(tmp_path):
    raw = tmp_path / "src.raw"
    rng = random.Random(3)
    ref = Reference(raw, 40 * MiB)
    for _ in range(30):
        n = rng.randrange(1, 200_000)
        ref.write(rng.randrange(0, ref.size - n), rng.randbytes(n))
    ref.write(0, b"compressible " * 10000)
    path = tmp_path / "s.vmdk"
    out = qemu_img(
        "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path
    )
    assert out.returncode == 0, out.stderr
    assert disk_info(path).type == "streamOptimized"
    with open_disk(path, read_only=True) as d:
        assert d.read(0, d.size) == raw.read_bytes()


def test_qemu_children_read_and_written_by_boite(tmp_path):
    base = tmp_path / "base.vmdk"
    mid = tmp_path / "base-000001.vmdk"
    top = tmp_path / "base-000002.vmdk"
    assert qemu_img("create", "-f", "vmdk", base, "32M").returncode == 0
    qemu_io(base, "write -P 0xa1 0 8M")
    assert qemu_img("create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", mid).returncode == 0
    qemu_io(mid, "write -P 0xb2 1M 1M", "write -P 0xb3 10M 512")
    assert qemu_img("create", "-f", "vmdk", "-b", mid.name, "-F", "vmdk", top).returncode == 0
    qemu_io(top, "write -P 0xc3 1536k 4096")
    with open_disk(top) as d:
        assert [p.path for p in d.chain] == [str(top), str(mid), str(base)]
        assert d.read(0, MiB) == pattern(0xA1, MiB)
        assert d.read(MiB, 512 * 1024) == pattern(0xB2, 512 * 1024)
        assert d.read(1536 * 1024, 4096) == pattern(0xC3, 4096)
        assert d.read(1536 * 1024 + 4096, 4096) == pattern(0xB2, 4096)
        assert d.read(10 * MiB, 1024) == pattern(0xB3, 512) + bytes(512)
        d.write(5 * MiB + 100, pattern(0xD4, 1000))  # partial grain over the base's data
    qemu_io(top, "read -P 0xa1 5M 100", "read -P 0xd4 5242980 1000", "read -P 0xa1 5243980 1000")
    assert qemu_img("check", top).returncode == 0


BOITE_TYPES = [
    ("thin", 48 * MiB),
    ("flat", 48 * MiB),
    ("split-thin", 2100 * MiB),
    ("split-flat", 2100 * MiB),
]


@pytest.mark.parametrize("disk_type,size", BOITE_TYPES)
def test_boite_made_disk_agrees_with_qemu_libvmdk_dissect(tmp_path, disk_type, size):
    path = tmp_path / "b.vmdk"
    create_disk(path, size, disk_type)
    ref = Reference(tmp_path / "ref.raw", size)
    rng = random.Random(disk_type)
    with open_disk(path) as d:
        random_writes(d, ref, rng, 60, hot=[2047 * MiB, size - 1])
    out = qemu_img("check", path)
    assert out.returncode == 0, out.stdout + out.stderr
    out = qemu_img("compare", "-f", "vmdk", "-F", "raw", path, ref.path)
    assert out.returncode == 0, out.stdout + out.stderr
    peer_reads(path, [], ref, rng)
    # boite reads back too, and converts to a stream-optimized disk the peers read alike
    stream = tmp_path / "b-stream.vmdk"
    convert_disk(path, stream, "stream")
    assert qemu_img("check", stream).returncode == 0
    out = qemu_img("compare", "-f", "vmdk", "-F", "raw", stream, ref.path)
    assert out.returncode == 0, out.stdout + out.stderr
    peer_reads(stream, [], ref, rng)


def test_boite_chain_agrees_with_qemu_libvmdk_dissect(tmp_path):
    size = 24 * MiB
    base = tmp_path / "vm.vmdk"
    c1 = tmp_path / "vm-000001.vmdk"
    c2 = tmp_path / "vm-000002.vmdk"
    create_disk(base, size)
    ref = Reference(tmp_path / "ref.raw", size)
    rng = random.Random(7)
    with open_disk(base) as d:
        random_writes(d, ref, rng, 30)
    create_child(base, c1)
    with open_disk(c1) as d:
        random_writes(d, ref, rng, 30)
    create_child(c1, c2)
    with open_disk(c2) as d:
        random_writes(d, ref, rng, 30)
        d.discard(4 * MiB, 3 * MiB + 512)
        ref.write(4 * MiB, bytes(3 * MiB + 512))
    info = disk_info(c2)
    assert [link["path"] for link in info.chain] == [str(c2), str(c1), str(base)] and info.chain_ok
    out = qemu_img("info", "--backing-chain", c2)
    assert out.returncode == 0 and str(c1.name) in out.stdout and str(base.name) in out.stdout
    for p in (base, c1, c2):
        assert qemu_img("check", p).returncode == 0
    out = qemu_img("compare", "-f", "vmdk", "-F", "raw", c2, ref.path)
    assert out.returncode == 0, out.stdout + out.stderr
    peer_reads(c2, [c1, base], ref, rng)


def test_changed_parent_is_refused_naming_both_files(tmp_path):
    base = tmp_path / "vm.vmdk"
    child = tmp_path / "vm-000001.vmdk"
    create_disk(base, MiB)
    create_child(base, child)
    with open_disk(base) as d:
        d.write(0, b"changed under the child".ljust(512, b"\0"))
    with pytest.raises(DiskFormatError) as err:
        open_disk(child)
    assert str(child) in str(err.value) and str(base) in str(err.value)
    # libvmdk agrees: it refuses the stale link too
    with pytest.raises(OSError, match="content identifier"):
        pyvmdk_open(child, [base])


def test_qemu_created_stream_optimized_written_by_qemu_io(tmp_path):
    path = tmp_path / "so.vmdk"
    out = qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized", path, "64M")
    assert out.returncode == 0, out.stderr
    # qemu appends whole compressed grains only
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", "write -P 0x33 40M 128k")
    with open_disk(path, read_only=True) as d:
        assert d.read(0, MiB) == pattern(0x11, MiB)
        assert d.read(MiB, 3 * MiB) == bytes(3 * MiB)
        assert d.read(4 * MiB, 65536) == pattern(0x22, 65536)
        assert d.read(40 * MiB - 512, 131072 + 1024) == bytes(512) + pattern(0x33, 131072) + bytes(
            512
        )
    with pytest.raises(DiskError, match="read-only"):
        open_disk(path)
