"""Shared test fixtures: run the real `boite` command, and skip what this host cannot do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# Subprocesses run the boite of this checkout, not whatever is installed.
os.environ["PYTHONPATH"] = str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_is_pvm() -> bool:
    """This project's machines have a software nested KVM (kvm_pvm) where interrupt
    delivery, mode changes and Linux boots fail; real VT-x/AMD-V machines don't."""
    return Path("/sys/module/kvm_pvm").exists()


requires_kvm = pytest.mark.skipif(not kvm_available(), reason="needs /dev/kvm (not present)")
requires_real_vtx = pytest.mark.skipif(
    not kvm_available() or kvm_is_pvm(),
    reason="needs KVM on real VT-x/AMD-V: /dev/kvm is missing or is the kvm_pvm software "
    "module, where interrupt delivery, mode changes and Linux boots end in emulation failures",
)


@pytest.fixture
def boite_cli():
    """Run `python -m boite ARGS...` and return the CompletedProcess (text mode)."""

    def run(
        *args: str, check: bool = False, input: str | None = None, timeout: float = 300, cwd=None
    ):
        return subprocess.run(
            [sys.executable, "-m", "boite", *map(str, args)],
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=timeout,
            cwd=cwd,
        )

    return run
