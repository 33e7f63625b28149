"""NAT through passt, in a network namespace each test makes (`unshare -n`): passt's DHCP
offer, and a kit guest under the emulator that takes its lease by DHCP (udhcpc), moves
bytes to a host service through the gateway and from the host through a forwarded port,
checked byte for byte, and reaches a host address that is not loopback (the way out);
`list --all` shows it running with its IP and tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.skipif(shutil.which("passt") is None, reason="needs passt (Debian package)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]


def in_namespace(*args: str, timeout: float) -> dict:
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    proc = subprocess.run(
        [*unshare, sys.executable, str(HERE / "inside.py"), *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot make a network namespace here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_passt_leases_the_nat_address_with_gateway_and_dns():
    from boite.machine.netback.passt import DNS_ADDRESS, GATEWAY, GUEST_ADDRESS

    out = in_namespace("dhcp", timeout=120)
    offer = out["offer"]
    assert offer is not None, out["log"]
    assert offer["type"] == 2  # DHCPOFFER
    assert (offer["yiaddr"], offer["router"], offer["dns"]) == (GUEST_ADDRESS, GATEWAY, DNS_ADDRESS)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_kit_guest_reaches_the_host_and_is_reached_through_a_forward(tmp_path):
    from boite import guestkit
    from boite.box import Box
    from boite.machine.netback.passt import DNS_ADDRESS, GATEWAY

    kit = guestkit.ensure_kit(("i386", "initrd"))
    box = Box.create(tmp_path / "net", disk_size=None)
    box.vmx["boite.kernel"] = str(kit.i386_vmlinux)
    box.vmx["boite.initrd"] = str(kit.initrd_i386)
    box.vmx["boite.cmdline"] = "console=ttyS0 quiet"
    box.vmx["ethernet0.boite.forward"] = "tcp:18080:8080"
    box.save()
    assert box.vmx["ethernet0.connectionType"] == "nat"
    out = in_namespace("box", str(box.dir), timeout=3000)
    assert {"interface": "eth0", "address": "10.0.2.15/24"} in out["ips"], out.get("diagnosis")
    (row,) = out["listed"]
    assert (row["state"], row["ip"], row["tools"]) == ("running", "10.0.2.15", True), row
    assert row["accelerator"] == "emu", row
    lease = out["lease"]  # by DHCP from passt: DNS and the default route came with it
    assert "boite.ip=" not in lease["cmdline"] and lease["udhcpc"], lease
    assert lease["resolv"] == f"nameserver {DNS_ADDRESS}", lease
    assert f"default via {GATEWAY} dev eth0" in lease["routes"], lease
    assert (out["outside_status"], out["outside_got"]) == (0, "hello outside\n"), out
    assert out["to_host_status"] == 0, out
    assert out["to_host_sha256"] == out["sha256"], out
    assert out["from_host_sha256"] == out["sha256"], out
