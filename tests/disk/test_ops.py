"""convert, grow, compact, map and the consolidation helpers, checked by reading back and by qemu-img."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from boite.disk import (
    check_disk,
    commit_child_into_parent,
    compact_disk,
    convert_disk,
    create_child,
    create_disk,
    disk_info,
    grow_disk,
    map_disk,
    merge_parent_into_child,
    open_disk,
)
from boite.errors import DiskError, DiskFormatError

MiB = 1 << 20
TYPES = ["thin", "flat", "split-thin", "split-flat", "stream"]
have_qemu = shutil.which("qemu-img") is not None


def fill(path, size: int, seed: int, count: int = 30) -> bytearray:
    model = bytearray(size)
    rng = random.Random(seed)
    with open_disk(path) as d:
        for _ in range(count):
            n = rng.randrange(1, 150_000)
            off = rng.randrange(0, size - n)
            data = rng.randbytes(n)
            d.write(off, data)
            model[off : off + n] = data
    return model


def read_all(path) -> bytes:
    with open_disk(path, read_only=True) as d:
        return d.read(0, d.size)


def qemu_check(path) -> None:
    if have_qemu:
        out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dst_type", TYPES + ["raw"])
def test_convert_every_type_both_ways(tmp_path, dst_type):
    src = tmp_path / "src.vmdk"
    create_disk(src, 12 * MiB)
    model = fill(src, 12 * MiB, 1)
    dst = tmp_path / ("dst.img" if dst_type == "raw" else "dst.vmdk")
    seen = []
    convert_disk(src, dst, dst_type, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert read_all(dst) == model
    info = disk_info(dst)
    assert info.capacity == 12 * MiB
    # sparseness kept: far less than the capacity is allocated (flat types are preallocated,
    # as vdiskmanager's -t 2/-t 3 are, and the filesystem may call any of that data)
    if dst_type not in ("flat", "split-flat"):
        assert info.allocated < 8 * MiB
    if dst_type != "raw":
        qemu_check(dst)
    back = tmp_path / "back.vmdk"
    convert_disk(dst, back, "thin")
    assert read_all(back) == model


def test_convert_flattens_a_chain(tmp_path):
    base, child = tmp_path / "b.vmdk", tmp_path / "b-000001.vmdk"
    create_disk(base, 4 * MiB)
    model = fill(base, 4 * MiB, 2)
    create_child(base, child)
    with open_disk(child) as d:
        d.write(MiB, b"c" * 4096)
        model[MiB : MiB + 4096] = b"c" * 4096
    flat = tmp_path / "flat.vmdk"
    convert_disk(child, flat, "thin")
    assert read_all(flat) == model and disk_info(flat).parent is None


@pytest.mark.parametrize("disk_type", ["thin", "flat", "split-thin", "split-flat"])
def test_grow_keeps_data_cid_and_chain(tmp_path, disk_type):
    path = tmp_path / "g.vmdk"
    create_disk(path, 3 * MiB, disk_type)
    model = fill(path, 3 * MiB, 3)
    cid = disk_info(path).cid
    grow_disk(path, 7 * MiB)
    assert disk_info(path).cid == cid
    with open_disk(path) as d:
        assert d.size == 7 * MiB
        assert d.read(0, 3 * MiB) == model and d.read(3 * MiB, 4 * MiB) == bytes(4 * MiB)
        d.write(7 * MiB - 512, b"e" * 512)
    assert check_disk(path).ok
    qemu_check(path)
    with pytest.raises(DiskError, match="shrinking"):
        grow_disk(path, MiB)


def test_a_grow_killed_before_its_descriptor_is_finished_by_the_next_writable_open(tmp_path):
    """grow_sparse writes and syncs the tables and the header (its commit) before the
    embedded descriptor: a kill between them leaves the header larger. A read-only open
    refuses that (it cannot fix it); a writable one (boite start) finishes the grow."""
    from boite.disk.sparse import grow_sparse

    path = tmp_path / "k.vmdk"
    create_disk(path, 3 * MiB, "thin")
    model = fill(path, 3 * MiB, 5)
    grow_sparse(path, (7 * MiB) // 512, None)  # as killed before the descriptor's write
    with pytest.raises(DiskFormatError, match="check --repair"):
        open_disk(path, read_only=True)
    with open_disk(path) as d:
        assert d.size == 7 * MiB
        assert d.read(0, 3 * MiB) == model and d.read(3 * MiB, 4 * MiB) == bytes(4 * MiB)
    with open_disk(path, read_only=True) as d:
        assert d.size == 7 * MiB
    assert check_disk(path).ok
    qemu_check(path)


def test_a_header_larger_than_its_directories_is_refused_not_finished(tmp_path):
    """A hostile header capacity (offset 12) far past what the grain directories hold
    is not taken for a killed grow: the writable open refuses it and writes nothing."""
    import struct

    path = tmp_path / "h.vmdk"
    create_disk(path, 3 * MiB, "thin")
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<Q", (64 << 30) // 512))  # 64 GiB: 2,048 directory entries
    before = path.read_bytes()
    with pytest.raises(DiskFormatError, match="check --repair"):
        open_disk(path)
    assert path.read_bytes() == before


def test_compact_drops_zero_grains_keeps_content_and_children(tmp_path):
    path = tmp_path / "c.vmdk"
    child = tmp_path / "c-000001.vmdk"
    create_disk(path, 8 * MiB)
    model = fill(path, 8 * MiB, 4)
    with open_disk(path) as d:
        d.write(2 * MiB, bytes(MiB))  # allocated zero grains
        model[2 * MiB : 3 * MiB] = bytes(MiB)
    create_child(path, child)
    before = disk_info(path)
    compact_disk(path)
    after = disk_info(path)
    assert after.allocated < before.allocated and after.cid == before.cid
    assert read_all(path) == model
    assert read_all(child) == model  # the child still opens: same CID, same content
    assert check_disk(path).ok and check_disk(child).ok
    qemu_check(path)


def test_compact_child_keeps_zero_grains_that_hide_the_parent(tmp_path):
    base, child = tmp_path / "b.vmdk", tmp_path / "b-000001.vmdk"
    create_disk(base, 2 * MiB)
    with open_disk(base) as d:
        d.write(0, b"p" * (2 * MiB))
    create_child(base, child)
    with open_disk(child) as d:
        d.write(0, bytes(65536))  # zeroes over the parent's data: must stay
        d.write(65536, b"q" * 65536)
    compact_disk(child)
    with open_disk(child, read_only=True) as d:
        assert d.read(0, 65536) == bytes(65536)
        assert d.read(65536, 65536) == b"q" * 65536
        assert d.read(131072, 65536) == b"p" * 65536


def test_map_reports_layers(tmp_path):
    base, child = tmp_path / "b.vmdk", tmp_path / "b-000001.vmdk"
    create_disk(base, 4 * MiB)
    with open_disk(base) as d:
        d.write(0, b"a" * (2 * 65536))
    create_child(base, child)
    with open_disk(child) as d:
        d.write(65536, b"b" * 65536)
        d.write(3 * MiB, b"b" * 512)
    entries = [(e.offset, e.length, e.depth) for e in map_disk(child)]
    assert entries == [(0, 65536, 1), (65536, 65536, 0), (3 * MiB, 65536, 0)]
    raw = tmp_path / "r.img"
    convert_disk(child, raw)
    assert sum(e.length for e in map_disk(raw)) < 4 * MiB


def test_commit_child_into_parent(tmp_path):
    base, child = tmp_path / "b.vmdk", tmp_path / "b-000001.vmdk"
    create_disk(base, 4 * MiB)
    model = fill(base, 4 * MiB, 5)
    create_child(base, child)
    with open_disk(child) as d:
        for off in (0, 100_000, 3 * MiB + 7):
            d.write(off, b"x" * 9000)
            model[off : off + 9000] = b"x" * 9000
    old = disk_info(base).cid
    new = commit_child_into_parent(child)
    assert new != old and disk_info(base).cid == new
    assert read_all(base) == model
    assert not disk_info(child).chain_ok  # stale now, as documented
    qemu_check(base)


def test_merge_parent_into_child_keeps_grandchildren_valid(tmp_path):
    a, b, c, d_ = (tmp_path / f"{n}.vmdk" for n in ("a", "a-000001", "a-000002", "a-000003"))
    create_disk(a, 4 * MiB)
    model = fill(a, 4 * MiB, 6)
    create_child(a, b)
    with open_disk(b) as d:
        d.write(MiB, b"b" * 70000)
        model[MiB : MiB + 70000] = b"b" * 70000
    create_child(b, c)
    with open_disk(c) as d:
        d.write(MiB + 5000, b"c" * 100)
        model[MiB + 5000 : MiB + 5100] = b"c" * 100
    create_child(c, d_)
    merge_parent_into_child(c)  # c absorbs b, then points at a
    info = disk_info(c)
    assert info.parent == str(a) and info.chain_ok
    assert read_all(c) == model
    assert read_all(d_) == model  # c's CID did not change
    os.unlink(b)
    assert read_all(d_) == model
    qemu_check(d_)


def test_unclean_disk_opens_after_check_and_refuses_when_broken(tmp_path):
    path = tmp_path / "u.vmdk"
    create_disk(path, MiB)
    d = open_disk(path)
    d.write(0, b"u" * 512)
    d.flush()
    # simulate a crash: the process never closed it
    for ext in d.extents:
        os.close(ext.fd)
        ext.fd = -1
    assert disk_info(path).unclean
    with open_disk(path) as d2:  # consistent: opens
        assert d2.read(0, 512) == b"u" * 512
    assert not disk_info(path).unclean
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(b"\1")
    with open_disk(path, read_only=True) as d3:
        gt = d3.extents[0].gd[0]
    with open(path, "r+b") as f:  # a GT entry into the tables
        f.seek(gt * 512 + 8)
        f.write((3).to_bytes(4, "little"))
    with pytest.raises(DiskFormatError, match="check --repair"):
        open_disk(path)
    assert check_disk(path, repair=True).ok
    with open_disk(path) as d4:
        assert d4.read(0, 512) == b"u" * 512


@pytest.mark.parametrize("new_size", [40 * MiB, 9 * 1024 * MiB], ids=["same-gd-sector", "gd-moves"])
def test_grow_thin_in_place_without_moving_data(tmp_path, new_size):
    path = tmp_path / "g.vmdk"
    create_disk(path, 3 * MiB)
    model = fill(path, 3 * MiB, 8)
    before = os.stat(path).st_ino
    grow_disk(path, new_size)
    assert os.stat(path).st_ino == before  # same file: grown in place, nothing copied
    with open_disk(path) as d:
        assert d.size == new_size and d.read(0, 3 * MiB) == model
        d.write(new_size - 4096, b"t" * 4096)
        d.write(5 * MiB, b"m" * 70000)
    with open_disk(path, read_only=True) as d:
        assert d.read(new_size - 4096, 4096) == b"t" * 4096
        assert d.read(0, 3 * MiB) == model
    assert check_disk(path).ok and check_disk(path).leaked_bytes == 0
    import pyvmdk
    from dissect.hypervisor.disk.vmdk import VMDK

    h = pyvmdk.handle()
    h.open(str(path))
    h.open_extent_data_files()
    try:
        assert h.get_media_size() == new_size
        assert h.read_buffer_at_offset(4096, new_size - 4096) == b"t" * 4096
        assert h.read_buffer_at_offset(3 * MiB, 0) == model
    finally:
        h.close()
    v = VMDK(path)
    v.seek(5 * MiB)
    assert v.read(70000) == b"m" * 70000
    qemu_check(path)
    if have_qemu:
        out = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True)
        assert f"({new_size} bytes)" in out.stdout
        out = subprocess.run(
            ["qemu-io", "-f", "vmdk", "-c", f"read -P 0x74 {new_size - 4096} 4096", str(path)],
            capture_output=True,
            text=True,
        )
        assert "Pattern verification failed" not in out.stdout and out.returncode == 0


def test_convert_raw_with_small_holes_to_stream(tmp_path):
    raw = tmp_path / "holes.img"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        for off in (0, 8192, 20480, 65536 + 4096, 3 * MiB + 12288):
            f.seek(off)
            f.write(b"d" * 4096)
    out = tmp_path / "s.vmdk"
    convert_disk(raw, out, "stream")
    assert read_all(out) == raw.read_bytes()
    qemu_check(out)


@pytest.mark.parametrize("disk_type", ["split-thin", "flat", "split-flat", "stream"])
def test_compact_every_type(tmp_path, disk_type):
    src = tmp_path / "src.vmdk"
    create_disk(src, 6 * MiB)
    model = fill(src, 6 * MiB, 9)
    with open_disk(src) as d:
        d.write(MiB, bytes(2 * MiB))
        model[MiB : 3 * MiB] = bytes(2 * MiB)
    path = tmp_path / "c.vmdk"
    if disk_type == "stream":
        convert_disk(src, path, "stream")
    else:
        create_disk(path, 6 * MiB, disk_type)
        with open_disk(path) as d:
            d.write(0, read_all(src))  # every grain allocated, zero ones included
    cid = disk_info(path).cid
    before = disk_info(path).allocated
    compact_disk(path)
    after = disk_info(path)
    assert read_all(path) == model and after.cid == cid
    assert after.allocated <= before and (disk_type == "stream" or after.allocated < before)
    assert check_disk(path).ok
    qemu_check(path)
