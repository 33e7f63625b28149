"""System-level behaviour of the emulator against QEMU TCG as the reference.

QEMU's `qemu-system-i386 -accel tcg` is the reference here, for what this machine's
kvm_pvm cannot run (paging turned on by the guest, IRET, interrupt delivery, mode
changes). Each multiboot kernel in tcg_guests/ exercises one system feature and prints a
deterministic transcript on COM1 (only values that do not depend on timing or on the CPU
model), then leaves through isa-debug-exit. It runs under QEMU TCG and under the real
`boite boot --accel emu` command, with block translation and with the plain interpreter
(BOITE_EMU=interp); the transcripts and exit statuses must be equal, and QEMU's must end
with "done" and the kernel's own exit code (so a kernel that dies early fails too).
A kernel that names "(qemu-smp: N)" near its top runs with N vCPUs on both (smp.asm:
INIT/SIPI, IPIs to a halted CPU, APIC timers, TLB shootdown, ISR and TPR priority).

Left out, because QEMU TCG itself departs from the hardware there (each noted in the
kernel that would test it): data and stack segment limit and access-right checks (those
are compared against the real CPU through KVM in test_boot_parity.py), CR0.PG without
PE, WRMSR to the TSC, and #GP on unknown MSRs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "tcg_guests"
KERNELS = sorted(p.stem for p in GUESTS.glob("*.asm"))
MEMSIZE_MB = 64
TIMEOUT_S = 60

pytestmark = [
    pytest.mark.skipif(
        shutil.which("qemu-system-i386") is None,
        reason="qemu-system-i386 (the reference) is not installed",
    ),
    pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed"),
]


def exit_code_of(name: str) -> int:
    """The debug-exit value the kernel writes after "done" (its EXIT_CODE)."""
    m = re.search(r"%define EXIT_CODE (0x[0-9a-fA-F]+)", (GUESTS / f"{name}.asm").read_text())
    assert m, f"{name}.asm defines no EXIT_CODE"
    return int(m.group(1), 16)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tcg_guests")
    images = {}
    for name in KERNELS:
        img = out / f"{name}.bin"
        subprocess.run(
            ["nasm", "-f", "bin", "-I", f"{GUESTS}/", "-o", str(img), str(GUESTS / f"{name}.asm")],
            check=True,
            capture_output=True,
        )
        images[name] = img
    return images


def qemu_cpu_of(name: str) -> str:
    """The QEMU CPU model a kernel needs, from "(qemu-cpu: MODEL)" in its first line
    (qemu32 lacks some features the emulator has, NX among them)."""
    m = re.search(r"\(qemu-cpu: ([\w,+-]+)\)", (GUESTS / f"{name}.asm").read_text().split("\n")[0])
    return m.group(1) if m else "qemu32"


def cpus_of(name: str) -> int:
    """The vCPUs a kernel runs on, from "(qemu-smp: N)" in its first lines (default 1)."""
    m = re.search(r"\(qemu-smp: (\d+)\)", (GUESTS / f"{name}.asm").read_text()[:400])
    return int(m.group(1)) if m else 1


def _qemu(image: Path) -> tuple[int, bytes]:
    p = subprocess.run(
        ["qemu-system-i386", "-accel", "tcg", "-cpu", qemu_cpu_of(image.stem),
         "-smp", str(cpus_of(image.stem)), "-m", str(MEMSIZE_MB), "-kernel", str(image),
         "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    return p.returncode, p.stdout


@pytest.fixture(scope="module")
def qemu_runs(built) -> dict[str, tuple[int, bytes]]:
    """Every kernel under QEMU TCG, once per module and side by side: (status, COM1)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(built, pool.map(_qemu, built.values()), strict=True))


def boite_boot_emu(image: Path, mode: str) -> tuple[int, bytes, bytes]:
    env = dict(os.environ, BOITE_EMU=mode, BOITE_EMU_HOT="2")  # every block compiled
    # On the native tier -v: the VMM's last line says how much ran as native code.
    verbose = ["-v"] if env.get("BOITE_EMU_TIER") == "native" else []
    p = subprocess.run(
        [sys.executable, "-m", "boite", *verbose, "boot", "--accel", "emu",
         "--cpus", str(cpus_of(image.stem)), "--memsize", str(MEMSIZE_MB), str(image)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT_S, env=env,
    )  # fmt: skip
    return p.returncode, p.stdout, p.stderr


MODES = ("translate", "interp")


@pytest.fixture(scope="module")
def emu_runs(built):
    """A kernel under `boite boot --accel emu` in both paths at once (two independent
    processes, which only saves waiting), cached for the second mode's test; on the
    native tier (BOITE_EMU_TIER, see conftest.py) only the translating path has one."""
    cache: dict[tuple[str, str, str | None], tuple[int, bytes, bytes]] = {}

    def run(name: str, mode: str) -> tuple[int, bytes, bytes]:
        tier = os.environ.get("BOITE_EMU_TIER")
        if (name, mode, tier) not in cache:
            modes = MODES if tier != "native" else ("translate",)
            with ThreadPoolExecutor(max_workers=len(modes)) as pool:
                results = pool.map(lambda m: boite_boot_emu(built[name], m), modes)
                cache.update({(name, m, tier): r for m, r in zip(modes, results, strict=True)})
        return cache[name, mode, tier]

    return run


def native_ran(stderr: bytes) -> bytes:
    """Checks that the VMM's count of native instructions (-v) is not 0; stderr without
    the VMM's own lines."""
    lines = stderr.decode(errors="replace").splitlines()
    counts = [ln for ln in lines if ln.startswith("boite: Emulator tier native:")]
    assert counts, stderr
    assert int(counts[0].split(", ")[1].split()[0]) > 0, counts[0]
    return "".join(ln + "\n" for ln in lines if not ln.startswith("boite: ")).encode()


@pytest.mark.emu_tiers
@pytest.mark.parametrize("mode", MODES, ids=["translated", "interpreted"])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_qemu_tcg(qemu_runs, emu_runs, name, mode):
    q_status, q_out = qemu_runs[name]
    want = (exit_code_of(name) << 1) | 1
    # The reference itself must have run the kernel to its end.
    assert q_out.endswith(b"done\n") and q_status == want, (q_status, q_out.decode())
    e_status, e_out, e_err = emu_runs(name, mode)
    if os.environ.get("BOITE_EMU_TIER") == "native":
        e_err = native_ran(e_err)
    assert not e_err, e_err.decode(errors="replace")
    assert e_out.decode(errors="replace") == q_out.decode()
    assert e_status == q_status


def test_every_kernel_is_compared():
    """The frame (lib.inc) is no kernel; every .asm file is one, with its own exit code."""
    assert len(KERNELS) >= 9
    codes = [exit_code_of(n) for n in KERNELS]
    assert len(set(codes)) == len(codes)
