"""Cost of one port-I/O exit round trip: boite's KVM accelerator against QEMU/KVM.

The same bare-metal guest (tests/guests/pio_loop32.asm, a multiboot kernel) runs under
both VMMs. It times ITERATIONS `out` instructions with the TSC and prints the cycle
count; every `out` is a VM exit to the VMM's user space and back. Cycles per exit are
turned into microseconds with the guest TSC rate KVM reports (KVM_GET_TSC_KHZ), which
QEMU's guest shares (no TSC scaling asked for). Each VMM runs --repeat times,
interleaved, and the best run of each counts (the host is shared; noise only adds).

Final line: JSON with exit_us_boite, exit_us_qemu, exit_ratio (boite / QEMU).
Usage: python bench/kvm.py [--iterations N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from boite.accel.base import StopReason  # noqa: E402
from boite.accel.kvm import KvmAccelerator, abi  # noqa: E402
from boite.accel.kvm.system import ioctl  # noqa: E402
from boite.machine.builder import build_machine  # noqa: E402
from guests.build import assemble  # noqa: E402
from guests.runner import CollectedOutput  # noqa: E402

RESULT = re.compile(rb"iterations=0x([0-9a-f]+) cycles=0x([0-9a-f]+)")
EXIT_STATUS = (0x27 << 1) | 1


def run_boite(kernel: Path) -> tuple[int, int, int, float]:
    """(iterations, cycles, tsc_khz, wall seconds) of one boite run: the machine builder
    and multiboot loader `boite boot` uses, KVM with its in-kernel PIC/IOAPIC/PIT as QEMU."""
    com1 = CollectedOutput()
    machine = build_machine(16, 1, {1: com1}, str(kernel), emulated_irqchip=False)
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    try:
        tsc_khz = ioctl(accel.runners[0].vcpu.fd, abi.KVM_GET_TSC_KHZ)
        t0 = time.perf_counter()
        result = accel.run()
        wall = time.perf_counter() - t0
    finally:
        accel.close()
        machine.memory.close()
    if result.reason is not StopReason.SHUTDOWN or result.exit_status != EXIT_STATUS:
        raise SystemExit(f"boite run failed: {result}")
    m = RESULT.search(bytes(com1.output))
    if m is None:
        raise SystemExit(f"boite: no result line in {bytes(com1.output)!r}")
    return int(m[1], 16), int(m[2], 16), tsc_khz, wall


def time_to_marker(cmd: list[str], marker: bytes, timeout: float = 300) -> float | None:
    """Seconds from process start until `marker` shows on its stdout (None: never)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    seen = b""
    try:
        assert proc.stdout is not None
        while time.perf_counter() - t0 < timeout:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                return None
            seen = seen[-len(marker) :] + chunk
            if marker in seen:
                return time.perf_counter() - t0
        return None
    finally:
        proc.kill()
        proc.wait()


def linux_init_times() -> tuple[float | None, float | None, str]:
    """boite vs QEMU microvm, Debian's kernel and the kit's initrd, to the init marker."""
    if Path("/sys/module/kvm_pvm").exists():
        return None, None, "kvm_pvm: Linux does not boot under this KVM (nor under QEMU)"
    try:
        from boite.guestkit import READY_MARKER, ensure_kit
    except ImportError:
        return None, None, "no guest kit in this build"
    kit = ensure_kit(("debian",))
    append = "console=ttyS0 quiet panic=-1 boite.exitport=0x505"
    kernel, initrd = str(kit.debian_vmlinuz), str(kit.initrd_i386)
    boite_s = time_to_marker(
        [sys.executable, "-m", "boite", "boot", kernel, "--initrd", initrd, "--append", append,
         "--accel", "kvm", "--memsize", "256"], READY_MARKER.encode(),
    )  # fmt: skip
    qemu_s = time_to_marker(
        ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", "256", "-nodefaults",
         "-no-user-config", "-display", "none", "-serial", "stdio", "-kernel", kernel,
         "-initrd", initrd, "-append", append], READY_MARKER.encode(),
    )  # fmt: skip
    return boite_s, qemu_s, "Debian x86_64 kernel + guest kit initrd, 256 MiB"


def run_qemu(kernel: Path) -> tuple[int, int, float]:
    cmd = [
        "qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-m", "16", "-nodefaults",
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(kernel),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != EXIT_STATUS:
        raise SystemExit(f"qemu exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    m = RESULT.search(proc.stdout)
    if m is None:
        raise SystemExit(f"qemu: no result line in {proc.stdout!r}")
    return int(m[1], 16), int(m[2], 16), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    kernel = assemble("pio_loop32", ITERATIONS=args.iterations)

    boite_cycles: list[float] = []
    qemu_cycles: list[float] = []
    tsc_khz = 0
    for i in range(args.repeat):
        n, cycles, tsc_khz, wall = run_boite(kernel)
        boite_cycles.append(cycles / n)
        print(f"run {i + 1} boite: {cycles / n:9.0f} cycles/exit ({wall:.2f} s wall)", flush=True)
        n, cycles, wall = run_qemu(kernel)
        qemu_cycles.append(cycles / n)
        print(f"run {i + 1} qemu : {cycles / n:9.0f} cycles/exit ({wall:.2f} s wall)", flush=True)

    def us(cycles: float) -> float:
        return round(cycles / tsc_khz * 1000, 3)

    best_boite, best_qemu = min(boite_cycles), min(qemu_cycles)
    linux_boite, linux_qemu, linux_note = linux_init_times()
    print(
        f"linux to init marker: boite {linux_boite} s, qemu microvm {linux_qemu} s ({linux_note})"
    )
    kvm_kind = "kvm_pvm" if Path("/sys/module/kvm_pvm").exists() else "kvm"
    print(
        json.dumps(
            {
                "exit_us_boite": us(best_boite),
                "exit_us_qemu": us(best_qemu),
                "exit_ratio": round(best_boite / best_qemu, 3),
                "iterations": args.iterations,
                "repeat": args.repeat,
                "tsc_khz": tsc_khz,
                "kvm_module": kvm_kind,
                "python": platform.python_version(),
                "linux_init_s_boite": linux_boite,
                "linux_init_s_qemu": linux_qemu,
                "linux_note": linux_note,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
