"""`./dev setup` on a fresh virtual environment prints boite's own progress only (pip's
chatter and warnings go to a log), as a newcomer's first run does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_first_dev_setup_prints_only_boites_own_lines(tmp_path):
    venv = tmp_path / "venv"
    env = dict(os.environ, BOITE_VENV=str(venv))
    proc = subprocess.run(
        [str(ROOT / "dev"), "setup"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1700, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0 and "pip failed" in proc.stderr and "connect" in proc.stderr.lower():
        pytest.skip("no package index reachable from here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines and all(line.startswith("boite: ") for line in lines), lines
    assert len(lines) <= 4, lines
    assert (venv / "bin" / "boite").exists()
    again = subprocess.run(
        [str(ROOT / "dev"), "setup"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout + again.stderr == ""  # nothing to do
