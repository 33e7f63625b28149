"""The README's tour, run for real as written: the kit box under whatever accelerator
this host gives it, with the guest tools, NAT and a forwarded port."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def tour_script() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A tour") :]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_readme_tour_runs_as_written(tmp_path):
    for tool in ("passt", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the tour needs {tool}")
    boite = Path(sys.executable).parent / "boite"
    if not boite.exists():
        pytest.skip(f"no boite command next to {sys.executable} (run ./dev setup)")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    # The tour's first line puts $PWD/.venv/bin on PATH: give the copy one.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    script = "set -ex\n" + tour_script()
    env = dict(os.environ)
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=3000, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out = proc.stdout
        assert "Linux" in out  # uname -a, from inside
        assert "10.0.2.15" in out  # boite ip
        assert "hello from web" in out  # through the forwarded port
        assert "boite\n" in out  # uname -n through boite shell
        assert "web" in out and "off" in out  # list --all after the stop
        log = (tmp_path / "web" / "vmware.log").read_text()
        assert "Soft stop: asked the guest to power off through the guest tools" in log
        assert "Soft stop: the guest powered off when asked through the guest tools" in log
    finally:
        subprocess.run([str(boite), "stop", str(tmp_path / "web"), "hard"], capture_output=True)
