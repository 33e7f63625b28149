"""`boite boot --accel emu` of the tiny Linux ends with the guest command's exit status:
the init writes it to boite's power-off port after ioperm(), which the emulator allows
through the TSS's I/O permission bitmap (ring 3 is above IOPL 0)."""

from __future__ import annotations

import pytest

from boite import guestkit

# Both tiers of the emulator (tests/conftest.py): the Linux boot of `./dev test` on each.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.emu_tiers]


def test_guest_exit_status_reaches_the_host(boite_cli):
    kit = guestkit.ensure_kit(("i386", "initrd"))
    r = boite_cli(
        "boot", kit.i386_bzimage, "--initrd", kit.initrd_i386, "--accel", "emu",
        "--memsize", "64", "--append",
        'console=ttyS0 quiet boite.exitport=0x505 boite.run="exit 3"',
        timeout=1800,
    )  # fmt: skip
    assert "BOITE-EXIT status=3" in r.stdout, r.stdout[-2000:]
    assert "Segmentation fault" not in r.stdout and "general protection" not in r.stdout
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
