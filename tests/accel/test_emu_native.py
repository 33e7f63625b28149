"""The native tier (accel/emu/native/) against the Python tiers.

- every translated row of the opcode table, on registers and on memory, from random
  registers and flags, against its closure: the same registers, memory and EIP, and
  flags that differ only where `host_differs` says the host computes undefined flags
  its own way (the translator fixes those up or leaves them to Python where they live);
- random hot loops (test_emu_jit's generator, with #PF and #DE on the last pass) run on
  the native tier and on the plain interpreter end identical, and native code ran;
- self-modifying code and a paging change invalidate translations.

The crash fuzz is test_native_fuzz.py; the other CPU tests run on both tiers through the
`emu_tiers` mark (tests/conftest.py); invalidation by real guests is test_native_invalidation.py.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flatcpu import flat32_cpu

from boite.accel.emu import EmuAccelerator
from boite.accel.emu.arch import CpuFault
from boite.accel.emu.cpu import Cpu
from boite.accel.emu.decode.string import REP_SLICE
from boite.accel.emu.native import NativeTier, native_available
from boite.accel.emu.native import translate as native_translate
from boite.accel.emu.native.translate import host_differs, parse
from boite.accel.emu.optable import ROWS, Op, has_modrm, imm_bytes

pytestmark = pytest.mark.skipif(not native_available(), reason="no native tier on this host")

HERE = Path(__file__).resolve().parent
CODE, DATA = 0x1000, 0x4000


_RAM0 = bytes(1 << 20)


def _cpu() -> Cpu:
    cpu = flat32_cpu()
    cpu.native = NativeTier(cpu)
    return cpu


def _encode(r: Op, rnd: random.Random, memory: bool) -> bytes:
    out = bytes([0x0F, r.code]) if r.map == "0F" else bytes([r.code])
    if has_modrm(r):
        reg = r.ext if r.ext is not None else rnd.randrange(8)  # ESP too: it becomes R12
        if memory:  # [ebx + 0x10 + ...]: EBX points at DATA
            out += bytes([0x80 | reg << 3 | 3]) + rnd.randrange(0, 40).to_bytes(4, "little")
        else:
            out += bytes([0xC0 | reg << 3 | rnd.randrange(8)])
    return out + rnd.randbytes(imm_bytes(r, False))


def _once(cpu: Cpu, code: bytes, regs: list[int], fl: int, native: bool, setup=None):
    # All of RAM as it was: a bit string instruction's register offset reaches anywhere.
    cpu.ram[:] = _RAM0
    cpu.ram[CODE : CODE + len(code) + 1] = code + b"\xf4"  # HLT: not translated
    cpu.ram[DATA : DATA + 64] = bytes(range(64))
    if setup is not None:
        setup(cpu)
    cpu.flush_blocks()
    cpu.tlb_flush()
    cpu.r[:] = regs
    cpu.r[3], cpu.r[4] = DATA, 0x8000
    cpu.set_flags(fl)
    cpu.eip = CODE
    try:
        if native:
            f = cpu.native.translate(CODE, CODE)
            if f is None:
                return None
            while f() == 0:  # TLB misses filled: go on
                pass
        else:
            cpu.decoder.decode(CODE)[0]()
    except CpuFault as e:
        return ("fault", e.vector, cpu.eip)
    return list(cpu.r), cpu.get_flags() & 0x8D5, bytes(cpu.ram[DATA : DATA + 64]), cpu.eip


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r.native == "copy"],
    ids=lambda r: f"{r.map}{r.code:02x}{'' if r.ext is None else '/' + str(r.ext)}-{r.mnemonic}",
)  # fmt: skip
def test_native_rows_agree_with_the_closures(row: Op, monkeypatch) -> None:
    monkeypatch.setattr(native_translate, "MATCH_PYTHON_FLAGS", False)  # each row as it is
    rnd = random.Random(f"{row.map}{row.code}{row.ext}")
    cpu = _cpu()
    ran = 0
    try:
        for memory in (False, True):
            for _ in range(25):
                code = _encode(row, rnd, memory)
                regs = [rnd.choice((0, 1, 0x7F, 0x80, 0xFFFFFFFF, rnd.getrandbits(32)))
                        for _ in range(8)]  # fmt: skip
                fl = rnd.getrandbits(12) & 0x8D5
                got = _once(cpu, code, regs, fl, True)
                if got is None:
                    continue  # not translated in this form (ESP, AH with memory, ...)
                ran += 1
                want = _once(cpu, code, regs, fl, False)
                if got[0] == "fault" or want[0] == "fault":
                    assert got == want, code.hex()
                    continue
                insn = parse(code, CODE)
                assert insn is not None
                assert (got[0], got[2], got[3]) == (want[0], want[2], want[3]), code.hex()
                assert (got[1] ^ want[1]) & ~host_differs(insn) == 0, code.hex()
        assert ran, "no form of the row was translated"
    finally:
        cpu.close()


_FIXED = [r for r in ROWS if r.native == "copy" and (r.mnemonic in ("MUL", "IMUL", "SHLD", "SHRD", "BSF", "BSR")
          or r.mnemonic in ("SHL", "SAL", "SAR", "SHR") and r.map == "")]  # fmt: skip


@pytest.mark.parametrize(
    "row", _FIXED,
    ids=lambda r: f"{r.map}{r.code:02x}{'' if r.ext is None else '/' + str(r.ext)}-{r.mnemonic}",
)  # fmt: skip
def test_native_flag_fixups_give_the_python_flags(row: Op) -> None:
    """Multiplies and shifts whose undefined flags the host computes its own way: where
    the translator takes them (fixing SF/ZF/PF/AF after a multiply, AF and SHR's OF after
    a shift, by CL included), every flag equals the closure's."""
    rnd = random.Random(f"fix{row.map}{row.code}{row.ext}")
    cpu = _cpu()
    ran = 0
    try:
        for memory in (False, True):
            for _ in range(40):
                code = _encode(row, rnd, memory)
                regs = [rnd.choice((0, 1, 2, 31, 32, 33, 0x7F, 0x80, 0xFFFFFFFF,
                                    rnd.getrandbits(32))) for _ in range(8)]  # fmt: skip
                fl = rnd.getrandbits(12) & 0x8D5
                got = _once(cpu, code, regs, fl, True)
                if got is None:
                    continue
                ran += 1
                assert got == _once(cpu, code, regs, fl, False), code.hex()
        assert ran, "no form of the row was translated"
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["f3a5", "f3a4", "f366a5", "f3aa", "f3ab", "f366ab", "ac", "ad",
                                  "66ad", "aa", "ab", "ae", "af", "f2ae", "f3ae", "f2af", "f366af",
                                  "e200", "e300", "e000", "e100"])  # fmt: skip
def test_native_string_and_loop_instructions(code: str) -> None:
    """REP MOVS/STOS, LODS/STOS/SCAS, REPE/REPNE SCAS, LOOP/LOOPE/LOOPNE/JECXZ, with DF
    set and clear, ECX 0, small and spanning pages: as the closures (DF set on REP MOVS:
    left to Python)."""
    cpu = _cpu()
    ran = 0
    try:
        for fl in (0x2, 0x42, 0x402, 0x442, 0x8D5):
            for ecx in (0, 1, 3, 5000):
                for edi in (0x6FFE, 0x7000, 0x4003):
                    regs = [0x11223300 if ecx == 3 else 0x11223344, ecx, 0, DATA, 0x8000, 0,
                            DATA + 16, edi]  # fmt: skip
                    got = _once(cpu, bytes.fromhex(code), regs, fl, True)
                    if got is None:
                        continue
                    ran += 1
                    assert got == _once(cpu, bytes.fromhex(code), regs, fl, False), (fl, ecx)
        assert ran
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["a6", "a7", "66a7", "f3a6", "f2a6", "f3a7", "f2a7", "f366a7",
                                  "f2ae", "f3af"])  # fmt: skip
def test_native_cmps_and_scas_loops(code: str) -> None:
    """CMPS and REPE/REPNE CMPS/SCAS (the kernel's strncmp over kallsyms): equal runs,
    a difference at a known element, ECX 0, DF set, strings that cross into an unmapped
    page (the miss leaves mid-loop and the next entry goes on): as the closures, and
    translated (the row is native)."""
    cpu = _cpu()
    ran = 0
    try:
        assert parse(bytes.fromhex(code), CODE) is not None
        for fl in (0x2, 0x42, 0x402, 0x8D5):
            for ecx in (0, 1, 3, 17, 5000):
                for esi, edi in ((DATA, DATA + 0x100), (0x6FF8, 0x4008), (DATA + 3, 0x7FFC)):
                    regs = [0x11223344, ecx, 0, DATA, 0x8000, 0, esi, edi]
                    for diff in (None, 2, 9):

                        def setup(c: Cpu, diff=diff, esi=esi, edi=edi) -> None:
                            c.ram[esi : esi + 32] = bytes(range(32))
                            c.ram[edi : edi + 32] = bytes(range(32))
                            if diff is not None:
                                c.ram[edi + diff] ^= 0x55

                        got = _once(cpu, bytes.fromhex(code), regs, fl, True, setup)
                        assert got is not None
                        ran += 1
                        want = _once(cpu, bytes.fromhex(code), regs, fl, False, setup)
                        assert got == want, (code, fl, ecx, esi, edi, diff)
        assert ran
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["f30fbcc1", "f30fbdc1", "660fbcc1", "0fbdc3", "f30fbcd8",
                                  "0fa5c2", "0fadd0", "0fa4c20c", "0fac c101".replace(" ", ""),
                                  "660fa4c203"])  # fmt: skip
def test_native_bit_scans_and_double_shifts(code: str) -> None:
    """BSF/BSR (REP-prefixed too: the kernel's TZCNT encoding, BSF on this CPU model) and
    SHLD/SHRD by an immediate and by CL, zero sources and counts included: translated,
    and every flag as the closures' (only ZF from a scan, AF clear and OF from the sign
    change of a double shift)."""
    cpu = _cpu()
    try:
        assert parse(bytes.fromhex(code), CODE) is not None
        for ecx in (0, 1, 32, 0x80000000, 0x12345678):
            for edx in (0, 0xFFFFFFFF, 0x80000001):
                for fl in (0x2, 0x8D7):
                    regs = [0x11223344, ecx, edx, DATA, 0x8000, 0, 0, 0]
                    got = _once(cpu, bytes.fromhex(code), regs, fl, True)
                    assert got is not None
                    assert got == _once(cpu, bytes.fromhex(code), regs, fl, False), (ecx, edx, fl)
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["8f4304", "8f03", "8f0424", "8fc0", "8fc4", "8fc5", "8f4424fc",
                                  "668f03"])  # fmt: skip
def test_native_pop_to_memory(code: str) -> None:
    """POP r/m32 (the kernel's `pushf; pop [ebp - n]`): translated but for an ESP-based
    operand (its address uses the incremented ESP) and the 16-bit form, and as the
    closures, a write across a page and one past RAM included."""
    cpu = _cpu()
    try:
        for ebx in (DATA, 0x7FFFE, 0xFFFFC):
            regs = [1, 2, 3, ebx, 0x8000, 5, 6, 7]

            def setup(c: Cpu) -> None:
                c.ram[0x8000:0x8004] = (0xCAFEF00D).to_bytes(4, "little")

            got = _once(cpu, bytes.fromhex(code), regs, 0x8D7, True, setup)
            if code in ("8f0424", "8f4424fc", "668f03"):
                assert got is None
                continue
            assert got is not None
            assert got == _once(cpu, bytes.fromhex(code), regs, 0x8D7, False, setup), ebx
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["f7f3", "f7f1", "f77304", "f733", "66f7f3"])
def test_native_div(code: str) -> None:
    """DIV r/m32: translated (not the 16-bit form); quotients that fit, a zero divisor
    and a quotient past 32 bits (#DE from the Python tiers, EIP on the instruction, the
    state before it), flags kept: as the closures."""
    cpu = _cpu()
    try:
        for edx, eax, div in ((0, 100, 7), (6, 0xFFFFFFFF, 7), (0, 5, 0), (9, 0, 9), (9, 0, 10),
                              (0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFF)):  # fmt: skip
            regs = [eax, div, edx, div, 0x8000, 0, 0, 0]

            def setup(c: Cpu, div=div) -> None:
                c.ram[DATA : DATA + 8] = div.to_bytes(4, "little") * 2

            if code[2:] in ("7304", "33"):
                regs[3] = DATA
            got = _once(cpu, bytes.fromhex(code), regs, 0x8D7, True, setup)
            if code.startswith("66"):
                assert got is None
                continue
            assert got is not None
            assert got == _once(cpu, bytes.fromhex(code), regs, 0x8D7, False, setup), (edx, eax)
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["f3a6", "f3ae", "f2af"])
def test_native_rep_compare_yields_after_a_slice(code: str) -> None:
    """A REPE/REPNE CMPS/SCAS longer than REP_SLICE elements stops after REP_SLICE of
    them with EIP on the instruction (counted as run), as the closures do."""
    cpu = _cpu()
    try:
        regs = [0xFFFFFFFF if code == "f2af" else 0, 100_000, 0, DATA, 0x8000, 0, 0x10000, 0x40000]
        got = _once(cpu, bytes.fromhex(code), regs, 0x2, True)
        assert got is not None and got[3] == CODE and got[0][1] == 100_000 - REP_SLICE
        assert got == _once(cpu, bytes.fromhex(code), regs, 0x2, False)
    finally:
        cpu.close()


@pytest.mark.parametrize("code", ["648b03", "64ff4304", "65017b08", "3e8d742600", "648b1d10400000",
                                  "64a110400000", "64a310400000", "26ff03", "36ff03", "3e0fb10b",
                                  "2e8b03", "3e7400", "64f3ab", "64ac"])  # fmt: skip
def test_native_segment_overrides(code: str) -> None:
    """Segment override prefixes: through a flat FS/GS with a base (the kernel's per-CPU
    data), DS/ES/SS, a no-op prefix on LEA or Jcc; CS (not writable, so never flat) and
    string instructions with an override are left to Python."""
    cpu = _cpu()
    try:
        cpu.set_seg_raw(4, 0x10, 0x2000, 0xFFFFFFFF, 0xC093)  # FS: flat, based
        cpu.set_seg_raw(5, 0x10, 0x3000, 0xFFFFFFFF, 0xC093)  # GS
        regs = [0x11223344, 3, 0x55, DATA, 0x8000, 0, DATA + 16, DATA + 32]
        got = _once(cpu, bytes.fromhex(code), regs, 0x2, True)
        if code[:2] == "2e" or code in ("64f3ab", "64ac"):
            assert got is None
            return
        assert got is not None
        assert got == _once(cpu, bytes.fromhex(code), regs, 0x2, False)
    finally:
        cpu.close()


def test_chained_entry_polls_the_interrupt_flag_and_the_budget() -> None:
    """A self-looping block (INC EAX; JMP back) runs in one entry until its budget is
    spent (run(n)'s n bounds it); with an interrupt pending and IF set it leaves at the
    first chain (the flag a device thread sets with Cpu.kick while it runs)."""
    cpu = _cpu()
    try:
        code = b"\x40\xeb\xfd"  # inc eax; jmp $-3
        cpu.ram[CODE : CODE + 3] = code
        cpu.eip = CODE
        cpu.r[0] = 0
        f = cpu.native.translate(CODE, CODE)
        assert f is not None
        cpu.run_left = 1000
        cpu.intr = False
        while (n := f()) == 0:
            pass  # TLB misses filled: none here (no memory operand), but harmless
        assert 1000 <= n < 1000 + 2 and cpu.r[0] == n // 2
        cpu.set_flags(0x202)  # IF
        cpu.intr = True
        assert f() == 2 and cpu.eip == CODE  # one pass, then the chain sees the flag
        cpu.set_flags(0x2)  # IF clear: the pending interrupt cannot be taken, no exit
        assert 1000 <= f() < 1000 + 2
    finally:
        cpu.close()


def _entries_over(cpu: Cpu, insns: int, warm: bool = True) -> int:
    """Native entries while Cpu.run runs `insns` more instructions (after a warm-up
    that translates the hot blocks and enters each once)."""
    cpu.intr = False
    if warm:
        cpu.run(200)
    before = cpu.native.entries
    done = 0
    while done < insns:
        done += cpu.run(insns - done)
    return cpu.native.entries - before


def test_blocks_whose_eip_products_collide_chain_to_each_other() -> None:
    """Two blocks jumping to each other at a distance d with d * CHAIN_MUL near 0 mod
    2^32 (the kit boot's two functions 0xC575 bytes apart, at 0x1040 here: the top bits
    of EIP * CHAIN_MUL alone are the same for both): their chain slots are apart, so
    they run chained, not one entry from Python a pass."""
    cpu = _cpu()
    try:
        a, b = 0x1040, 0x1040 + 0xC575
        assert b + 8 <= cpu.ram_size
        jmp = b"\xe9" + ((b - (a + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
        cpu.ram[a : a + 6] = b"\x40" + jmp  # A: inc eax; jmp B
        back = b"\xe9" + ((a - (b + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
        cpu.ram[b : b + 6] = b"\x43" + back  # B: inc ebx; jmp A
        cpu.eip = a
        assert _entries_over(cpu, 20_000) <= 2
        assert cpu.r[0] == cpu.r[3] or cpu.r[0] == cpu.r[3] + 1
    finally:
        cpu.close()


def test_indirect_jumps_find_their_block_in_the_chain_table() -> None:
    """The dispatch stub computes the chain slot Python fills (state.chain_slot): a loop
    through JMP EAX runs chained."""
    cpu = _cpu()
    try:
        cpu.ram[CODE : CODE + 3] = b"\x46\xff\xe0"  # L: inc esi; jmp eax
        cpu.eip, cpu.r[0] = CODE, CODE
        assert _entries_over(cpu, 20_000) <= 2
    finally:
        cpu.close()


def test_a_chain_to_eip_0_without_a_block_leaves() -> None:
    """Unused chain slots are zero (tag 0, code 0): the chain to EIP 0 must find its own
    slot empty, not jump to host address 0."""
    cpu = _cpu()
    try:
        cpu.ram[CODE : CODE + 6] = b"\x40\xe9" + ((0 - (CODE + 6)) & 0xFFFFFFFF).to_bytes(
            4, "little"
        )  # inc eax; jmp 0
        cpu.eip = CODE
        f = cpu.native.translate(CODE, CODE)
        assert f is not None
        cpu.run_left = 1000
        cpu.intr = False
        assert f() == 2 and cpu.eip == 0 and cpu.r[0] == 1
    finally:
        cpu.close()


def _paged_cpu(frame: int) -> tuple[Cpu, int]:
    """_cpu() with identity paging of the first 1 MiB but linear page 0x30000 mapped to
    `frame`; returns the CPU and the address of that PTE."""
    cpu = _cpu()
    pd, pt = 0x20000, 0x21000
    cpu.ram[pd : pd + 4] = (pt | 3).to_bytes(4, "little")
    for i in range(256):
        cpu.ram[pt + 4 * i : pt + 4 * i + 4] = ((i << 12) | 3).to_bytes(4, "little")
    pte = pt + 4 * 0x30
    cpu.ram[pte : pte + 4] = (frame | 3).to_bytes(4, "little")
    cpu.cr3 = pd
    cpu.set_cr(0, 0x80000011)
    return cpu, pte


def _loop_at(cpu: Cpu, frame: int, reg: int) -> None:
    """Two blocks on one page jumping to each other at linear 0x30000/0x30100 (frame
    holds them): INC reg in the first."""
    cpu.ram[frame : frame + 6] = bytes([0x40 + reg, 0xE9]) + (0xFA).to_bytes(4, "little")
    cpu.ram[frame + 0x100 : frame + 0x105] = b"\xe9" + (-0x105 & 0xFFFFFFFF).to_bytes(4, "little")


def test_a_full_tlb_flush_puts_back_the_blocks_of_pages_mapped_as_before() -> None:
    """After a TLB flush (Linux's CR4.PGE toggles) the EIP map entries and chain slots of
    a page come back once run() fetches from it again and it maps to the same frame: no
    translation and no entry for each block again."""
    cpu, _ = _paged_cpu(0x50000)
    try:
        _loop_at(cpu, 0x50000, 0)
        cpu.eip = 0x30000
        assert _entries_over(cpu, 20_000) <= 2
        tier = cpu.native
        blocks = tier.blocks
        for _ in range(3):
            cpu.tlb_flush()
            assert not cpu.fast_cur  # the maps are empty until the page is fetched again
            # One entry: the second block's chain slot came back with the first's.
            assert _entries_over(cpu, 20_000, warm=False) == 1
        assert tier.blocks == blocks and cpu.r[0] > 20_000
    finally:
        cpu.close()


def test_a_flush_remapping_the_code_page_does_not_put_back_its_blocks() -> None:
    """Linear page 0x30000 maps to another frame after the flush: that frame's code runs
    (its own blocks); mapped back, the first frame's blocks are valid again; rewritten
    while stashed (invalidate_code), they are not."""
    cpu, pte = _paged_cpu(0x50000)
    try:
        _loop_at(cpu, 0x50000, 0)  # INC EAX
        _loop_at(cpu, 0x60000, 3)  # INC EBX
        cpu.eip = 0x30000
        _entries_over(cpu, 2_000)
        regs = lambda: (cpu.r[0], cpu.r[3])  # noqa: E731
        eax, ebx = regs()
        assert eax > 0 and ebx == 0
        cpu.ram[pte : pte + 4] = (0x60000 | 3).to_bytes(4, "little")
        cpu.tlb_flush()
        _entries_over(cpu, 2_000)
        assert regs()[0] == eax and regs()[1] > 0
        eax, ebx = regs()
        cpu.ram[pte : pte + 4] = (0x50000 | 3).to_bytes(4, "little")
        cpu.tlb_flush()
        blocks = cpu.native.blocks
        _entries_over(cpu, 2_000)
        assert regs()[1] == ebx and regs()[0] > eax and cpu.native.blocks == blocks
        eax, ebx = regs()
        cpu.tlb_flush()
        cpu.phys_write(0x50000, 1, 0x43)  # INC EBX now, while the blocks are stashed
        _entries_over(cpu, 2_000)
        assert regs()[0] == eax and regs()[1] > ebx
    finally:
        cpu.close()


def test_a_frame_mapped_twice_puts_back_only_the_linear_page_fetched() -> None:
    """One frame at two linear pages (0x30000, 0x31000), blocks run at both; after a
    flush the second is remapped: fetching the first puts back only its own blocks, and
    the second runs its new frame's code."""
    cpu, pte = _paged_cpu(0x50000)
    try:
        _loop_at(cpu, 0x50000, 0)  # INC EAX, at both linear pages
        _loop_at(cpu, 0x60000, 3)  # INC EBX
        pte2 = pte + 4
        cpu.ram[pte2 : pte2 + 4] = (0x50000 | 3).to_bytes(4, "little")
        for at in (0x31000, 0x30000):
            cpu.eip = at
            _entries_over(cpu, 2_000)
        eax, ebx = cpu.r[0], cpu.r[3]
        assert eax > 1_000 and ebx == 0
        cpu.ram[pte2 : pte2 + 4] = (0x60000 | 3).to_bytes(4, "little")
        cpu.tlb_flush()
        _entries_over(cpu, 2_000)  # at 0x30000: the frame's blocks for that page
        assert cpu.r[0] > eax and cpu.r[3] == 0
        assert all(eip >> 12 == 0x30 for eip in cpu.fast_cur)
        eax = cpu.r[0]
        cpu.eip = 0x31000
        _entries_over(cpu, 2_000)
        assert cpu.r[0] == eax and cpu.r[3] > 0
    finally:
        cpu.close()


def test_invlpg_of_a_data_page_keeps_the_translations() -> None:
    """INVLPG of a page no block was fetched from (the Debian boot's fixmap loop: 70,000
    of them) drops that TLB entry only; of a code page, every EIP map and chain."""
    cpu = _cpu()
    try:
        code = b"\x40\x8b\x0b\xeb\xfb"  # inc eax; mov ecx, [ebx]; jmp back
        cpu.ram[CODE : CODE + len(code)] = code
        cpu.eip, cpu.r[3] = CODE, DATA
        cpu.run(2000)
        assert cpu.native.blocks and cpu.code_lin == {CODE >> 12}
        epoch, fast = cpu.native.epoch, sum(len(m) for m in cpu._fast.values())
        assert fast and DATA >> 12 in cpu.rtlb
        cpu.tlb_flush(DATA >> 12)
        assert DATA >> 12 not in cpu.rtlb and not cpu.native.tlb.tables.read[DATA >> 12]
        assert cpu.native.epoch == epoch and sum(len(m) for m in cpu._fast.values()) == fast
        cpu.tlb_flush(CODE >> 12)
        assert cpu.native.epoch == epoch + 1 and not any(cpu._fast.values())
        assert not cpu.code_lin
        before = cpu.r[0]
        cpu.run(2000)  # and it runs on, translated again
        assert cpu.r[0] > before and cpu.code_lin == {CODE >> 12}
    finally:
        cpu.close()


def test_cr3_reload_keeps_global_pages() -> None:
    """MOV to CR3 with CR4.PGE drops the TLB entries of non-global pages only: a hot
    loop on a global code page keeps its translations and chains; its non-global data
    page misses again and reads the new mapping."""
    cpu = _cpu()
    try:
        pd, pt, other = 0x80000, 0x81000, 0x90000
        cpu.ram[pd : pd + 4] = (pt | 3).to_bytes(4, "little")
        for n in range(256):  # identity, the code page global, the data page not
            g = 0x100 if n == CODE >> 12 else 0
            cpu.ram[pt + 4 * n : pt + 4 * n + 4] = (n << 12 | g | 3).to_bytes(4, "little")
        cpu.ram[DATA : DATA + 4] = (7).to_bytes(4, "little")
        cpu.ram[other : other + 4] = (9).to_bytes(4, "little")
        code = b"\x40\x8b\x0b\xeb\xfb"  # inc eax; mov ecx, [ebx]; jmp back
        cpu.ram[CODE : CODE + len(code)] = code
        cpu.set_cr(3, pd)
        cpu.set_cr(4, 0x80)
        cpu.set_cr(0, 0x80000011)
        cpu.eip, cpu.r[3] = CODE, DATA
        cpu.run(2000)
        assert cpu.native.blocks and cpu.r[1] == 7
        epoch = cpu.native.epoch
        # The data page now maps another frame; the CR3 reload must show it.
        pte = pt + 4 * (DATA >> 12)
        cpu.ram[pte : pte + 4] = (other | 3).to_bytes(4, "little")
        cpu.set_cr(3, pd)
        assert CODE >> 12 in cpu.rtlb and DATA >> 12 not in cpu.rtlb
        assert cpu.native.epoch == epoch and any(cpu._fast.values())
        cpu.run(2000)
        assert cpu.r[1] == 9
        cpu.set_cr(4, 0)  # PGE off: everything goes
        assert not cpu.rtlb and cpu.native.epoch > epoch
    finally:
        cpu.close()


def test_rdtsc_reads_the_clock_the_python_tiers_read() -> None:
    """Translated RDTSC calls clock_gettime and scales it as Cpu.rdtsc (its rate, its
    offset after a WRMSR to the TSC): its value lies between two Python reads, and
    the registers and flags but EAX/EDX stay."""
    cpu = _cpu()
    try:
        code = b"\x0f\x31\x0f\x31"  # rdtsc; rdtsc (the second one: a translated block)
        cpu.ram[CODE : CODE + len(code) + 1] = code + b"\xf4"
        for hz, tsc in ((1_000_000_000, None), (2_400_000_000, 1 << 40), (3_000_000, 5)):
            cpu.tsc_hz = hz
            cpu.native = NativeTier(cpu)
            if tsc is not None:
                cpu.wrmsr(0x10, tsc)
            f = cpu.native.translate(CODE, CODE)
            assert f is not None
            cpu.eip, cpu.r[:] = CODE, [1, 2, 3, 4, 0x8000, 6, 7, 8]
            cpu.set_flags(0x8D7)
            lo = cpu.rdtsc()
            assert f() == 2 and cpu.eip == CODE + 4 and cpu.native.exits[0] == 1
            hi = cpu.rdtsc()
            got = cpu.r[2] << 32 | cpu.r[0]
            assert lo <= got <= hi, (hz, tsc)
            assert cpu.r[1] == 2 and cpu.r[3:] == [4, 0x8000, 6, 7, 8]
            assert cpu.get_flags() & 0x8D5 == 0x8D5
    finally:
        cpu.close()


# -- whole programs ------------------------------------------------------------------------
nasm = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")


def _assemble(tmp_path: Path, src: str) -> bytes:
    (tmp_path / "p.asm").write_text(src)
    subprocess.run(["nasm", "-f", "bin", "-o", str(tmp_path / "p.bin"), str(tmp_path / "p.asm")],
                   check=True)  # fmt: skip
    return (tmp_path / "p.bin").read_bytes()


def _jit_tests():
    sys.path.insert(0, str(HERE))
    import test_emu_jit

    return test_emu_jit


def _run_loop(image: bytes, seed: int, paging: bool, native: bool) -> tuple:
    t = _jit_tests()
    m = t._machine(image, seed, paging)
    acc = EmuAccelerator(translate=True, hot_block=2, native=native)
    acc.create(m)
    try:
        acc.run()
        st = acc.save_cpu_state()[0]
        ran = acc.cpu.native.insns if native else 0
    finally:
        acc.close()
    regs = {k: v & 0xFFFFFFFF for k, v in st["gpr"].items()}
    return (regs, st["rip"], st["rflags"] & 0xED5, st["cr2"]), m.memory.read(t.DATA, 0x2000), \
        m.memory.read(t.boot.STACK_TOP - 64, 64), ran  # fmt: skip


def _interpreted(image: bytes, seed: int, paging: bool) -> tuple:
    """The reference for _run_loop: the same machine on the plain interpreter, as
    (registers/EIP/flags/CR2, data, stack)."""
    t = _jit_tests()
    m = t._machine(image, seed, paging)
    acc = EmuAccelerator(translate=False)
    acc.create(m)
    try:
        acc.run()
        st = acc.save_cpu_state()[0]
    finally:
        acc.close()
    regs = {k: v & 0xFFFFFFFF for k, v in st["gpr"].items()}
    return ((regs, st["rip"], st["rflags"] & 0xED5, st["cr2"]), m.memory.read(t.DATA, 0x2000),
            m.memory.read(t.boot.STACK_TOP - 64, 64))  # fmt: skip


@nasm
@pytest.mark.parametrize("fault", [None, "pf", "de"])
@pytest.mark.parametrize("seed", range(12))
def test_hot_random_loops_match_the_interpreter(tmp_path, seed: int, fault: str | None) -> None:
    t = _jit_tests()
    src = t._program(random.Random(seed), 30, fault)
    image = _assemble(tmp_path, src)
    paging = fault == "pf" or seed % 2 == 0
    ref = _interpreted(image, seed, paging)
    got = _run_loop(image, seed, paging, True)
    assert got[3] > 0, "no native code ran"
    for i, what in enumerate(("registers, EIP, flags, CR2", "data", "stack")):
        assert got[i] == ref[i], f"seed {seed}: {what} differ\n{src}"


_CALLS = """
bits 32
org 0x100000
TABLE equ 0x200000 + 0x1000
COUNTER equ 0x200000 + 0x1010
    mov dword [TABLE], fn1
    mov dword [TABLE + 4], fn2
    mov dword [TABLE + 8], done
    mov dword [TABLE + 12], finish
    mov ecx, 300
.top:
    push ecx
    call fn1
    mov eax, fn2
    call eax
    call [TABLE]
    push dword [TABLE + 4]
    pop esi
    call esi
    mov [COUNTER], eax          ; A3
    mov eax, [COUNTER]          ; A1
    mov al, [COUNTER + 1]       ; A0
    mov [COUNTER + 2], al       ; A2
    lock xadd [COUNTER], ebx
    cmpxchg [COUNTER + 4], edx
    xadd edi, ebp
    sub esp, 8
    mov [esp + 4], ecx
    lea esp, [esp + 8]
    mov edi, esp
    xchg esp, ebp
    xchg esp, ebp
    push esi
    push edi
    push ecx
    mov esi, 0x200000 + 0xF00   ; across a page end, both ways
    mov edi, 0x200000 + 0x1800
    mov ecx, 100
    rep movsd
    mov edi, 0x200000 + 0x1FF0
    mov ecx, [esp]
    and ecx, 63
    rep stosb
    mov esi, 0x200000 + 0x1802
    mov edi, 0x200000 + 0x1F00
    mov ecx, 33
    rep movsw
    std
    mov ecx, 9
    rep movsb
    cld
    rep stosd                   ; ECX = 0: nothing
    pop ecx
    pop edi
    pop esi
    pop ecx
    dec ecx
    jnz .top
    mov eax, [TABLE + 8]
    jmp eax
done:
    jmp [TABLE + 12]
finish:
    hlt
fn1:
    push ebp
    mov ebp, esp
    sub esp, 16
    mov eax, [ebp + 8]
    add ebx, eax
    mov [esp + 4], eax
    leave
    ret
fn2:
    push ebp
    mov ebp, esp
    push dword [ebp + 4]
    pop edx
    add edx, esp
    leave
    ret
"""


@nasm
def test_calls_leave_moffs_and_esp_operands(tmp_path) -> None:
    """Indirect CALL/JMP (register and memory), PUSH r/m, LEAVE, MOV moffs, LOCK XADD,
    CMPXCHG, REP MOVS/STOS (across pages, DF set) and ESP as an operand, hot, on the native tier and the interpreter: the
    same registers, memory and stack."""
    image = _assemble(tmp_path, _CALLS)
    ref = _interpreted(image, 3, False)
    got = _run_loop(image, 3, False, True)
    assert got[3] > 3000, "native code did not run the loop"
    for i, what in enumerate(("registers, EIP, flags, CR2", "data", "stack")):
        assert got[i] == ref[i], f"{what} differ"


@nasm
def test_a_full_code_arena_starts_over(tmp_path, monkeypatch) -> None:
    """An arena of 8 KiB fills up again and again (_CALLS' blocks): every translation goes
    (the Python tiers' blocks too) and the guest ends as on the interpreter."""
    import boite.accel.emu.native as native_mod

    image = _assemble(tmp_path, _CALLS)
    (ref_regs, ref_rip, ref_flags, _), ref_data, _ = _interpreted(image, 3, False)
    t = _jit_tests()
    monkeypatch.setattr(native_mod, "ARENA_BYTES", 8192)
    m = t._machine(image, 3, False)
    acc = EmuAccelerator(translate=True, hot_block=2, native=True)
    acc.create(m)
    try:
        acc.run()
        st = acc.save_cpu_state()[0]
        tier = acc.cpu.native
        assert tier.insns > 1000 and tier.arena_resets > 10, (tier.insns, tier.arena_resets)
    finally:
        acc.close()
    assert {k: v & 0xFFFFFFFF for k, v in st["gpr"].items()} == ref_regs
    assert (st["rip"], st["rflags"] & 0xED5) == (ref_rip, ref_flags)
    assert m.memory.read(t.DATA, 0x2000) == ref_data


_FLAGS = """
bits 32
org 0x100000
    mov ecx, 400
    xor ebx, ebx
.top:
    pushf               ; a per-CPU section: save, CLI, work, restore
    cli
    add eax, ecx
    popf                ; IF back as it was, the arithmetic flags from the stack
    pushf
    pop edx
    add ebx, edx
    sti                 ; its shadow: the next instruction in the same block
    inc esi
    pushf
    pop dword [0x200000 + 0x100]  ; POP r/m32 (DATA)
    add ebx, [0x200000 + 0x100]
    push dword 0x8d7    ; POPF setting every arithmetic flag, IF clear
    popf
    pushf
    pop edi
    add ebx, edi
    push dword 0x202    ; IF set, the rest clear
    popf
    pushf
    pop edi
    add ebx, edi
    cli
    test ecx, 1
    jz .odd
    sti
    nop
.odd:
    dec ecx
    jnz .top
    cli                 ; HLT with IF set would wait for an interrupt
    hlt
"""


@nasm
def test_flag_instructions_run_natively(tmp_path) -> None:
    """PUSHF/POPF/CLI/STI in a hot loop (no interrupt pending): native, and the same
    registers, flags (IF included), memory and stack as the interpreter."""
    image = _assemble(tmp_path, _FLAGS)
    ref = _interpreted(image, 5, False)
    got = _run_loop(image, 5, False, True)
    assert got[3] > 400 * 20, "native code did not run the loop"
    for i, what in enumerate(("registers, EIP, flags, CR2", "data", "stack")):
        assert got[i] == ref[i], f"{what} differ"


def test_sti_and_popf_leave_when_an_interrupt_may_be_pending() -> None:
    """STI and POPF that set IF while a request may be pending (Cpu.intr) leave for the
    Python tiers before the instruction: STI's shadow and the interrupt after POPF are
    theirs. With none pending they run natively; CLI and POPF clearing IF never leave."""
    cpu = _cpu()
    try:
        for code, first in (
            (b"\xfb\x40\xfa\xeb\xfb", "sti"),  # sti; inc eax; cli; jmp
            (b"\x68\x02\x02\x00\x00\x9d\x40\xfa\xeb\xf6", "popf"),
        ):
            cpu.ram[CODE : CODE + len(code)] = code
            cpu.flush_blocks()
            cpu.eip = CODE
            cpu.r[0] = 0
            cpu.r[4] = 0x8000
            cpu.set_flags(0x2)
            f = cpu.native.translate(CODE, CODE)
            assert f is not None
            cpu.intr = False
            cpu.run_left = 1000
            for _ in range(4):  # the stack page's TLB entries first
                if (n := f()) >= 900:
                    break
                cpu.eip, cpu.r[4], cpu.run_left = CODE, 0x8000, 1000
            assert n >= 900 and not cpu.fl & 0x200 and cpu.r[0] > 100  # looped natively
            cpu.eip = CODE
            cpu.r[4] = 0x8000
            cpu.intr = True  # a request waits: IF must be set by the Python tiers
            before = cpu.r[0]
            n = f()
            if first == "popf":  # PUSH ran, POPF is left with the state before it
                assert (n, cpu.eip, cpu.fl & 0x200, cpu.r[4]) == (1, CODE + 5, 0, 0x7FFC)
            else:  # STI ran as the Python tiers run it: its shadow follows
                assert n == 1 and cpu.eip == CODE + 1 and cpu.fl & 0x200 and cpu.inhibit_irq
            assert cpu.r[0] == before
            cpu.inhibit_irq = False
    finally:
        cpu.close()


def test_an_interrupt_during_a_miss_in_stis_shadow_waits_for_that_instruction() -> None:
    """STI ran natively with nothing pending; its shadow instruction misses the TLB and a
    request arrives while Python fills the entry (a device thread's timing). The shadow
    stays: Cpu.run must run that instruction before taking the interrupt, as after the
    Python tiers' STI (inhibit_irq)."""
    cpu = _cpu()
    try:
        code = (
            b"\xfb\xa1" + DATA.to_bytes(4, "little") + b"\xfa\xeb\xf6"
        )  # sti; mov eax, [DATA]; cli; jmp
        cpu.ram[CODE : CODE + len(code)] = code
        cpu.ram[DATA : DATA + 4] = (0x1234).to_bytes(4, "little")
        cpu.eip = CODE
        cpu.r[4] = 0x8000
        cpu.set_flags(0x2)
        f = cpu.native.translate(CODE, CODE)
        assert f is not None
        fill = cpu._fill

        def fill_while_a_request_arrives(lin: int, write: bool):
            cpu.intr = True
            return fill(lin, write)

        cpu._fill = fill_while_a_request_arrives
        cpu.intr = False
        cpu.run_left = 1000
        n = f()
        assert (n, cpu.eip) == (1, CODE + 1) and cpu.fl & 0x200 and cpu.intr
        assert cpu.inhibit_irq, "the interrupt would be taken before STI's shadow instruction"
        assert cpu.r[0] == 0
    finally:
        cpu.close()


def test_a_run_ending_at_a_miss_inside_a_rep_slice_finishes_the_slice() -> None:
    """Fuzz seed 75771: run(n)'s count ran out at a TLB miss inside a REPNE SCASB's
    65,536-element slice, and the native tier stopped there, where the Python tiers'
    slice (one instruction) has no stop: the same count, two different EDI/ECX. The rest
    of the slice now runs on the closures, so the instruction ends where both tiers end it."""
    cpu = _cpu()
    try:
        code = b"\x40\xf2\xae\xf4"  # inc eax; repne scasb (over zeros, AL 0xff); hlt
        cpu.ram[CODE : CODE + len(code)] = code
        f = cpu.native.translate(CODE, CODE)
        assert f is not None

        def start(count: int) -> None:
            cpu.eip, cpu.halted = CODE, False
            cpu.r[:] = [0xFE, count, 0, 0, 0x8000, 0, 0, 0x8F00]
            cpu.set_flags(0x2)

        start(0x10)  # a short scan first: page 8 in the native TLB
        cpu.run_left = 1000
        while not cpu.halted and cpu.eip != CODE + 3:
            f() if cpu.eip == CODE else cpu.run(1)
        start(0x100000)
        cpu.run_left = 1  # the INC takes it; the scan misses at page 9
        n = f()
        assert (n, cpu.eip) == (2, CODE + 1)  # the INC and one whole slice
        assert cpu.r[7] == 0x8F00 + REP_SLICE and cpu.r[1] == 0x100000 - REP_SLICE
    finally:
        cpu.close()


_SMC = """
bits 32
org 0x100000
    mov ecx, 400
.top:
    mov eax, 1          ; its immediate is rewritten below
.imm equ $ - 4
    add ebx, eax
    add edx, 3
    test ecx, 15
    jnz .skip
    mov [.imm], ecx     ; every 16th pass: the passes after see the new immediate
.skip:
    dec ecx
    jnz .top
    hlt
"""


@nasm
@pytest.mark.parametrize("native", [True, False])
def test_self_modifying_code(tmp_path, native: bool) -> None:
    """A loop that rewrites an instruction of its own block on every pass: the write
    misses the native write TLB (the page holds code), Python does it and drops the
    translation, so each pass runs the new immediate."""
    t = _jit_tests()
    image = _assemble(tmp_path, _SMC)
    m = t._machine(image, 1, False)
    rbx0 = m.boot_state[0].gpr["rbx"]
    acc = EmuAccelerator(translate=True, hot_block=2, native=native)
    acc.create(m)
    try:
        acc.run()
        st = acc.save_cpu_state()[0]
        if native:
            assert acc.cpu.native.insns > 0
    finally:
        acc.close()
    imm, want = 1, rbx0
    for ecx in range(400, 0, -1):
        want += imm
        if ecx & 15 == 0:
            imm = ecx
    assert st["gpr"]["rbx"] & 0xFFFFFFFF == want & 0xFFFFFFFF


def test_paging_change_drops_translations() -> None:
    """The same linear page remapped to another physical page: after the TLB flush the
    native tier reads the new page (its TLB follows the Python one)."""
    cpu = _cpu()
    try:
        pd, pt = 0x20000, 0x21000
        cpu.ram[pd : pd + 4] = (pt | 3).to_bytes(4, "little")
        for i in range(256):
            cpu.ram[pt + 4 * i : pt + 4 * i + 4] = ((i << 12) | 3).to_bytes(4, "little")
        cpu.ram[0x50000:0x50004] = (111).to_bytes(4, "little")
        cpu.ram[0x60000:0x60004] = (222).to_bytes(4, "little")
        map_at = pt + 4 * 0x30  # linear 0x30000
        cpu.ram[map_at : map_at + 4] = (0x50000 | 3).to_bytes(4, "little")
        cpu.cr3 = pd
        cpu.set_cr(0, 0x80000011)
        code = bytes.fromhex("8b0500000300") + b"\xf4"  # mov eax, [0x30000]; hlt
        cpu.ram[CODE : CODE + len(code)] = code
        results = []
        for target in (0x50000, 0x60000):
            cpu.ram[map_at : map_at + 4] = (target | 3).to_bytes(4, "little")
            cpu.tlb_flush()
            cpu.eip = CODE
            f = cpu.native.translate(CODE, CODE)
            assert f is not None
            while f() == 0:
                pass
            results.append(cpu.r[0])
        assert results == [111, 222]
    finally:
        cpu.close()


def test_a_page_becoming_code_leaves_every_write_tlb(monkeypatch) -> None:
    """guard_code_page finds the write TLB entries of a physical page through Cpu.wrev
    (aliases, both privilege levels, after a rebuild that dropped flushed pages) and
    drops them, in the native TLB too; other pages keep theirs."""
    import boite.accel.emu.cpu as cpu_mod

    cpu = _cpu()
    # Paging with two linear aliases of physical page 0x5000 and one other page.
    pd, pt = 0x10000, 0x11000
    cpu.memory.write(pd, (pt | 7).to_bytes(4, "little"))
    for lin, phys in ((0x20000, 0x5000), (0x21000, 0x5000), (0x22000, 0x6000)):
        cpu.memory.write(pt + (lin >> 12) * 4, (phys | 7).to_bytes(4, "little"))
    cpu.set_cr(3, pd)
    cpu.set_cr(0, 0x80000011)
    monkeypatch.setattr(cpu_mod, "WREV_PRUNE", 2)  # rebuilt at the third write fill
    for user in (False, True):
        cpu.cpl = 3 if user else 0
        cpu.tlb_switch()
        cpu.native._bind()
        for lin in (0x20000, 0x21000, 0x22000):
            cpu._fill(lin, True)
            assert cpu.native._mirror(lin >> 12, True)
    tables = [t[1] for t in cpu._tlbs.values()]
    assert len(tables) == 2 and all(len(wt) == 3 for wt in tables)
    cpu.guard_code_page(0x5)
    for wt in tables:
        assert sorted(wt) == [0x22]
    assert 5 not in cpu.wrev
    assert len(cpu.native.tlbs) == 2
    for t in cpu.native.tlbs:
        assert [bool(t.tables.write[p]) for p in (0x20, 0x21, 0x22)] == [False, False, True]


def test_the_flags_saved_to_r11_come_back_whatever_ran_between() -> None:
    """_SAVE (LAHF, SETO into R11) then _RESTORE (SAHF, and a CMP for OF) give every
    combination of the arithmetic flags back, whatever changed the host's flags between,
    and keep RAX as it was."""
    import ctypes

    from boite.accel.emu.arch import ARITH
    from boite.accel.emu.native.state import CodeArena

    # push rdi; popfq; mov rax, rsi; SAVE; xor ecx, ecx (flags: ZF PF); cmp cl, 1 (CF SF
    # AF); RESTORE; pushfq; pop rdx; xor rax, rsi; shl rax, 16; or rax, rdx; ret
    code = (b"\x57\x9d\x48\x89\xf0" + native_translate._SAVE + b"\x31\xc9\x80\xf9\x01"
            + native_translate._RESTORE + b"\x9c\x5a\x48\x31\xf0\x48\xc1\xe0\x10\x48\x09\xd0\xc3")  # fmt: skip
    arena = CodeArena(4096)
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)(arena.place(code))
    bits = [b for b in range(12) if ARITH >> b & 1]
    rnd = random.Random(11)
    for combo in range(1 << len(bits)):
        fl = sum(1 << b for i, b in enumerate(bits) if combo >> i & 1)
        rax = rnd.getrandbits(32)
        got = fn(fl | 0x202, rax)
        assert got & ARITH == fl, (hex(fl), hex(got))
        assert got >> 16 == 0  # RAX as it was


@pytest.mark.parametrize(
    "first, second",
    [
        ("83dc00", "83dc93"),  # SBB ESP, imm8: ESP's store follows the immediate
        ("69e4" + "00000000", "69e4" + "78563412"),  # IMUL ESP, ESP, imm32
        ("83c000", "83c07f"),  # ADD EAX, imm8: kept, the immediate appended
    ],
)
def test_kept_host_code_takes_the_new_immediate(first: str, second: str) -> None:
    """Host code kept per instruction shape (translate._FRAGMENTS) is reused with the
    next instruction's immediate; where more host code follows the immediate (an ESP
    operand's store into the state) it must not be kept without it: a reused copy of
    `sbb esp, 0` made `sbb esp, 0x93` store R12 to [R15 + 0x93000010] (fuzz seed
    2016606 after 2016256 in one process: a host segfault)."""
    hlt = bytes.fromhex("f4")  # not translated: each block is the one instruction

    def host(code: bytes) -> bytes:
        out = native_translate.translate_block(lambda n: (code + hlt)[:n], 0x1000, 0x100)
        assert out is not None and out[1] == 1
        return out[0]

    native_translate.clear_caches()
    fresh = host(bytes.fromhex(second))
    native_translate.clear_caches()
    host(bytes.fromhex(first))  # fills the caches with the first immediate's code
    assert host(bytes.fromhex(second)) == fresh


def test_a_block_made_again_from_the_same_bytes_is_reused() -> None:
    """A write to a code page drops its blocks; the next translation at the same place
    from the same guest bytes (those the translator looked at) and segments takes the
    host code already in the arena (NativeTier.made); changed bytes, or an override
    through a segment that is no longer flat, are translated again."""
    cpu = _cpu()
    try:
        tier = cpu.native
        cpu.set_seg_raw(4, 0x10, 0x2000, 0xFFFFFFFF, 0xC093)  # FS: flat, based
        code = bytes.fromhex("64 8b 03 83 c0 05") + b"\xf4"  # mov eax, fs:[ebx]; add; hlt
        cpu.ram[CODE : CODE + len(code)] = code
        cpu.ram[DATA + 0x2000 : DATA + 0x2004] = (7).to_bytes(4, "little")

        def run() -> int:
            cpu.eip, cpu.r[3] = CODE, DATA
            f = tier.translate(CODE, CODE)
            assert f is not None
            while f() == 0:
                pass
            return cpu.r[0]

        assert run() == 12 and tier.blocks == 1 and tier.reused == 0
        first = tier.made[(CODE, CODE)][4]
        cpu.ram[CODE + 0x800] = 0x90  # elsewhere in the page: not part of the block
        assert run() == 12 and tier.blocks == 1 and tier.reused == 1
        assert tier.made[(CODE, CODE)][4] == first
        cpu.ram[CODE + 5] = 0x06  # add eax, 6
        assert run() == 13 and tier.blocks == 2 and tier.reused == 1
        cpu.set_seg_raw(4, 0x10, 0x2000, 0xFFFF, 0xC093)  # FS: a limit, checked accesses
        # The override is left to Python now: not the block made before.
        assert tier._translate(CODE, CODE) is None and tier.reused == 1
        assert run() == 13 and tier.reused == 1  # mov in Python, the add translated
    finally:
        cpu.close()


@pytest.mark.parametrize("lead", range(0, 12, 3))
def test_a_block_past_the_first_read_is_translated_from_the_whole_page(lead, monkeypatch) -> None:
    """translate_block reads FIRST_READ bytes first and the rest of the page only where
    the scan came near their end: a block of 30 ten-byte MOVs (one straddling that end,
    at each of a few offsets) translates to what a read of the whole page gives."""
    page_left = 0x1000 - (CODE & 0xFFF)
    mov = bytes.fromhex("c7 83 10 00 00 00 78 56 34 12")  # mov dword [ebx + 0x10], imm32
    code = b"\x90" * lead + mov * 30 + b"\xf4"
    page = code + bytes(page_left - len(code))
    reads: list[int] = []

    def read(n: int) -> bytes:
        reads.append(n)
        return page[:n]

    native_translate.clear_caches()
    got = native_translate.translate_block(read, CODE, page_left)
    assert reads == [native_translate.FIRST_READ, page_left]
    monkeypatch.setattr(native_translate, "FIRST_READ", page_left)
    native_translate.clear_caches()
    assert native_translate.translate_block(read, CODE, page_left) == got
    assert got is not None and got[1] == lead + 30
