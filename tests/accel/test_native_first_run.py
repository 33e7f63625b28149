"""Translate-first: a block runs as host code from its first run, never decoded by the
Python tier before (NATIVE_HOT 0), and its cache entry holds only while the override
segments its instructions name stay as flat as when it was translated."""

from __future__ import annotations

import pytest
from tests.accel.flatcpu import flat32_cpu

from boite.accel.emu.arch import GP, GS
from boite.accel.emu.native import NATIVE_HOT, NativeTier, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="no native tier on this host")

CODE, DATA = 0x1000, 0x4000


def _cpu(native: bool, code: bytes):
    cpu = flat32_cpu()
    if native:
        cpu.native = NativeTier(cpu)
    cpu.ram[CODE : CODE + len(code)] = code
    cpu.ram[DATA : DATA + 16] = bytes(range(0x11, 0x21))
    return cpu


def _run_from(cpu, eip: int) -> None:
    cpu.halted = False
    cpu.eip = eip
    while not cpu.halted:
        cpu.run(1000)


def test_a_block_runs_natively_from_its_first_run() -> None:
    assert NATIVE_HOT == 0
    cpu = _cpu(True, b"\x8b\x03\x41\xf4")  # mov eax, [ebx]; inc ecx; hlt
    try:
        cpu.r[3] = DATA
        _run_from(cpu, CODE)
        block = cpu.blocks[CODE]
        assert block.fn is not None and block.fns == ()  # no closures were made
        assert cpu.native.blocks == 1 and cpu.native.insns >= 2
        assert cpu.r[0] == 0x14131211 and cpu.r[1] == 1
    finally:
        cpu.close()


def test_a_block_the_tier_refuses_goes_to_the_python_tiers_once() -> None:
    cpu = _cpu(True, b"\xf4")  # hlt: not translated
    try:
        for _ in range(3):
            _run_from(cpu, CODE)
        block = cpu.blocks[CODE]
        assert block.native_refused and block.fns and cpu.native.blocks == 0
    finally:
        cpu.close()


def _gs_program(native: bool) -> tuple[list, int]:
    """mov eax, gs:[ebx] with GS flat, then with GS limited to 4 KiB (each access
    checked), then past that limit (#GP: the handler-less CPU records it)."""
    cpu = _cpu(
        native, b"\x65\x8b\x03\xf4\x8b\x03\xf4"
    )  # gs: mov eax,[ebx]; hlt; mov eax,[ebx]; hlt
    out = []
    try:
        cpu.r[3] = DATA
        _run_from(cpu, CODE)
        _run_from(cpu, CODE + 4)
        out.append(cpu.r[0])
        cpu.set_seg_raw(GS, 0x10, 0x10, 0xFFF, 0x4093)  # base 16, limit 4 KiB: not flat
        cpu.r[3] = 0x100
        _run_from(cpu, CODE)
        out.append(cpu.r[0])
        before = cpu.native.blocks if native else 0
        _run_from(cpu, CODE + 4)  # no override: the same translation holds
        out.append(cpu.r[0])
        again = (cpu.native.blocks if native else 0) - before
        cpu.r[3] = 0x2000  # past GS's limit
        faults = []
        cpu.exception = lambda vector, error=None: (
            faults.append(vector) or setattr(cpu, "halted", True)
        )
        _run_from(cpu, CODE)
        out.append(faults[:1])
        return out, again
    finally:
        cpu.close()


def test_a_block_naming_gs_is_not_reused_once_gs_needs_checks() -> None:
    native, again = _gs_program(True)
    python, _ = _gs_program(False)
    assert native == python
    assert native[3] == [GP]
    assert again == 0
