"""Hostile x87/MMX/SSE code: random encodings of the escape and 0F SIMD opcodes on random
FPU state (any registers, tags, control words, MXCSR, XMM contents) either complete or
raise an architectural fault, never a Python exception."""

from __future__ import annotations

import os
import random

from fpudiff import CODE, CTX, EmuRunner, rand_ext

from boite.accel.emu.arch import CpuFault, CpuHalt

SIMD_0F = [*range(0x10, 0x18), *range(0x28, 0x30), *range(0x50, 0x80), 0xAE, 0xC2, 0xC3,
           0xC4, 0xC5, 0xC6, 0xD6, 0xD7, *range(0xD1, 0x100)]  # fmt: skip


def test_random_fpu_and_simd_encodings_never_crash_the_emulator() -> None:
    r = random.Random(2026)
    run = EmuRunner()
    cpu = run.cpu
    for _ in range(int(os.environ.get("FPU_FUZZ", "6000"))):
        f = cpu.fpu
        f.regs = [rand_ext(r) for _ in range(8)]
        f.empty = r.getrandbits(8)
        f.top = r.randrange(8)
        f.cw = r.getrandbits(16)
        f.sw = r.getrandbits(16) & ~0x3800
        f.mxcsr = r.getrandbits(16)
        f.xmm = [r.getrandbits(128) for _ in range(8)]
        cpu.set_cr(0, r.choice([0x33, 0x13, 0x3B, 0x37, 0x31]))
        cpu.set_cr(4, r.choice([0x600, 0x200, 0x0]))
        f.ignne = r.random() < 0.5
        prefix = bytes(r.choice([[], [0x66], [0xF2], [0xF3], [0x67], [0x66, 0xF3]]))
        if r.random() < 0.5:
            op = bytes([0xD8 + r.randrange(8)])
        else:
            op = bytes([0x0F, r.choice(SIMD_0F)])
        code = prefix + op + r.getrandbits(64).to_bytes(8, "little")
        run.mem.write(CODE, code + b"\xf4")
        cpu.flush_blocks()
        cpu.eip = CODE
        cpu.r[:] = [r.choice([CTX, 0, r.getrandbits(32)]) for _ in range(8)]
        try:
            fn, _ = cpu.decoder.decode_one(cpu.eip)
            fn()
        except (CpuFault, CpuHalt):
            pass
