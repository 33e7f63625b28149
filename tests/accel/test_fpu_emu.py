"""The x87's system side in the emulator: #NM with CR0.EM/TS/MP, #MF with CR0.NE, the
legacy FERR# -> IRQ 13 path with IGNNE# through port 0xF0, and the FPU state in a
snapshot (CpuState.fxsave) surviving a round trip."""

from __future__ import annotations

import shutil

import pytest
from fpudiff import CTX, EmuRunner, assemble

from boite.accel.cpustate import CpuState
from boite.accel.emu.accel import cpu_to_state, state_to_cpu
from boite.accel.emu.cpu import Cpu, CpuFault, CpuHalt

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm")


def _run(r: EmuRunner, lines: list[str], cr0: int = 0x33) -> tuple[Cpu, BaseException | None, int]:
    """Run the instructions one by one; (cpu, what stopped it, index it stopped at)."""
    cpu = r.cpu
    cpu.set_cr(0, cr0)
    cpu.r[3] = CTX
    codes = assemble(lines)
    for i, code in enumerate(codes):
        r.mem.write(0x10000, code + b"\xf4")
        cpu.flush_blocks()
        cpu.eip = 0x10000
        fn, _ = cpu.decoder.decode_one(cpu.eip)
        try:
            fn()
        except (CpuFault, CpuHalt) as e:
            return cpu, e, i
    return cpu, None, len(codes)


DIV0 = ["fninit", "mov word [ebx], 0x37b", "fldcw [ebx]", "fldz", "fld1", "fdiv st0, st1"]


def test_nm_follows_cr0_em_ts_mp() -> None:
    r = EmuRunner()
    for cr0, insn, nm in (
        (0x33 | 8, "fadd st0, st1", True),  # TS
        (0x37, "fadd st0, st1", True),  # EM
        (0x31 | 8, "fwait", False),  # TS without MP: WAIT runs
        (0x33 | 8, "fwait", True),  # TS and MP
        (0x35, "fwait", False),  # EM alone does not trap WAIT
    ):
        _, stop, _ = _run(r, [insn], cr0)
        assert isinstance(stop, CpuFault) == nm, (hex(cr0), insn)
        if nm:
            assert stop.vector == 7


def test_unmasked_exception_raises_mf_at_the_next_waiting_instruction() -> None:
    r = EmuRunner()
    cpu, stop, i = _run(r, [*DIV0, "fnstsw ax", "fld1"])
    assert isinstance(stop, CpuFault) and stop.vector == 16 and i == len(DIV0) + 1
    assert cpu.r[0] & 0x84 == 0x84  # FNSTSW (no wait) saw ES and ZE
    # FNCLEX clears it: the next waiting instruction runs
    _, stop, _ = _run(r, ["fnclex", "fld1"])
    assert stop is None


def test_legacy_ferr_raises_irq13_and_ignne_lets_the_instruction_go() -> None:
    r = EmuRunner()
    levels: list[bool] = []
    r.cpu.ferr_irq = levels.append
    cpu, stop, i = _run(r, [*DIV0, "fwait"], cr0=0x13)  # NE clear
    assert isinstance(stop, CpuHalt) and i == len(DIV0)  # waits at FWAIT for IRQ 13
    assert levels == [True] and cpu.fpu.ferr
    cpu.port_out(0xF0, 1, 0)  # the IRQ 13 handler: clear the latch, IGNNE#
    assert levels == [True, False] and cpu.fpu.ignne
    _, stop, _ = _run(r, ["fwait", "fld1"], cr0=0x13)
    assert stop is None  # IGNNE#: the error is ignored
    _, stop, _ = _run(r, ["fnclex"], cr0=0x13)
    assert not cpu.fpu.ferr and not cpu.fpu.ignne


def test_fpu_state_survives_a_snapshot() -> None:
    r = EmuRunner()
    cpu, stop, _ = _run(r, ["fldpi", "fld1", "fchs", *DIV0[:1], "fldpi", *DIV0[1:]])
    assert stop is None
    cpu.fpu.xmm[3] = 0x0123456789ABCDEF_FEDCBA9876543210
    cpu.fpu.mxcsr = 0x1F80 | 0x3F
    st = CpuState.from_dict(cpu_to_state(cpu).to_dict())
    other = EmuRunner().cpu
    state_to_cpu(st, other)
    assert other.fpu.fxsave_image() == cpu.fpu.fxsave_image()
    assert other.fpu.tag_word() == cpu.fpu.tag_word()
    assert other.fpu.status() == cpu.fpu.status() and other.fpu.pending()


LOOP = """
bits 32
    fninit
    mov ecx, 300
    fldz                      ; the sum
again:
    mov [ebx], ecx
    fild dword [ebx]
    fsqrt
    fld1
    fcomi st0, st1            ; EFLAGS from the FPU, read by the jcc below
    jae skip
    fdivrp st1, st0           ; 1 / sqrt(n)
    faddp st1, st0
    jmp next
skip:
    fstp st0
    fstp st0
next:
    fnstsw ax
    movd xmm2, ecx
    paddd xmm3, xmm2
    movq xmm1, xmm0
    addsd xmm0, xmm0
    dec ecx
    jnz again
    fstp qword [ebx + 8]
    hlt
"""


@pytest.mark.parametrize("translate", [False, True])
def test_fpu_code_in_compiled_blocks_matches_the_interpreter(translate: bool) -> None:
    """x87/MMX/SSE closures inside compiled blocks (registers and EFLAGS written back and
    reloaded around them) give what the interpreter gives."""
    from fpudiff import nasm

    code = nasm(LOOP)
    r = EmuRunner()
    cpu = r.cpu
    cpu.translate_blocks = cpu.compile_blocks = translate
    cpu.hot_block = 2
    r.mem.write(0x10000, code)
    cpu.flush_blocks()
    cpu.eip = 0x10000
    cpu.r[3] = CTX
    cpu.fpu.xmm[0] = 0x3FF0000000000000  # 1.0
    for _ in range(200):
        cpu.run(10_000)
        if cpu.halted:
            break
    assert cpu.halted
    total = int.from_bytes(bytes(r.mem.read(CTX + 8, 8)), "little")
    import struct

    expect = sum(1 / n**0.5 for n in range(2, 301))
    assert abs(struct.unpack("<d", total.to_bytes(8, "little"))[0] - expect) < 1e-12
    assert cpu.fpu.xmm[3] == sum(range(1, 301))


def _fault_of(lines: list[str], cr0: int = 0x33, cr4: int = 0x600) -> int | None:
    r = EmuRunner()
    r.cpu.set_cr(4, cr4)
    r.cpu.fpu.xmm[1] = 0x3FF0000000000000  # 1.0 / 0.0 in XMM1 / XMM2
    _, stop, _ = _run(r, lines, cr0)
    return stop.vector if isinstance(stop, CpuFault) else None


@pytest.mark.parametrize(
    ("lines", "cr0", "cr4", "vector"),
    [
        (["addsd xmm0, xmm1"], 0x33, 0x600, None),
        (["addsd xmm0, xmm1"], 0x33, 0x400, 6),  # no CR4.OSFXSR: #UD
        (["addsd xmm0, xmm1"], 0x37, 0x600, 6),  # CR0.EM: #UD
        (["addsd xmm0, xmm1"], 0x3B, 0x600, 7),  # CR0.TS: #NM
        (["paddb mm0, mm1"], 0x37, 0x600, 6),  # MMX with CR0.EM: #UD
        (["paddb mm0, mm1"], 0x3B, 0x600, 7),
        (["paddb mm0, mm1"], 0x33, 0x000, None),  # MMX needs no OSFXSR
        # an unmasked divide-by-zero: #XM with CR4.OSXMMEXCPT, else #UD
        (["mov dword [ebx], 0x1d80", "ldmxcsr [ebx]", "divsd xmm1, xmm2"], 0x33, 0x600, 19),
        (["mov dword [ebx], 0x1d80", "ldmxcsr [ebx]", "divsd xmm1, xmm2"], 0x33, 0x200, 6),
        (["mov dword [ebx], 0x10000", "ldmxcsr [ebx]"], 0x33, 0x600, 13),  # reserved bit
        (["fxsave [ebx+8]"], 0x33, 0x600, 13),  # misaligned
        (["fxsave [ebx]"], 0x3B, 0x600, 7),
        (["lfence", "mfence", "sfence", "clflush [ebx]", "pause"], 0x33, 0x600, None),
    ],
)
def test_simd_fault_conditions(lines: list[str], cr0: int, cr4: int, vector: int | None) -> None:
    """SDM vol. 3, 13.1 / 2.5: #UD, #NM, #XM and #GP conditions of MMX/SSE forms."""
    assert _fault_of(lines, cr0, cr4) == vector
