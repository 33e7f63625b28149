"""The decoder's reuse of a page-straddling instruction's block (decode/core.py
_keep_straddler): such a block is never cached, so it is asked for again each time it
runs; the decoder hands back the closures of the last decode only while both pages
still hold the same bytes and the second is at the same frame in the execute TLB."""

from __future__ import annotations

from flatcpu import flat32_cpu

START = 0x1FFE  # MOV EAX, imm32 (5 bytes): opcode and one byte on one page, three on the next


def _cpu_at_straddler(imm: int):
    cpu = flat32_cpu()
    cpu.ram[START : START + 6] = bytes([0xB8, *imm.to_bytes(4, "little"), 0xF4])  # ...; HLT
    return cpu


def _run_straddler(cpu) -> int:
    cpu.eip = START
    cpu.halted = False
    cpu.run(10)
    assert cpu.halted and cpu.eip == START + 6
    return cpu.r[0]


def test_straddling_block_reused_while_its_bytes_stay() -> None:
    cpu = _cpu_at_straddler(0x11223344)
    assert _run_straddler(cpu) == 0x11223344
    first = cpu.decoder.translate_block(START, START)
    again = cpu.decoder.translate_block(START, START)
    assert not first.cacheable and not again.cacheable
    assert again.fns is first.fns  # the same closures, not a second decode
    assert _run_straddler(cpu) == 0x11223344


def test_straddling_block_decoded_again_when_either_page_changes() -> None:
    cpu = _cpu_at_straddler(0x11223344)
    assert _run_straddler(cpu) == 0x11223344
    cpu.wr8(0x2001, 0x99)  # the immediate's third byte, on the second page
    assert _run_straddler(cpu) == 0x11993344
    cpu.wr8(0x1FFF, 0x55)  # its first byte, on the first page
    assert _run_straddler(cpu) == 0x11993355
    cpu.ram[0x2002] = 0x77  # behind the emulator's back too: the bytes are compared
    assert _run_straddler(cpu) == 0x77993355


def test_straddling_block_decoded_again_when_the_second_page_moves() -> None:
    cpu = _cpu_at_straddler(0x11223344)
    assert _run_straddler(cpu) == 0x11223344
    cpu.ram[0x5000:0x5004] = bytes([0xAA, 0xBB, 0xCC, 0xF4])  # another frame, next page
    cpu.xtlb[0x2] = 0x5000
    assert _run_straddler(cpu) == 0xCCBBAA44
