"""The device benchmark runs end to end on a small size and prints its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_devices_benchmark_small_run() -> None:
    res = subprocess.run(
        [sys.executable, str(BENCH / "devices.py"), "--mib", "1", "--harness", "device"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (
        "virtio_mb_s",
        "ata_mb_s",
        "virtio_over_ata",
        "virtio_exits_per_mib",
        "ata_exits_per_mib",
    ):
        assert figures[key] > 0
    # Structural, not timing: virtio needs a handful of register accesses per 256 KiB
    # request, ATA at least one per sector.
    assert figures["virtio_exits_per_mib"] < 20
    assert figures["ata_exits_per_mib"] >= 2048


def test_fuzz_benchmark_small_run() -> None:
    res = subprocess.run(
        [sys.executable, str(BENCH / "fuzz_virtio.py"), "--requests", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 2000 and figures["escaped"] == 0
