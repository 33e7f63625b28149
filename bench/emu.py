"""Benchmark: boite's x86 emulator (block translator and plain interpreter) against QEMU
TCG on the same bare-metal compute loop (tests/accel/emu_guests/compute32.asm, a
multiboot image), and (when the tiny Linux boots) seconds to its init marker.

MIPS = guest instructions / wall seconds. The instruction count comes from the
emulator's own counter (the program is deterministic, so QEMU runs the same count).
QEMU TCG and boite's native tier are measured the same way, in steady state: a short
run (ITER/10 outer iterations) and a long one (ITER*100) of the same program, MIPS = the
instructions of long minus short over the time of long minus short, so start-up and the
translation of the loop's blocks (the same in both runs) drop out. boite's runs are in
this process, each on a fresh machine, the short one first.

Usage: python bench/emu.py [--iter N] [--profile] [--linux KERNEL INITRD]
                           [--stock BZIMAGE INITRD [--stock-marker TEXT]]
(KERNEL: the kit's i386 vmlinux, booted through its PVH entry, or its bzImage; both boite
and QEMU boot the same files.) It also runs under PyPy (`pypy3 bench/emu.py ...`).
--stock: a stock distribution kernel (Debian 12's linux-image-686, the kit's
`debian686_vmlinuz`) with the kit's initramfs, 256 MiB: boite unpacks the bzImage on the
host (protocol linux-unpacked, as `boite boot --accel emu` does), QEMU boots it as a
bzImage, both with `cryptomgr.notests` (see STOCK_CMDLINE); seconds to the first console
text TEXT (default: init's BOITE-READY).
The last line printed is JSON: mips_translated, mips_interpreted, mips_native (the
native tier in steady state as above, null on hosts without it), mips_translated_cpu /
mips_native_cpu (per CPU second: the figures to compare on a loaded host),
mips_native_from_start / mips_native_from_start_cpu (the native tier over one run of
ITER iterations from power-on: translation and the closures' first runs included, so
short runs read low), mips_qemu_tcg, linux_init_s (the
Python tiers) and linux_init_s_native (the native tier; both with *_cpu_s: CPU
seconds), linux_init_s_qemu_tcg, stock_kernel_init_s (on the native tier where the host
has it: stock_kernel_tier says which) and its CPU seconds, stock_kernel_init_s_qemu_tcg,
stock_kernel_marker (null where not measurable yet), and boite / QEMU TCG of this run:
mips_native_ratio, linux_init_ratio_native, stock_kernel_init_ratio (seconds in 0.01 s).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from boite.accel.cpustate import CpuState, DescriptorTable, Segment  # noqa: E402
from boite.accel.emu import EmuAccelerator  # noqa: E402
from boite.accel.emu.native import native_available  # noqa: E402
from boite.machine.machine import Machine  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402

GUEST = REPO / "tests" / "accel" / "emu_guests" / "compute32.asm"
LOAD = 0x100000
GDT = 0x1000


class Com1:
    def __init__(self) -> None:
        self.out = bytearray()

    def bus_read(self, offset: int, size: int) -> int:
        return 0x60 if offset == 5 else 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.out.append(value)


class DebugExit:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.machine.request_poweroff((value << 1) | 1)


def build(iters: int, out: Path) -> bytes:
    subprocess.run(["nasm", "-f", "bin", f"-DITER={iters}", "-o", str(out), str(GUEST)], check=True)
    return out.read_bytes()


def multiboot_state(mem: GuestMemory, image: bytes) -> CpuState:
    """What a multiboot loader hands over: flat 32-bit segments, EAX = magic."""
    mem.write_u64(GDT + 8, 0x00CF9B000000FFFF)
    mem.write_u64(GDT + 16, 0x00CF93000000FFFF)
    off = image.index((0x1BADB002).to_bytes(4, "little"))
    entry = int.from_bytes(image[off + 28 : off + 32], "little")
    code = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    data = Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
    st = CpuState(rip=entry, cr0=0x11, gdt=DescriptorTable(GDT, 23))
    st.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    st.gpr["rax"] = 0x2BADB002
    return st


def run_emu(
    image: bytes, translate: bool, profile: bool = False, native: bool = False
) -> tuple[float, int, bytes]:
    mem = GuestMemory.with_ram(16 << 20)
    m = Machine(mem)
    com = Com1()
    m.pio.register(0x3F8, 8, com)
    m.pio.register(0xF4, 1, DebugExit(m))
    mem.write(LOAD, image)
    m.boot_state = [multiboot_state(mem, image)]
    acc = EmuAccelerator(translate=translate, native=native)
    acc.create(m)
    if native and (acc.cpu is None or acc.cpu.native is None):
        return 0.0, 0, b""  # this host has no native tier
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    res = acc.run()
    if prof:
        prof.disable()
    dt = time.perf_counter() - t
    assert acc.cpu is not None
    n = acc.cpu.icount
    if res.exit_status != (0x31 << 1) | 1:
        raise SystemExit(f"emulator run failed: {res} output={bytes(com.out)!r}")
    if prof:
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(14)
    return dt, n, bytes(com.out)


def run_qemu(path: Path) -> tuple[float, bytes]:
    cmd = [
        "qemu-system-i386", "-accel", "tcg", "-kernel", str(path), "-m", "64",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, timeout=600)
    dt = time.perf_counter() - t
    if p.returncode != 0x31 * 2 + 1:
        raise SystemExit(f"qemu run failed: rc={p.returncode} {p.stderr[-300:]!r}")
    return dt, p.stdout


READY = b"BOITE-READY"
LINUX_CMDLINE = 'console=ttyS0 quiet boite.run="uname -a"'
# The stock kernel's crypto self-tests (RSA private-key operations among them) are over
# half of its boot under QEMU and far more under the emulator; they test the kernel's
# crypto, not the machine, so both skip them.
STOCK_CMDLINE = LINUX_CMDLINE + " cryptomgr.notests"


def linux_emu(kernel: Path, initrd: Path, memsize: int = 64, protocol: str = "auto",
              marker: bytes = READY, timeout: float | None = None,
              cmdline: str = LINUX_CMDLINE, tier: str | None = None) -> tuple[float, float]:  # fmt: skip
    """(wall, CPU) seconds from start to the console's first `marker` (vmlinux or bzImage;
    the time includes boite's own loading, unpacking a bzImage included)."""
    from boite.machine.builder import build_machine
    from boite.machine.devices.uart import SerialBackend

    t0, c0 = time.perf_counter(), time.process_time()
    seen: list[tuple[float, float]] = []

    class Console(SerialBackend):
        buf = b""

        def write(self, data: bytes) -> None:
            self.buf = (self.buf + data)[-256:]
            if not seen and marker in self.buf:
                seen.append((time.perf_counter() - t0, time.process_time() - c0))
                acc.pause()

    m = build_machine(memsize, 1, kernel=kernel, initrd=initrd, cmdline=cmdline,
                      console=Console(), protocol=protocol)  # fmt: skip
    acc = EmuAccelerator(tier=tier)
    acc.create(m)
    timer = threading.Timer(timeout, acc.pause) if timeout else None
    if timer:
        timer.start()
    res = acc.run()
    if timer:
        timer.cancel()
    if not seen:
        raise SystemExit(f"Linux did not reach {marker!r} under the emulator: {res}")
    return seen[0]


def linux_qemu(kernel: Path, initrd: Path, memsize: int = 64, marker: bytes = READY,
               cmdline: str = LINUX_CMDLINE) -> float:  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["qemu-system-i386", "-accel", "tcg", "-kernel", str(kernel), "-initrd", str(initrd),
         "-append", cmdline, "-m", str(memsize), "-display", "none", "-serial", "stdio",
         "-monitor", "none", "-no-reboot"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    try:
        for line in p.stdout:
            if marker in line:
                return time.perf_counter() - t0
    finally:
        p.kill()
        p.wait()
    raise SystemExit(f"Linux did not reach {marker!r} under QEMU TCG")


def _ratio(ours: float | None, qemu: float | None) -> float | None:
    return round(ours / qemu, 2) if ours and qemu else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iter", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--linux",
        nargs=2,
        type=Path,
        metavar=("KERNEL", "INITRD"),
        help="also time the guest kit's i386 Linux to its init marker",
    )
    ap.add_argument(
        "--stock",
        nargs=2,
        type=Path,
        metavar=("BZIMAGE", "INITRD"),
        help="also time a stock 32-bit bzImage (Debian's 686) to its init marker",
    )
    ap.add_argument(
        "--stock-marker",
        default=READY.decode(),
        metavar="TEXT",
        help="--stock: time to this console text (default: BOITE-READY)",
    )
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="boite-bench-emu-"))
    try:
        img = build(a.iter, tmp / "long.bin")
        small = build(max(1, a.iter // 10), tmp / "short.bin")
        c0 = time.process_time()
        t_tr, n, out_tr = run_emu(img, True, a.profile)
        cpu_tr = time.process_time() - c0
        t_in, n_in, out_in = run_emu(small, False)
        mips_tr = n / t_tr / 1e6
        mips_in = n_in / t_in / 1e6
        print(
            f"translated:  {n} insns in {t_tr:.2f}s = {mips_tr:.2f} MIPS "
            f"({n / cpu_tr / 1e6:.2f} MIPS per CPU second)",
            file=sys.stderr,
        )
        print(f"interpreted: {n_in} insns in {t_in:.2f}s = {mips_in:.2f} MIPS", file=sys.stderr)
        c0 = time.process_time()
        t_na, n_na, out_na = run_emu(img, True, a.profile, native=True)
        cpu_na = time.process_time() - c0
        mips_na_start = n_na / t_na / 1e6 if t_na else None
        if mips_na_start is not None:
            if out_na.strip() != out_tr.strip():
                raise SystemExit(f"checksums differ: native {out_na!r}, translated {out_tr!r}")
            print(f"native:      {n_na} insns in {t_na:.2f}s = {mips_na_start:.2f} MIPS from "
                  f"power-on ({n_na / cpu_na / 1e6:.2f} MIPS per CPU second)",
                  file=sys.stderr)  # fmt: skip
        # Long and short runs as QEMU's below: the same images, ITER*100 and ITER/10.
        s_iter, q_iter = max(1, a.iter // 10), a.iter * 100
        build(q_iter, tmp / "qlong.bin")
        mips_na = mips_na_cpu = None
        out_nl = b""
        if mips_na_start is not None:
            c0 = time.process_time()
            ts_na, ns_na, _ = run_emu(small, True, native=True)
            c1 = time.process_time()
            tl_na, nl_na, out_nl = run_emu((tmp / "qlong.bin").read_bytes(), True, native=True)
            c2 = time.process_time()
            if tl_na > ts_na:
                mips_na = (nl_na - ns_na) / (tl_na - ts_na) / 1e6
            if (c2 - c1) > (c1 - c0):
                mips_na_cpu = (nl_na - ns_na) / ((c2 - c1) - (c1 - c0)) / 1e6
            print(f"native:      {tl_na:.2f}s for {q_iter} iterations, {ts_na:.2f}s short -> "
                  f"{mips_na and round(mips_na, 1)} MIPS steady "
                  f"({mips_na_cpu and round(mips_na_cpu, 1)} per CPU second)",
                  file=sys.stderr)  # fmt: skip
        mips_q = None
        if shutil.which("qemu-system-i386"):
            # The instruction count is linear in ITER: n = n0 + per_iter * ITER.
            _, n_small, _ = run_emu(small, True)
            per_iter = (n - n_small) / (a.iter - s_iter)
            tq_long, out_q = run_qemu(tmp / "qlong.bin")
            tq_short, out_qs = run_qemu(tmp / "short.bin")
            if out_qs.strip() != run_emu(small, True)[2].strip():
                raise SystemExit(f"checksums differ: qemu {out_qs!r}")
            if out_nl and out_nl.strip() != out_q.strip():
                raise SystemExit(f"checksums differ: native {out_nl!r}, qemu {out_q!r}")
            if tq_long > tq_short:
                mips_q = per_iter * (q_iter - s_iter) / (tq_long - tq_short) / 1e6
            print(
                f"qemu tcg:    {tq_long:.2f}s for {q_iter} iterations, {tq_short:.2f}s short -> "
                f"{mips_q and round(mips_q, 1)} MIPS ({per_iter:.0f} insns/iteration)",
                file=sys.stderr,
            )
        linux_s = linux_q = linux_cpu = linux_na = linux_na_cpu = None
        native_ok = native_available()
        if a.linux:
            linux_s, linux_cpu = linux_emu(*a.linux, tier="python")
            print(f"linux:       init marker after {linux_s:.1f}s ({linux_cpu:.1f} CPU s)",
                  file=sys.stderr)  # fmt: skip
            if native_ok:
                linux_na, linux_na_cpu = linux_emu(*a.linux, tier="native")
                print(f"linux native: init marker after {linux_na:.2f}s "
                      f"({linux_na_cpu:.2f} CPU s)", file=sys.stderr)  # fmt: skip
            if shutil.which("qemu-system-i386"):
                linux_q = linux_qemu(*a.linux)
                print(f"qemu linux:  init marker after {linux_q:.2f}s", file=sys.stderr)
        stock_s = stock_q = stock_cpu = stock_tier = None
        if a.stock:
            marker = a.stock_marker.encode()
            stock_tier = "native" if native_ok else "python"
            stock_s, stock_cpu = linux_emu(
                *a.stock, 256, "linux-unpacked", marker, 7200, STOCK_CMDLINE, stock_tier
            )
            print(f"stock:       {a.stock_marker!r} after {stock_s:.1f}s ({stock_cpu:.1f} CPU s)",
                  file=sys.stderr)  # fmt: skip
            if shutil.which("qemu-system-i386"):
                stock_q = linux_qemu(*a.stock, 256, marker, STOCK_CMDLINE)
                print(f"qemu stock:  {a.stock_marker!r} after {stock_q:.1f}s "
                      f"(ratio {stock_s / stock_q:.1f})", file=sys.stderr)  # fmt: skip
        print(
            json.dumps(
                {
                    "mips_translated": round(mips_tr, 3),
                    "mips_interpreted": round(mips_in, 3),
                    "mips_native": mips_na and round(mips_na, 3),
                    "mips_translated_cpu": round(n / cpu_tr / 1e6, 3),
                    "mips_native_cpu": mips_na_cpu and round(mips_na_cpu, 3),
                    "mips_native_from_start": mips_na_start and round(mips_na_start, 3),
                    "mips_native_from_start_cpu": mips_na_start and round(n_na / cpu_na / 1e6, 3),
                    "mips_qemu_tcg": mips_q and round(mips_q, 1),
                    "linux_init_s": linux_s and round(linux_s, 2),
                    "linux_init_cpu_s": linux_cpu and round(linux_cpu, 2),
                    "linux_init_s_native": linux_na and round(linux_na, 2),
                    "linux_init_cpu_s_native": linux_na_cpu and round(linux_na_cpu, 2),
                    "linux_init_s_qemu_tcg": linux_q and round(linux_q, 2),
                    "stock_kernel_init_s": stock_s and round(stock_s, 2),
                    "stock_kernel_init_cpu_s": stock_s and round(stock_cpu, 2),
                    "stock_kernel_tier": stock_tier if a.stock else None,
                    "stock_kernel_init_s_qemu_tcg": stock_q and round(stock_q, 2),
                    "stock_kernel_marker": a.stock_marker if a.stock else None,
                    # boite / QEMU TCG in this run (the aims: >= 0.3, <= 2, <= 3)
                    "mips_native_ratio": _ratio(mips_na, mips_q),
                    "linux_init_ratio_native": _ratio(linux_na, linux_q),
                    "stock_kernel_init_ratio": _ratio(stock_s, stock_q),
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
