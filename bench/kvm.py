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
import struct
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
from boite.machine.devices import IsaDebugExit, Uart16550  # noqa: E402
from boite.machine.machine import Machine  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402
from guests import boot  # noqa: E402
from guests.build import assemble  # noqa: E402
from guests.runner import CollectedOutput  # noqa: E402

RESULT = re.compile(rb"iterations=0x([0-9a-f]+) cycles=0x([0-9a-f]+)")
EXIT_STATUS = (0x27 << 1) | 1
MULTIBOOT_MAGIC = 0x1BADB002


def load_multiboot_aout(memory: GuestMemory, image: bytes) -> int:
    """Place a multiboot a.out-kludge image as its header asks; return the entry point.
    (Only what this guest uses: header at offset 0, load_addr == header_addr.)"""
    magic, flags, _, header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from(
        "<8I", image
    )
    assert magic == MULTIBOOT_MAGIC and flags & 0x10000 and header_addr == load_addr
    memory.write(load_addr, image[: load_end - load_addr])
    return entry


def run_boite(image: bytes) -> tuple[int, int, int, float]:
    """(iterations, cycles, tsc_khz, wall seconds) of one boite run."""
    memory = GuestMemory.with_ram(16 << 20)
    machine = Machine(memory)
    com1 = CollectedOutput()
    machine.pio.register(
        0x3F8, 8, machine.add_device("com1", Uart16550(machine.irqs.line(4), com1))
    )
    machine.pio.register(0xF4, 4, machine.add_device("debug-exit", IsaDebugExit(machine, 4)))
    entry = load_multiboot_aout(memory, image)
    state = boot.flat32(memory, entry)
    state.gpr["rax"] = 0x2BADB002  # what a multiboot loader hands over
    machine.boot_state = [state]
    accel = KvmAccelerator(irqchip=True)  # as QEMU: in-kernel PIC/IOAPIC/LAPIC and PIT
    accel.create(machine)
    try:
        tsc_khz = ioctl(accel.runners[0].vcpu.fd, abi.KVM_GET_TSC_KHZ)
        t0 = time.perf_counter()
        result = accel.run()
        wall = time.perf_counter() - t0
    finally:
        accel.close()
        memory.close()
    if result.reason is not StopReason.SHUTDOWN or result.exit_status != EXIT_STATUS:
        raise SystemExit(f"boite run failed: {result}")
    m = RESULT.search(bytes(com1.output))
    if m is None:
        raise SystemExit(f"boite: no result line in {bytes(com1.output)!r}")
    return int(m[1], 16), int(m[2], 16), tsc_khz, wall


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
    image = kernel.read_bytes()

    boite_cycles: list[float] = []
    qemu_cycles: list[float] = []
    tsc_khz = 0
    for i in range(args.repeat):
        n, cycles, tsc_khz, wall = run_boite(image)
        boite_cycles.append(cycles / n)
        print(f"run {i + 1} boite: {cycles / n:9.0f} cycles/exit ({wall:.2f} s wall)", flush=True)
        n, cycles, wall = run_qemu(kernel)
        qemu_cycles.append(cycles / n)
        print(f"run {i + 1} qemu : {cycles / n:9.0f} cycles/exit ({wall:.2f} s wall)", flush=True)

    def us(cycles: float) -> float:
        return round(cycles / tsc_khz * 1000, 3)

    best_boite, best_qemu = min(boite_cycles), min(qemu_cycles)
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
                "linux_init_s_boite": None,  # Linux does not boot under kvm_pvm (see RESULTS.md)
                "linux_init_s_qemu": None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
