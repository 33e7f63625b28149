"""Benchmark: what the native tier's translator costs per guest instruction.

Boots a Linux kernel (the kit's i386 vmlinux, or a bzImage with --bzimage) on the native
tier to its init marker and records every block the tier was asked to translate (the
guest bytes to the end of the page, EIP, the flat segments), then translates them all
again, REPEAT times, and reports the best pass in CPU microseconds per translated guest
instruction, with a hash of the host code (equal hashes: byte-identical translations,
the check for a change meant to make the translator faster, not different).

Boot figures come from the run itself (`NativeTier.translate_s`, sampled thread CPU
time, includes the cost of reading the guest bytes); the replay is the steadier figure
on a shared host.

Usage: python bench/native_translate.py KERNEL INITRD [--bzimage] [--repeat N] [--save F]
       python bench/native_translate.py --load F [--repeat N] [--profile]
(--save keeps the recorded blocks in a file so that later replays, and cProfile runs of the
replay with --profile, need no boot.)
The last line printed is JSON: blocks, translated_insns, replay_us_per_insn,
replay_cold_us_per_insn (one pass after translate.clear_caches(): what a boot's
translations cost, each instruction shape seen first there), boot_us_per_insn,
code_sha256 (first 16 hex digits), boot_cpu_s.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pickle
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import boite.accel.emu.native as native  # noqa: E402
import emu  # noqa: E402
from boite.accel.emu.native import translate  # noqa: E402


def record(kernel: Path, initrd: Path, bzimage: bool) -> tuple[list, float, float]:
    """Boot on the native tier; returns (the blocks asked for, translate_s/insn, CPU s)."""
    blocks: list[tuple[bytes, int, int, int, bool]] = []
    tiers: list[native.NativeTier] = []
    real = native.translate_block
    first_init = native.NativeTier.__init__

    def recording(read, eip: int, page_left: int, flat: int = 0x3F, host_tsc: bool = True,
                  shadows: set[int] | None = None, extent: list[int] | None = None):  # fmt: skip
        data = read(page_left)
        blocks.append((data, eip, page_left, flat, host_tsc))
        return real(lambda n: data[:n], eip, page_left, flat, host_tsc, shadows, extent)

    def init(self, cpu) -> None:
        first_init(self, cpu)
        tiers.append(self)

    native.translate_block = recording
    native.NativeTier.__init__ = init
    try:
        if bzimage:
            _, cpu_s = emu.linux_emu(kernel, initrd, 256, "linux-unpacked", emu.READY, 7200,
                                     emu.STOCK_CMDLINE, "native")  # fmt: skip
        else:
            _, cpu_s = emu.linux_emu(kernel, initrd, tier="native")
    finally:
        native.translate_block = real
        native.NativeTier.__init__ = first_init
    t = tiers[0]
    return blocks, 1e6 * t.translate_s / max(1, t.translated_insns), cpu_s


def replay(blocks: list, repeat: int) -> tuple[float, int, str, float]:
    """Best CPU us per translated instruction over `repeat` passes, the count, the hash,
    and the us of a pass with the translator's caches emptied first (as a boot finds
    them; the others find them full)."""
    best = float("inf")
    cold = 0.0
    insns = 0
    digest = ""
    for n in range(repeat + 1):
        if n == 0 and hasattr(translate, "clear_caches"):
            translate.clear_caches()
        h = hashlib.sha256()
        insns = 0
        t0 = time.process_time()
        for data, eip, left, flat, host_tsc in blocks:
            out = translate.translate_block(lambda n, data=data: data[:n], eip, left, flat,
                                            host_tsc, set())  # fmt: skip
            if out is not None:
                insns += out[1]
                h.update(out[0])
        if n == 0:
            cold = time.process_time() - t0
        else:
            best = min(best, time.process_time() - t0)
        digest = h.hexdigest()[:16]
    return 1e6 * best / max(1, insns), insns, digest, 1e6 * cold / max(1, insns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", type=Path, nargs="?")
    ap.add_argument("initrd", type=Path, nargs="?")
    ap.add_argument("--bzimage", action="store_true", help="a bzImage (Debian's 686), 256 MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", type=Path, help="keep the recorded blocks in this file")
    ap.add_argument("--load", type=Path, help="replay blocks saved by --save (no boot)")
    ap.add_argument("--profile", action="store_true", help="cProfile one replay pass")
    a = ap.parse_args()
    if not native.native_available():
        print(json.dumps({"error": "no native tier on this host"}))
        return 1
    if a.load:
        blocks, boot_us, cpu_s = pickle.loads(a.load.read_bytes()), 0.0, 0.0
    elif a.kernel and a.initrd:
        blocks, boot_us, cpu_s = record(a.kernel, a.initrd, a.bzimage)
        if a.save:
            a.save.write_bytes(pickle.dumps(blocks))
    else:
        ap.error("KERNEL and INITRD, or --load")
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(replay, blocks, 1)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    us, insns, digest, cold_us = replay(blocks, a.repeat)
    print(f"{len(blocks)} blocks, {insns} instructions translated: {us:.2f} us each "
          f"(replay, best of {a.repeat}), {cold_us:.2f} us with empty caches, "
          f"{boot_us:.2f} us in the boot", file=sys.stderr)  # fmt: skip
    print(json.dumps({"blocks": len(blocks), "translated_insns": insns,
                      "replay_us_per_insn": round(us, 2),
                      "replay_cold_us_per_insn": round(cold_us, 2),
                      "boot_us_per_insn": round(boot_us, 2),
                      "code_sha256": digest, "boot_cpu_s": round(cpu_s, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
