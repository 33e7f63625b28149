"""Benchmark: what x87, MMX and SSE instructions cost in the emulator's Python tiers.

Each form runs in a loop of 64 copies of the instruction (plus the loop's DEC/JNZ),
once through the closures only (translate off), once with blocks compiled (jit.py
calls the instruction's closure from the compiled function) and, where the host runs
it, once with the native tier (accel/emu/native: hot blocks as x86-64 code, which hands
the instructions it does not translate to their closures). Reported: microseconds per
instruction (the time of --iter passes subtracted from that of twice as many, so that
compiling and translating cancel out; the loop's own cost removed with an empty loop of
the same shape). The values
are ordinary (normal operands, all exceptions masked); denormals and transcendental
arguments cost more (bigger Python ints).

Usage: python bench/fpu.py [--iter N]. The last line printed is JSON {form: {tier: us}}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from boite.accel.emu.cpu import Cpu  # noqa: E402
from boite.accel.emu.native import NativeTier, native_available  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402

FORMS = {
    "nop (loop baseline)": "nop",
    "fadd st0, st1": "fadd st0, st1",
    "fmul st0, st1": "fmul st0, st1",
    "fdiv st0, st1": "fdiv st0, st1",
    "fsqrt": "fsqrt",
    "fld qword / fstp qword": "fld qword [ebx]\n fstp qword [ebx+8]",
    "fsin": "fsin",
    "fpatan+fld": "fld st0\n fpatan",
    "fcomi st0, st1": "fcomi st0, st1",
    "addsd xmm0, xmm1": "addsd xmm0, xmm1",
    "mulsd xmm0, xmm1": "mulsd xmm0, xmm1",
    "divsd xmm0, xmm1": "divsd xmm0, xmm1",
    "pxor xmm0, xmm1": "pxor xmm0, xmm1",
    "pcmpeqb xmm0, xmm1": "pcmpeqb xmm0, xmm1",
    "pmovmskb eax, xmm0": "pmovmskb eax, xmm0",
    "paddw mm0, mm1": "paddw mm0, mm1",
    "movdqu xmm2, [ebx]": "movdqu xmm2, [ebx]",
}


def _image(body: str, iters: int) -> bytes:
    # ST0 = 0.7, ST1 = 1.3 (kept: FADD/FMUL/FDIV replace ST0 only, so values stay sane)
    src = f"""bits 32
org 0x10000
    fninit
    fld qword [data1]
    fld qword [data0]
    movsd xmm0, [data0]
    movsd xmm1, [data1]
    mov ecx, {iters}
again:
%rep 64
    {body}
%endrep
    dec ecx
    jnz again
    hlt
align 8
data0: dq 0.7
data1: dq 1.0000001
"""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.asm").write_text(src)
        subprocess.run(["nasm", "-f", "bin", "-o", f"{d}/a.bin", f"{d}/a.asm"], check=True)
        return (Path(d) / "a.bin").read_bytes()


def _run(code: bytes, translate: bool, native: bool = False) -> float:
    mem = GuestMemory.with_ram(1 << 20)
    mem.write(0x10000, code)
    cpu = Cpu(mem, translate=translate)
    if native:
        cpu.native = NativeTier(cpu)
    cpu.set_cr(0, 0x33)
    cpu.set_cr(4, 0x600)
    cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF, 0xC09B)
    for i in (0, 2, 3, 4, 5):
        cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    cpu.tlb_switch()
    cpu.eip = 0x10000
    cpu.r[3] = 0x20000
    cpu.r[4] = 0x80000
    t = time.process_time()  # CPU time: this machine is shared and loaded
    while not cpu.halted:
        cpu.run(100_000)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iter", type=int, default=40)
    args = ap.parse_args()
    n = args.iter * 64
    out: dict[str, dict[str, float]] = {}
    base: dict[str, float] = {}
    tiers = [("closures", False, False), ("compiled", True, False)]
    if native_available():
        tiers.append(("native", True, True))
    for name, body in FORMS.items():
        code, code2 = _image(body, args.iter), _image(body, 2 * args.iter)
        res = {}
        for tier, tr, nat in tiers:
            # The difference of two lengths: one-time costs (block compiles, native
            # translation) cancel out.
            per = (_run(code2, tr, nat) - _run(code, tr, nat)) / n * 1e6
            if name.startswith("nop"):
                base[tier] = per
            res[tier] = round(per - base.get(tier, 0.0) if not name.startswith("nop") else per, 2)
        out[name] = res
        print(f"{name:28s} " + "  ".join(f"{t} {us:8.2f} us" for t, us in res.items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
