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


# --- every CPU test on both tiers of the emulator (issue 11) ---------------------------
# A test or module marked `emu_tiers` runs once per tier, `[python]` and `[native]`,
# through BOITE_EMU_TIER, which reaches EmuAccelerator() in this process and `boite` in
# child processes alike (accel/emu/tiers.py). On the native side hot means 2 runs
# (BOITE_EMU_HOT), so that nearly all the code a test runs goes through the translator,
# not only its loops. A test that takes the plain interpreter (a `translate` parameter
# False, a `mode` parameter "interp") has no native tier: its [native] copy is
# deselected, not run twice.
TIERS = ("python", "native")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("emu_tiers") is not None:
        metafunc.parametrize("emu_tier", TIERS, indirect=True)


def _interpreted(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("translate") is False or params.get("mode") == "interp"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    drop = [
        it for it in items
        if getattr(getattr(it, "callspec", None), "params", {}).get("emu_tier") == "native"
        and _interpreted(it)
    ]  # fmt: skip
    if drop:
        config.hook.pytest_deselected(items=drop)
        keep = set(map(id, drop))
        items[:] = [it for it in items if id(it) not in keep]


@pytest.fixture(autouse=True)
def emu_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The tier a marked test runs on (None for the others, which run as they are)."""
    tier = getattr(request, "param", None)
    if tier is None:
        yield None
        return
    from boite.accel.emu.tiers import native_refusal

    if tier == "native" and native_refusal() is not None:
        pytest.skip(str(native_refusal()))
    monkeypatch.setenv("BOITE_EMU_TIER", tier)
    monkeypatch.delenv("BOITE_EMU_NATIVE", raising=False)
    if tier == "native":
        monkeypatch.setenv("BOITE_EMU_HOT", os.environ.get("BOITE_EMU_HOT") or "2")
    yield tier
