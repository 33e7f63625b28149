"""Hostile and damaged files: every case is a DiskFormatError (or DiskError) naming the file,
nothing outside the disk's files is touched, nothing hangs."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.disk import check_disk, create_child, create_disk, disk_info, open_disk
from boite.disk.descriptor import parse_descriptor
from boite.errors import DiskError, DiskFormatError

MiB = 1 << 20
EXAMPLES = int(os.environ.get("BOITE_HYPOTHESIS_EXAMPLES", "40"))

# (name, byte offset in the header, struct format)
FIELDS = [
    ("version", 4, "<I"),
    ("flags", 8, "<I"),
    ("capacity", 12, "<Q"),
    ("grainSize", 20, "<Q"),
    ("descriptorOffset", 28, "<Q"),
    ("descriptorSize", 36, "<Q"),
    ("numGTEsPerGT", 44, "<I"),
    ("rgdOffset", 48, "<Q"),
    ("gdOffset", 56, "<Q"),
    ("overHead", 64, "<Q"),
    ("compressAlgorithm", 77, "<H"),
]
HOSTILE = [0, 1, 3, 7, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


@pytest.fixture(scope="module")
def good_disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "g.vmdk"
    create_disk(path, 4 * MiB)
    rng = random.Random(5)
    with open_disk(path) as d:
        for _ in range(20):
            d.write(rng.randrange(0, 4 * MiB - 5000), rng.randbytes(5000))
    return path


def exercise(path: Path) -> None:
    """Everything a user might do with the file; only typed errors may come out."""
    for action in ("info", "check", "read", "write"):
        try:
            if action == "info":
                disk_info(path)
            elif action == "check":
                check_disk(path)
            elif action == "read":
                with open_disk(path, read_only=True) as d:
                    step = max(65536, d.size // 64)
                    for off in range(0, d.size, step):
                        d.read(off, min(70000, d.size - off))
            else:
                with open_disk(path) as d:
                    d.write(0, b"w" * 4096)
                    d.write(d.size - 1000 - (d.size - 1000) % 512, b"v" * 512)
                    d.flush()
        except (DiskFormatError, DiskError) as exc:
            assert str(path) in str(exc) or path.name in str(exc), exc
            if isinstance(exc, DiskFormatError):
                # where in the file: a byte offset, or the descriptor key at fault
                assert re.search(
                    r"offset \d+|parentFileNameHint|parentCID|extent file name", str(exc)
                ), exc


def copy_of(good: Path, tmp: Path) -> Path:
    p = tmp / "h.vmdk"
    shutil.copy(good, p)
    return p


@pytest.mark.parametrize("name,offset,fmt", FIELDS, ids=[f[0] for f in FIELDS])
def test_hostile_header_fields(good_disk, tmp_path, name, offset, fmt):
    for value in HOSTILE:
        p = copy_of(good_disk, tmp_path)
        try:
            raw = struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
        except struct.error:
            continue
        with open(p, "r+b") as f:
            f.seek(offset)
            f.write(raw)
        exercise(p)


def test_bad_header_errors_say_file_and_offset(good_disk, tmp_path):
    p = copy_of(good_disk, tmp_path)
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(struct.pack("<Q", 0))
    with pytest.raises(DiskFormatError, match=r"h\.vmdk.*grain size is 0.*offset 20"):
        open_disk(p)
    p.write_bytes(b"KDMV")
    with pytest.raises(DiskFormatError, match="h.vmdk.*truncated"):
        open_disk(p)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 80 * 512), st.integers(0, 255)), min_size=1, max_size=12))
def test_random_metadata_corruption(good_disk, flips):
    """Random bytes in the header, descriptor, grain directories and grain tables."""
    with tempfile.TemporaryDirectory() as tmp:
        p = copy_of(good_disk, Path(tmp))
        size = p.stat().st_size
        with open(p, "r+b") as f:
            for off, byte in flips:
                f.seek(off % size)
                f.write(bytes([byte]))
        exercise(p)
        assert sorted(os.listdir(tmp)) == ["h.vmdk"]  # nothing created beside it


def test_grain_table_entries_past_eof_or_into_metadata(good_disk, tmp_path):
    p = copy_of(good_disk, tmp_path)
    with open_disk(p, read_only=True) as d:
        ext = d.extents[0]
        gt_sector = ext.gd[0]
    for bad in (ext.file_size // 512 + 10, 2, 0xFFFFFFF0):
        with open(p, "r+b") as f:
            f.seek(gt_sector * 512)
            f.write(struct.pack("<I", bad))
        with pytest.raises(DiskFormatError, match=rf"h\.vmdk.*offset {gt_sector * 512}\b"):
            with open_disk(p, read_only=True) as d:
                d.read(0, 512)
        report = check_disk(p)
        assert not report.ok
        fixed = check_disk(p, repair=True)
        assert fixed.ok, fixed
        with open_disk(p, read_only=True) as d:
            assert d.read(0, 512) == bytes(512)  # the bogus grain was dropped


def test_overlapping_grains_found_by_check(good_disk, tmp_path):
    p = copy_of(good_disk, tmp_path)
    with open_disk(p, read_only=True) as d:
        ext = d.extents[0]
        entries = [e for _, e in ext.allocated()]
        gt_sector, rgt_sector = ext.gd[0], ext.rgd[0]
        before = d.read(0, d.size)
    with open(p, "r+b") as f:
        f.seek(gt_sector * 512 + 4 * 63)
        f.write(struct.pack("<I", entries[0]))
    # the redundant table still says what entry 63 was: reported, and repaired from it
    report = check_disk(p)
    assert not report.ok and any("redundant GT names grains" in e for e in report.errors)
    assert check_disk(p, repair=True).ok
    with open_disk(p, read_only=True) as d:
        assert d.read(0, d.size) == before
    # both copies agree on the overlap: nothing to repair it from
    for sector in (gt_sector, rgt_sector):
        with open(p, "r+b") as f:
            f.seek(sector * 512 + 4 * 63)
            f.write(struct.pack("<I", entries[0]))
    report = check_disk(p)
    assert not report.ok and any("share sector" in e for e in report.errors)


def descriptor_disk(tmp: Path, extent_line: str, extra: str = "") -> Path:
    p = tmp / "d.vmdk"
    p.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n{extra}{extent_line}\n'
    )
    return p


@pytest.mark.parametrize(
    "line",
    [
        'RW 2048 FLAT "../../etc/passwd" 0',
        'RW 2048 FLAT "/etc/passwd" 0',
        'RW 2048 FLAT "sub/../../x-flat.vmdk" 0',
        'RW 2048 SPARSE "C:\\\\Windows\\\\x.vmdk"',
        'RW 99999999999999999 FLAT "x-flat.vmdk" 0',
        'RW 2048 FLAT "x-flat.vmdk" 99999999999999999999',
        "RW 2048 WHATEVER",
        'RW 2048 VMFSSPARSE "x.vmdk"',
    ],
)
def test_descriptor_extent_names_and_sizes(tmp_path, line):
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(2048 * 512))
    p = descriptor_disk(tmp_path, line)
    with pytest.raises((DiskFormatError, DiskError)) as err:
        open_disk(p, read_only=True)
    assert "d.vmdk" in str(err.value)
    exercise(p)


def test_symlinked_extent_leaving_the_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "vm"
    outside.mkdir()
    inside.mkdir()
    (outside / "secret").write_bytes(b"s" * 1048576)
    os.symlink(outside / "secret", inside / "x-flat.vmdk")
    p = descriptor_disk(inside, 'RW 2048 FLAT "x-flat.vmdk" 0')
    with pytest.raises(DiskFormatError, match="leaves the disk's directory"):
        open_disk(p)


def test_descriptor_garbage(tmp_path):
    cases = [
        b"\xff\xfe not utf-8 # Disk DescriptorFile createType",
        b'# Disk DescriptorFile\nCID=zz\ncreateType="monolithicFlat"\n',
        b"# Disk DescriptorFile\nCID=1\n",
        b'# Disk DescriptorFile\nCID=1\ncreateType="bogus"\nRW 1 ZERO\n',
        b'# Disk DescriptorFile\nCID=1\ncreateType="monolithicFlat"\n',
        b'# Disk DescriptorFile\nCID=1\nparentCID=2\ncreateType="monolithicFlat"\nRW 1 ZERO\n',
        b"# Disk DescriptorFile\n" + b"x" * (2 << 20),
    ]
    for i, raw in enumerate(cases):
        p = tmp_path / f"c{i}.vmdk"
        p.write_bytes(raw)
        with pytest.raises(DiskFormatError, match=f"c{i}.vmdk"):
            open_disk(p, read_only=True)


def test_parsed_descriptor_round_trips(good_disk):
    info = disk_info(good_disk)
    with open_disk(good_disk, read_only=True) as d:
        again = parse_descriptor(d.descriptor.render().encode(), good_disk)
        assert again == d.descriptor and again.cid == info.cid


def test_parent_loops_and_bad_hints(tmp_path):
    a, b = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    create_disk(a, MiB)
    create_child(a, b)
    # make a's parent b: a loop
    from boite.disk import set_parent

    set_parent(a, b)
    with pytest.raises(DiskFormatError, match="loops"):
        open_disk(b, read_only=True)
    assert not check_disk(b).ok
    set_parent(a, None)
    set_parent(a, a)  # its own parent
    with pytest.raises(DiskFormatError, match="loops"):
        open_disk(a, read_only=True)
    # a parent hint that is not a disk
    c = tmp_path / "c.vmdk"
    create_disk(c, MiB)
    raw = c.read_bytes().replace(
        b"parentCID=ffffffff\n", b'parentCID=00000001\nparentFileNameHint="../../etc/passwd"\n', 1
    )
    c.write_bytes(raw)
    with pytest.raises(DiskFormatError, match="does not name a .vmdk"):
        open_disk(c, read_only=True)


def test_corrupt_stream_grain(tmp_path, good_disk):
    from boite.disk import convert_disk

    s = tmp_path / "s.vmdk"
    convert_disk(good_disk, s, "stream")
    data = bytearray(s.read_bytes())
    pos = 128 * 512 + 12 + 4  # inside the first compressed grain
    data[pos : pos + 16] = b"\xff" * 16
    s.write_bytes(data)
    with pytest.raises(DiskFormatError, match="s.vmdk.*offset"):
        with open_disk(s, read_only=True) as d:
            d.read(0, d.size)


def test_fifo_and_device_extents_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / "x-flat.vmdk")
    p = descriptor_disk(tmp_path, 'RW 2048 FLAT "x-flat.vmdk" 0')
    with pytest.raises(DiskFormatError, match="not a regular file"):
        open_disk(p)
    assert not check_disk(p).ok  # check reports it, never blocks
    os.mkfifo(tmp_path / "fifo.img")
    with pytest.raises(DiskFormatError, match="not a regular file"):
        open_disk(tmp_path / "fifo.img")
    os.mkfifo(tmp_path / "fifo.vmdk")
    with pytest.raises(DiskFormatError, match="not a regular file"):
        open_disk(tmp_path / "fifo.vmdk")
