"""`boite disk` as a person runs it: a real process, paths last, --json where output is data."""

from __future__ import annotations

import json

from boite.disk import open_disk


def test_create_info_map_check(tmp_path, boite_cli):
    path = tmp_path / "d.vmdk"
    out = boite_cli("disk", "create", "-s", "64M", "-t", "thin", path)
    assert out.returncode == 0, out.stderr
    with open_disk(path) as d:
        d.write(65536, b"x" * 4096)
    out = boite_cli("disk", "info", "--json", path)
    info = json.loads(out.stdout)
    assert info["type"] == "monolithicSparse" and info["capacity"] == 64 << 20
    assert info["allocated"] == 65536 and len(info["cid"]) == 8
    out = boite_cli("disk", "info", path)
    assert "monolithicSparse" in out.stdout and "64.0 MiB" in out.stdout
    out = boite_cli("disk", "map", "--json", path)
    assert json.loads(out.stdout) == [
        {"offset": 65536, "length": 65536, "kind": "data", "depth": 0, "file": str(path)}
    ]
    out = boite_cli("disk", "check", path)
    assert out.returncode == 0 and "No errors" in out.stdout


def test_convert_grow_compact(tmp_path, boite_cli):
    src = tmp_path / "s.vmdk"
    assert boite_cli("disk", "create", "-s", "8M", src).returncode == 0
    with open_disk(src) as d:
        d.write(0, b"abc" * 1000)
    for t, name in (
        ("flat", "f.vmdk"),
        ("split-thin", "st.vmdk"),
        ("stream", "so.vmdk"),
        (None, "r.img"),
    ):
        args = ["disk", "convert", *(["-t", t] if t else []), src, tmp_path / name]
        out = boite_cli(*args)
        assert out.returncode == 0, out.stderr
        with open_disk(tmp_path / name, read_only=True) as d:
            assert d.read(0, 3000) == b"abc" * 1000
    grown = boite_cli("disk", "grow", "-s", "16M", src)
    assert grown.returncode == 0
    assert "capacity 8 MiB -> 16 MiB" in str(grown.stdout), grown.stdout  # says what it did
    compacted = boite_cli("disk", "compact", src)
    assert compacted.returncode == 0
    assert "on the host" in str(compacted.stdout), compacted.stdout
    with open_disk(src, read_only=True) as d:
        assert d.size == 16 << 20 and d.read(0, 3000) == b"abc" * 1000


def test_errors_are_messages_not_tracebacks(tmp_path, boite_cli):
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(b"KDMV" + bytes(508))
    for args in (
        ("disk", "info", bad),
        ("disk", "create", "-s", "lots", tmp_path / "x.vmdk"),
        ("disk", "info", tmp_path / "missing.vmdk"),
    ):
        out = boite_cli(*args)
        assert out.returncode != 0
        assert out.stderr.startswith("boite: error:") and "Traceback" not in out.stderr, out.stderr


def test_check_exit_status_and_repair(tmp_path, boite_cli):
    path = tmp_path / "d.vmdk"
    assert boite_cli("disk", "create", "-s", "4M", path).returncode == 0
    with open_disk(path) as d:
        d.write(0, b"y" * 65536)
        gt = d.extents[0].gd[0]
        rgt = d.extents[0].rgd[0]
    with open(path, "r+b") as f:  # redundant table out of step with the primary
        f.seek(rgt * 512)
        f.write(bytes(4))
    out = boite_cli("disk", "check", "--json", path)
    report = json.loads(out.stdout)
    assert out.returncode == 2 and not report["ok"] and "redundant GT 0" in report["errors"][0]
    out = boite_cli("disk", "check", "--repair", path)
    assert out.returncode == 0 and "fixed" in out.stdout
    assert gt != rgt
