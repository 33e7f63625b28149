"""The native tier's crash fuzz: hostile random code, each run checked against the Python
tier, many short runs per worker process so a host crash (a segfault: in principle a
hypervisor escape) kills only its worker and is counted.

A run (one seed): 2 KiB of random code, mostly instructions the native tier translates
with random operands, some noise bytes, placed in real mode, 16-bit or 32-bit protected
mode (32-bit with random paging: pages missing or read-only, the code and page tables
read-only), an IDT/IVT whose handlers land in the random code, random registers pointing
mostly into RAM. It runs up to RUN_INSNS instructions with every hot block (hot at 1)
translated to x86-64 code, then again with the Python closures one instruction at a time
to the same instruction count; registers, EIP, flags, HLT, the guest error that ended it
and all of RAM must be equal. A Python exception that is not a guest outcome (a bug of
the emulator itself) is counted apart, and so is a run that does not end (a hang: the
worker says nothing for SEED_TIMEOUT_S and is killed).

`python tests/accel/native_fuzz.py FIRST COUNT` runs seeds FIRST.. and prints one line per
seed ("seed same native_insns outcome"); `first_difference(plan(seed), 200)` finds the
shortest run that differs (then trace the Python tier to that many instructions); `fuzz(runs)` runs workers and restarts one after a
crash, past the seed that killed it.
"""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

RAM = 2 << 20
CODE = 0x100000  # 32-bit modes: the random code (CS base for 16-bit)
CODE_BYTES = 0x400
STUB_AT = CODE + CODE_BYTES  # fault handlers that recover (see setup)
STUBS = 32
IDT, GDT, PD, PT = 0x3000, 0x1000, 0x20000, 0x21000
# A worker silent this long hangs on its seed (a guest that keeps Cpu.run from returning).
SEED_TIMEOUT_S = float(os.environ.get("BOITE_NATIVE_FUZZ_SEED_S", "120"))
HOT = 2  # runs of a block before it is translated (1 translates run-once code too: slower)
RUN_INSNS = 200  # per run, in RUN_SLICES calls of Cpu.run
RUN_SLICES = 2
# Prefixes _insn puts on a row now and then (66 alone is more common): operand size,
# address size, REPNE/REP, LOCK, the segment overrides.
ODD_PREFIXES = (0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
ODD_PREFIX_RATE = float(os.environ.get("BOITE_NATIVE_FUZZ_PREFIX_RATE", "0.04"))
# Exceptions that end a run as a guest outcome (the guest's own doing).
GUEST_OUTCOMES = ("TripleFault", "GuestError", "AccelError")


def _insn(rnd: random.Random, rows) -> bytes:
    from boite.accel.emu.optable import has_modrm, imm_bytes

    if rnd.random() < 0.1:
        return rnd.randbytes(rnd.randrange(1, 4))
    if rnd.random() < 0.01:
        return b"\xf3\x90"  # PAUSE
    if rnd.random() < 0.01:
        # Linux's sync_core: IRET to the next instruction, same CS (pushfd; push cs;
        # call over a jmp that skips the iret; iret), maybe with some flags flipped.
        flip = b""
        if rnd.random() < 0.5:  # xor byte [esp + n], v: arithmetic flags, IF, DF, TF
            n, v = rnd.choice(((0, 1), (0, 0x40), (0, 0xD5), (1, 2), (1, 4), (1, 1)))
            flip = bytes((0x80, 0x74, 0x24, n, v))
        return b"\x9c" + flip + b"\x0e\xe8\x02\x00\x00\x00\xeb\x01\xcf"
    r = rnd.choice(rows)
    p66 = rnd.random() < 0.1
    pre = b"\x66" if p66 else b""
    if rnd.random() < ODD_PREFIX_RATE:  # odd prefixes now and then (seed 711014: F2 on a fence)
        pre = bytes(rnd.choice(ODD_PREFIXES) for _ in range(rnd.choice((1, 1, 2, 3))))
        p66 = 0x66 in pre
    b = pre + (b"\x0f" if r.map else b"") + bytes([r.code])
    if has_modrm(r):
        reg = r.ext if r.ext is not None else rnd.randrange(8)
        mod, rm = rnd.choice((0, 1, 2, 3, 3)), rnd.randrange(8)
        b += bytes([mod << 6 | reg << 3 | rm])
        if mod != 3 and rm == 4:
            b += bytes([rnd.randrange(256)])
        if mod == 1:
            b += rnd.randbytes(1)
        elif mod == 2 or (mod == 0 and rm == 5):
            b += rnd.randbytes(4)
    return b + rnd.randbytes(imm_bytes(r, p66))


def plan(seed: int) -> tuple:
    """Everything random about a run: (mode, RAM image, EIP, registers, flags)."""
    from boite.accel.emu.optable import ROWS

    rnd = random.Random(seed)
    rows = [r for r in ROWS if r.native]
    mode = ("real", "pm16", "pm32", "pm32", "pm32")[seed % 5]
    ram = bytearray(RAM)
    code = b""
    while len(code) < CODE_BYTES:
        code += _insn(rnd, rows)
    code = code[:CODE_BYTES]
    ram[CODE : CODE + CODE_BYTES] = code
    ram[0x8000:0x9000] = rnd.randbytes(0x1000)  # data around the stack
    if mode == "real":
        ram[0:0x400] = rnd.randbytes(0x400)  # the IVT
        ram[0x7000 : 0x7000 + CODE_BYTES] = code
        eip = 0x7000
    else:
        # Recovery stubs after the code: a fresh stack, then a jump into the random code
        # (without them most runs end in a loop of faults that eats the stack).
        stubs = bytearray()
        for _ in range(STUBS):
            stubs += b"\xbc" + (0x8800 - 4 * rnd.randrange(64)).to_bytes(4, "little")
            to = CODE + rnd.randrange(CODE_BYTES) - (STUB_AT + len(stubs) + 5)
            stubs += b"\xe9" + (to & 0xFFFFFFFF).to_bytes(4, "little")
        ram[STUB_AT : STUB_AT + len(stubs)] = stubs
        gates = bytearray()
        for v in range(256):  # ring-0 interrupt gates into the random code or a stub
            if rnd.random() < (0.75 if v < 32 else 0.25):
                h = STUB_AT + 10 * rnd.randrange(STUBS)
            else:
                h = CODE + rnd.randrange(CODE_BYTES)
            gate = (h & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((h >> 16) << 48)
            gates += gate.to_bytes(8, "little")
        ram[IDT : IDT + 0x800] = gates
        gdt = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)  # flat ring-0 code, data
        ram[GDT : GDT + 0x18] = b"".join(d.to_bytes(8, "little") for d in gdt)
        if mode == "pm32":
            # Identity map of the first 4 MiB (the half past RAM is MMIO to the CPU),
            # random pages missing or read-only; the code and the page tables read-only,
            # so a rewrite of either is a #PF rather than a difference of when each tier
            # notices it (that is what the invalidation tests are for).
            ram[PD : PD + 4] = (PT | 3).to_bytes(4, "little")
            ptes = bytearray()
            for i in range(1024):
                ro = i == CODE >> 12 or i in (PD >> 12, PT >> 12)
                fl = 3 if i in (1, 3, 5, 6, 7, 8) else 1 if ro else rnd.choice((3, 3, 3, 1, 0))
                ptes += ((i << 12) | fl).to_bytes(4, "little")
            ram[PT : PT + 0x1000] = ptes
        eip = CODE + rnd.randrange(0x100) if mode != "pm16" else 0
    # Registers mostly inside RAM, so that memory operands hit it; ESP on the stack page.
    regs = [rnd.getrandbits(32) if rnd.random() < 0.3 else rnd.randrange(RAM) for _ in range(8)]
    regs[4] = 0x8800
    return mode, bytes(ram), eip, regs, rnd.getrandbits(12) & 0x8D5


def setup(p: tuple, native: bool):
    """A fresh CPU in RAM of its own, in the state plan `p` describes."""
    from boite.accel.emu.cpu import Cpu
    from boite.accel.emu.native import NativeTier
    from boite.machine.memory import GuestMemory

    mode, ram, eip, regs, flags = p
    cpu = Cpu(GuestMemory.with_ram(RAM))
    cpu.ram[:] = ram
    if mode != "real":
        cpu.set_cr(0, 0x11)
        big = mode != "pm16"
        cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF if big else 0xFFFF, 0xC09B if big else 0x9B)
        for i in (0, 2, 3, 4, 5):
            cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
        cpu.idt_base, cpu.idt_limit = IDT, 0x7FF
        cpu.gdt_base, cpu.gdt_limit = GDT, 0x17
        if mode == "pm32":
            cpu.cr3 = PD
            cpu.set_cr(0, 0x80010011)  # PG, WP, PE
        cpu.tlb_switch()
        if mode == "pm16":
            cpu.set_seg_raw(1, 0x08, CODE, 0xFFFF, 0x9B)
    cpu.eip = eip
    cpu.r[:] = regs
    cpu.set_flags(flags)
    cpu.hot_block = HOT
    # RDTSC reads the host clock: both runs must see the same counter (seed 25523 read it
    # into EAX and "differed" by the time between the two runs). WRMSR to the TSC still
    # moves it through tsc_offset.
    cpu.rdtsc = lambda: (0x1234_5678_9ABC + cpu.tsc_offset) & ((1 << 64) - 1)
    cpu.random_bytes = lambda n: bytes(range(0x5A, 0x5A + n))  # RDRAND, as RDTSC (seed 6203556)
    # Faults delivered by Cpu.run, counted: the reference stops where the native run did
    # in instructions completed and in faults delivered (a fault completes none).
    cpu.faults = 0
    deliver = cpu.exception

    def exception(*args, **kw):
        cpu.faults += 1
        return deliver(*args, **kw)

    cpu.exception = exception
    if native:
        cpu.native = NativeTier(cpu)
    return cpu


def _state(cpu, err: str | None) -> tuple:
    return (list(cpu.r), cpu.eip, cpu.get_flags() & 0x8D5, cpu.halted, err, cpu.icount,
            zlib.crc32(cpu.ram), cpu.faults)  # fmt: skip


@contextmanager
def _limits(budget: int | None = None) -> Iterator[None]:
    """One-instruction closure blocks (and a native entry bound) while a run lasts: the
    module globals come back after, for the tests that run here in their own process."""
    import boite.accel.emu.decode.core as dcore
    import boite.accel.emu.native as native

    saved = dcore.MAX_BLOCK, native.BUDGET
    dcore.MAX_BLOCK = 1
    if budget is not None:
        native.BUDGET = budget
    try:
        yield
    finally:
        dcore.MAX_BLOCK, native.BUDGET = saved


def native_outcome(p: tuple) -> tuple[tuple, int]:
    """Native blocks where they apply, closures one instruction a block elsewhere (jit.py
    left out: a fault inside its blocks loses the count of what ran before it, and the
    reference stops at the same instruction count; longer closure blocks run stale code
    when random code rewrites its own block, which native blocks and the reference do
    not)."""
    # Chained native code runs up to native.BUDGET instructions per entry, past what
    # Cpu.run was asked for: keep a run short, or the reference (one closure at a time)
    # would have thousands of instructions to catch up with.
    with _limits(RUN_INSNS // RUN_SLICES):
        cpu = setup(p, True)
        cpu.decoder.compile = lambda b: setattr(b, "fn", cpu.native.translate(b.pa, b.eip))
        err = None
        try:
            for _ in range(RUN_SLICES):
                cpu.run(RUN_INSNS // RUN_SLICES)
                if cpu.halted:
                    break
        except Exception as e:  # noqa: BLE001 - an outcome to compare
            err = type(e).__name__
        out = _state(cpu, err), cpu.native.insns
        cpu.close()
    return out


def reference(p: tuple, count: int, faults: int, native_err: str | None) -> tuple:
    """The same run loop with one-instruction closure blocks and no native code, one
    step at a time (a step completes an instruction or delivers a fault) until it has
    completed `count` instructions and delivered `faults` faults, as the native run did
    (where that run ended in an error, it goes on until it meets one)."""
    with _limits():
        cpu = setup(p, False)
        cpu.compile_blocks = False
        err = None
        try:
            for _ in range(2 * (count + faults) + 100):
                if cpu.halted or cpu.icount > count or cpu.faults > faults:
                    break
                if cpu.icount == count and cpu.faults == faults and not native_err:
                    break
                cpu.run(1)
        except Exception as e:  # noqa: BLE001 - as above
            err = type(e).__name__
        out = _state(cpu, err)
        cpu.close()
    return out


def guest32(
    code: bytes,
    handler: bytes,
    ptes: dict[int, int] | None = None,
    regs: list[int] | None = None,
    flags: int = 0,
) -> tuple:
    """A hand-written plan for the runs above (regression tests): 32-bit paged mode as
    the fuzz's, `code` at CODE, every IDT vector to `handler` at STUB_AT, the identity
    map of RAM writable except the PTE flags in `ptes` (linear page -> flags; 0: absent)."""
    ram = bytearray(RAM)
    ram[CODE : CODE + len(code)] = code
    ram[STUB_AT : STUB_AT + len(handler)] = handler
    gate = (STUB_AT & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((STUB_AT >> 16) << 48)
    ram[IDT : IDT + 0x800] = gate.to_bytes(8, "little") * 256
    gdt = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    ram[GDT : GDT + 0x18] = b"".join(d.to_bytes(8, "little") for d in gdt)
    ram[PD : PD + 4] = (PT | 3).to_bytes(4, "little")
    fl = {i: 3 for i in range(RAM >> 12)} | (ptes or {})
    ram[PT : PT + 0x1000] = b"".join(((i << 12) | fl.get(i, 0)).to_bytes(4, "little")
                                     for i in range(1024))  # fmt: skip
    r = list(regs or [0] * 8)
    r[4] = r[4] or 0x8800
    return "pm32", bytes(ram), CODE, r, flags


def native_run(p: tuple, n: int) -> tuple:
    """The state after one Cpu.run(n) on the native tier (every block hot at HOT), one
    entry bounded by n as well."""
    with _limits(n):
        cpu = setup(p, True)
        cpu.decoder.compile = lambda b: setattr(b, "fn", cpu.native.translate(b.pa, b.eip))
        err = None
        try:
            cpu.run(n)
        except Exception as e:  # noqa: BLE001 - an outcome to compare
            err = type(e).__name__
        out = _state(cpu, err)
        cpu.close()
    return out


def first_difference(p: tuple, upto: int) -> tuple[int, tuple, tuple] | None:
    """The first n in 1..upto where Cpu.run(n) on the native tier ends otherwise than
    the Python tier at the same instruction and fault counts: (n, native, python), or
    None. Bisects a differing seed to the instruction that makes it differ."""
    for n in range(1, upto + 1):
        nat = native_run(p, n)
        ref = reference(p, nat[5], nat[7], nat[4])
        if nat != ref:
            return n, nat, ref
    return None


def one(seed: int) -> tuple[bool, int, str]:
    """(same as the Python tier, native instructions run, outcome)."""
    p = plan(seed)
    nat, ran = native_outcome(p)
    err = nat[4]
    outcome = "ok" if err is None else err if err in GUEST_OUTCOMES else f"bug:{err}"
    # Real and 16-bit modes never enter native code (the count shows it): there the run
    # has only to survive, since their code may rewrite itself within a block.
    same = nat == reference(p, nat[5], nat[7], err) if ran or seed % 5 >= 2 else True
    return same, ran, outcome


def worker(first: int, count: int) -> None:
    for seed in range(first, first + count):
        same, ran, outcome = one(seed)
        sys.stdout.write(f"{seed} {int(same)} {ran} {outcome}\n")
        sys.stdout.flush()


def _counts() -> dict:
    return {"runs": 0, "crashes": [], "hangs": [], "differ": [], "bugs": [], "native_insns": 0,
            "native_runs": 0}  # fmt: skip


def _run_worker(first: int, count: int) -> dict:
    """Seeds first..first+count-1 in worker processes, one after another: a worker that
    dies (a signal, or any exit before its last seed) is a host crash at the seed after
    its last line, one silent for SEED_TIMEOUT_S a hang there (it is killed); the next
    worker starts past that seed."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = _counts()
    end = first + count
    while first < end:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(first), str(end - first)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        last, hung = first - 1, False
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], SEED_TIMEOUT_S)
            if not ready:
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            seed_s, same, ran, outcome = line.split()
            seed = int(seed_s)
            last = seed
            out["runs"] += 1
            out["native_insns"] += int(ran)
            out["native_runs"] += int(ran) > 0
            if same != "1":
                out["differ"].append(seed)
            if outcome.startswith("bug:"):
                out["bugs"].append((seed, outcome[4:]))
        proc.wait()
        err = proc.stderr.read()[-400:]
        first = last + 1
        if first < end:  # the worker died or hung on this seed
            out["runs"] += 1
            if hung:
                out["hangs"].append(first)
            else:
                out["crashes"].append((first, proc.returncode, err))
            first += 1
    return out


def fuzz(runs: int, first: int = 0, jobs: int = 2) -> dict:
    """Runs seeds first..first+runs-1 in `jobs` parallel chains of worker processes."""
    out = _counts()
    t0 = time.monotonic()
    jobs = max(1, min(jobs, runs))
    share = -(-runs // jobs)
    spans = [(lo, min(share, first + runs - lo)) for lo in range(first, first + runs, share)]
    with ThreadPoolExecutor(jobs) as pool:
        for part in pool.map(lambda span: _run_worker(*span), spans):
            for key, value in part.items():
                out[key] += value
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]))
