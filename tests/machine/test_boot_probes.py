"""The probe kernels of guests/ run under boite (every accelerator this build has) and,
where QEMU boots the same format, under QEMU TCG: each prints what its loader handed it
over COM1 and exits through isa-debug-exit, so the loaders are checked from inside a guest."""

from __future__ import annotations

import calendar
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from boite.errors import AccelError
from boite.machine.builder import build_machine
from boite.machine.devices.uart import ConsoleBackend
from conftest import kvm_available

from .machine_kernels import *  # noqa: F403 - the fixtures

PROBE_EXIT = (0x21 << 1) | 1
CMDLINE = "console=ttyS0 x=1"
INITRD = b"initrd-bytes!"


def accelerators() -> list:
    return [
        pytest.param("kvm", marks=pytest.mark.skipif(not kvm_available(), reason="no /dev/kvm")),
        "emu",
    ]


def run_boite(
    accel: str,
    kernel: Path,
    initrd: Path | None,
    protocol: str = "auto",
    vcpus: int = 1,
    com2: bool = False,
) -> tuple[int, str]:
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
            64, vcpus, serial_backends=[console, ConsoleBackend()] if com2 else [console],
            kernel=kernel, initrd=initrd, cmdline=CMDLINE,
            protocol=protocol, emulated_irqchip=accel != "kvm",
        )  # fmt: skip

    status = Vmm(build, lambda: accelerator_for(accel)).run()
    return status, console.buffered().decode()


def run_qemu(
    kernel: Path, initrd: Path | None, tmp_path: Path, extra: tuple[str, ...] = ()
) -> tuple[int, str]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    serial = tmp_path / "qemu-serial.txt"
    r = subprocess.run(
        ["qemu-system-x86_64", "-kernel", str(kernel), "-append", CMDLINE,
         *(["-initrd", str(initrd)] if initrd else []),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "64", "-no-reboot",
         "-display", "none", "-monitor", "none", "-serial", f"file:{serial}", *extra],
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
def test_fw_cfg_matches_qemu(multiboot_kernels, tmp_path, accel):
    """kvm-unit-tests learn the CPU count and RAM size from fw_cfg."""
    kernel = multiboot_kernels["fwcfg"]
    status, out = run_boite(accel, kernel, None, vcpus=2)
    assert status == PROBE_EXIT, out
    qstatus, qout = run_qemu(kernel, None, tmp_path, ("-smp", "2"))
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    for key in ("signature", "nb_cpus", "max_cpus", "ram_size"):
        assert ours[key] == theirs[key], key
    assert ours["nb_cpus"] == "00000002" and ours["ram_size"] == f"{64 << 20:08x}"
    assert ours["id"] == theirs["id"] == "00000003"  # traditional and DMA interfaces


def _cmos_time(f: dict[str, str]) -> int:
    """Unix time from the probe's BCD date/time registers (24-hour mode, as firmware sets)."""
    bcd = {k: int(v, 16) for k, v in f.items()}
    dec = {k: (v >> 4) * 10 + (v & 0xF) for k, v in bcd.items()}
    year = dec["cmos32"] * 100 + dec["cmos09"]
    return calendar.timegm((year, dec["cmos08"], dec["cmos07"], dec["cmos04"], dec["cmos02"], 0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
def test_cmos_matches_qemu(multiboot_kernels, tmp_path, accel):
    """Status registers, the BIOS memory size bytes and the clock read as under QEMU."""
    kernel = multiboot_kernels["cmos"]
    before = time.time()
    status, out = run_boite(accel, kernel, None)
    assert status == PROBE_EXIT, out
    qstatus, qout = run_qemu(kernel, None, tmp_path)
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    for key in ("cmos0a", "cmos0b", "cmos0d", "cmos15", "cmos16", "cmos17", "cmos18",
                "cmos30", "cmos31", "cmos34", "cmos35", "cmos5b", "cmos5c", "cmos5d"):  # fmt: skip
        assert ours[key] == theirs[key], key
    # both clocks are the host's UTC time (to the minute the probe read it)
    for f in (ours, theirs):
        assert before - 120 <= _cmos_time(f) <= time.time() + 60


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accel", accelerators())
def test_uart_registers_match_qemu(multiboot_kernels, tmp_path, accel):
    """The same register steps on COM2 (FIFO, loopback, interrupts, overrun, divisor latch)
    read the same on boite's 16550A as on QEMU's, apart from two documented points."""
    kernel = multiboot_kernels["uart"]
    status, out = run_boite(accel, kernel, None, com2=True)
    assert status == PROBE_EXIT, out
    qstatus, qout = run_qemu(kernel, None, tmp_path, ("-serial", "null"))
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    assert len(ours) == len(theirs) == 22
    for key in ours:
        a, b = int(ours[key], 16), int(theirs[key], 16)
        if key == "r09":
            # loopback MSR: the datasheet sets the delta bits from MCR changes, QEMU does not
            a, b = a & 0xF0, b & 0xF0
        if key == "r11":
            # received data (0x4) or character timeout (0xc): QEMU's timeout is a timer
            assert a & 0x04 and b & 0x04
            a, b = a & 0xF3, b & 0xF3
        assert a == b, (key, ours[key], theirs[key])


@pytest.mark.timeout(120)
def test_pic_and_pit_match_qemu(multiboot_kernels, tmp_path):
    """Our 8259 pair and 8254 (the emulator's; KVM uses its in-kernel ones) against QEMU's:
    read-back status, OUT2 on port 0x61, IRQ 0 into IRR, poll, ISR and EOI."""
    kernel = multiboot_kernels["pic_pit"]
    status, out = run_boite("emu", kernel, None)
    assert status == PROBE_EXIT, out
    # QEMU's PIT runs on its virtual clock: tied to the instruction count (-icount), a
    # loaded host cannot deliver IRQ 0 late and change what the probe reads back.
    qstatus, qout = run_qemu(kernel, None, tmp_path, ("-icount", "shift=0,sleep=off"))
    assert qstatus == PROBE_EXIT, qout
    ours, theirs = fields(out), fields(qout)
    assert len(ours) == len(theirs) == 12
    for key in ours:
        a, b = int(ours[key], 16), int(theirs[key], 16)
        if key in ("r00", "r01"):
            # read-back status: boite follows the datasheet for OUT (high while a mode 2
            # count runs) and NULL COUNT (set until the count is loaded); QEMU 7 reports
            # neither (0x34). Access mode, counting mode and BCD must agree.
            assert a == (0xF4 if key == "r00" else 0xB4)
            a, b = a & 0x3F, b & 0x3F
        assert a == b, (key, ours[key], theirs[key])
