"""Issue 14's disk defects (items 8, 11, 12, 13, 17, 18): each test failed before its fix."""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boite.disk import check_disk, compact_disk, convert_disk, create_disk, open_disk
from boite.disk.sparse import SparseHeader
from boite.errors import DiskError, DiskFormatError

MiB = 1 << 20
SECTOR = 512


def header(path: Path) -> SparseHeader:
    return SparseHeader.unpack(path.read_bytes()[:SECTOR], path)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def filled_thin(path: Path, size: int = 4 * MiB, seed: int = 3) -> bytes:
    """A thin disk with data spread over it; returns the whole disk's bytes."""
    create_disk(path, size)
    rng = random.Random(seed)
    with open_disk(path) as d:
        for _ in range(24):
            d.write(rng.randrange(0, size - 9000) // 512 * 512, rng.randbytes(9000))
        return d.read(0, size)


# -- item 8: a killed convert leaves nothing that looks like the output -------------------


@pytest.mark.parametrize("disk_type", ["thin", "flat", "raw"])
def test_killed_convert_leaves_no_output(tmp_path, disk_type):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:  # 192 MiB of data: the convert takes a while
        block = random.Random(1).randbytes(MiB)
        for _ in range(192):
            f.write(block)
    dst = tmp_path / ("dst.img" if disk_type == "raw" else "dst.vmdk")
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "disk", "convert", "-t", disk_type, str(src), str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill it once it has written a good part of the data, wherever that goes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        written = sum(
            f.stat().st_blocks * 512
            for f in tmp_path.rglob("*")
            if f.is_file() and f.name != "src.img"
        )
        if written > 24 * MiB:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "convert finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert not (tmp_path / "dst-flat.vmdk").exists()
    with pytest.raises(DiskError):
        check_disk(dst)
    # the next convert to the same name works and clears the dead one's leftovers
    convert_disk(src, dst, disk_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src.img", dst.name] + (["dst-flat.vmdk"] if disk_type == "flat" else [])
    )
    with open_disk(dst, read_only=True) as d:
        assert d.read(191 * MiB, MiB) == block


def test_convert_refuses_an_existing_destination(tmp_path):
    src = tmp_path / "s.vmdk"
    create_disk(src, MiB)
    dst = tmp_path / "d.vmdk"
    (tmp_path / "d-flat.vmdk").write_bytes(b"someone's file")
    with pytest.raises(DiskError, match="d-flat.vmdk.*exists"):
        convert_disk(src, dst, "flat")
    assert (tmp_path / "d-flat.vmdk").read_bytes() == b"someone's file"
    assert not dst.exists()


# -- item 11: flat disks are preallocated; too big is one typed line ----------------------


@pytest.mark.parametrize("disk_type", ["flat", "split-flat"])
def test_flat_disks_are_preallocated(tmp_path, disk_type):
    path = tmp_path / "f.vmdk"
    create_disk(path, 8 * MiB, disk_type)
    extents = [p for p in tmp_path.iterdir() if p != path]
    assert sum(p.stat().st_blocks * 512 for p in extents) >= 8 * MiB
    convert_disk(path, tmp_path / "c.vmdk", disk_type)
    extents = [p for p in tmp_path.iterdir() if p.name.startswith("c-")]
    assert sum(p.stat().st_blocks * 512 for p in extents) >= 8 * MiB


def test_8t_flat_disk_without_room_is_one_line(tmp_path, boite_cli):
    st = os.statvfs(tmp_path)
    if st.f_bavail * st.f_frsize >= 8 << 40:
        pytest.skip("this filesystem has 8 TiB free")
    out = boite_cli("disk", "create", "-t", "flat", "-s", "8T", tmp_path / "big.vmdk")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "space" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_flat_disk_past_the_file_size_limit_is_efbig_in_one_line(tmp_path):
    # RLIMIT_FSIZE makes the kernel answer EFBIG, as a filesystem with a small file limit does
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * MiB, 64 * MiB))

    out = subprocess.run(
        [sys.executable, "-m", "boite", "disk", "create", "-t", "flat", "-s", "1G"]
        + [str(tmp_path / "big.vmdk")],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "too large" in out.stderr.lower() and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


# -- item 12: header capacity contradicting the embedded descriptor -----------------------


def test_zeroed_capacity_is_reported_and_repair_keeps_the_data(tmp_path):
    p = tmp_path / "z.vmdk"
    before = filled_thin(p)
    size = p.stat().st_size
    patch(p, 12, bytes(8))  # header capacity
    report = check_disk(p)
    assert not report.ok
    assert any("capacity" in e and "descriptor" in e for e in report.errors), report.errors
    with pytest.raises(DiskFormatError, match="capacity"):
        open_disk(p, read_only=True)
    report = check_disk(p, repair=True)
    assert p.stat().st_size >= size - 65536
    assert report.ok, report.errors
    assert check_disk(p).ok
    with open_disk(p, read_only=True) as d:
        assert d.read(0, d.size) == before


def test_zeroed_capacity_on_a_bare_extent_never_truncates(tmp_path):
    """No descriptor to say the size: repair may not decide the grains are leaked."""
    p = tmp_path / "z.vmdk"
    filled_thin(p)
    h = header(p)
    h.desc_offset = h.desc_size = 0
    patch(p, 0, h.pack())
    size = p.stat().st_size
    patch(p, 12, bytes(8))
    report = check_disk(p, repair=True)
    assert not report.ok and p.stat().st_size == size


# -- item 13: stream grains inflate exactly to where their marker ends --------------------


def stream_disk(tmp_path: Path) -> tuple[Path, bytes, int]:
    src = tmp_path / "t.vmdk"
    data = filled_thin(src)
    s = tmp_path / "s.vmdk"
    convert_disk(src, s, "stream")
    # the first grain marker sits right after the 128 sectors of header and descriptor
    lba, size = struct.unpack("<QI", s.read_bytes()[128 * SECTOR : 128 * SECTOR + 12])
    return s, data, size


@pytest.mark.parametrize("how", ["short", "long", "flipped"])
def test_damaged_stream_grain_is_an_error(tmp_path, how):
    s, data, size = stream_disk(tmp_path)
    at = 128 * SECTOR
    if how == "short":  # the marker ends before the deflate stream does
        patch(s, at + 8, struct.pack("<I", size - 6))
    elif how == "long":  # the stream ends before the marker says
        patch(s, at + 8, struct.pack("<I", size + 3))
        patch(s, at + 12 + size, b"\x01\x02\x03")
    else:  # a flipped bit inside the stream (its Adler-32 no longer matches)
        raw = bytearray(s.read_bytes()[at + 12 + size - 5 : at + 12 + size - 4])
        patch(s, at + 12 + size - 5, bytes([raw[0] ^ 0x10]))
    with pytest.raises(DiskFormatError, match=r"s\.vmdk.*offset"):
        with open_disk(s, read_only=True) as d:
            d.read(0, d.size)
    report = check_disk(s)
    assert not report.ok and any("grain" in e for e in report.errors), report.errors


def test_intact_stream_checks_clean(tmp_path):
    s, data, _ = stream_disk(tmp_path)
    assert check_disk(s).ok
    with open_disk(s, read_only=True) as d:
        assert d.read(0, d.size) == data


# -- item 17: the descriptor's encoding ---------------------------------------------------


@pytest.mark.parametrize(
    "encoding,name", [("windows-1252", "Disque-été"), ("Shift_JIS", "ディスク"), ("UTF-8", "Ñame")]
)
def test_descriptor_encoding_is_honoured(tmp_path, encoding, name):
    extent = f"{name}-flat.vmdk"
    (tmp_path / extent).write_bytes(b"E" * 4096 + bytes(MiB - 4096))
    text = (
        "# Disk DescriptorFile\nversion=1\n"
        f'encoding="{encoding}"\nCID=1234abcd\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
        f'RW 2048 FLAT "{extent}" 0\n\nddb.adapterType = "lsilogic"\n'
    )
    p = tmp_path / f"{name}.vmdk"
    p.write_bytes(text.encode(encoding))
    with open_disk(p) as d:
        assert d.read(0, 4096) == b"E" * 4096
        d.write(4096, b"w" * 512)  # rewrites the descriptor (a new CID) in its encoding
    raw = p.read_bytes()
    assert extent.encode(encoding) in raw and f'encoding="{encoding}"'.encode() in raw
    assert check_disk(p).ok
    with open_disk(p, read_only=True) as d:
        assert d.read(4096, 512) == b"w" * 512


def test_unknown_or_non_ascii_encodings_are_refused(tmp_path):
    for enc in ("klingon", "UTF-16"):
        p = tmp_path / "e.vmdk"
        p.write_bytes(
            f'# Disk DescriptorFile\nencoding="{enc}"\nCID=1\ncreateType="monolithicFlat"\n'
            'RW 1 FLAT "x" 0\n'.encode()
        )
        with pytest.raises(DiskFormatError, match=r"e\.vmdk.*encoding.*offset \d+"):
            open_disk(p)


# -- item 18 ------------------------------------------------------------------------------


def test_short_flat_extent_is_reported(tmp_path):
    p = tmp_path / "f.vmdk"
    create_disk(p, 4 * MiB, "flat")
    with open_disk(p) as d:
        d.write(0, b"a" * MiB)
    os.truncate(tmp_path / "f-flat.vmdk", MiB)
    report = check_disk(p)
    assert not report.ok
    assert any("f-flat.vmdk" in e and str(MiB) in e for e in report.errors), report.errors
    # reads past the file's end are zeroes, as qemu's file driver gives
    with open_disk(p, read_only=True) as d:
        assert d.read(MiB - 512, 1024) == b"a" * 512 + bytes(512)


def test_zeroed_gd_entry_reads_and_repairs_from_the_redundant_gd(tmp_path):
    p = tmp_path / "g.vmdk"
    before = filled_thin(p)
    h = header(p)
    patch(p, h.gd_offset * SECTOR, bytes(4))  # GD entry 0
    with open_disk(p, read_only=True) as d:
        assert d.read(0, d.size) == before
    with pytest.raises(DiskFormatError, match="redundant"):
        open_disk(p)  # writing through half a directory: repair first
    report = check_disk(p)
    assert not report.ok and any("GD entry 0" in e for e in report.errors), report.errors
    report = check_disk(p, repair=True)
    assert report.ok, report.errors
    assert any("redundant" in x for x in report.fixed)
    assert check_disk(p).ok
    with open_disk(p) as d:
        assert d.read(0, d.size) == before
        d.write(0, b"n" * 512)
    with open_disk(p, read_only=True) as d:
        assert d.read(0, 512) == b"n" * 512 and d.read(512, d.size - 512) == before[512:]


def test_zeroed_redundant_gd_entry_is_repaired_from_the_primary(tmp_path):
    p = tmp_path / "g.vmdk"
    before = filled_thin(p)
    h = header(p)
    patch(p, h.rgd_offset * SECTOR, bytes(4))
    assert not check_disk(p).ok
    assert check_disk(p, repair=True).ok
    assert check_disk(p).ok
    with open_disk(p, read_only=True) as d:
        assert d.read(0, d.size) == before


def many_extents(tmp_path: Path, n: int, kind: str) -> Path:
    lines = (
        ["RW 1 ZERO"] * n if kind == "zero" else [f'RW 1 FLAT "m-flat.vmdk" {i}' for i in range(n)]
    )
    if kind != "zero":
        (tmp_path / "m-flat.vmdk").write_bytes(bytes(range(256)) * (n * 2))
    p = tmp_path / "m.vmdk"
    p.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n' + "\n".join(lines) + "\n"
    )
    return p


def compact_profile_events(tmp_path: Path, n: int) -> int:
    """Python and C calls that `disk compact` makes on n one-sector ZERO extents."""
    (tmp_path / str(n)).mkdir()
    p = many_extents(tmp_path / str(n), n, "zero")
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        count += 1

    sys.setprofile(prof)
    try:
        compact_disk(p)
    finally:
        sys.setprofile(None)
    return count


def test_compact_work_grows_linearly_with_extents(tmp_path):
    small, big = compact_profile_events(tmp_path, 3000), compact_profile_events(tmp_path, 12000)
    assert big < 6 * small, (small, big)  # 4x the extents; quadratic work would be 16x


def test_thousands_of_extents_on_one_file_share_a_descriptor(tmp_path):
    p = many_extents(tmp_path, 3000, "flat")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "from boite.disk import open_disk, compact_disk\n"
        f"with open_disk({str(p)!r}) as d:\n"
        "    assert d.read(0, 512) == bytes(range(256)) * 2\n"
        "    d.write(512 * 2999, b'z' * 512)\n"
        f"compact_disk({str(p)!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open_disk(p, read_only=True) as d:
        assert d.read(512 * 2999, 512) == b"z" * 512


def test_descriptor_capacity_past_the_directories_gives_way_to_the_header(tmp_path):
    """A descriptor that claims more than the grain directories can hold (as a hostile or
    damaged one may) is what repair corrects; checking it reads nothing unbounded."""
    p = tmp_path / "d.vmdk"
    before = filled_thin(p)
    h = header(p)
    raw = p.read_bytes()[h.desc_offset * SECTOR : (h.desc_offset + h.desc_size) * SECTOR]
    line = f"RW {4 * MiB // SECTOR} SPARSE".encode()
    assert line in raw
    patch(p, h.desc_offset * SECTOR, raw.replace(line, b"RW 2199023255552 SPARSE"))
    report = check_disk(p)
    assert not report.ok and any("2199023255552" in e for e in report.errors), report.errors
    report = check_disk(p, repair=True)
    assert report.ok, report.errors
    with open_disk(p, read_only=True) as d:
        assert d.size == 4 * MiB and d.read(0, d.size) == before


HEADER_FIELDS = [(12, "<Q"), (20, "<Q"), (28, "<Q"), (36, "<Q"), (44, "<I"), (48, "<Q")]
HEADER_FIELDS += [(56, "<Q"), (64, "<Q")]


@pytest.mark.parametrize("offset,fmt", HEADER_FIELDS, ids=lambda v: str(v))
def test_repair_of_a_damaged_header_never_loses_grains(tmp_path, offset, fmt):
    """Whatever one header field says, repair gives up no grain: with the header put back
    afterwards the disk reads as before (nothing truncated, no table emptied)."""
    p = tmp_path / "h.vmdk"
    before = filled_thin(p)
    good = p.read_bytes()[:SECTOR]
    for value in (0, 1, 3, 4096, 1 << 33):
        patch(p, offset, struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1)))
        try:
            check_disk(p, repair=True)
        except (DiskError, DiskFormatError):
            pass
        patch(p, 0, good)
        with open_disk(p, read_only=True) as d:
            assert d.read(0, d.size) == before, (offset, value)


def test_repair_never_loses_what_a_copy_still_holds(tmp_path):
    """Random damage to one of the header, a grain directory or a grain table (the other
    copy intact): repair gives up no grain. Afterwards (the header put back if it was the
    one damaged) the disk reads as before, or still refuses with a typed error: never
    different data."""
    base = tmp_path / "base.vmdk"
    before = filled_thin(base)
    raw = base.read_bytes()
    h = header(base)
    gt = struct.unpack("<I", raw[h.gd_offset * SECTOR : h.gd_offset * SECTOR + 4])[0]
    rgt = struct.unpack("<I", raw[h.rgd_offset * SECTOR : h.rgd_offset * SECTOR + 4])[0]
    regions = {
        "header": (4, 80),
        "gd": (h.gd_offset * SECTOR, h.gd_offset * SECTOR + 4),
        "rgd": (h.rgd_offset * SECTOR, h.rgd_offset * SECTOR + 4),
        "gt": (gt * SECTOR, gt * SECTOR + 2048),
        "rgt": (rgt * SECTOR, rgt * SECTOR + 2048),
    }
    rng = random.Random(11)
    p = tmp_path / "x.vmdk"
    readable = 0
    for _ in range(120):
        p.write_bytes(raw)
        name = rng.choice(sorted(regions))
        a, b = regions[name]
        for _ in range(rng.randint(1, 3)):
            patch(p, rng.randrange(a, b), bytes([rng.randrange(256)]))
        try:
            check_disk(p, repair=True)
        except (DiskError, DiskFormatError):
            pass
        if name == "header":
            patch(p, 0, raw[:SECTOR])
        try:
            with open_disk(p, read_only=True) as d:
                assert d.read(0, d.size) == before, name
            readable += 1
        except (DiskError, DiskFormatError):
            pass
    assert readable > 100  # most damage of one copy is repaired


def test_convert_into_a_full_filesystem_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(32 * MiB))
    out = subprocess.run(
        [sys.executable, "-m", "boite", "disk", "convert", str(src), str(tmp_path / "d.vmdk")],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8 * MiB, 8 * MiB)),
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.img"]


def test_damaged_gd_offset_reads_and_repairs_through_the_redundant_gd(tmp_path):
    p = tmp_path / "o.vmdk"
    before = filled_thin(p)
    patch(p, 56, bytes(8))  # the header's gdOffset
    with open_disk(p, read_only=True) as d:
        assert d.read(0, d.size) == before
    with pytest.raises(DiskFormatError, match="redundant"):
        open_disk(p)
    report = check_disk(p)
    assert not report.ok and any("redundant" in e for e in report.errors), report.errors
    report = check_disk(p, repair=True)
    assert report.ok, report.errors
    assert check_disk(p).ok
    with open_disk(p) as d:
        assert d.read(0, d.size) == before
        d.write(0, b"r" * 512)
    with open_disk(p, read_only=True) as d:
        assert d.read(0, 512) == b"r" * 512


def test_repair_after_grow_keeps_the_moved_directories(tmp_path):
    """grow moves the grain directories to the end of the file; leaked space after them
    (a crash) is reclaimed without cutting them off."""
    from boite.disk import grow_disk

    p = tmp_path / "g.vmdk"
    before = filled_thin(p)
    grow_disk(p, 8 << 30)  # 256 directory entries: more than the directory's sector holds
    with open(p, "ab") as f:
        f.write(b"L" * 65536)  # grains a crashed writer appended and never recorded
    report = check_disk(p, repair=True)
    assert report.ok, report.errors
    assert check_disk(p).ok
    with open_disk(p, read_only=True) as d:
        assert d.read(0, len(before)) == before and d.size == 8 << 30
