"""monolithicSparse: create, write, read back, reopen, and what qemu-img thinks of it."""

from __future__ import annotations

import os
import random

from disktools import qemu_img, requires_qemu_img

from boite.disk import check_disk, create_disk, disk_info, map_disk, open_disk

MiB = 1 << 20


def test_write_read_reopen_across_grains(tmp_path):
    path = tmp_path / "a.vmdk"
    create_disk(path, 64 * MiB)
    model = bytearray(64 * MiB)
    rng = random.Random(1)
    with open_disk(path) as d:
        for _ in range(200):
            off = rng.randrange(0, 64 * MiB - 300_000)
            n = rng.randrange(1, 300_000)
            data = rng.randbytes(n)
            d.write(off, data)
            model[off : off + n] = data
        assert d.read(0, 64 * MiB) == model
    with open_disk(path, read_only=True) as d:
        assert d.size == 64 * MiB
        assert d.read(0, 64 * MiB) == model
    assert check_disk(path).ok


def test_cid_changes_on_first_write_only(tmp_path):
    path = tmp_path / "a.vmdk"
    create_disk(path, MiB)
    cid0 = disk_info(path).cid
    with open_disk(path) as d:
        d.read(0, 512)
    assert disk_info(path).cid == cid0  # opening and reading is not a change
    with open_disk(path) as d:
        d.write(0, b"a" * 512)
        cid1 = disk_info(path).cid
        d.write(512, b"b" * 512)
    assert cid1 != cid0 and disk_info(path).cid == cid1


def test_unclean_flag_while_open_for_write(tmp_path):
    path = tmp_path / "a.vmdk"
    create_disk(path, MiB)
    d = open_disk(path)
    assert disk_info(path).unclean
    d.close()
    assert not disk_info(path).unclean


def test_two_terabyte_thin_disk_opens_without_reading_tables(tmp_path):
    path = tmp_path / "big.vmdk"
    create_disk(path, 2 << 40)
    assert os.stat(path).st_blocks * 512 < 4 * MiB  # tables are preallocated as holes
    with open_disk(path) as d:
        d.write((2 << 40) - 4096, b"z" * 4096)
        assert d.read((2 << 40) - 4096, 4096) == b"z" * 4096
        assert len(d.extents[0]._gts) == 1  # only the table touched was loaded
    # walking all 65536 tables reads them in large windows and skips the untouched ones
    assert disk_info(path).allocated == 65536
    assert [(e.offset, e.length) for e in map_disk(path)] == [((2 << 40) - 65536, 65536)]
    assert check_disk(path).ok


@requires_qemu_img
def test_qemu_img_checks_and_compares(tmp_path):
    path = tmp_path / "a.vmdk"
    ref = tmp_path / "ref.raw"
    create_disk(path, 16 * MiB)
    model = bytearray(16 * MiB)
    rng = random.Random(2)
    with open_disk(path) as d:
        for _ in range(50):
            off = rng.randrange(0, 16 * MiB - 70000)
            data = rng.randbytes(rng.randrange(1, 70000))
            d.write(off, data)
            model[off : off + len(data)] = data
    ref.write_bytes(model)
    out = qemu_img("check", path)
    assert out.returncode == 0, out.stdout + out.stderr
    out = qemu_img("compare", "-f", "vmdk", "-F", "raw", path, ref)
    assert out.returncode == 0, out.stdout + out.stderr


def test_concurrent_writers_and_readers(tmp_path):
    import threading

    path = tmp_path / "t.vmdk"
    create_disk(path, 16 * MiB)
    model = bytearray(16 * MiB)
    errors = []
    with open_disk(path) as d:

        def worker(k: int) -> None:
            rng = random.Random(k)
            region = k * 4 * MiB  # each thread owns a 4 MiB region, grains allocate concurrently
            try:
                for _ in range(150):
                    off = region + rng.randrange(0, 4 * MiB - 9000)
                    data = rng.randbytes(rng.randrange(1, 9000))
                    d.write(off, data)
                    model[off : off + len(data)] = data
                    assert d.read(off, len(data)) == data
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    with open_disk(path, read_only=True) as d:
        assert d.read(0, 16 * MiB) == model
    assert check_disk(path).ok


def test_long_content_id_follows_the_cid(tmp_path):
    from boite.disk.descriptor import Descriptor

    path = tmp_path / "v.vmdk"
    d0 = Descriptor(cid=0x11223344, ddb={"ddb.longContentID": "0" * 24 + "11223344"})
    create_disk(path, MiB, descriptor=d0)
    with open_disk(path) as d:
        d.write(0, b"x" * 512)
        cid = d.descriptor.cid
        assert d.descriptor.ddb["ddb.longContentID"].endswith(f"{cid:08x}")
    assert disk_info(path).cid == cid != 0x11223344
