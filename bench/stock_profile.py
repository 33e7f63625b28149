"""Where a stock kernel's boot time goes under boite's emulator.

Boots a 32-bit bzImage (Debian 12's linux-image-686: the kit's `debian686_vmlinuz`)
unpacked on the host, with an initramfs, for at most SECONDS or until the console
shows TEXT, and reports:
- guest side: the guest EIP sampled every few milliseconds from another thread, counted
  by kernel function (from a kallsyms listing: Debian's System.map is a stub pointing at
  the -dbg package, so take /proc/kallsyms of the same kernel booted with `nokaslr`,
  e.g. under QEMU with the kit's init and `boite.run="cat /proc/kallsyms"`; the unpacked
  kernel runs at LOAD_PHYSICAL_ADDR, so the addresses are the same), and the guest
  instructions executed (MIPS);
- host side, with --cprofile: cProfile's top functions by own time (the emulator's hot
  paths; cProfile slows the run about twofold, so guest timings are from runs without).

Usage: python bench/stock_profile.py BZIMAGE INITRD [--kallsyms FILE] [--seconds S]
       [--until TEXT] [--top N] [--cprofile]
The last line printed is JSON (seconds, guest_instructions, mips, top guest functions
with their share of samples).
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import io
import json
import pstats
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from boite.accel.emu import EmuAccelerator  # noqa: E402
from boite.machine.builder import build_machine  # noqa: E402
from boite.machine.devices.uart import SerialBackend  # noqa: E402

CMDLINE = 'console=ttyS0 quiet cryptomgr.notests boite.run="uname -a"'  # as bench/emu.py --stock


def read_kallsyms(path: Path) -> tuple[list[int], list[str]]:
    """Sorted text symbol addresses and names from a /proc/kallsyms listing."""
    syms: list[tuple[int, str]] = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW" and len(parts[0]) == 8:
            try:
                syms.append((int(parts[0], 16), parts[2]))
            except ValueError:
                continue
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kernel", type=Path)
    ap.add_argument("initrd", type=Path)
    ap.add_argument("--kallsyms", type=Path)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--until", default="BOITE-READY")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the host side")
    ap.add_argument("--interval", type=float, default=0.005, help="EIP sampling period (s)")
    a = ap.parse_args()

    out = io.StringIO()
    acc = EmuAccelerator()
    marker_at: list[float] = []

    class Console(SerialBackend):
        def write(self, data: bytes) -> None:
            out.write(data.decode(errors="replace"))
            if not marker_at and a.until in out.getvalue()[-4096:]:
                marker_at.append(time.perf_counter())
                acc.pause()

    t_load = time.perf_counter()
    m = build_machine(256, 1, kernel=a.kernel, initrd=a.initrd, cmdline=CMDLINE,
                      console=Console(), protocol="linux-unpacked")  # fmt: skip
    load_s = time.perf_counter() - t_load
    acc.create(m)
    samples: Counter[int] = Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(a.interval):
            cpu = acc.cpu
            if cpu is not None:
                samples[cpu.eip] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    timer = threading.Timer(a.seconds, acc.pause)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    sampler.start()
    timer.start()
    if a.cprofile:
        prof.enable()
    result = acc.run()
    prof.disable()
    wall = time.perf_counter() - t0
    done.set()
    timer.cancel()
    icount = acc.cpu.icount if acc.cpu is not None else 0
    acc.close()

    total = sum(samples.values()) or 1
    by_symbol: Counter[str] = Counter()
    if a.kallsyms:
        addrs, names = read_kallsyms(a.kallsyms)
        for eip, n in samples.items():
            i = bisect.bisect_right(addrs, eip) - 1
            by_symbol[names[i] if i >= 0 and eip < 0xFFFF_F000 else f"{eip:#x}"] += n
    else:
        for eip, n in samples.items():
            by_symbol[f"{eip & ~0xFFF:#x} page"] += n
    print(f"loaded (unpacked) in {load_s:.1f}s; ran {wall:.1f}s, {icount} guest instructions "
          f"({icount / wall / 1e6:.2f} MIPS); stopped: {result}; marker "
          f"{'reached after %.1fs' % (marker_at[0] - t0) if marker_at else 'not reached'}",
          file=sys.stderr)  # fmt: skip
    print("last console lines:", *out.getvalue().splitlines()[-3:], sep="\n  ", file=sys.stderr)
    print(f"\nguest EIP samples ({total}) by function:", file=sys.stderr)
    for name, n in by_symbol.most_common(a.top):
        print(f"  {100 * n / total:5.1f}%  {name}", file=sys.stderr)
    if a.cprofile:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(a.top)
        print("\nhost (cProfile, by own time):", file=sys.stderr)
        print("\n".join(text.getvalue().splitlines()[4 : 10 + a.top]), file=sys.stderr)
    print(json.dumps({
        "seconds": round(wall, 1),
        "load_s": round(load_s, 1),
        "marker_s": round(marker_at[0] - t0, 1) if marker_at else None,
        "guest_instructions": icount,
        "mips": round(icount / wall / 1e6, 3),
        "guest_top": [[name, round(n / total, 4)] for name, n in by_symbol.most_common(a.top)],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
