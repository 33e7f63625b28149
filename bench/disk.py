"""Disk engine throughput: boite's VMDK engine against `qemu-img bench` on thin VMDKs.

The same file (a monolithicSparse made by boite and filled by the sequential write; the
allocating write itself runs on two identical fresh disks), the same access pattern and
cache mode (host page cache: qemu `-t writeback`, thread-pool AIO, queue depth 1, as boite's engine is
synchronous), in one run:

- 1 MiB sequential writes into a fresh thin disk (every grain allocated on the way),
- 1 MiB sequential reads of that disk (four laps),
- 4 KiB "random" reads and writes over it: qemu-img bench has no random mode, so both use
  its strided pattern, offset_i = (i * step) mod size with a step of 7919 blocks (a prime),
  which visits the blocks in a scattered order, every block once per lap.

And `boite disk convert` against `qemu-img convert -O raw` of the same thin disk (1 GiB by
default, every grain written; once with grains laid out in guest order, once scattered as a
guest's random writes leave them), each tool as a command, cold (page cache dropped first:
needs root) and warm, interleaved, best of N. boite's convert ends with fdatasync (it renames
a complete file into place); qemu-img's does not sync, so its time plus an fsync of its
output is reported too.

Prints a table and a final JSON line with boite/qemu throughput ratios (above 1: boite is
faster).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from boite.disk import create_disk, open_disk  # noqa: E402

MiB = 1 << 20
STRIDE_BLOCKS = 7919


FLUSH_S: dict[str, float] = {}


def write_key(bufsize: int, step: int) -> str:
    return "seq_write" if bufsize == step else "rand_write"


def qemu_bench(path: Path, bufsize: int, count: int, step: int, write: bool) -> float:
    argv = ["qemu-img", "bench", "-f", "vmdk", "-t", "writeback", "-i", "threads", "-d", "1"]
    argv += ["-c", str(count), "-s", str(bufsize), "-S", str(step)]
    if write:
        argv += ["-w", "--pattern=165"]
    out = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if not m:
        raise RuntimeError(out.stdout + out.stderr)
    return float(m.group(1))


def boite_bench(path: Path, bufsize: int, count: int, step: int, write: bool) -> float:
    with open_disk(path) as d:
        size = d.size
        # page-aligned like guest RAM (GuestMemory is mmap-backed) and qemu's bounce buffers
        buf = mmap.mmap(-1, bufsize)
        buf.write(b"\xa5" * bufsize)
        mv = memoryview(buf)
        off = 0
        if write:
            t0 = time.perf_counter()
            for _ in range(count):
                d.write(off, mv)
                off = (off + step) % size
            elapsed = time.perf_counter() - t0
            d.flush()  # grain tables + fdatasync: reported apart, qemu-img bench does none
            FLUSH_S[write_key(bufsize, step)] = time.perf_counter() - t0
            mv.release()
        else:
            t0 = time.perf_counter()
            for _ in range(count):
                d.read_into(off, mv)
                off = (off + step) % size
            elapsed = time.perf_counter() - t0
            mv.release()
    return elapsed


GRAIN = 64 << 10


def make_source(path: Path, size: int, scattered: bool) -> None:
    """A thin disk with every grain written, in guest order or shuffled."""
    create_disk(path, size)
    order = list(range(size // GRAIN))
    if scattered:
        random.Random(7).shuffle(order)
    block = random.Random(8).randbytes(MiB)
    with open_disk(path) as d:
        for g in order:
            at = (g * GRAIN) % MiB
            d.write(g * GRAIN, block[at : at + GRAIN])


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def fsync_time(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def convert_bench(tmp: Path, size: int, rounds: int) -> dict[str, float]:
    """Seconds (best of `rounds`) per layout, cache state and tool."""
    boite = [sys.executable, "-m", "boite", "disk", "convert", "-t", "raw"]
    qemu = ["qemu-img", "convert", "-O", "raw"]
    env_src = str(Path(__file__).resolve().parent.parent / "src")
    os.environ["PYTHONPATH"] = env_src + os.pathsep + os.environ.get("PYTHONPATH", "")
    best: dict[str, float] = {}
    out = tmp / "out.raw"
    for layout in ("ordered", "scattered"):
        src = tmp / f"{layout}.vmdk"
        make_source(src, size, layout == "scattered")
        for r in range(rounds):
            for cache in ("cold", "warm"):
                if cache == "cold" and not drop_caches():
                    continue
                tools = [("boite", boite), ("qemu", qemu)]
                for name, argv in tools if r % 2 == 0 else tools[::-1]:
                    out.unlink(missing_ok=True)
                    if cache == "cold":
                        drop_caches()
                    else:
                        timed(["cat", str(src)])  # the source in the page cache
                    t = timed([*argv, str(src), str(out)])
                    runs = {name: t}
                    if name == "qemu":
                        runs["qemu_synced"] = t + fsync_time(out)
                    for k, v in runs.items():
                        key = f"{layout}_{cache}_{k}"
                        best[key] = min(best.get(key, v), v)
        src.unlink()
    out.unlink(missing_ok=True)
    return best


def report_convert(best: dict[str, float], size: int) -> dict[str, float]:
    print(f"\nconvert {size // MiB} MiB thin -> raw (seconds, best of the rounds)")
    print(
        f"{'layout/cache':<18} {'boite':>8} {'qemu-img':>9} {'+fsync':>8} {'ratio':>7} {'synced':>7}"
    )
    figures: dict[str, float] = {}
    for layout in ("ordered", "scattered"):
        for cache in ("cold", "warm"):
            k = f"{layout}_{cache}"
            if f"{k}_boite" not in best:
                continue
            b, q, qs = best[f"{k}_boite"], best[f"{k}_qemu"], best[f"{k}_qemu_synced"]
            print(f"{k:<18} {b:8.2f} {q:9.2f} {qs:8.2f} {q / b:7.2f} {qs / b:7.2f}")
            figures[f"convert_{k}_s_boite"] = round(b, 2)
            figures[f"convert_{k}_s_qemu"] = round(q, 2)
            figures[f"convert_{k}_ratio"] = round(q / b, 3)
            figures[f"convert_{k}_ratio_qemu_synced"] = round(qs / b, 3)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="disk size (default 256 MiB)")
    ap.add_argument("--rand-count", type=int, default=32768, help="4 KiB requests per random test")
    ap.add_argument("--repeat", type=int, default=3, help="best of N rounds (default 3)")
    ap.add_argument("--dir", default=None, help="where the test disks go (default: a temp dir)")
    ap.add_argument("--convert-mib", type=int, default=1024, help="convert test disk size")
    ap.add_argument("--convert-rounds", type=int, default=2, help="best of N convert rounds")
    ap.add_argument("--only", choices=["engine", "convert"], default=None)
    args = ap.parse_args()
    if args.only == "convert":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            best = convert_bench(Path(tmp), args.convert_mib * MiB, args.convert_rounds)
        print(json.dumps(report_convert(best, args.convert_mib * MiB), sort_keys=True))
        return 0
    size = args.size_mib * MiB
    seq_count = size // MiB
    best: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        # (name, bufsize, count, step, write)
        tests = [
            ("seq_write", MiB, seq_count, MiB, True),
            ("seq_read", MiB, 4 * seq_count, MiB, False),  # 4 laps: long enough to time
            ("rand_read", 4096, args.rand_count, STRIDE_BLOCKS * 4096, False),
            ("rand_write", 4096, args.rand_count, STRIDE_BLOCKS * 4096, True),
        ]
        # The host is shared and noisy: repeat the whole sequence on fresh disks, the two
        # tools interleaved test by test, and keep each one's best time.
        for _ in range(args.repeat):
            a, b = Path(tmp) / "boite.vmdk", Path(tmp) / "qemu.vmdk"
            for p in (a, b):
                p.unlink(missing_ok=True)
                create_disk(p, size)
            for name, bs, count, step, write in tests:
                tb = boite_bench(a, bs, count, step, write)
                # allocating writes need a fresh disk each; everything else runs on one file
                tq = qemu_bench(b if name == "seq_write" else a, bs, count, step, write)
                mb, mq = bs * count / tb / MiB, bs * count / tq / MiB
                old = best.get(name, [0.0, 0.0])
                best[name] = [max(old[0], mb), max(old[1], mq)]
                if write:
                    fl = bs * count / FLUSH_S[name] / MiB
                    best[f"{name}_incl_flush"] = [
                        max(best.get(f"{name}_incl_flush", [0])[0], fl),
                        mq,
                    ]
        results = {k: tuple(v) for k, v in best.items()}
        t0 = time.perf_counter()
        big = Path(tmp) / "big.vmdk"
        create_disk(big, 2 << 40)
        t1 = time.perf_counter()
        with open_disk(big) as d:
            t2 = time.perf_counter()
            d.read(1 << 40, 4096)
        t3 = time.perf_counter()
    print(f"{'test':<22} {'boite MiB/s':>12} {'qemu MiB/s':>12} {'ratio':>7}")
    for name, (mb, mq) in results.items():
        print(f"{name:<22} {mb:12.1f} {mq:12.1f} {mb / mq:7.2f}")
    print(
        f"2 TiB thin disk: create {1000 * (t1 - t0):.1f} ms, open {1000 * (t2 - t1):.2f} ms, first read {1000 * (t3 - t2):.2f} ms"
    )
    figures = {f"{k}_ratio": round(v[0] / v[1], 3) for k, v in results.items()}
    figures |= {f"{k}_mib_s_boite": round(v[0], 1) for k, v in results.items()}
    figures |= {f"{k}_mib_s_qemu": round(v[1], 1) for k, v in results.items()}
    figures["open_2tib_ms"] = round(1000 * (t2 - t1), 2)
    if args.only != "engine":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            best = convert_bench(Path(tmp), args.convert_mib * MiB, args.convert_rounds)
        figures |= report_convert(best, args.convert_mib * MiB)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
