"""Instructions the native tier translates so that the Debian 686 boot leaves native code
less often (INVLPG, PUSH CS, the fences, PAUSE, AH..BH with memory): each one against
the Python tiers on the same program, and checked to run without leaving."""

from __future__ import annotations

import pytest
from tests.accel.flatcpu import flat32_cpu

from boite.accel.emu.arch import CS
from boite.accel.emu.native import NativeTier, native_available
from boite.accel.emu.native.state import EXIT_FALLBACK
from boite.accel.emu.native.translate import parse, translate_block

pytestmark = pytest.mark.skipif(not native_available(), reason="no native tier on this host")

CODE, DATA, OTHER = 0x1000, 0x4000, 0x9000
PD, PT = 0x80000, 0x81000


def _paged(native: bool):
    """Flat ring 0 with paging: an identity map of the first 1 MiB."""
    cpu = flat32_cpu()
    cpu.ram[PD : PD + 4] = (PT | 3).to_bytes(4, "little")
    for n in range(256):
        cpu.ram[PT + 4 * n : PT + 4 * n + 4] = (n << 12 | 3).to_bytes(4, "little")
    cpu.set_cr(3, PD)
    cpu.set_cr(0, 0x80000011)
    if native:
        cpu.native = NativeTier(cpu)
        cpu.native.profile = {}
    return cpu


def _loop(body: bytes) -> bytes:
    """body, then dec edi; jnz back to it; hlt."""
    return body + b"\x4f\x75" + bytes((0x100 - len(body) - 3,)) + b"\xf4"


_exits: list[int] = []


def _translated(body: bytes) -> int:
    """How many of the loop's instructions one native block covers."""
    code = _loop(body)
    out = translate_block(lambda n: code[:n], CODE, 0x1000 - (CODE & 0xFFF))
    return out[1] if out is not None else 0


def _run(body: bytes, native: bool, n: int, setup=None) -> tuple:
    """The loop of body run n times (EDI) to its HLT."""
    cpu = _paged(native)
    try:
        code = _loop(body)
        cpu.ram[CODE : CODE + len(code)] = code
        cpu.ram[DATA : DATA + 4] = (7).to_bytes(4, "little")
        cpu.ram[OTHER : OTHER + 4] = (9).to_bytes(4, "little")
        cpu.eip, cpu.r[3], cpu.r[4], cpu.r[7] = CODE, DATA, 0x8000, n
        if setup is not None:
            setup(cpu)
        while not cpu.halted:
            cpu.run(10000)
        out = (list(cpu.r), cpu.eip, cpu.get_flags() & 0x8D5, bytes(cpu.ram[:0x90000]))
        fallbacks = None
        if native:
            fallbacks = {eip: k for (why, eip), k in cpu.native.profile.items()
                         if why == EXIT_FALLBACK}  # fmt: skip
        # (and the EIPs of every exit, in `_exits`)
        _exits[:] = [eip for _, eip in cpu.native.profile] if native else []
        return out, fallbacks, cpu.native.blocks if native else 0
    finally:
        cpu.close()


# Each pass remaps DATA's page to the other frame, flushes it and reads it.
_REMAP = (
    b"\x81\x35" + (PT + 4 * (DATA >> 12)).to_bytes(4, "little")
    + (DATA ^ OTHER).to_bytes(4, "little")  # xor dword [pte], DATA ^ OTHER
    + b"\x0f\x01\x3b"  # invlpg [ebx]
    + b"\x31\xc0\xd7"  # xor eax, eax; xlatb: in Python, through the Python TLB
    + b"\x01\xc6"  # add esi, eax
    + b"\x03\x0b"  # add ecx, [ebx]: natively, through the native TLB
)  # fmt: skip


def test_invlpg_runs_natively_and_the_next_read_sees_the_new_mapping() -> None:
    """The Debian boot's fixmap loop: a PTE changed, INVLPG, the page read again, by
    translated code and by the Python tiers (which see the flush at the next exit)."""
    assert _translated(_REMAP) == 2  # xor, invlpg: it ends the block and chains on
    native, fallbacks, blocks = _run(_REMAP, True, 2000)
    exits = set(_exits)
    python, _, _ = _run(_REMAP, False, 2000)
    assert native == python
    assert blocks and not fallbacks and CODE + 10 not in exits  # never at INVLPG
    assert CODE + 15 in exits  # XLAT
    assert native[0][1] == native[0][6] == 16 * 1000


def test_invlpg_of_a_code_page_or_at_cpl3_leaves_for_python() -> None:
    code = b"\x0f\x01\x3d" + CODE.to_bytes(4, "little") + b"\x40"  # invlpg [CODE]
    native, fallbacks, blocks = _run(code, True, 3000)
    python, _, _ = _run(code, False, 3000)
    assert native == python and blocks
    assert fallbacks and set(fallbacks) == {CODE}


def test_invlpg_ring_fills_up_and_goes_on() -> None:
    """More INVLPGs in one entry than the ring holds: the one past it leaves, Python
    applies the ring and runs it, and the loop goes on natively."""
    code = (
        b"\x0f\x01\x3b"  # invlpg [ebx]
        + b"\x81\xc3\x00\x10\x00\x00"  # add ebx, 4096
        + b"\x81\xe3\xff\xff\x0f\x00"  # and ebx, 0xFFFFF
    )

    def warm(cpu) -> None:  # every page in the TLB first
        for n in range(256):
            if n != CODE >> 12:
                cpu.rd8(n << 12)

    native, fallbacks, _ = _run(code, True, 40000, warm)
    python, _, _ = _run(code, False, 40000, warm)
    assert native == python
    assert fallbacks and set(fallbacks) == {CODE}  # the ring full (and the code page)


def test_push_cs_pushes_the_current_selector_low_word_only() -> None:
    code = b"\x0e\x58"  # push cs; pop eax

    def stack(cpu) -> None:
        cpu.ram[0x8000 - 4 : 0x8000] = b"\xaa\xbb\xcc\xdd"

    def selector(cpu) -> None:  # another code segment's selector (Cpu.update_cs_key)
        stack(cpu)
        cpu.set_seg_raw(CS, 0x38, 0, 0xFFFFFFFF, 0xC09B)

    assert _translated(code) == 4
    for setup, sel in ((stack, 0x08), (selector, 0x38)):
        native, fallbacks, blocks = _run(code, True, 2000, setup)
        python, _, _ = _run(code, False, 2000, setup)
        assert native == python and blocks and not fallbacks
        assert native[0][0] == 0xDDCC0000 | sel  # the high word as it was


def test_fences_and_pause_are_translated() -> None:
    code = b"\x0f\xae\xe8\x0f\xae\xf0\x0f\xae\xf8\xf3\x90\x40"
    for at in (0, 3, 6, 9):
        assert parse(code[at:], CODE + at) is not None
    assert parse(b"\x66\x0f\xae\xe8", CODE) is not None  # parsed; refused when built
    assert _translated(code) == 7
    native, fallbacks, blocks = _run(code, True, 2000)
    python, _, _ = _run(code, False, 2000)
    assert native == python and blocks and not fallbacks


@pytest.mark.parametrize("op", [0x8A, 0x88, 0x02, 0x00, 0x38, 0x3A, 0x84, 0x30])
def test_high_byte_registers_with_memory(op: int) -> None:
    """mov ch, [ebp - 0x12] (the Debian boot's 8a 6d ee) and the ALU forms with AH..BH
    and a memory operand: through a host stack slot, flags and memory as the closures."""
    # op [ebp - 0x12], ch; op [ebx + 1], bh (or the reverse direction); inc eax
    body = bytes((op, 0x6D, 0xEE, op, 0x7B, 0x01)) + b"\x40"

    def regs(cpu) -> None:
        cpu.ram[DATA : DATA + 0x20] = bytes(range(0x80, 0xA0))
        cpu.r[1], cpu.r[5] = 0x1234A5C3, DATA + 0x20
        cpu.r[3] = DATA | 0x5A00  # BH: 0x5A; [ebx + 1] in a page of its own

    assert _translated(body) == 5
    native, fallbacks, blocks = _run(body, True, 200, regs)
    python, _, _ = _run(body, False, 200, regs)
    assert native == python and blocks and not fallbacks


GDT = 0x6000
# Linux's sync_core: pushfd; push cs; call over a jmp that skips the iret; iret
_SYNC_CORE = b"\x9c\x0e\xe8\x02\x00\x00\x00\xeb\x01\xcf"


def _gdt(cpu) -> None:
    descs = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)  # flat code and data, accessed
    cpu.ram[GDT : GDT + 24] = b"".join(d.to_bytes(8, "little") for d in descs)
    cpu.gdt_base, cpu.gdt_limit = GDT, 0x17
    cpu.set_seg_raw(CS, 0x08, 0, 0xFFFFFFFF, 0xC09B)


@pytest.mark.parametrize("flip", [b"", b"\x80\x34\x24\xd5", b"\x80\x74\x24\x01\x04"])
def test_iret_to_the_same_cs_runs_natively(flip: bytes) -> None:
    """The same CS at CPL 0, the flags as pushed (or arithmetic flags flipped): native
    after the first one (which sets the A bits of the GDT page's PDE/PTE); DF flipped:
    every one leaves for Python, which runs it."""
    body = _SYNC_CORE[:1] + flip + _SYNC_CORE[1:] + b"\x40"
    at = CODE + len(flip) + 9  # the IRET
    native, fallbacks, blocks = _run(body, True, 500, _gdt)
    python, _, _ = _run(body, False, 500, _gdt)
    assert native == python and native[0][0] == 500 and blocks
    if flip[-1:] == b"\x04":  # DF
        assert fallbacks[at] >= 500  # (each: maybe again from a block at the IRET)
    else:
        # The first only: Python's IRET sets the A bits of the GDT page's PDE/PTE.
        assert fallbacks.get(at, 0) <= 1


def test_iret_after_the_descriptor_changed_reloads_it_in_python() -> None:
    """The guest flips the AVL bit of its CS descriptor before each IRET: the cache no
    longer comes from that descriptor, so Python's reload (not the native IRET) runs."""
    body = b"\x80\x35" + (GDT + 14).to_bytes(4, "little") + b"\x10" + _SYNC_CORE + b"\x40"
    out = []
    for native in (True, False):
        cpu = _paged(native)
        try:
            code = _loop(body)
            cpu.ram[CODE : CODE + len(code)] = code
            cpu.eip, cpu.r[4], cpu.r[7] = CODE, 0x8000, 301
            _gdt(cpu)
            while not cpu.halted:
                cpu.run(10000)
            out.append((list(cpu.r), cpu.eip, cpu.sattr[CS], bytes(cpu.ram[GDT : GDT + 24])))
        finally:
            cpu.close()
    assert out[0] == out[1] and out[0][2] == 0xD09B  # 301 flips: AVL set in the cache
