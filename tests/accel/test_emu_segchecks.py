"""Segment limit and rights checks on every memory access (Intel SDM vol. 3, 5.3 and 5.4):
each rule on the interpreter, the block translator and (for loops that get hot) the
block compiler. A loop walks an offset in EBX towards a limit, so the access faults on
a known iteration, after its block has been compiled; rights faults come on the first
access. The real CPU (KVM) checks the same rules in test_emu_kvm_diff.py and in the
parity/segchecks boot test.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from boite.accel.emu.arch import GP, SEGCHK, SS_VEC
from boite.accel.emu.cpu import Cpu
from boite.machine.memory import GuestMemory

pytestmark = pytest.mark.emu_tiers  # both tiers (tests/conftest.py)

CODE = 0x100000
GDT = 0x1000
IDT = 0x3000
HANDLERS = 0x180000  # vector v: HLT at HANDLERS + 16 * v
STACK = 0x80000
NO_FAULT = -1

# Descriptors (selector: raw 8 bytes). Base 0 everywhere, so offsets are linear addresses.
DESC = {
    0x08: 0x00CF9B000000FFFF,  # flat 32-bit code, readable
    0x10: 0x00CF93000000FFFF,  # flat data
    0x18: 0x00CF91000000FFFF,  # flat read-only data
    0x20: 0x0040930000000FFF,  # data, byte-granular limit 0xfff
    0x28: 0x00C0930000000001,  # data, G=1 limit 1 -> 0x1fff
    0x30: 0x0040970000000FFF,  # expand-down 32-bit (B=1), limit 0xfff: 0x1000..4G-1
    0x38: 0x0000970000000FFF,  # expand-down 16-bit (B=0), limit 0xfff: 0x1000..0xffff
    0x40: 0x00CF99000000FFFF,  # flat 32-bit code, execute-only
    0x48: 0x000F93000000FFFF,  # 16-bit data, byte-granular limit 0xfffff (for unreal mode)
    0x50: 0x00409B100100000F,  # 32-bit code at CODE + 0x100, limit 0xf
    0x58: 0x00409B100100FFFF,  # the same code, limit 0xffff
}


def _nasm(src: str, tmp: Path, name: str) -> bytes:
    s = tmp / f"{name}.asm"
    out = tmp / f"{name}.bin"
    s.write_text(src)
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(s)], check=True)
    return out.read_bytes()


@dataclass
class Case:
    name: str
    setup: str  # runs once (segment loads)
    access: str  # the instruction(s) under test, at the loop top; EBX is the offset
    ebx0: int
    stride: int
    fault_at: int  # iteration that faults, NO_FAULT when the loop finishes
    vector: int = GP
    iters: int = 8
    regs: dict[str, int] = field(default_factory=dict)


def _pm_source(case: Case) -> str:
    regs = "\n".join(f"    mov {r}, {v:#x}" for r, v in case.regs.items())
    return f"""bits 32
org {CODE:#x}
    jmp short start
    align 4, db 0
access_addr: dd access
start:
{case.setup}
{regs}
    mov ebx, {case.ebx0 & 0xFFFFFFFF:#x}
    mov ebp, {case.iters}
access:
    {case.access}
    add ebx, {case.stride}
    dec ebp
    jnz access
    hlt
"""


def _protected_cpu(image: bytes, translate: bool) -> Cpu:
    mem = GuestMemory.with_ram(4 << 20)
    for sel, d in DESC.items():
        mem.write_u64(GDT + sel, d)
    for v in range(32):
        h = HANDLERS + 16 * v
        mem.write(h, b"\xf4")
        mem.write_u64(IDT + 8 * v, (h & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((h >> 16) << 48))
    mem.write(CODE, image)
    cpu = Cpu(mem, translate=translate)
    cpu.hot_block = 2  # the loops get compiled after two runs
    cpu.gdt_base, cpu.gdt_limit = GDT, 0x5F
    cpu.idt_base, cpu.idt_limit = IDT, 32 * 8 - 1
    cpu.set_cr(0, 0x11)
    cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF, 0xC09B)
    for i in (0, 2, 3, 4, 5):
        cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    cpu.r[4] = STACK
    cpu.eip = CODE
    cpu.tlb_switch()
    return cpu


def _run(cpu: Cpu, handlers: int = HANDLERS) -> int:
    """Run to a HLT; the vector whose handler (16 bytes each from `handlers`) halted, or
    NO_FAULT."""
    for _ in range(200):
        cpu.run(1000)
        if cpu.halted:
            break
    assert cpu.halted
    at = cpu.eip - 1
    if handlers <= at < handlers + 16 * 32:
        return (at - handlers) // 16
    return NO_FAULT


def _rd32(cpu: Cpu, a: int) -> int:
    return int.from_bytes(cpu.ram[a : a + 4], "little")


LIM = "    mov ax, 0x20\n    mov {s}, ax"
CASES = [
    # Read-only data: reads work, writes (and read-modify-writes) are #GP(0).
    Case("ro-read", "    mov ax, 0x18\n    mov ds, ax", "mov eax, [ebx]", 0x200000, 4, NO_FAULT),
    Case("ro-write", "    mov ax, 0x18\n    mov ds, ax", "mov dword [ebx], 1", 0x200000, 4, 0),
    Case("ro-rmw", "    mov ax, 0x18\n    mov ds, ax", "add [ebx], eax", 0x200000, 4, 0),
    Case("ro-setcc", "    mov ax, 0x18\n    mov es, ax", "sete [es:ebx]", 0x200000, 1, 0),
    Case("ro-xchg", "    mov ax, 0x18\n    mov ds, ax", "xchg [ebx], eax", 0x200000, 4, 0),
    Case("ro-moffs", "    mov ax, 0x18\n    mov ds, ax", "mov [0x200000], eax", 0, 0, 0),
    Case("ro-stos", "    mov ax, 0x18\n    mov es, ax", "mov edi, ebx\n    stosd", 0x200000, 4, 0),
    Case("ro-sgdt", "    mov ax, 0x18\n    mov ds, ax", "sgdt [ebx]", 0x200000, 8, 0),
    Case("ro-cmpxchg8b", "    mov ax, 0x18\n    mov ds, ax", "cmpxchg8b [ebx]", 0x200000, 8, 0),
    Case("ro-bts", "    mov ax, 0x18\n    mov ds, ax", "bts dword [ebx], 3", 0x200000, 4, 0),
    Case("ro-read-bt", "    mov ax, 0x18\n    mov ds, ax", "bt dword [ebx], 3", 0x200000, 4, -1),
    # Byte-granular limit 0xfff: the last byte of the access counts.
    Case("limit-dword", LIM.format(s="ds"), "mov eax, [ebx]", 0xFE1, 4, 7),
    Case("limit-dword-ok", LIM.format(s="ds"), "mov eax, [ebx]", 0xFE0, 4, NO_FAULT),
    Case("limit-byte-ok", LIM.format(s="ds"), "mov al, [ebx]", 0xFF8, 1, NO_FAULT),
    Case("limit-word", LIM.format(s="ds"), "mov ax, [ebx]", 0xFF9, 1, 6),
    Case("limit-store", LIM.format(s="ds"), "mov [ebx], eax", 0xFE1, 4, 7),
    Case("limit-rmw", LIM.format(s="ds"), "inc dword [ebx]", 0xFE1, 4, 7),
    Case("limit-fs", LIM.format(s="fs"), "mov eax, [fs:ebx]", 0xFE1, 4, 7),
    Case("limit-gs-store", LIM.format(s="gs"), "mov [gs:ebx], al", 0xFF9, 1, 7),
    Case("limit-es-cmp", LIM.format(s="es"), "cmp [es:ebx], ecx", 0xFE1, 4, 7),
    Case("limit-movzx", LIM.format(s="ds"), "movzx eax, word [ebx]", 0xFF9, 1, 6),
    Case("limit-push-mem", LIM.format(s="ds"), "push dword [ebx]\n    pop eax", 0xFE1, 4, 7),
    Case("limit-pop-mem", LIM.format(s="ds"), "push eax\n    pop dword [ebx]", 0xFE1, 4, 7),
    Case("limit-lods", LIM.format(s="ds"), "mov esi, ebx\n    lodsd", 0xFE1, 4, 7),
    Case("limit-movs-src", LIM.format(s="ds"), "mov esi, ebx\n    mov edi, 0x200000\n    movsd",
         0xFE1, 4, 7),
    Case("limit-movs-dst", LIM.format(s="es"), "mov edi, ebx\n    mov esi, 0x200000\n    movsd",
         0xFE1, 4, 7),
    Case("limit-scas", LIM.format(s="es"), "mov edi, ebx\n    scasw", 0xFF9, 1, 6),
    Case("limit-xlat", LIM.format(s="ds"), "mov eax, 0\n    xlatb", 0xFF8, 1, NO_FAULT),
    Case("limit-xlat-over", LIM.format(s="ds"), "mov eax, 8\n    xlatb", 0xFF1, 1, 7),
    Case("limit-les", LIM.format(s="ds"), "les eax, [ebx]", 0xFF9, 1, 2),
    Case("limit-bound", LIM.format(s="ds"), "bound eax, [ebx]", 0xFF9, 1, 0, GP, 8,
         {"eax": 0}),
    Case("limit-cmpxchg8b", LIM.format(s="ds"), "cmpxchg8b [ebx]", 0xFF2, 1, 7),
    Case("limit-lgdt", LIM.format(s="ds"), "lgdt [ebx]", 0xFFB, 1, 0),
    Case("limit-bt-offset", LIM.format(s="ds"), "mov eax, 1024\n    bt [ebx], eax", 0xF61, 4, 7),
    Case("limit-moffs", LIM.format(s="ds"), "mov eax, [0xffd]", 0, 0, 0),
    # G=1: limit 1 covers 0..0x1fff.
    Case("g1-limit", "    mov ax, 0x28\n    mov ds, ax", "mov eax, [ebx]", 0x1FE1, 4, 7),
    Case("g1-limit-ok", "    mov ax, 0x28\n    mov ds, ax", "mov eax, [ebx]", 0x1FE0, 4, NO_FAULT),
    # Expand-down: valid offsets are above the limit, up to 0xffff or 0xffffffff (B bit).
    Case("down32-low", "    mov ax, 0x30\n    mov ds, ax", "mov eax, [ebx]", 0x1018, -4, 7),
    Case("down32-top-ok", "    mov ax, 0x30\n    mov ds, ax", "mov eax, [ebx]", 0xFFFFFFE0, 4, -1),
    Case("down32-top", "    mov ax, 0x30\n    mov ds, ax", "mov eax, [ebx]", 0xFFFFFFE1, 4, 7),
    Case("down16-top", "    mov ax, 0x38\n    mov ds, ax", "mov eax, [ebx]", 0xFFE1, 4, 7),
    Case("down16-low", "    mov ax, 0x38\n    mov ds, ax", "mov al, [ebx]", 0x1003, -1, 4),
    # Null selectors load fine in DS/ES/FS/GS; the access is #GP(0).
    Case("null-ds", "    xor eax, eax\n    mov ds, ax", "mov eax, [ebx]", 0x200000, 4, 0),
    Case("null-fs", "    xor eax, eax\n    mov fs, ax", "mov [fs:ebx], eax", 0x200000, 4, 0),
    Case("null-es-movs", "    xor eax, eax\n    mov es, ax",
         "mov esi, ebx\n    mov edi, ebx\n    movsb", 0x200000, 1, 0),
    # SS: #SS(0), whether through the stack instructions or SS-based addressing.
    Case("ss-prefix", LIM.format(s="ss") + "\n    mov esp, 0x800", "mov eax, [ss:ebx]",
         0xFE1, 4, 7, SS_VEC),
    Case("ss-ebp-base", LIM.format(s="ss") + "\n    mov esp, 0x800",
         "mov ecx, ebp\n    mov ebp, ebx\n    mov eax, [ebp]\n    mov ebp, ecx",
         0xFE1, 4, 7, SS_VEC),
    Case("ss-pop", LIM.format(s="ss"), "mov esp, ebx\n    pop eax", 0xFE1, 4, 7, SS_VEC),
    Case("ss-ret", LIM.format(s="ss"), "mov dword [ebx], .r\n    mov esp, ebx\n    ret\n.r:",
         0xFE1, 4, 7, SS_VEC),
    Case("ss-leave", LIM.format(s="ss") + "\n    mov esp, 0x800",
         "mov ecx, ebp\n    mov ebp, ebx\n    leave\n    mov ebp, ecx\n    mov esp, 0x800",
         0xFE1, 4, 7, SS_VEC),
    Case("ss-enter", LIM.format(s="ss"), "mov esp, 0x40\n    enter 0x80, 0", 0, 0, 0, SS_VEC),
    Case("ss-pop-es", LIM.format(s="ss"), "mov esp, ebx\n    push es\n    pop es\n    pop es",
         0xFF0, 2, 7, SS_VEC),
    # CS: never writable; readable only when the code segment has R.
    Case("cs-read", "", "mov eax, [cs:ebx]", 0x200000, 4, NO_FAULT),
    Case("cs-write", "", "mov [cs:ebx], eax", 0x200000, 4, 0),
    Case("cs-rmw", "", "not dword [cs:ebx]", 0x200000, 4, 0),
    Case("cs-exec-only", "    jmp 0x40:.x\n.x:", "mov eax, [cs:ebx]", 0x200000, 4, 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("segchk")
    return {c.name: _nasm(_pm_source(c), tmp, c.name) for c in CASES}


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_protected_mode_rule(images, case: Case, translate: bool) -> None:
    cpu = _protected_cpu(images[case.name], translate)
    vec = _run(cpu)
    access = _rd32(cpu, CODE + 4)
    if case.fault_at == NO_FAULT:
        assert vec == NO_FAULT, f"vector {vec}, EBX={cpu.r[3]:#x}"
        return
    assert vec == case.vector, f"vector {vec} (want {case.vector}), EBX={cpu.r[3]:#x}"
    esp = cpu.r[4]
    error, eip = _rd32(cpu, esp), _rd32(cpu, esp + 4)
    assert error == 0
    # It faulted on the expected iteration, at the instruction under test (restartable).
    assert cpu.r[3] == (case.ebx0 + case.stride * case.fault_at) & 0xFFFFFFFF
    assert access <= eip < access + 48


def test_block_compiler_ran_the_hot_loops(images) -> None:
    """The limit loops above fault in a compiled block (the block ran hot first), with
    SEGCHK set for DS limits (nothing inlined) and clear for an FS limit."""
    for name, segchk in (("limit-dword", True), ("limit-fs", False)):
        cpu = _protected_cpu(images[name], True)
        assert _run(cpu) == GP
        assert bool(cpu.mode_key & SEGCHK) is segchk
        assert any(b.fn is not None for b in cpu.blocks.values()), name


def test_rep_stos_stops_at_the_limit_with_partial_progress(tmp_path) -> None:
    src = f"""bits 32
org {CODE:#x}
    mov dword [0x1000], 0x5a5a5a5a
    mov ax, 0x20
    mov es, ax
    mov edi, 0xff0
    mov ecx, 8
    mov eax, 0x11223344
    cld
    rep stosd
    hlt
"""
    image = _nasm(src, tmp_path, "repstos")
    for translate in (False, True):
        cpu = _protected_cpu(image, translate)
        assert _run(cpu) == GP
        assert cpu.r[1] == 4 and cpu.r[7] == 0x1000  # four dwords stored, then the fault
        assert _rd32(cpu, 0xFFC) == 0x11223344 and _rd32(cpu, 0x1000) == 0x5A5A5A5A


def test_rep_movs_stops_at_the_source_limit(tmp_path) -> None:
    src = f"""bits 32
org {CODE:#x}
    mov ax, 0x20
    mov ds, ax
    mov esi, 0xff8
    mov edi, 0x200000
    mov ecx, 16
    cld
    rep movsb
    hlt
"""
    image = _nasm(src, tmp_path, "repmovs")
    for translate in (False, True):
        cpu = _protected_cpu(image, translate)
        assert _run(cpu) == GP
        assert cpu.r[1] == 8 and cpu.r[6] == 0x1000 and cpu.r[7] == 0x200008


def test_flat_segments_keep_the_fast_mode() -> None:
    cpu = _protected_cpu(b"\xf4", True)
    assert not cpu.mode_key & SEGCHK and cpu.stack_fast
    cpu.load_seg(4, 0)  # a null FS (Linux user space) does not leave the fast mode
    assert not cpu.mode_key & SEGCHK
    cpu.load_seg(3, 0)  # a null DS does
    assert cpu.mode_key & SEGCHK


def test_gs_flatness_keys_only_the_blocks_that_name_gs(tmp_path) -> None:
    """Loops compiled while GS is flat: after GS gets a 4 KiB limit, the one that reads
    through GS must fault (its inlined access assumed a flat GS), the one that never
    names GS keeps its compiled block (Linux runs its kernel under every process's GS)."""
    src = f"""bits 32
org {CODE:#x}
    mov esi, 2
again:
    mov ebx, 0x2000
    mov ecx, 8
plain:
    add eax, [ebx]
    dec ecx
    jnz plain
    mov ecx, 8
via_gs:
    add eax, [gs:ebx]
    dec ecx
    jnz via_gs
    mov ax, 0x20
    mov gs, ax
    dec esi
    jnz again
    hlt
"""
    image = _nasm(src, tmp_path, "gskey")
    plain = CODE + image.index(b"\x03\x03\x49")  # add eax, [ebx]; dec ecx
    cpu = _protected_cpu(image, True)
    seen: dict[int, Any] = {}

    def translate_block(pa: int, eip: int, real=cpu.decoder.translate_block):
        b = real(pa, eip)
        if eip in seen:
            seen[eip] = None  # translated twice
        else:
            seen.setdefault(eip, b)
        return b

    cpu.decoder.translate_block = translate_block  # type: ignore[method-assign]
    assert _run(cpu) == GP
    assert cpu.sel[5] == 0x20 and cpu.r[6] == 1  # in the second pass, through GS
    assert seen[plain] is not None, "the loop without GS was translated again"
    assert seen[plain].fn is not None  # and it ran compiled


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
def test_fetch_past_the_cs_limit(tmp_path, translate: bool) -> None:
    """Instruction fetch is checked against the CS limit: the instruction whose last byte
    lies past it is #GP(0), the ones before it ran. The same code reached first through
    a CS with a larger limit (same base) must not be reused from the block cache."""
    src = f"""bits 32
org {CODE:#x}
    call 0x58:0
    cmp edx, 4
    jne fail
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    jmp 0x50:0
fail:
    hlt
times 0x100 - ($ - $$) db 0x90
    mov eax, 1        ; offsets 0..4
    mov ebx, 2        ; 5..9
    mov ecx, 3        ; 10..14
    mov edx, 4        ; 15..19: past the limit 0xf
    retf
"""
    cpu = _protected_cpu(_nasm(src, tmp_path, "cslimit"), translate)
    cpu.hot_block = 1
    assert _run(cpu) == GP
    esp = cpu.r[4]
    assert _rd32(cpu, esp) == 0  # error code
    assert _rd32(cpu, esp + 4) == 15 and _rd32(cpu, esp + 8) & 0xFFFF == 0x50
    assert cpu.r[0:4] == [1, 3, 0, 2]  # EAX, ECX, EDX, EBX: the MOV to EDX did not run


# ------------------------------------------------------------------ real mode


def _real_source(body: str) -> str:
    return f"""bits 16
org 0x7c00
    jmp short start
    align 4, db 0
access_addr: dd access
gdtr: dw 0x4f
    dd {GDT:#x}
start:
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
{body}
    hlt
"""


def _real_cpu(image: bytes, translate: bool) -> Cpu:
    mem = GuestMemory.with_ram(4 << 20)
    for sel, d in DESC.items():
        mem.write_u64(GDT + sel, d)
    for v in range(32):
        mem.write(0x9000 + 16 * v, b"\xf4")
        mem.write(4 * v, (0x9000 + 16 * v).to_bytes(2, "little") + b"\0\0")
    mem.write(0x7C00, image)
    cpu = Cpu(mem, translate=translate)
    cpu.reset()
    cpu.set_seg_raw(1, 0, 0, 0xFFFF, 0x9B)
    cpu.eip = 0x7C00
    cpu.idt_base, cpu.idt_limit = 0, 0x3FF
    return cpu


REAL = [
    ("byte-ok", "    mov bx, 0xffff\naccess:\n    mov al, [bx]", NO_FAULT),
    ("word-wraps", "    mov bx, 0xffff\naccess:\n    mov ax, [bx]", GP),
    ("bp-word-wraps", "    mov bp, 0xffff\naccess:\n    mov ax, [bp]", SS_VEC),
    ("a32-past-64k", "    mov ebx, 0x10000\naccess:\n    mov al, [ebx]", GP),
    ("a32-fs-past-64k", "    mov ebx, 0x10000\naccess:\n    mov al, [fs:ebx]", GP),
    ("string-past-64k", "    mov esi, 0xfffe\naccess:\n    a32 lodsd", GP),
    ("pop-wraps", "    mov sp, 0xffff\naccess:\n    pop ax", SS_VEC),
    ("cs-writable", "    mov bx, 0x8000\naccess:\n    mov [cs:bx], ax", NO_FAULT),
    # "Unreal mode": a 1 MiB limit loaded in protected mode stays in the hidden cache
    # after CR0.PE is cleared, and a real-mode segment load keeps it.
    (
        "unreal",
        "    lgdt [gdtr]\n    mov eax, cr0\n    or al, 1\n    mov cr0, eax\n"
        "    mov bx, 0x48\n    mov ds, bx\n    and al, 0xfe\n    mov cr0, eax\n"
        "    xor bx, bx\n    mov ds, bx\n    mov ebx, 0xffffc\naccess:\n    mov eax, [ebx]",
        NO_FAULT,
    ),
    (
        "unreal-limit",
        "    lgdt [gdtr]\n    mov eax, cr0\n    or al, 1\n    mov cr0, eax\n"
        "    mov bx, 0x48\n    mov ds, bx\n    and al, 0xfe\n    mov cr0, eax\n"
        "    mov ebx, 0xffffd\naccess:\n    mov eax, [ebx]",
        GP,
    ),
]


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
@pytest.mark.parametrize(("name", "body", "want"), REAL, ids=[r[0] for r in REAL])
def test_real_mode_rule(tmp_path, name: str, body: str, want: int, translate: bool) -> None:
    cpu = _real_cpu(_nasm(_real_source(body), tmp_path, name), translate)
    vec = _run(cpu, 0x9000)  # the real-mode IVT's handlers
    assert vec == want
    if want != NO_FAULT:
        # Real mode pushes FLAGS, CS, IP (no error code): IP is the access instruction.
        sp = cpu.r[4] & 0xFFFF
        assert int.from_bytes(cpu.ram[sp : sp + 2], "little") == _rd32(cpu, 0x7C04) & 0xFFFF
