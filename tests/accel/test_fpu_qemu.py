"""The emulator's x87/MMX/SSE against QEMU TCG (qemu-system-i386 -accel tcg -cpu
core2duo), the same random cases as the host tests, one QEMU run for all of them.

QEMU is a peer we did not write, not the truth: where it and this x86-64 host disagree,
the host (real silicon) decides, and the test names the difference instead of tuning it
away. Printed per form: cases where the emulator equals QEMU, and the cases where QEMU
differs from the real CPU (the emulator then equals the real CPU). Differences of QEMU
from the real CPU seen here (named, not copied):
- x87: C1 ("rounded up") is not maintained; stack faults with IE unmasked write the
  indefinite and pop; FST m32/m64 with an unmasked underflow stores anyway; FSQRT/FPREM/
  FXTRACT/FBSTP condition codes and #D/#Z ordering; the transcendentals (FSIN ... FYL2XP1)
  differ in the last bits and for denormal/huge arguments.
- MMX: a write to an MMX register leaves bits 79:64 of the x87 register as they were
  (the CPU sets them to ones) and some forms leave the tag word alone.
- SSE: the #D flag is not set for denormal operands; unmasked exceptions do not raise
  #XM (the CPU faults; the emulator does too).
"""

from __future__ import annotations

import os

import pytest
import test_fpu_host
import test_sse_host
from fpudiff import (
    EmuRunner,
    HostRunner,
    assemble,
    compare,
    host_supported,
    make_ctx,
    qemu_supported,
    run_qemu,
)

pytestmark = [
    pytest.mark.skipif(not qemu_supported(), reason="needs qemu-system-i386 and nasm"),
    pytest.mark.slow,
]


def _check(
    forms, n: int, seed: int, sse: bool, tmp_path
) -> dict[str, tuple[int, int, int, list[str]]]:
    import random

    r = random.Random(seed)
    ops = assemble([f.asm for f in forms])
    cases = []
    for form, op in zip(forms, ops, strict=True):
        cases += [(form, op, make_ctx(r, form)) for _ in range(n)]
    qemu = run_qemu([(op, ctx) for _, op, ctx in cases], sse)
    host = (
        HostRunner(tmp_path).run([(op, ctx) for _, op, ctx in cases], sse)
        if host_supported()
        else None
    )
    emu = EmuRunner()
    out: dict[str, tuple[int, int, int, list[str]]] = {}
    for i, ((form, op, ctx), q) in enumerate(zip(cases, qemu, strict=True)):
        same, tot, qemu_wrong, bad = out.get(form.name, (0, 0, 0, []))
        e = emu.run(op, ctx, sse)
        d = compare(form, ctx, q, e, sse)
        if d is None:
            same += 1
        elif host is not None and compare(form, ctx, host[i], e, sse) is None:
            qemu_wrong += 1  # QEMU differs from the real CPU; the emulator does not
        else:
            bad = [*bad, f"{form.name}: {d}"]
        out[form.name] = (same, tot + 1, qemu_wrong, bad)
    return out


def _report(title: str, res) -> str:
    lines = [title]
    for name, (same, tot, qemu_wrong, bad) in res.items():
        lines.append(f"{name:28s} emu=qemu {same:4d}/{tot:<4d} {100.0 * same / tot:6.2f}%"
                     f"   qemu!=real cpu {qemu_wrong:4d}   unexplained {len(bad)}")  # fmt: skip
    return "\n".join(lines)


@pytest.mark.parametrize("which", ["x87", "sse"])
def test_emulator_agrees_with_qemu_or_with_the_real_cpu(which: str, tmp_path, capsys) -> None:
    n = int(os.environ.get("FPUDIFF_QEMU_CASES", "15"))
    if which == "x87":
        res = _check(test_fpu_host._forms(), n, 21, False, tmp_path)
    else:
        res = _check(test_sse_host._forms() + test_sse_host._fp_forms(), n, 22, True, tmp_path)
    with capsys.disabled():
        print("\n" + _report(f"{which}: emulator vs QEMU TCG", res))
    unexplained = [b for v in res.values() for b in v[3]]
    if not host_supported():
        pytest.skip("no x86-64 host to tell QEMU's deviations from the emulator's")
    assert not unexplained, "\n".join(unexplained[:20])
