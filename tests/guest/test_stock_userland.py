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
The program leaves out what legitimately differs between those two hosts' builds
(math.gamma's C code rounds differently under x87 double rounding; math.hypot changed
between 3.11.2 and 3.11.7).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from boite import guestkit
from guests.stockinitrd import StockInitrd, boot_with_markers, stock_initrd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]

FP_PROGRAM = """\
import math
xs = [math.sin(k) * math.exp(-k / 7) for k in range(1, 40)]
p = 1.0
for k in range(1, 30):
    p *= 1 + 1 / k**1.5
print("STOCK-PY", repr(math.fsum(xs)), repr(sum(xs)), repr(p), math.sqrt(2) ** 0.5,
      math.log10(12345.678), math.atan2(-1.5, 0.3), (0.1).hex(), float("1e-310") * 3,
      10**-5 / 3, round(math.pi, 7), int(2**52 * math.tau), math.cos(1e22), math.tan(0.5),
      7.0 % 2.5, divmod(-7.5, 2), f"{math.e:.30f}", 1e308 * 10, float("nan") != float("nan"))
"""
RESULT_PREFIX = "STOCK-PY "
NO_FPU = "x86/fpu: Giving up, no FPU found"


def python_userland() -> StockInitrd:
    return stock_initrd(
        run='python3 -c "$(cat /etc/boite/fp.py)"',
        packages=("busybox", "python3.11-minimal", "libpython3.11-minimal"),
        files={"etc/boite/fp.py": FP_PROGRAM.encode()},
        links={"usr/bin/python3": "python3.11"},
    )


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
         "--append", "console=ttyS0 quiet boite.exitport=0x505"],
        stop_on=(NO_FPU, "Kernel panic"), timeout=6000,
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
