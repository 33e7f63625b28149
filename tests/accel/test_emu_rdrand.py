"""RDRAND on the emulated CPU: CPUID reports it, values come from the host's entropy."""

from __future__ import annotations

import subprocess

from test_emu_jit import CODE, _machine, pytestmark  # noqa: F401 - nasm skip marker

from boite.accel.base import StopReason
from boite.accel.emu import EmuAccelerator

PROGRAM = f"""bits 32
org {CODE:#x}
    mov eax, 1
    cpuid
    mov esi, ecx          ; feature bits
    rdrand eax
    setc bl               ; CF=1: a value was ready
    rdrand edx
    mov edi, edx
    rdrand cx             ; 16-bit form: the high half of ECX stays
    hlt
"""


def test_rdrand_is_reported_and_returns_fresh_values(tmp_path) -> None:
    (tmp_path / "r.asm").write_text(PROGRAM)
    subprocess.run(["nasm", "-f", "bin", "-o", str(tmp_path / "r.bin"), str(tmp_path / "r.asm")],
                   check=True)  # fmt: skip
    image = (tmp_path / "r.bin").read_bytes()
    seen = []
    for translate in (False, True):
        m = _machine(image, 1, False)
        acc = EmuAccelerator(translate=translate, hot_block=1)
        acc.create(m)
        try:
            assert acc.run().reason is StopReason.HALTED
            st = acc.save_cpu_state()[0]
        finally:
            acc.close()
        gpr = st["gpr"]
        assert gpr["rsi"] >> 30 & 1, "CPUID.1:ECX.RDRAND"
        assert gpr["rbx"] & 0xFF == 1
        assert st["rflags"] & 0x8D5 == 1, "CF set, OF SF ZF AF PF clear"
        assert gpr["rcx"] >> 16 == 0x4000, "a 16-bit RDRAND keeps ECX's high half (CPUID's)"
        seen += [gpr["rax"], gpr["rdi"]]
    assert len(set(seen)) == len(seen), "four 32-bit draws, all different"
