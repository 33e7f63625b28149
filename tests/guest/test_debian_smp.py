"""Debian 12's stock kernel (linux-image-686, unmodified) on 2 vCPUs under the emulator.

The kernel is booted directly (bzImage unpacked by boite; the machine's MP table names
both vCPUs), with an initramfs of Debian's busybox. The guest's init counts its CPUs,
runs a worker pinned to each (busybox taskset) and processes that hand a token back and
forth through pipes (each hand-over wakes a task on the other CPU: reschedule and
call-function IPIs, the halted CPU's wake-up), shows /proc/interrupts (both CPUs' APIC
timers, the IPIs, the console UART's IRQ through the IOAPIC), then powers off through
the exit port. It must count 2 CPUs, finish, and never report a soft lockup or an RCU
stall (what a lost wake-up of a halted vCPU looked like: issue 12). QEMU TCG with
`-smp 2` runs the same files as the reference. (Debian's kernel has no virtio-mmio
command line devices, so a directly booted one finds no boite disk: the firmware boot
of test_debian_iso.py covers the disks and their interrupts on 2 vCPUs.)

About 1.5 CPU-minutes under the emulator on the native tier; both tests took 3.5 minutes
of wall time at load 6.5 on this project's 2 shared cores (2026-12-07).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from boite import guestkit
from guests.stockinitrd import StockInitrd, boot_with_markers, stock_initrd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RUN = r"""
echo "STOCK-CPUS $(grep -c '^processor' /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online)"
for c in 0 1; do
  taskset -c $c sh -c 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done
    echo "STOCK-WORKER cpu=$(cut -d" " -f39 /proc/self/stat) done"' &
done
wait
# a token through two pipes, 200 times: every hand-over wakes the other side
mkfifo /tmp/a /tmp/b
(i=0; while [ $i -lt 200 ]; do read t </tmp/a; echo $t >/tmp/b; i=$((i+1)); done) &
i=0
while [ $i -lt 200 ]; do echo $i >/tmp/a; read t </tmp/b; i=$((i+1)); done
wait
echo "STOCK-PINGPONG $t"
grep -E '^ *(CPU|LOC|RES|CAL|TLB):? |ttyS' /proc/interrupts
"""
BAD = ("soft lockup", "rcu_sched self-detected", "rcu: INFO", "detected stall", "Kernel panic")
# The exit port: boite's power-off port (status 0 -> boite boot exits 0), QEMU's
# isa-debug-exit ((status << 1) | 1).
CMDLINE = "console=ttyS0 cryptomgr.notests boite.exitport="


@pytest.fixture(scope="module")
def image() -> StockInitrd:
    guestkit.ensure_kit(["debian-686"])  # adds the i386 architecture to apt if needed
    return stock_initrd(run=RUN)


def _check(out: str) -> None:
    for bad in BAD:
        assert bad not in out, out[-4000:]
    assert "STOCK-CPUS 2 online=0-1" in out, out[-3000:]
    assert "smp: Brought up 1 node, 2 CPUs" in out, out[-3000:]
    for c in (0, 1):
        assert f"STOCK-WORKER cpu={c} done" in out, out[-3000:]
    assert "STOCK-PINGPONG 199" in out, out[-3000:]
    # Both CPUs' local APIC timers ticked; the console's UART interrupts came through the
    # IOAPIC.
    loc = re.search(r"^\s*LOC:\s+(\d+)\s+(\d+)", out, re.M)
    assert loc and int(loc[1]) > 0 and int(loc[2]) > 0, out[-3000:]
    uart = re.search(r"^\s*4:\s+(\d+)\s+(\d+)\s+IO-APIC\s+4-edge\s+ttyS0", out, re.M)
    assert uart and int(uart[1]) + int(uart[2]) > 0, out[-3000:]
    assert "BOITE-EXIT status=0" in out, out[-3000:]


def test_debian_686_counts_two_cpus_under_the_emulator(image: StockInitrd) -> None:
    kit = guestkit.ensure_kit(["debian-686"])
    run = boot_with_markers(
        [sys.executable, "-m", "boite", "boot", str(kit.debian686_vmlinuz),
         "--initrd", str(image.path), "--accel", "emu", "--emu-tier", "auto",
         "--cpus", "2", "--memsize", "256", "--append", CMDLINE + "0x505"],
        stop_on=BAD, timeout=1200,
    )  # fmt: skip
    _check(run.output)
    assert run.returncode == 0, run.tail()


@pytest.mark.skipif(shutil.which("qemu-system-i386") is None, reason="needs qemu-system-i386")
def test_the_same_files_under_qemu_tcg(image: StockInitrd) -> None:
    """The reference: QEMU TCG with 2 CPUs."""
    kit = guestkit.ensure_kit(["debian-686"])
    r = subprocess.run(
        ["qemu-system-i386", "-accel", "tcg", "-smp", "2", "-m", "256",
         "-kernel", str(kit.debian686_vmlinuz), "-initrd", str(image.path), "-append", CMDLINE + "0xf4",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-display", "none",
         "-serial", "stdio", "-monitor", "none", "-no-reboot"],
        capture_output=True, text=True, errors="replace", timeout=900,
    )  # fmt: skip
    out = r.stdout.replace("\r\n", "\n")
    _check(out)
    assert r.returncode == 1, out[-3000:]  # isa-debug-exit: (0 << 1) | 1
