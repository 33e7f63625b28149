"""SIGKILL a writer at random moments, many times: every flushed write survives, and
`check` finds the disk consistent or `--repair` makes it so, with qemu-img agreeing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from boite.disk import check_disk, create_child, create_disk, open_disk

SIZE = 8 * 1024 * 1024
ROUNDS = int(os.environ.get("BOITE_CRASH_ROUNDS", "24"))

WRITER = r"""
import os, random, sys
from boite.disk import open_disk
path, seed, status = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = os.open(status, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
rng = random.Random(seed)
d = open_disk(path)
os.write(log, b"O\n")
i = 0
while True:
    off, n, data = op(rng)
    os.write(log, b"S %d\n" % i)
    d.write(off, data)
    if rng.random() < 0.3:
        d.flush()
        os.write(log, b"F %d\n" % i)
    i += 1
"""

OP = r"""
def op(rng):
    n = rng.choice([512, 4096, 65536, 131072, rng.randrange(1, 100000)])
    off = rng.randrange(0, SIZE - n)
    return off, n, rng.randbytes(n)
"""
exec(OP)  # the parent replays the very same operations


def ops_from(seed: int, count: int):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append(op(rng))  # noqa: F821 - defined by exec above
        rng.random()  # the writer's flush decision
    return out


def run_round(path, model: bytearray, seed: int, status, rng: random.Random) -> None:
    status.unlink(missing_ok=True)
    script = f"SIZE = {SIZE}\n" + OP + WRITER
    child = subprocess.Popen([sys.executable, "-c", script, str(path), str(seed), str(status)])
    try:
        # wait until it opened the disk, then let it run a random while
        deadline = time.monotonic() + 30
        while not (status.exists() and status.read_bytes().startswith(b"O")):
            assert child.poll() is None, "writer died on its own"
            assert time.monotonic() < deadline, "writer never opened the disk"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.25))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    started, flushed = -1, -1
    for line in status.read_text().splitlines():
        if line.startswith("S "):
            started = int(line[2:])
        elif line.startswith("F "):
            flushed = int(line[2:])
    ops = ops_from(seed, started + 1)
    durable = bytearray(model)
    for off, n, data in ops[: flushed + 1]:
        durable[off : off + n] = data
    uncertain = bytearray(SIZE)  # 1 where an unflushed write may or may not have landed
    for off, n, _ in ops[flushed + 1 :]:
        uncertain[off : off + n] = b"\1" * n

    report = check_disk(path)
    if not report.ok or rng.random() < 0.5:
        fixed = check_disk(path, repair=True)
        assert fixed.ok, fixed
        assert check_disk(path).leaked_bytes == 0
    if shutil.which("qemu-img"):
        out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    with open_disk(path, read_only=True) as d:
        now = d.read(0, SIZE)
    # every byte no unflushed write touched holds exactly what was flushed
    mask = bytes(uncertain)
    if mask.count(1) == 0:
        assert now == durable
    else:
        for pos in range(0, SIZE, 65536):
            m = mask[pos : pos + 65536]
            if not any(m):
                assert now[pos : pos + 65536] == durable[pos : pos + 65536], f"lost data at {pos}"
            else:
                for j in range(pos, pos + 65536, 512):
                    if not any(mask[j : j + 512]):
                        assert now[j : j + 512] == durable[j : j + 512], f"lost data at {j}"
    model[:] = now


@pytest.mark.parametrize("chain", [False, True], ids=["thin", "child"])
def test_sigkill_at_random_moments(tmp_path, chain, boite_cli):
    rng = random.Random(1234 + chain)
    base = tmp_path / "vm.vmdk"
    create_disk(base, SIZE)
    model = bytearray(SIZE)
    path = base
    if chain:
        with open_disk(base) as d:
            for _ in range(20):
                off = rng.randrange(0, SIZE - 70000)
                data = rng.randbytes(rng.randrange(1, 70000))
                d.write(off, data)
                model[off : off + len(data)] = data
        path = tmp_path / "vm-000001.vmdk"
        create_child(base, path)
    for i in range(ROUNDS // 2):
        run_round(path, model, rng.randrange(1 << 30), tmp_path / f"status{i}", rng)
    # one last kill, then the command a person would run
    run_round(path, model, rng.randrange(1 << 30), tmp_path / "last", random.Random(0))
    out = boite_cli("disk", "check", "--repair", path)
    assert out.returncode == 0, out.stdout + out.stderr
    out = boite_cli("disk", "check", "--json", path)
    assert out.returncode == 0 and '"ok": true' in out.stdout, out.stdout
