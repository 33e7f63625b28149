"""The opcode table (accel/emu/optable.py) against the code that implements it.

The table's columns are claims about the closures: these tests hold them to it. Each row
that can run on registers alone is executed through its closure from random registers
and random flags; the arithmetic flags it changes must be among those it says it writes
or leaves undefined, and flipping the flags it does not read must not change its result.
Structure: keys are unique, every named decoder/emitter method exists, the decoder's
dispatch, block ends and LOCK rules come from the rows.
"""

from __future__ import annotations

import random

import pytest
from flatcpu import flat32_cpu

from boite.accel.emu.arch import ARITH, DF, CpuFault
from boite.accel.emu.cpu import Cpu
from boite.accel.emu.decode import Decoder
from boite.accel.emu.jit import Emitter
from boite.accel.emu.native.translate import Translator
from boite.accel.emu.optable import (
    BY_OPCODE,
    ROWS,
    Op,
    end_regs,
    has_modrm,
    imm_bytes,
    lock_regs,
    lookup,
    operands_of,
)

CODE = 0x1000
STACK = 0x8000


def test_keys_are_unique_and_methods_exist() -> None:
    keys = [(r.map, r.code, r.ext, r.prefix) for r in ROWS]
    assert len(keys) == len(set(keys))
    for r in ROWS:
        assert callable(getattr(Decoder, r.decode, None)), r
        if r.jit is not None:
            assert callable(getattr(Emitter, r.jit, None)), r
        if r.native is not None:
            assert callable(getattr(Translator, r.native, None)), r
        # A row for the whole opcode and rows for its extensions do not mix.
        rows = BY_OPCODE[(r.map, r.code)]
        assert all((x.ext is None) == (r.ext is None) for x in rows), r
        assert r.privilege in ("", "cpl0", "iopl", "io", "pm", "tsd", "pce"), r


def test_lookup_and_masks() -> None:
    assert lookup("", 0x01).mnemonic == "ADD"
    assert lookup("", 0xF7, 0xF0).mnemonic == "DIV"  # ModRM reg 6
    assert lookup("0F", 0xC7, 0x08).mnemonic == "CMPXCHG8B"
    assert lookup("0F", 0xC7, 0x00) is None
    assert end_regs("", 0xFF) == 0b111100  # CALL/CALLF/JMP/JMPF end a block, INC/DEC/PUSH not
    assert end_regs("", 0xEB) == 0xFF and end_regs("", 0x01) == 0
    assert lock_regs("", 0x80) == 0x7F  # not CMP
    assert lock_regs("", 0x8B) is None


_IMM = {"Ib": 1, "Iw": 2, "Iz": 4, "Iv": 4}
# Rows run on registers only: not control flow, privileged, I/O, memory-only or random.
_SKIP = {"_string", "_fpu", "_les", "_bound", "_enter", "_pusha", "_grp9", "_bcd", "_arpl",
         "_larlsl", "_mov_sreg", "_pop_seg", "_push_seg", "_nop_rm", "_lea", "_misc1"}  # fmt: skip


def _runnable(r: Op) -> bool:
    return not r.ends_block and not r.privilege and r.decode not in _SKIP and r.prefix is None


def _encode(r: Op, rnd: random.Random) -> bytes:
    out = bytes([0x0F, r.code]) if r.map == "0F" else bytes([r.code])
    ops = operands_of(r)
    if any(o[0] in "EGM" for o in ops):
        reg = r.ext if r.ext is not None else rnd.randrange(8)
        out += bytes([0xC0 | reg << 3 | rnd.choice((0, 1, 2, 3, 5, 6, 7))])  # never ESP
    for o in ops:
        if o in _IMM:
            out += rnd.randbytes(_IMM[o])
    return out


def test_operand_forms_give_the_decoders_lengths() -> None:
    """The operand column says how long an encoding is (the native tier parses with
    it): for every row, ModRM (register and [disp32] forms) + immediates, as the SDM
    notation gives them, must be what the decoder consumes."""
    cpu = flat32_cpu()
    try:
        for r in ROWS:
            if r.prefix is not None or r.decode in ("_fpu", "_enter", "_string", "_io"):
                continue
            if r.operands == "simd":  # SSE rows whose forms the table does not spell out
                continue
            head = bytes([0x0F, r.code]) if r.map == "0F" else bytes([r.code])
            reg = r.ext if r.ext is not None else 0
            forms = [b""]
            if has_modrm(r):
                forms = [bytes([0xC0 | reg << 3 | 1])]
                if not any(o[:1] == "R" for o in r.operands.split(",")):  # Rd: mod is ignored
                    forms.append(bytes([reg << 3 | 5]) + b"\x00\x10\0\0")
            imm = imm_bytes(r, False)
            for modrm in forms:
                code = head + modrm + bytes(imm)
                cpu.ram[CODE : CODE + 32] = code + b"\x90" * (32 - len(code))
                fn, n, _ = cpu.decoder.decode(CODE)
                if fn.__name__ in ("_ud", "ud", "fault"):
                    continue  # a form this opcode does not have (a register LEA, ...)
                assert n == len(code), f"{r}: decoder takes {n} bytes, the table {len(code)}"
    finally:
        cpu.close()


def _run(cpu: Cpu, code: bytes, regs: list[int], fl: int) -> tuple[list[int], int] | None:
    cpu.ram[CODE : CODE + len(code) + 8] = code + b"\x90" * 8
    cpu.blocks.clear()
    cpu.r[:] = regs
    cpu.r[4] = STACK
    cpu.set_flags(fl)
    cpu.eip = CODE
    fn, _, _ = cpu.decoder.decode(CODE)
    try:
        fn()
    except CpuFault:
        return None
    return list(cpu.r), cpu.get_flags()


@pytest.mark.parametrize(
    "row",
    [r for r in ROWS if _runnable(r)],
    ids=lambda r: f"{r.map}{r.code:02x}{'' if r.ext is None else '/' + str(r.ext)}-{r.mnemonic}",
)  # noqa: E501
def test_flag_columns_match_the_closure(row: Op) -> None:
    rnd = random.Random(f"{row.map}{row.code}{row.ext}")
    cpu = flat32_cpu()
    try:
        for _ in range(40):
            code = _encode(row, rnd)
            regs = [
                rnd.choice((0, 1, 0x7F, 0x80, 0xFFFFFFFF, rnd.getrandbits(32))) for _ in range(8)
            ]
            fl = rnd.getrandbits(32) & (ARITH | DF)
            got = _run(cpu, code, regs, fl)
            if got is None:
                continue  # #DE, a #UD form
            _, after = got
            may = row.flags_written | row.flags_undefined
            assert (fl ^ after) & (ARITH | DF) & ~may == 0, (
                f"{code.hex()} changed flags it does not write"
            )
            # The flags it does not read cannot change what it computes.
            flip = rnd.getrandbits(32) & (ARITH | DF) & ~row.flags_read
            again = _run(cpu, code, regs, fl ^ flip)
            assert again is not None
            defined = row.flags_written & ~row.flags_undefined
            assert again[0] == got[0], f"{code.hex()}: result depends on flags it does not read"
            assert again[1] & defined == after & defined, (
                f"{code.hex()}: flags depend on unread ones"
            )
    finally:
        cpu.close()


def test_decoder_dispatch_comes_from_the_table() -> None:
    cpu = flat32_cpu()
    try:
        d = cpu.decoder
        for (map_, code), rows in BY_OPCODE.items():
            ops = d.ops0f if map_ == "0F" else d.ops
            names = {r.decode for r in rows}
            if len(names) == 1:
                assert ops[code].__name__ == names.pop()
        # Undefined opcodes are #UD and end the block.
        assert d.ops0f[0xFF].__name__ == "_ud"
    finally:
        cpu.close()
