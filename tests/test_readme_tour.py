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


def tour_script(block: int = 0) -> str:
    """The tour's `block`-th sh block: 0 the kit box, 1 the firmware box with an ISO."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A tour") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[block]


def test_the_readme_tour_runs_as_written(tmp_path):
    from boite.machine.netback.passt import find_passt

    if find_passt() is None:
        pytest.skip("the tour needs passt")
    if shutil.which("curl") is None:
        pytest.skip("the tour needs curl")
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
        assert "shell-42" in out  # through boite shell's PTY
        assert re.search(r"^web\s+(off|suspended)\s", out, re.M), out[-500:]  # list --all
        log = (tmp_path / "web" / "vmware.log").read_text()
        assert "Soft stop: asked the guest to power off through the guest tools" in log
        assert "Soft stop: the guest powered off when asked through the guest tools" in log
    finally:
        subprocess.run([str(boite), "stop", str(tmp_path / "web"), "hard"], capture_output=True)


def test_the_readme_iso_tour_runs_as_written(tmp_path):
    """The firmware box: `boite check` says it cannot boot, then an ISO made with
    grub-mkrescue boots under the emulator through SeaBIOS and GRUB, in the foreground,
    until the kit's init powers off."""
    for tool in ("grub-mkrescue", "xorriso", "mformat"):
        if shutil.which(tool) is None:
            pytest.skip(f"the ISO tour needs {tool} (grub-pc-bin, xorriso, mtools)")
    from boite.machine.firmware.seabios import bios_path

    if not bios_path().exists():
        pytest.skip("Debian's seabios is not installed")
    boite = Path(sys.executable).parent / "boite"
    if not boite.exists():
        pytest.skip(f"no boite command next to {sys.executable} (run ./dev setup)")
    from boite import guestkit

    guestkit.ensure_kit(("i386", "initrd"))
    env = dict(os.environ, PATH=f"{boite.parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        ["bash", "-c", "set -ex\n" + tour_script(1)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=3000, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", proc.stdout)
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert "nothing the BIOS can boot" in out and "live cannot boot yet" in out, out[-3000:]
    assert "SeaBIOS (version" in out and "Welcome to GRUB" in out, out[-3000:]
    assert "hello from the ISO" in out and "BOITE-EXIT status=0" in out, out[-3000:]
