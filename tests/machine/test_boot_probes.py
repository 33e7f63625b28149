"""The probe kernels of guests/ run under boite (every accelerator this build has) and,
where QEMU boots the same format, under QEMU TCG: each prints what its loader handed it
over COM1 and exits through isa-debug-exit, so the loaders are checked from inside a guest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from boite.errors import AccelError
from boite.machine.builder import build_machine
from boite.machine.devices.uart import ConsoleBackend
from conftest import kvm_available

PROBE_EXIT = (0x21 << 1) | 1
CMDLINE = "console=ttyS0 x=1"
INITRD = b"initrd-bytes!"


def accelerators() -> list:
    return [
        pytest.param("kvm", marks=pytest.mark.skipif(not kvm_available(), reason="no /dev/kvm")),
        "emu",
    ]


def run_boite(accel: str, kernel: Path, initrd: Path, protocol: str = "auto") -> tuple[int, str]:
    from boite.vmm import Vmm, accelerator_for

    try:
        accel_obj = accelerator_for(accel)
    except AccelError as e:
        pytest.skip(f"accelerator {accel} is not in this build: {e}")
    if protocol == "linux64" and not getattr(accel_obj, "supports_long_mode", accel == "kvm"):
        pytest.skip(f"the {accel} accelerator does not run 64-bit code (no supports_long_mode)")
    console = ConsoleBackend()

    def build():
        return build_machine(
            64, serial_backends=[console], kernel=kernel, initrd=initrd, cmdline=CMDLINE,
            protocol=protocol, emulated_irqchip=accel != "kvm",
        )  # fmt: skip

    status = Vmm(build, lambda: accelerator_for(accel)).run()
    return status, console.buffered().decode()


def run_qemu(kernel: Path, initrd: Path, tmp_path: Path) -> tuple[int, str]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    serial = tmp_path / "qemu-serial.txt"
    r = subprocess.run(
        ["qemu-system-x86_64", "-kernel", str(kernel), "-append", CMDLINE, "-initrd", str(initrd),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "64", "-no-reboot",
         "-display", "none", "-monitor", "none", "-serial", f"file:{serial}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    return r.returncode, serial.read_text()


def fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture
def initrd(tmp_path) -> Path:
    p = tmp_path / "initrd"
    p.write_bytes(INITRD)
    return p


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
@pytest.mark.parametrize("entry", ["linux32", "linux64"])
def test_bzimage_entries_seen_from_the_guest(multiboot_kernels, initrd, accel, entry):
    status, out = run_boite(accel, multiboot_kernels["linux"], initrd, entry)
    assert status == PROBE_EXIT, out
    assert out.startswith(f"{entry} ok\n")
    f = fields(out)
    assert f["hdrs"] == "53726448"  # "HdrS" as a little-endian dword
    assert f["loader"] == "000000ff"
    assert f["cmdline"] == CMDLINE
    assert f["initrd_size"] == f"{len(INITRD):08x}" and f["initrd"] == INITRD.decode()
    assert f["e820"] == "00000003"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
def test_pvh_matches_qemu(multiboot_kernels, initrd, tmp_path, accel):
    kernel = multiboot_kernels["pvh"]
    status, out = run_boite(accel, kernel, initrd)
    assert status == PROBE_EXIT, out
    qstatus, qout = run_qemu(kernel, initrd, tmp_path)
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    for key in ("magic", "version", "cmdline", "modules", "mod0"):
        assert ours[key] == theirs[key], key
    assert ours["mod0"].rstrip() == INITRD.decode()
    assert ours["memmap"].split()[0] == theirs["memmap"].split()[0] == "00000000+0009fc00:1"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
def test_multiboot_matches_qemu(multiboot_kernels, initrd, tmp_path, accel):
    kernel = multiboot_kernels["aout"]
    status, out = run_boite(accel, kernel, initrd)
    assert status == PROBE_EXIT, out
    qstatus, qout = run_qemu(kernel, initrd, tmp_path)
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    for key in ("flags", "mem_lower", "cmdline", "mods", "mod0", "mod0cmd", "mod0align", "bss"):
        assert ours[key] == theirs[key], key
    assert (ours["loader"], theirs["loader"]) == ("boite", "qemu")
