"""Linux under KVM: the guest kit's kernels boot to the init marker and power off cleanly.

Needs real VT-x/AMD-V: under this project's kvm_pvm, Linux stops at emulation failures
(QEMU too: `lock cmpxchg16b` with Debian's kernel, `xrstor` with a minimal one).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import requires_real_vtx

pytestmark = [requires_real_vtx, pytest.mark.slow]


@pytest.mark.parametrize("part", ["debian", "i386"], ids=["debian-x86_64", "tiny-i386"])
def test_linux_boots_to_the_init_marker_and_powers_off(part):
    pytest.importorskip("boite.machine.builder", reason="needs the machine builder")
    guestkit = pytest.importorskip("boite.guestkit", reason="needs the guest kit")
    kit = guestkit.ensure_kit((part,))
    kernel = kit.debian_vmlinuz if part == "debian" else kit.i386_bzimage
    cmdline = (
        "console=ttyS0 earlyprintk=serial panic=-1 quiet "
        'boite.run="uname -m; echo kvm-linux-ok" boite.exitport=0x505'
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "boite", "boot", str(kernel), "--initrd", str(kit.initrd_i386),
            "--append", cmdline, "--accel", "kvm", "--memsize", "256", "--cpus", "2",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode(errors="replace")
    assert guestkit.READY_MARKER in out
    assert "kvm-linux-ok" in out and "BOITE-EXIT status=0" in out
    assert guestkit.POWEROFF_MARKER in out
    assert ("x86_64" if part == "debian" else "i686") in out or "i586" in out
