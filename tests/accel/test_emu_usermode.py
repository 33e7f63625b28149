"""Debian's own i386 programs on the emulated CPU without a kernel (tests/guests/usermode.py).

Each program runs as a Linux process would: ld.so loads its libraries, pages come in on
demand from shuffled frames (every first write to a private page faults after the read,
so instructions are interrupted and restarted everywhere), system calls enter through
INT 0x80 and return with IRET, and optionally a timer interrupt saves and restores the
FPU/SSE state with FXSAVE/FXRSTOR while the program runs. Output must match what the
same binaries print on the host CPU where the host runs i386 code, else the host's own
python3 (the floating-point line of test_stock_userland). A boot of Debian's kernel
takes many minutes; this runs the same userland in one or two.

The translated tier's two bugs behind issue 15's `malloc(): corrupted top size` were
found with this harness: a block that cached an instruction fetch's #PF (python3 hung),
and a compiled block that wrote stale registers over a faulting REP MOVSD's progress
(memcpy overran malloc's heap).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from boite import guestkit
from guests.stockinitrd import FP_PROGRAM, python_userland
from guests.usermode import UserMode

RESULT_PREFIX = "STOCK-PY "
ENV = ["PATH=/bin:/usr/bin", "HOME=/", "PYTHONHASHSEED=0"]


def _can_make_image() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


pytestmark = pytest.mark.skipif(not _can_make_image(), reason="needs apt-get and dpkg-deb")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The python image's files (busybox, python3.11, their libraries), unpacked."""
    guestkit.ensure_kit(["debian-686"])  # adds the i386 architecture to apt if needed
    img = python_userland()
    where = tmp_path_factory.mktemp("root")
    _unpack(img.path.read_bytes(), where)
    return where


def _unpack(data: bytes, where: Path) -> None:
    for name, mode, body in guestkit.parse_newc(data):
        path = where / name
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_symlink():
                os.symlink(body.decode(), path)
        elif stat.S_ISREG(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            path.chmod(mode & 0o755)


def _copy(root: Path, tmp_path: Path) -> Path:
    """A private copy: python3 writes its bytecode caches as it imports."""
    dst = tmp_path / "root"
    shutil.copytree(root, dst, symlinks=True)
    return dst


def _host_i386(root: Path, argv: list[str]) -> subprocess.CompletedProcess | None:
    """The same program on the host CPU (same binaries and libraries), or None when the
    host does not run i386 code."""
    cmd = [str(root / "lib/ld-linux.so.2"), "--library-path", str(root / "lib/i386-linux-gnu"),
           str(root / argv[0].lstrip("/")), *argv[1:]]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=120, cwd=root,
                           env={"PYTHONHOME": str(root / "usr"), "PYTHONHASHSEED": "0"})  # fmt: skip
    except OSError:
        return None
    return r


@pytest.mark.parametrize(
    ("translate", "pae"), [(True, False), (False, False), (True, True)],
    ids=["translated", "interpreted", "translated-pae-nx"],
)  # fmt: skip
def test_busybox_applets(root, tmp_path, translate, pae):
    # One process (the harness has no fork): builtins, arithmetic, loops, printf.
    prog = ("echo $((7 * 6)) $((1 << 20)); printf '%x %s\\n' 3054 abc; "
            "for i in 3 2 1; do printf $i,; done; i=0; while [ $i -lt 100 ]; do "
            "i=$((i + 7)); done; echo $i")  # fmt: skip
    argv = ["/bin/busybox", "sh", "-c", prog]
    run = UserMode(_copy(root, tmp_path), translate=translate, pae=pae).execute(argv, ENV)
    assert run.status == 0, (run.fault, run.stderr)
    assert run.stdout == b"42 1048576\nbee abc\n3,2,1,105\n"


@pytest.mark.slow
def test_python_prints_a_float(root, tmp_path):
    """Python's start-up (ld.so, glibc's SSE2 string functions, obmalloc, the bytecode
    compiler writing .pyc files) under demand paging and an FXSAVE/FXRSTOR timer, with
    PAE paging and NX as the 686-pae kernel gives it."""
    argv = ["/usr/bin/python3.11", "-c", "print(1.5 * 3, 2 ** 0.5)"]
    um = UserMode(_copy(root, tmp_path), translate=True, timer_every=20_000, pae=True)
    run = um.execute(argv, ENV)
    assert run.status == 0, (run.fault, run.stderr[-2000:])
    assert run.stdout == b"4.5 1.4142135623730951\n"
    assert not run.unknown_syscalls - {386}, run.unknown_syscalls  # rseq: ENOSYS is fine


@pytest.mark.slow
def test_python_floating_point_program(root, tmp_path):
    """test_stock_userland's program: the line the host's python3 prints, and the line
    the same i386 binary prints on the host's own x87."""
    argv = ["/usr/bin/python3.11", "-c", FP_PROGRAM]
    run = UserMode(_copy(root, tmp_path), translate=True, timer_every=50_000).execute(argv, ENV)
    assert run.status == 0, (run.fault, run.stderr[-2000:])
    line = run.stdout.decode()
    host = subprocess.run([sys.executable, "-c", FP_PROGRAM], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert line == host
    same = _host_i386(_copy(root, tmp_path / "host"), argv)
    if same is not None and same.returncode == 0:
        assert line == same.stdout.decode()
    assert line.startswith(RESULT_PREFIX)
