"""Choosing the emulator's tier (accel/emu/tiers.py) and saying which one ran: the order
--emu-tier > BOITE_EMU_TIER > boite.emuTier > auto, the refusal reasons, the VMM's
vmware.log lines and status, `boite info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boite.accel.emu import EmuAccelerator
from boite.accel.emu import tiers as tiers_mod
from boite.accel.emu.tiers import choose_tier, native_refusal
from boite.box.box import Box
from boite.errors import AccelError
from guests.build import assemble

NATIVE_HERE = native_refusal() is None
needs_native = pytest.mark.skipif(not NATIVE_HERE, reason="no native tier on this host")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("BOITE_EMU_TIER", "BOITE_EMU_NATIVE", "BOITE_EMU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_order_of_the_choices(clean_env) -> None:
    assert choose_tier().source == "default" and choose_tier().asked == "auto"
    assert choose_tier(None, "python").source == "boite.emuTier"
    clean_env.setenv("BOITE_EMU_TIER", "python")
    assert (choose_tier(None, "native").tier, choose_tier(None, "native").source) == (
        "python", "BOITE_EMU_TIER")  # fmt: skip
    got = choose_tier("native", "python")
    assert got.source == "--emu-tier" and got.asked == "native"
    clean_env.delenv("BOITE_EMU_TIER")
    clean_env.setenv("BOITE_EMU_NATIVE", "0")  # the older spelling
    assert choose_tier(None, "native").tier == "python"


def test_python_is_forced_and_the_interpreter_has_no_native_tier(clean_env) -> None:
    got = choose_tier("python")
    assert got.tier == "python" and "forced" in got.why
    got = choose_tier("native", translate=False)
    assert got.tier == "python" and "interp" in got.why


@pytest.mark.parametrize("by_default", [False, True])
def test_auto_follows_the_default_switch(clean_env, by_default: bool) -> None:
    clean_env.setattr(tiers_mod, "NATIVE_BY_DEFAULT", by_default)
    got = choose_tier()
    want = "native" if by_default and NATIVE_HERE else "python"
    assert got.tier == want, got
    if not by_default:
        assert "opt-in" in got.why


def test_a_refused_native_tier_says_why(clean_env) -> None:
    clean_env.setattr(tiers_mod.platform, "machine", lambda: "aarch64")
    got = choose_tier("native")
    assert got.tier == "python"
    assert "refused" in got.why and "x86-64 Linux host" in got.why and "aarch64" in got.why


@pytest.mark.parametrize("bad", ["fast", "", " NATIVE2"])
def test_a_bad_value_is_a_clear_error(clean_env, bad: str) -> None:
    with pytest.raises(AccelError, match="expected one of auto, python, native"):
        choose_tier(bad)
    if bad:
        clean_env.setenv("BOITE_EMU_TIER", bad)
        with pytest.raises(AccelError, match="BOITE_EMU_TIER"):
            EmuAccelerator()


def test_case_and_spaces_are_forgiven(clean_env) -> None:
    assert choose_tier(" Python ").tier == "python"


def _boot(image, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "boite", "-v", "boot", "--accel", "emu", "--memsize", "16",
         *args, str(image)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(os.environ, BOITE_EMU_HOT="2", **(env or {})),
    )  # fmt: skip


@needs_native
def test_boot_says_which_tier_ran_and_how_much(clean_env, tmp_path) -> None:
    image = tmp_path / "smc.bin"  # hot loops, code rewritten, exits through the port
    guests = Path(__file__).parent / "tcg_guests"
    subprocess.run(["nasm", "-f", "bin", "-I", f"{guests}/", "-o", str(image),
                    str(guests / "smc.asm")], check=True)  # fmt: skip
    nat = _boot(image, "--emu-tier", "native")
    assert "Emulator tier: native (--emu-tier = native" in nat.stderr, nat.stderr
    counts = [ln for ln in nat.stderr.splitlines() if "Emulator tier native:" in ln]
    assert counts, nat.stderr
    native_insns = int(counts[0].split(", ")[1].split()[0])
    assert native_insns > 0, counts
    py = _boot(image, env={"BOITE_EMU_TIER": "python"})
    assert "Emulator tier: python (BOITE_EMU_TIER = python: the Python tiers are forced)" in (
        py.stderr)  # fmt: skip
    assert "0 of them as native code" in py.stderr


def test_the_box_key_is_checked_and_shown(tmp_path, boite_cli) -> None:
    box = Box.create(tmp_path / "b", memsize_mb=16, disk_size=None)
    box.vmx["boite.emuTier"] = "python"
    box.save()
    info = json.loads(boite_cli("info", box.dir, "--json", check=True).stdout)
    assert info["emu_tier"] == "python"
    text = boite_cli("info", box.dir, check=True).stdout
    assert "emulator tier" in text and "python (boite.emuTier" in text
    box.vmx["boite.emuTier"] = "quick"
    box.save()
    check = boite_cli("check", box.dir, "--json")
    problems = json.loads(check.stdout)
    assert "boite.emuTier" in [p["key"] for p in problems], problems


@needs_native
def test_a_running_box_reports_its_tier_in_info_and_vmware_log(tmp_path, boite_cli) -> None:
    box = Box.create(tmp_path / "spin", memsize_mb=16, disk_size=None)
    box.vmx["boite.kernel"] = str(assemble("mb_spin"))
    box.vmx["monitor.virtual_exec"] = "software"
    box.vmx["boite.emuTier"] = "python"  # --emu-tier below wins over it
    box.save()
    env = dict(os.environ, BOITE_EMU_HOT="2")
    env.pop("BOITE_EMU_TIER", None)
    env.pop("BOITE_EMU_NATIVE", None)
    start = subprocess.run([sys.executable, "-m", "boite", "start", str(box.dir), "--detach",
                            "--emu-tier", "native"],
                           capture_output=True, text=True, timeout=120, env=env,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    assert start.returncode == 0, start.stderr
    try:
        info = json.loads(boite_cli("info", box.dir, "--json", check=True).stdout)
        running = info["emu_tier_running"]
        assert running["tier"] == "native", running
        assert "--emu-tier = native" in running["why"]
        text = boite_cli("info", box.dir, check=True).stdout
        assert "instructions so far ran as native code" in text, text
    finally:
        boite_cli("stop", box.dir, "hard", timeout=60)
    log = (box.dir / "vmware.log").read_text()
    assert "Emulator tier: native (--emu-tier = native" in log, log
    assert "Emulator tier native:" in log, log


def test_the_vmm_hands_the_flag_and_the_box_key_to_the_emulator(clean_env) -> None:
    from boite.vmm import accelerator_for

    acc = accelerator_for("software", emu_tier_config="python")
    assert (acc.tier_choice.source, acc.tier_choice.tier) == ("boite.emuTier", "python")
    acc = accelerator_for("emu", emu_tier="python", emu_tier_config="native")
    assert acc.tier_choice.source == "--emu-tier"
    assert acc.tier_stats()["tier"] == "python" and acc.tier_stats()["instructions"] == 0
