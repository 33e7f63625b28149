"""The README's first command: `boite demo` builds the kit, makes ./boite-demo and boots its
Linux to the init marker, runs the demo command and powers off cleanly (exit status 0).

With --accel auto this goes through KVM where it can boot Linux and through the emulator
elsewhere (this project's kvm_pvm machines): a whole Linux boot, so it takes a minute or
more of CPU.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_demo_boots_the_default_box(tmp_path, boite_cli):
    r = boite_cli("demo", cwd=tmp_path, timeout=1800)
    out = r.stdout
    assert r.returncode == 0, (r.stderr[-2000:], out[-3000:])
    assert "BOITE-READY uptime=" in out
    assert "Linux (none) 6.1" in out  # uname -a from inside the guest
    assert "BOITE-EXIT status=0" in out and "BOITE-POWEROFF status=0" in out
    log = (tmp_path / "boite-demo" / "vmware.log").read_text()
    assert "Power off complete, exit status 0." in log
    # The box is still a box: boite check agrees, and a second demo reuses it.
    assert boite_cli("check", tmp_path / "boite-demo").returncode == 0
