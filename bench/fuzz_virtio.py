"""Fuzz virtio-blk and virtio-net with at least a million hostile requests.

Random structured requests (descriptor chains with any address, length, flags and next
index; indirect tables; forged avail indexes; stray register writes; random frames from
the wire) go through the MMIO transport of a real device on a real file / socket wire.
Pass: zero exceptions escape the devices. Prints a final JSON line with the counts.

    python bench/fuzz_virtio.py [--requests 1000000] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from boite.machine.virtio.fuzz import VirtioFuzzer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000, help="total over both devices")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # every violation logs; a million would drown stderr

    result: dict[str, object] = {"requests": 0, "escaped": 0}
    per_device = {"blk": args.requests - args.requests // 2, "net": args.requests // 2}
    start = time.monotonic()
    for kind, n in per_device.items():
        f = VirtioFuzzer(kind)
        rng = random.Random(args.seed * 1000 + len(kind))
        t0 = time.monotonic()
        try:
            for i in range(n):
                f.step(f.random_spec(rng))
                if (i + 1) % 100_000 == 0:
                    print(f"{kind}: {i + 1} requests, {f.escaped} escaped", file=sys.stderr)
            f.check_invariants()
        finally:
            f.close()
        dt = time.monotonic() - t0
        result[kind] = dict(f.counts, escaped=f.escaped, requests_per_s=round(n / dt))
        result["requests"] += n  # type: ignore[operator]
        result["escaped"] += f.escaped  # type: ignore[operator]
        if f.first_escape:
            print(f"{kind}: first escaped exception:\n{f.first_escape}", file=sys.stderr)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))
    return 0 if result["escaped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
