"""The guest kit's tiny i386 Linux boots under the emulator to its init marker, runs a
command and powers off. Slow (minutes of CPU on CPython): opt in with BOITE_EMU_LINUX=1.

The kernel and initrd come from $BOITE_EMU_KERNEL / $BOITE_EMU_INITRD, or the newest
complete guest-kit artifacts in the kit cache (`boite kit build` makes them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boite.accel.base import StopReason
from boite.accel.emu import EmuAccelerator
from boite.machine.builder import build_machine
from guests.runner import CollectedOutput


def _kit_file(pattern: str, name: str) -> Path | None:
    base = Path(os.environ.get("BOITE_CACHE") or Path.home() / ".cache" / "boite") / "kit"
    done = [d for d in base.glob(pattern) if (d / "manifest.json").exists() and (d / name).exists()]
    return max(done, key=lambda d: d.stat().st_mtime) / name if done else None


KERNEL = (
    Path(os.environ["BOITE_EMU_KERNEL"])
    if "BOITE_EMU_KERNEL" in os.environ
    else _kit_file("linux-i386-*", "bzImage")
)
INITRD = (
    Path(os.environ["BOITE_EMU_INITRD"])
    if "BOITE_EMU_INITRD" in os.environ
    else _kit_file("initrd-i386-*", "initrd.cpio")
)

pytestmark = [
    pytest.mark.emu_tiers,  # both tiers (tests/conftest.py)
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BOITE_EMU_LINUX") != "1", reason="set BOITE_EMU_LINUX=1"),
    pytest.mark.skipif(KERNEL is None or INITRD is None, reason="no i386 guest-kit kernel/initrd"),
]


def test_tiny_linux_boots_runs_a_command_and_powers_off():
    out = CollectedOutput()
    m = build_machine(
        64, 1, kernel=KERNEL, initrd=INITRD, console=out,
        cmdline='console=ttyS0 quiet boite.run="uname -m; echo ok-$((6*7))"',
    )  # fmt: skip
    acc = EmuAccelerator()
    acc.create(m)
    res = acc.run()
    text = bytes(out.output).decode(errors="replace")
    assert "BOITE-READY" in text, text[-2000:]
    assert "ok-42" in text and "i686" in text
    assert "BOITE-POWEROFF status=0" in text
    # Without ACPI the kernel halts with interrupts off: nothing can wake the CPU.
    assert res.reason in (StopReason.HALTED, StopReason.SHUTDOWN), res
