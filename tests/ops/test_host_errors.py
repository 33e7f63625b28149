"""The host says no: a full filesystem (ENOSPC) and a user without rights (EACCES).

Each verb answers in one line naming what the user asked for (JSON under --json), exits 1, and
leaves no half-made file behind. The full filesystem is a real 4 MiB tmpfs; the user without
rights is `nobody`, through setpriv. Both need root, as CI runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting and setpriv need root")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def boite(*args: str, cwd: Path, as_nobody: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "boite", *args]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    return subprocess.run(
        (NOBODY + cmd) if as_nobody else cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_space_for_a_flat_disk_box_or_conversion(small_fs: Path, tmp_path: Path) -> None:
    one_line_error(
        boite("disk", "create", "-t", "flat", "-s", "64M", "flat.vmdk", cwd=small_fs),
        "no space",
        "flat.vmdk",
    )
    one_line_error(
        boite("create", "web", "--disk", "64M", "--disk-type", "flat", cwd=small_fs), "no space"
    )
    res = boite("create", "--json", "web", "--disk", "64M", "--disk-type", "flat", cwd=small_fs)
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["errno"] == "ENOSPC"
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(8 << 20))  # incompressible, so a sparse VMDK cannot fit 4 MiB
    one_line_error(boite("disk", "convert", str(raw), "copy.vmdk", cwd=small_fs), "no space")
    assert sorted(p.name for p in small_fs.iterdir()) == [], "a half-made file was left"


def test_a_user_without_rights_gets_one_line_naming_the_box(tmp_path: Path) -> None:
    place = tmp_path / "boxes"
    place.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(place, 0o755)  # root's: nobody may read, not write
    one_line_error(boite("create", "web", "--disk", "16M", cwd=place, as_nobody=True), "web")
    res = boite("create", "--json", "web", cwd=place, as_nobody=True)
    assert res.returncode == 1 and json.loads(res.stdout)["error"]["errno"] == "EACCES"

    assert boite("create", "db", "--disk", "16M", cwd=place).returncode == 0
    (place / "db" / "db.vmx").chmod(0o600)
    for verb in (["info", "db"], ["check", "db"], ["start", "db"], ["snapshot", "db", "s1"]):
        one_line_error(boite(*verb, cwd=place, as_nobody=True), "db.vmx", "permission denied")
    os.chmod(place / "db", 0o700)
    one_line_error(boite("info", "db", cwd=place, as_nobody=True), "permission denied")
    assert sorted(p.name for p in place.iterdir()) == ["db"]
    shutil.rmtree(place)
