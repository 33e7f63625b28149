"""Debian's own kernel and userland under the emulator (issue 15's stock test).

Debian 12's linux-image-686 and linux-image-686-pae kernels, unmodified, boot under
`boite boot --accel emu` with an initramfs made of Debian's i386 packages (busybox,
python3.11-minimal and their shared libraries: tests/guests/stockinitrd.py). The init
runs `python3 -c` floating-point work (x87: Debian's i386 userland is built for i686,
without SSE2), whose printed line must match the same command on the host:
- the host's own python3 (x86-64, SSE2 arithmetic), and
- the same i386 python3 binary and libraries on the host CPU's x87, where the host runs
  32-bit code: bit for bit the same machine code, so the emulated FPU is checked against
  a real one.
The kernel skips its crypto self-tests (`cryptomgr.notests`): RSA private-key operations
in emulated code take most of an hour, and they test the kernel's crypto, not the CPU.
The program leaves out what legitimately differs between those two hosts' builds
(math.gamma's C code rounds differently under x87 double rounding; math.hypot changed
between 3.11.2 and 3.11.7).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from boite import guestkit
from guests.stockinitrd import (
    DISK_MODULES,
    FP_PROGRAM,
    PROBE_SCRIPT,
    StockInitrd,
    boot_with_markers,
    python_userland,
    stock_initrd,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RESULT_PREFIX = "STOCK-PY "
NO_FPU = "x86/fpu: Giving up, no FPU found"


@pytest.fixture(scope="module")
def userland() -> StockInitrd:
    guestkit.ensure_kit(["debian-686"])  # adds the i386 architecture to apt if needed
    return python_userland()


def _result_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_host_python_agrees_with_itself_on_the_program() -> None:
    """The reference: the host's python3 prints the line the guest must print."""
    out = subprocess.run(
        [sys.executable, "-c", FP_PROGRAM], capture_output=True, text=True, check=True
    ).stdout
    assert _result_line(out).startswith(RESULT_PREFIX + "0.895701844442325")


def _host_i386_python(img: StockInitrd, where: Path) -> list[str] | None:
    """argv running the image's i386 python3 on the host, or None if the host cannot."""
    for name, mode, data in guestkit.parse_newc(img.path.read_bytes()):
        path = where / name
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(data.decode(), path)
        elif stat.S_ISREG(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode & 0o755)
    argv = [str(where / "lib/ld-linux.so.2"), "--library-path",
            str(where / "lib/i386-linux-gnu"), str(where / "usr/bin/python3.11")]  # fmt: skip
    try:
        probe = subprocess.run([*argv, "-c", "print(1)"], capture_output=True, timeout=60,
                               env={"PYTHONHOME": str(where / "usr")})  # fmt: skip
    except OSError:
        return None  # no IA32 execution on this host
    return argv if probe.returncode == 0 else None


def _emulator_has_an_fpu() -> bool:
    """What the emulated CPU's CPUID.1:EDX.FPU says (the CPU model reports only what the
    emulator implements)."""
    from boite.accel.emu.cpumodel import FEATURES, cpuid_leaf

    return bool(cpuid_leaf(FEATURES, 1)[3] & 1)


@pytest.mark.skipif(not _emulator_has_an_fpu(), reason="needs the x87 FPU (cpu-fpu)")
@pytest.mark.parametrize("flavour", ["686", "686-pae"])
def test_debian_kernel_runs_debian_python(
    flavour: str, userland: StockInitrd, tmp_path: Path
) -> None:
    kit = guestkit.ensure_kit([f"debian-{flavour}"])
    kernel = kit.debian686_vmlinuz if flavour == "686" else kit.debian686pae_vmlinuz
    assert kernel is not None
    run = boot_with_markers(
        [sys.executable, "-m", "boite", "boot", str(kernel), "--initrd", str(userland.path),
         "--accel", "emu", "--memsize", "256",
         "--append", "console=ttyS0 quiet cryptomgr.notests boite.exitport=0x505"],
        stop_on=(NO_FPU, "Kernel panic"), timeout=900,  # init took ~4.5 min at load 11
    )  # fmt: skip
    if NO_FPU in run.output:
        pytest.fail(
            f"Debian's {flavour} kernel stopped at '{NO_FPU}': the emulated CPU has no x87 "
            "FPU yet (issue 15, branch cpu-fpu)"
        )
    assert "BOITE-READY" in run.output, run.tail()
    assert "BOITE-EXIT status=0" in run.output, run.tail()
    guest = _result_line(run.output)

    host = subprocess.run(
        [sys.executable, "-c", FP_PROGRAM], capture_output=True, text=True, check=True
    ).stdout
    assert guest == _result_line(host)

    argv = _host_i386_python(userland, tmp_path / "root")
    if argv is not None:  # the same i386 code on the host's own x87
        same = subprocess.run([*argv, "-c", FP_PROGRAM], capture_output=True, text=True,
                              env={"PYTHONHOME": str(tmp_path / "root/usr")}, check=True)  # fmt: skip
        assert guest == _result_line(same.stdout)
    assert run.returncode == 0, run.tail()


# --- the same images under QEMU TCG: the helper checked against a real peer -----------------
requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-i386") is None, reason="needs qemu-system-i386 (qemu-system-x86)"
)


def _qemu(kernel: Path, initrd: Path, *extra: str) -> subprocess.CompletedProcess:
    # no_timer_check: on a loaded host TCG's timer may miss the kernel's IO-APIC check.
    return subprocess.run(
        ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-kernel", str(kernel),
         "-initrd", str(initrd), "-append", "console=ttyS0 quiet no_timer_check "
         "boite.exitport=0xf4", "-device", "isa-debug-exit,iobase=0xf4", "-display", "none",
         "-serial", "stdio", "-monitor", "none", "-no-reboot", *extra],
        capture_output=True, text=True, errors="replace", timeout=900,
    )  # fmt: skip


@requires_qemu
def test_python_image_under_qemu(userland: StockInitrd) -> None:
    kit = guestkit.ensure_kit(["debian-686"])
    r = _qemu(kit.debian686_vmlinuz, userland.path)
    assert "BOITE-EXIT status=0" in r.stdout, r.stdout[-3000:]
    assert r.returncode == 1, r.stdout[-3000:]  # isa-debug-exit: (0 << 1) | 1
    host = subprocess.run(
        [sys.executable, "-c", FP_PROGRAM], capture_output=True, text=True, check=True
    ).stdout
    assert _result_line(r.stdout.replace("\r\n", "\n")) == _result_line(host)


@requires_qemu
def test_stock_modules_find_the_disks_under_qemu(tmp_path: Path) -> None:
    """The disk-driver image (for the platform tests): Debian's own virtio_pci, virtio_blk,
    ata_piix and sd_mod load, find QEMU's virtio-blk-pci and IDE disks; 2 CPUs counted."""
    kit = guestkit.ensure_kit(["debian-686"])
    img = stock_initrd(run=PROBE_SCRIPT, kernel_deb=kit.debian686_deb, modules=DISK_MODULES)
    assert img.modules.index("virtio_ring") < img.modules.index("virtio_pci")
    assert img.modules.index("libata") < img.modules.index("ata_piix")
    assert img.modules.index("scsi_mod") < img.modules.index("sd_mod")
    (tmp_path / "vd.img").write_bytes(bytes(64 << 20))
    (tmp_path / "hd.img").write_bytes(bytes(32 << 20))
    r = _qemu(kit.debian686_vmlinuz, img.path, "-smp", "2",
              "-drive", f"file={tmp_path / 'vd.img'},format=raw,if=virtio",
              "-drive", f"file={tmp_path / 'hd.img'},format=raw,if=ide")  # fmt: skip
    out = r.stdout.replace("\r\n", "\n")
    for name in img.modules:
        assert f"STOCK-INSMOD {name} ok" in out, out[-3000:]
    assert "STOCK-CPUS 2" in out, out[-3000:]
    assert "STOCK-DISK vda sectors=131072 driver=virtio_blk" in out, out[-3000:]
    assert "STOCK-DISK sda sectors=65536 driver=sd" in out, out[-3000:]
    assert "driver=ata_piix" in out and "driver=virtio-pci" in out, out[-3000:]
