"""Instructions that straddle into a page the guest has not mapped yet (demand paging).

Linux maps pages on first touch: when the tail of an instruction lies on a not-present
page, the fetch faults, the kernel maps the page and returns, and the instruction must
then run. The translated tier once cached the block holding the fetch's fault, so the
guest faulted at the same EIP forever (Debian's python3 hung in its first obmalloc arena
under a kernel-less harness, tests/guests/usermode.py). Both tiers, and the block
compiler from the first execution, must run the instruction once the page is mapped.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from boite.accel.emu import EmuAccelerator
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from guests import boot

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")

CODE = 0x100000
TAIL = 0x102000  # the page the straddling instruction's tail lies on: not present at first
IDT, HANDLER, PD, PT, CNT = 0x3000, 0x180000, 0x20000, 0x21000, 0x181000
PASSES = 20


def _image(tmp_path, src: str) -> bytes:
    (tmp_path / "p.asm").write_text(src)
    subprocess.run(["nasm", "-f", "bin", "-o", str(tmp_path / "p.bin"), str(tmp_path / "p.asm")],
                   check=True)  # fmt: skip
    return (tmp_path / "p.bin").read_bytes()


def _program(straddle: str, lead: bool) -> str:
    """A loop of 20 passes that jumps to `straddle`, which starts on the last byte of the
    page before TAIL (so a block starts with it). TAIL is unmapped again before every
    pass; the #PF handler counts, maps it back and returns. With `lead`, the block starts
    three bytes earlier, with an instruction of its own."""
    pte = PT + (TAIL >> 12) * 4
    return f"""bits 32
org {CODE:#x}
    mov ebp, {PASSES}
top:
    inc ecx
    mov dword [{pte:#x}], 0
    invlpg [{TAIL:#x}]
    jmp near {"lead" if lead else "straddle"}
    times {TAIL - CODE - 4} - ($ - $$) db 0x90
lead:
    add esi, byte 0
straddle:
    {straddle}
    add edi, eax
    dec ebp
    jnz top
    hlt
"""


def _handler() -> bytes:
    pte = PT + (TAIL >> 12) * 4
    # inc dword [CNT]; mov dword [pte], TAIL|3; add esp, 4; iret
    return (
        b"\xff\x05" + CNT.to_bytes(4, "little")
        + b"\xc7\x05" + pte.to_bytes(4, "little") + (TAIL | 3).to_bytes(4, "little")
        + b"\x83\xc4\x04\xcf"
    )  # fmt: skip


def _run(image: bytes, translate: bool, hot: int) -> tuple[int, int, int, int]:
    mem = GuestMemory.with_ram(4 << 20)
    m = Machine(mem)
    mem.write(CODE, image)
    mem.write(HANDLER, _handler())
    for v in range(32):
        h = HANDLER if v == 14 else HANDLER + 0x100  # any other vector: HLT
        mem.write_u64(IDT + 8 * v, (h & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((h >> 16) << 48))
    mem.write(HANDLER + 0x100, b"\xf4")
    st = boot.flat32(mem, CODE)
    st.idt.base, st.idt.limit = IDT, 32 * 8 - 1
    mem.write_u32(PD, PT | 3)
    for i in range(1024):
        mem.write_u32(PT + 4 * i, (i << 12) | 3)
    st.cr3, st.cr0 = PD, st.cr0 | boot.CR0_PG
    m.boot_state = [st]
    acc = EmuAccelerator(translate=translate, hot_block=hot)
    acc.create(m)
    cpu = acc.cpu
    try:
        # A bounded run (not acc.run()): the bug this catches faults forever.
        for _ in range(20):
            cpu.run(5_000)
            if cpu.halted:
                break
        assert cpu.halted, f"no HLT: stuck at {cpu.eip:#x} after {mem.read_u32(CNT)} #PFs"
        return cpu.eip, cpu.r[1], cpu.r[7], mem.read_u32(CNT)
    finally:
        acc.close()


@pytest.mark.parametrize(
    "straddle",
    ["mov eax, 0x11223344", "add eax, dword [esi+0x1234]", "fld1\n    fstp st0"],
)
@pytest.mark.parametrize("lead", [False, True], ids=["first", "after-another"])
def test_instruction_straddling_into_a_page_mapped_on_demand(tmp_path, straddle, lead):
    image = _image(tmp_path, _program(straddle, lead))
    ref = _run(image, translate=False, hot=1)
    assert ref[0] == CODE + image.index(b"\xf4", TAIL - CODE) + 1  # reached the final HLT
    assert ref[1] == PASSES and ref[3] == PASSES  # each pass's tail fetch faulted once
    for hot in (1, 5):
        assert _run(image, translate=True, hot=hot) == ref, f"hot {hot}"
