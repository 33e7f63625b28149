"""Guest block -> host x86-64 code.

Most translated instructions are the guest's own bytes: guest EAX..EDI (but ESP) live in
the host registers of the same numbers, and a 32-bit or smaller operation means the same
thing on an x86-64 host without a REX prefix, flags included. What is rewritten:
- a memory operand: its linear address is computed into R9 (LEA over the guest
  registers, guest ESP brought into R12, plus the segment base from the state), looked
  up in the TLB table (R14 read, R13 write; a miss or a page-crossing access leaves for
  Python before the instruction did anything), and the instruction runs on [R10], the
  host address of the guest byte, with a REX.B prefix;
- opcodes that mean something else in 64-bit mode (40-4F INC/DEC r32 are REX prefixes,
  82 is invalid) are re-encoded;
- PUSH/POP/CALL/RET work on the guest ESP in the state through the TLB;
- the guest's arithmetic flags live in the host's, or in R11 (LAHF and SETO format,
  _SAVE/_RESTORE: never the slow PUSHFQ/POPFQ pair) where host code in between changes
  the host's: every block is entered with them in R11 and puts them into the host's
  only before the first instruction that reads or keeps one that is live; a TLB lookup
  saves them to R11 unless they are there already and puts them back only where live;
- branches end the block: the block takes its instruction count off the budget and,
  while budget remains and no interrupt is pending, chains to the next block through the
  chain table (guest EIP -> host code; an indirect branch hashes its target at run time,
  a direct one reads its slot, known when translating); a branch to its own start jumps
  there. Anything else leaves for Python (EXIT_END with EIP the target).

Only rows of the opcode table with a `native` method are translated; the block stops
before any other instruction (EXIT_FALLBACK: the Python tiers run it). Exits are precise:
every exit stores the guest EIP of the next instruction to run and the registers and
flags as they are before it.

Safety: the only memory translated code touches is the state structure (R15), the TLB
tables (index < 2^20), the host stack (balanced pushes) and guest RAM pages through TLB
entries, which only NativeTier writes, with pages wholly inside guest RAM; an access is
taken only when it fits inside its page. Guest code cannot produce another address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from boite.accel.emu.arch import ARITH, CS, DF, DS, ES, FS, GS, IF, NT, SS, VM
from boite.accel.emu.decode.string import REP_SLICE
from boite.accel.emu.native.state import (
    CHAIN_BITS,
    CHAIN_MUL,
    EXIT_END,
    EXIT_FALLBACK,
    EXIT_MISS,
    INV_RING,
    OFF_BLOCK,
    OFF_BUDGET,
    OFF_CLOCK,
    OFF_CODEMAP,
    OFF_CS_SEL,
    OFF_DISPATCH,
    OFF_DSTEP,
    OFF_EFLAGS,
    OFF_EIP,
    OFF_ESP,
    OFF_IFOK,
    OFF_INTR,
    OFF_INV_N,
    OFF_INV_RING,
    OFF_IRET_DESC,
    OFF_IRET_DHOST,
    OFF_IRET_OK,
    OFF_IRET_PDE,
    OFF_IRET_PDEV,
    OFF_IRET_PTE,
    OFF_IRET_PTEV,
    OFF_IRQ,
    OFF_JTAB,
    OFF_MISS_ADDR,
    OFF_MISS_WRITE,
    OFF_NDONE,
    OFF_OUT,
    OFF_R,
    OFF_REASON,
    OFF_REP_EIP,
    OFF_REP_LEFT,
    OFF_SBASE,
    OFF_SYSFL,
    OFF_TLB_R,
    OFF_TLB_W,
    OFF_TMP,
    OFF_TMP2,
    OFF_TSC_HZ,
    OFF_TSC_OFF,
    chain_slot,
)
from boite.accel.emu.native.x64 import (
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    RAX,
    RDI,
    RSI,
    Asm,
    clear_encodings,
)
from boite.accel.emu.optable import Op, has_modrm, imm_bytes, lookup

# In NativeState.rep_left: the slice of a REP MOVS/STOS (counted in the closures' steps by
# NativeTier._miss), not of a REP compare (counted per element by translated code).
REP_MOVES = 1 << 31
ESP = 4
EBP = 5
MAX_INSNS = 48
FIRST_READ = 256  # guest code bytes translate_block reads first (a block scan's ~24)
# Make undefined flags agree with the Python tiers where they are live (see
# host_differs); tests turn it off to compare the host's instructions row by row.
MATCH_PYTHON_FLAGS = True
# Guest registers held in host registers (all but ESP), with their state offsets.
HELD = (0, 1, 2, 3, 5, 6, 7)
_RD_ONLY = {"CMP", "TEST", "BT", "MUL", "IMUL", "MOVZX", "MOVSX"}
# Translators that handle ESP as an operand themselves.
_ESP_AWARE = ("copy", "lea", "push_m", "jmp_m", "call_m", "pop_m")


def _epilogue(a: Asm) -> None:
    """Guest registers (and flags, from R11) into the state; back to the caller."""
    a.store32(R15, OFF_EFLAGS, R11)
    for g in HELD:
        a.store32(R15, OFF_R + 4 * g, g)
    for reg in (R15, R14, R13, R12, 5, 3):
        a.pop(reg)
    a.ret()


def runtime_stubs(st_addr: int) -> tuple[bytes, dict[str, int]]:
    """The code shared by every block, and the offsets of its entry points:

    enter: void enter(void): the same as entry(st_addr, st->block) (st_addr is built in:
    a call without arguments costs Python less).
    entry: void entry(NativeState *st, void *block): save the host's callee-saved
    registers, load the guest's (the flags into R11, as every block is entered), jump
    to the block.
    dispatch: chain to guest EIP R9D with the guest flags in R11, after the block took its
    instructions off the budget (the flags of that SUB are live: LE means spent); leaves
    through `out` when the budget is spent, an interrupt is pending or the chain table
    has no block for that EIP.
    out: leave with EIP = R9D, the guest flags in R11, reason EXIT_END."""
    a = Asm()
    a.label("enter")
    for reg in (3, 5, R12, R13, R14, R15):  # RBX RBP R12-R15
        a.push(reg)
    a.raw(b"\x49\xbf" + st_addr.to_bytes(8, "little"))  # mov r15, imm64
    a.load64(R8, R15, OFF_BLOCK)
    a.jmp("loaded")
    a.label("entry")
    for reg in (3, 5, R12, R13, R14, R15):  # RBX RBP R12-R15
        a.push(reg)
    a.mov_rr64(R15, RDI)
    a.mov_rr64(R8, RSI)
    a.label("loaded")
    a.load64(R14, R15, OFF_TLB_R)
    a.load64(R13, R15, OFF_TLB_W)
    # Blocks are entered with the guest flags in R11 (as _SAVE leaves them).
    a.load32(R11, R15, OFF_EFLAGS)
    a.mov_rr32(R10, R11)
    a.shr32(R10, 11)
    a.and32(R10, 1)  # OF
    a.and32(R11, ARITH & 0xFF)
    a.shl32(R11, 8)  # SF ZF AF PF CF
    a._rr(b"\x09", R10, R11)  # or r11d, r10d
    for g in HELD:
        a.load32(g, R15, OFF_R + 4 * g)
    a.jmp_reg(R8)
    a.label("dispatch")
    a.jcc(0xE, "out")  # JLE: the budget is spent
    a.cmp_mem_imm32(R15, OFF_INTR, 0)
    a.jcc(5, "out")  # JNE: leave for an interrupt
    # chain_slot (R8 is free here: the chains' `mov r9d, r8d` copied it)
    a._rr(b"\x69", R10, R9)  # imul r10d, r9d, CHAIN_MUL
    a.buf += _s32(CHAIN_MUL)
    a.mov_rr32(R8, R10)
    a.shr32(R8, 16)
    a.xor_rr32(R10, R8)
    a._rr(b"\x69", R10, R10)  # imul r10d, r10d, CHAIN_MUL
    a.buf += _s32(CHAIN_MUL)
    a.shr32(R10, 32 - CHAIN_BITS)
    a.shl32(R10, 4)
    a._mem(b"\x03", R10, R15, OFF_JTAB, w=True)  # add r10, [r15 + jtab]
    a._mem(b"\x39", R9, R10, 0)  # cmp [r10], r9d
    a.jcc(5, "out")
    a._mem(b"\xff", 4, R10, 8)  # jmp [r10 + 8] (the guest flags in R11)
    a.label("out")
    a.store32(R15, OFF_EIP, R9)
    a.store_imm32(R15, OFF_NDONE, 0)
    a.store_imm32(R15, OFF_REASON, EXIT_END)
    a.raw(_RESTORE)
    a.pushfq()
    a.raw(b"\x41\x5b")  # pop r11: EFLAGS, as the state has them
    _epilogue(a)
    return a.finish(), a.labels


def _encoded(build) -> bytes:
    """The bytes one Asm sequence (without jumps) encodes to: the templates below."""
    a = Asm()
    build(a)
    return a.finish()


def _s32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


# Byte templates of the code every block repeats (translation is Python building bytes:
# these are the same bytes the Asm calls would give, built once). An `_imm` template
# ends where a 32-bit immediate or displacement follows.
def _imm(build) -> bytes:
    return _encoded(build)[:-4]


# The guest flags in R11, as LAHF and SETO give them: bits 15-8 SF ZF - AF - PF - CF,
# bits 7-0 OF (0 or 1), the bits above whatever RAX had. PUSHFQ and POPFQ would do it
# in one instruction each, but POPFQ is microcoded (~15 cycles here) and PUSHFQ ~4: on a
# loop's hot path (a chain, a TLB lookup) they were the most costly instructions.
# Save: mov r11, rax; lahf; seto al; xchg rax, r11 (RAX as it was).
_SAVE = b"\x49\x89\xc3\x9f\x0f\x90\xc0\x49\x93"
# Restore, R11 and RAX kept: xchg rax, r11; cmp al, 0x81 (OF: 0x01 + 127 overflows,
# 0x00 + 127 does not); sahf (SF ZF AF PF CF from AH); xchg rax, r11.
_RESTORE = b"\x49\x93\x3c\x81\x9e\x49\x93"


def host_lahf() -> bool:
    """LAHF/SAHF work in 64-bit mode (CPUID 80000001h ECX bit 0: all but the first
    x86-64 processors), as the flag moves above need."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "lahf_lm" in line.split()
    except OSError:
        pass
    return False


_BUDGET_SUB = _imm(lambda a: a.sub_mem_imm32(R15, OFF_BUDGET, 0))
_CHAIN_HEAD = _SAVE + _BUDGET_SUB
_CHAIN_DISPATCH = _encoded(lambda a: (a.mov_rr32(R9, R8), a._mem(b"\xff", 4, R15, OFF_DISPATCH)))
_MOV_R9 = _imm(lambda a: a.mov_imm32(R9, 0))
_CMP_INTR = _encoded(lambda a: a.cmp_mem_imm32(R15, OFF_INTR, 0))

_CHAIN_CMP = _encoded(lambda a: a.load64(R8, R15, OFF_JTAB)) + _imm(
    lambda a: a._mem(b"\x39", R9, R8, 0)
)
_CHAIN_JMP = _imm(lambda a: a._mem(b"\xff", 4, R8, 0))
_JMP = b"\xe9\0\0\0\0"  # jmp rel32 (a fix-up follows)
_FLAG_EXIT = _RESTORE + _JMP  # a flag exit: the flags back into the host's
_REL32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_JLE = b"\x0f\x8e\0\0\0\0"
_JNE = b"\x0f\x85\0\0\0\0"
_JLE2, _JNE2 = _JLE[:2], _JNE[:2]  # their opcodes (the rel32 packed after)
_JCC = [bytes((0x0F, 0x80 | cc)) for cc in range(16)]  # jcc rel32's opcode, by condition


def _chain_structs(head: bytes) -> tuple:
    """A chain stub in one pack (Translator._emit_chains), by its head (with or without
    the flags to R11): to a register's EIP; to the block's start; to a constant EIP
    through its chain slot; the offsets of its rel32s to `leave`."""
    fix1 = len(head) + 4 + len(_MOV_R9) + 4 + 2
    fix2 = fix1 + 4 + len(_CMP_INTR) + 2
    fix3 = fix2 + 4 + len(_CHAIN_CMP) + 4 + 2
    return (
        struct.Struct(f"<{len(head)}sI{len(_CHAIN_DISPATCH)}s"),
        struct.Struct(f"<{len(head)}sI{len(_MOV_R9)}sI2si{len(_CMP_INTR)}s2si"),
        struct.Struct(
            f"<{len(head)}sI{len(_MOV_R9)}sI2si{len(_CMP_INTR)}s2si"
            f"{len(_CHAIN_CMP)}sI2si{len(_CHAIN_JMP)}sI"
        ),  # fmt: skip
        fix1,
        fix2,
        fix3,
    )


# by in_r11 (Translator.chain): (head, its _chain_structs)
_CHAINS = {False: (_CHAIN_HEAD, _chain_structs(_CHAIN_HEAD)),
           True: (_BUDGET_SUB, _chain_structs(_BUDGET_SUB))}  # fmt: skip
_JMP_OUT = _encoded(lambda a: a._mem(b"\xff", 4, R15, OFF_OUT))
_ST_EIP = _imm(lambda a: a.store_imm32(R15, OFF_EIP, 0))
_ST_NDONE = _imm(lambda a: a.store_imm32(R15, OFF_NDONE, 0))
_ST_REASON = _imm(lambda a: a.store_imm32(R15, OFF_REASON, 0))
_STUB_TAIL = struct.Struct(f"<{len(_ST_NDONE)}sI{len(_ST_REASON)}sI5s")  # ndone, reason, jmp
_STUB = struct.Struct(f"<{len(_ST_EIP)}sI{len(_ST_NDONE)}sI{len(_ST_REASON)}sIBi")  # + jmp
_EPILOGUE = _encoded(lambda a: (a.pushfq(), a.pop(R11), _epilogue(a)))
_LOAD_R12_ESP = _encoded(lambda a: a.load32(R12, R15, OFF_ESP))
# dst += the segment base (through R10): by (dst, segment)
_ADD_SBASE = {
    (dst, seg): _encoded(
        lambda a, dst=dst, seg=seg: (
            a.load32(R10, R15, OFF_SBASE + 4 * seg),
            a.lea32(dst, dst, 0, index=R10),
        )
    )
    for dst in range(16)
    for seg in range(6)
}
_LOOKUP: dict[tuple[int, int, bool, bool, bool], tuple[bytes, int, int]] = {}
_MISS: dict[int, tuple] = {}  # _miss_exit's, by address register * 4 + miss kind
_STACK_ADDR: dict[int, bytes] = {}  # Translator._stack_addr's code by delta


def _miss_exit(addr: int, write: int) -> tuple:
    """A TLB miss's exit (Translator._emit_misses) in one pack, for a lookup of the
    address in register addr and miss kind `write`: (its Struct's pack, the bytes before
    EIP, those between EIP and the instructions done, those between those and the rel32
    of the jump to the epilogue, its size). Translator.misses holds these."""
    key = addr << 2 | write
    t = _MISS.get(key)
    if t is None:
        head = _RESTORE + _encoded(lambda b: (b.store32(R15, OFF_MISS_ADDR, addr),
                                              b.store_imm32(R15, OFF_MISS_WRITE, write)))  # fmt: skip
        head += _ST_EIP
        tail = _ST_REASON + _U32.pack(EXIT_MISS) + b"\xe9"
        st = struct.Struct(f"<{len(head)}sI{len(_ST_NDONE)}sI{len(tail)}si")
        t = _MISS[key] = (st.pack, head, _ST_NDONE, tail, st.size)
    return t


def _stack_addr_code(delta: int) -> bytes:
    """Translator._stack_addr's code."""
    code = _STACK_ADDR.get(delta)
    if code is None:
        code = _STACK_ADDR[delta] = _encoded(lambda a: (
            a.load32(R9, R15, OFF_ESP), delta and a.lea32(R9, R9, delta),
            a.load32(R10, R15, OFF_SBASE + 4 * SS), a.lea32(R12, R9, 0, index=R10)))  # fmt: skip
    return code


_STORE_ESP_R9 = _encoded(lambda a: a.store32(R15, OFF_ESP, R9))
_CALL_TAIL = struct.Struct(f"<3sI{len(_STORE_ESP_R9)}sB")  # mov [r10], nxt; ESP; jmp
_CALL_RET: dict[tuple[bool, bool, bool], tuple[bytes, int, int]] = {}


def _call_ret_head(call: bool, restore: bool, saved: bool) -> tuple[bytes, int, int]:
    """Translator.call's (RET's) code to its store of the return EIP (after its load of
    it into R8D) and the offsets of the lookup's rel32s to its miss: build's fast path."""
    key = (call, restore, saved)
    t = _CALL_RET.get(key)
    if t is None:
        a = Asm()
        head = _stack_addr_code(-4 if call else 0)
        code, f1, f2 = _lookup_template(R12, 4, call, restore, saved)
        a.raw(head + code)
        if not call:
            a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]
        t = _CALL_RET[key] = (bytes(a.buf), len(head) + f1, len(head) + f2)
    return t


def _lookup_template(addr: int, size: int, write: bool, restore: bool,
                     saved: bool) -> tuple[bytes, int, int]:  # fmt: skip
    """The inline TLB lookup of Translator.lookup, with the offsets of its two rel32s
    (both to the miss stub; one, given twice, for a byte)."""
    a = Asm()
    if not saved:
        a.raw(_SAVE)  # the guest flags, for the miss path and to restore
    a.mov_rr32(R10, addr)
    a.shr32(R10, 12)
    a.load64_index8(R10, R13 if write else R14, R10)
    a.test64(R10, R10)
    a.jcc(4, "miss")  # JE: no entry
    a.mov_rr32(R8, addr)
    a.and32(R8, 0xFFF)
    if size > 1:  # (a byte never crosses)
        a.cmp32(R8, 0x1000 - size)
        a.jcc(7, "miss")  # JA: the access would cross into the next page
    a.add64(R10, R8)
    if restore:
        a.raw(_RESTORE)
    fix1 = a.fixups[0][0]
    return bytes(a.buf), fix1, a.fixups[-1][0]  # (the same one twice for a byte)


@dataclass(slots=True)
class MemOperand:
    mod: int
    rm: int
    base: int | None  # guest register, None: no base
    index: int | None
    scale: int
    disp: int
    seg: int


@dataclass(slots=True)
class Insn:
    eip: int
    raw: bytes
    row: Op
    p66: bool
    opmap: str
    code: int
    modrm: int | None
    mem: MemOperand | None
    imm_at: int  # offset of the immediate in raw (== len(raw) - imm size)
    size: int  # operand size in bytes (1, 2, 4)
    lock: bool = False  # a LOCK prefix (kept: the host's locked form is atomic too)
    rep: int = 0  # 0xF3 / 0xF2 prefix, or 0
    override: int | None = None  # a segment override prefix (in mem.seg already)
    rf: RowFacts | None = None  # facts(row), set by parse
    bf: tuple | None = None  # build_facts(self), shared by the copies parse's cache makes


class RowFacts:
    """What the translator derives from one opcode table row, derived once per row
    (parsing and building a block ask for them for every instruction)."""

    __slots__ = ("ops", "modrm", "imm", "byte_op", "kill", "read", "kills_all", "plain",
                 "writes_first", "undefined")  # fmt: skip

    def __init__(self, row: Op) -> None:
        self.ops = tuple(row.operands.split(",")) if row.operands else ()
        self.modrm = has_modrm(row)
        self.imm = (imm_bytes(row, False), imm_bytes(row, True))  # by the 66 prefix
        first = next((o for o in self.ops if o[:1] in ("E", "G", "Z")), "")
        self.byte_op = first.endswith("b")
        # Flag liveness: what the row defines for sure, and what it reads.
        self.kill = row.flags_written & ~row.flags_undefined & ~row.flags_read
        self.read = row.flags_read & ARITH
        self.kills_all = self.kill == ARITH
        self.plain = row.native in ("copy", "lea", "branch")  # never leaves before it
        self.writes_first = bool(self.ops) and self.ops[0][:1] == "E"
        # host_differs names only undefined flags: rows without any never differ
        self.undefined = row.flags_undefined & ARITH


_FACTS: dict[int, RowFacts] = {}
_CACHE_MAX = 1 << 15  # entries of each cache keyed by guest bytes (bounded: no end of keys)
_NO_FIX = (b"", b"")
# (map, opcode, ModRM reg field or -1) -> the row (lookup() walks a list)
_ROWS: dict[tuple[str, int, int], Op | None] = {}


def facts(row: Op) -> RowFacts:
    f = _FACTS.get(id(row))
    if f is None:
        f = _FACTS[id(row)] = RowFacts(row)
    return f


_SEG_PREFIX = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}
_PREFIXES = frozenset((0x66, 0xF0, 0xF2, 0xF3, *_SEG_PREFIX))


# Parsed instructions by their shape: the bytes that decide the length (prefixes,
# opcode, ModRM, SIB), where they are at most four; the rest (displacement, immediate)
# is read from the bytes at hand. Compiled code repeats shapes: a kit boot's blocks
# have ~25 instructions a shape. No instruction's bytes begin another's, so at most one
# of raw[:1] .. raw[:4] is a key. A shape that is one byte is in _SHAPE1 (by its value).
# An entry: (length, the flat it needs (-1: any), where the displacement is, its size,
# then Insn's fields from row to rf with the ModRM operand as (mod, rm, base, index,
# scale, seg) (without a displacement: the MemOperand, shared), then the build facts
# (None: they depend on the immediate), then (where they do) the build facts by the
# instruction's last byte (the immediate's top byte, all they depend on)).
_SHAPE1: list[tuple | None] = [None] * 256
_SHAPES: dict[bytes, tuple] = {}


def parse(raw: bytes, eip: int, flat: int = 0x3F) -> Insn | None:
    """The instruction at raw[0] if the native tier translates it, else None. `flat`:
    the segment registers (bit per number) an override may name: those whose accesses
    need no check (Cpu.seg_nonflat clear; never CS, which is not writable)."""
    e = _SHAPE1[raw[0]] or _SHAPES.get(raw[:2]) or _SHAPES.get(raw[:3]) or _SHAPES.get(raw[:4])
    if e is not None and e[0] <= len(raw) and (e[1] < 0 or e[1] == flat):
        return _insn(e, raw[: e[0]], eip)
    i = _parse(raw, eip, flat)
    if i is None:
        return None
    i.bf = build_facts(i)
    dsz = i.bf[10]
    decide = i.imm_at - dsz
    if decide <= 4:
        if len(_SHAPES) > _CACHE_MAX:
            _SHAPE1[:] = [None] * 256
            _SHAPES.clear()
        m = i.mem
        mem = None if m is None else (m.mod, m.rm, m.base, m.index, m.scale, m.seg)
        if m is not None and not dsz:
            mem = m  # no displacement: all instructions of the shape share it
        e = (len(i.raw), -1 if i.override is None else flat, decide, dsz, i.row, i.p66,
             i.opmap, i.code, i.modrm, mem, i.imm_at, i.size, i.lock, i.rep, i.override, i.rf,
             None if _imm_facts(i) else i.bf, {i.raw[-1]: i.bf} if _imm_facts(i) else None)  # fmt: skip
        if decide == 1:
            _SHAPE1[raw[0]] = e
        else:
            _SHAPES[raw[:decide]] = e
    return i


def _has_override(code: bytes, pos: int) -> bool:
    """The instruction at code[pos] has a segment override prefix."""
    for b in code[pos : pos + 15]:
        if b not in _PREFIXES:
            return False
        if b in _SEG_PREFIX:
            return True
    return False


def _imm_facts(i: Insn) -> bool:
    """build_facts(i) depends on the immediate (a shift's count: _reads; a conditional
    branch's direction: _ends)."""
    return i.opmap == "" and i.code in (0xC0, 0xC1) or i.row.native in ("branch", "loop")


def _insn(e: tuple, raw: bytes, eip: int) -> Insn:
    """The instruction of parse's cache entry e, with these bytes (its length)."""
    m = e[9]
    dsz = e[3]
    if dsz:
        disp = int.from_bytes(raw[e[2] : e[2] + dsz], "little", signed=True)
        m = MemOperand(m[0], m[1], m[2], m[3], m[4], disp, m[5])
    bf = e[16] if e[17] is None else e[17].get(raw[-1])
    i = Insn(eip, raw, e[4], e[5], e[6], e[7], e[8], m, e[10], e[11], e[12], e[13], e[14],
             e[15], bf)  # fmt: skip
    if bf is None:
        i.bf = e[17][raw[-1]] = build_facts(i)
    return i


# What _translate_code hands Translator.build for each instruction: (EIP, its bytes,
# build_facts, the Insn or None, parse's cache entry (None: the Insn is there), the
# displacement). Most instructions' host code is kept code (Translator.build's
# fragments), which needs no more than that: the Insn is made only where a translator
# or a flag fix-up asks for it (_full), about one instruction in four.
def _full(it: tuple) -> Insn:
    """The Insn of _translate_code's item."""
    i = it[3]
    if i is None:
        e = it[4]
        m = e[9]
        if e[3]:
            m = MemOperand(m[0], m[1], m[2], m[3], m[4], it[5], m[5])
        i = Insn(it[0], it[1], e[4], e[5], e[6], e[7], e[8], m, e[10], e[11], e[12], e[13],
                 e[14], e[15], it[2])  # fmt: skip
    return i


def _parse(raw: bytes, eip: int, flat: int) -> Insn | None:
    """parse without the cache."""
    pos = 0
    p66 = lock = rep = False
    repne = False
    override: int | None = None
    while pos < len(raw):
        b = raw[pos]
        if b not in _PREFIXES:
            break
        if b == 0x66:
            p66 = True
        elif b == 0xF0:
            lock = True
        elif b == 0xF3:
            rep = True
        elif b == 0xF2:
            repne = True
        else:
            override = _SEG_PREFIX[b]
        pos += 1
    if rep and repne:
        return None
    if pos >= len(raw):
        return None
    opmap = ""
    if raw[pos] == 0x0F:
        opmap = "0F"
        pos += 1
    if pos >= len(raw):
        return None
    code = raw[pos]
    pos += 1
    key = (opmap, code, (raw[pos] >> 3) & 7 if pos < len(raw) else -1)
    if key in _ROWS:
        row = _ROWS[key]
    else:
        row = _ROWS[key] = lookup(opmap, code, raw[pos] if pos < len(raw) else None)
    if row is None or row.native is None:
        return None
    rf = facts(row)
    modrm = None
    mem = None
    if rf.modrm:
        if pos >= len(raw):
            return None
        modrm = raw[pos]
        pos += 1
        mod, rm = modrm >> 6, modrm & 7
        if mod != 3:
            base: int | None = rm
            index = None
            scale = 0
            if rm == 4:
                if pos >= len(raw):
                    return None
                sib = raw[pos]
                pos += 1
                scale, idx, base = sib >> 6, (sib >> 3) & 7, sib & 7
                index = None if idx == 4 else idx
                if base == 5 and mod == 0:
                    base = None
            elif rm == 5 and mod == 0:
                base = None
            dsz = 4 if (mod == 0 and base is None) or mod == 2 else (1 if mod == 1 else 0)
            if pos + dsz > len(raw):
                return None
            disp = int.from_bytes(raw[pos : pos + dsz], "little", signed=True)
            pos += dsz
            seg = SS if base in (ESP, EBP) else DS
            if override is not None:
                if not flat >> override & 1:
                    return None  # an access that needs its segment's checks: Python
                seg = override
            mem = MemOperand(mod, rm, base, index, scale, disp, seg)
    imm = rf.imm[p66]
    if pos + imm > len(raw):
        return None
    if override is not None and row.native in ("rep_string", "string1", "moffs"):
        if row.native != "moffs" or not flat >> override & 1:
            return None  # implicit operands through an override: Python
    if lock and (not row.lock or mem is None or row.native != "copy"):
        return None  # #UD, raised by the Python tiers
    if rep and row.mnemonic in ("BSF", "BSR"):
        rep = False  # F3 0F BC/BD: BSF/BSR here (no TZCNT/LZCNT), the prefix ignored
    if (
        row.native == "rep_string"
        and not rep
        or rep
        and row.native not in ("rep_string", "ret", "string1")
        and not (code == 0x90 and not opmap)  # F3 90: PAUSE, a NOP here
    ):
        return None  # REP MOVS/STOS, REP LODS/STOS/SCAS (and REP RET, a RET)
    if repne and row.code not in (0xA6, 0xA7, 0xAE, 0xAF):
        return None
    if row.native == "string1" and (rep or repne) and row.code in (0xAC, 0xAD):
        return None  # REP STOS is rep_string's, REP LODS stays in Python
    size = 1 if rf.byte_op else (2 if p66 else 4)
    return Insn(eip, raw[: pos + imm], row, p66, opmap, code, modrm, mem, pos, size, lock,
                0xF3 if rep else (0xF2 if repne else 0), override, rf)  # fmt: skip


def _uses_esp(i: Insn) -> bool:
    """The instruction names ESP as a data register (not allowed: it lives in memory)."""
    for o in (i.rf or facts(i.row)).ops:
        sz_byte = o.endswith("b")
        if o[:1] == "G" and i.modrm is not None and (i.modrm >> 3) & 7 == ESP and not sz_byte:
            return True
        if o[:1] == "E" and i.modrm is not None and i.modrm >> 6 == 3 and i.modrm & 7 == ESP:
            if not sz_byte:
                return True
        if o[:1] == "Z" and i.code & 7 == ESP and not sz_byte:
            return True
    return False


def _esp_rex(i: Insn) -> int:
    """The REX bits (R: ModRM reg, B: ModRM rm or opcode register) that turn the guest's
    ESP operands into R12; -1 where that would also turn AH..BH into SPL..DIL."""
    rex = 0
    high_byte = False
    modrm = i.modrm
    for o in (i.rf or facts(i.row)).ops:
        kind, byte = o[:1], o.endswith("b")
        if kind == "G" and modrm is not None:
            num = (modrm >> 3) & 7
        elif kind == "E" and modrm is not None and modrm >> 6 == 3:
            num = modrm & 7
        elif kind == "Z":
            num = i.code & 7
        else:
            continue
        if byte:
            high_byte |= num >= 4
        elif num == ESP:
            rex |= 4 if kind == "G" else 1
    return -1 if rex and high_byte else rex


def _mem_size(i: Insn) -> int:
    """Bytes the memory operand accesses."""
    if i.row.mnemonic == "CMPXCHG8B":
        return 8
    if i.row.mnemonic in ("MOVZX", "MOVSX"):
        return 1 if i.code in (0xB6, 0xBE) else 2
    return i.size


def host_differs(i: Insn) -> int:
    """The flags where the host's instruction and the Python tiers' closure may give
    different values (all of them among the row's undefined flags; measured on x86-64
    hosts by tests/accel/test_emu_native.py). The translator makes them agree where they
    are live: AF is cleared after a shift by a known count, anything else ends the block
    before the instruction."""
    m, code = i.row.mnemonic, i.code
    if m in ("MUL", "IMUL"):  # SF ZF AF PF
        return 0xD4
    if m in ("SHLD", "SHRD"):
        return 0x810
    if m in ("BSF", "BSR"):  # the Python tiers keep all but ZF
        return 0x895
    if i.opmap:
        return 0
    if code in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3):
        of = 0 if _shift_count(i) == 1 else 0x800  # OF is defined for a count of 1
        if m == "RCR":
            return of
        if m in ("SHL", "SAL", "SAR"):
            return 0x10
        if m == "SHR":
            return 0x10 | of
    return 0


def _szp_from(size: int, reg: int) -> bytes:
    """After a multiply: SF, ZF, PF from the result in reg (R12 for ESP), AF clear, CF
    and OF as the host's multiply set them (the Python tiers' values)."""
    if reg == ESP:
        test = b"\x45\x85\xe4"  # test r12d, r12d
    else:
        test = bytes((0x84 if size == 1 else 0x85, 0xC0 | reg << 3 | reg))
    if size == 2:
        test = b"\x66" + test
    return (
        b"\x9c\x41\x5b"  # pushfq; pop r11
        + test
        + b"\x9c\x41\x58"  # pushfq; pop r8
        + b"\x41\x81\xe0\xc4\x00\x00\x00"  # and r8d, SF|ZF|PF
        + b"\x41\x81\xe3\x2b\xff\xff\xff"  # and r11d, ~(SF|ZF|AF|PF)
        + b"\x45\x09\xc3"  # or r11d, r8d
        + b"\x41\x53\x9d"  # push r11; popfq
    )


def _flag_fix(i: Insn, differ: int) -> tuple[bytes, bytes] | None:
    """Host code (before, after) the instruction that gives the flags in `differ` the
    Python tiers' values; None where the translator does not (the block ends there)."""
    m = i.row.mnemonic
    rm_reg = i.modrm is not None and i.modrm >> 6 == 3
    if m in ("MUL", "IMUL"):
        if i.opmap == "" and i.code in (0xF6, 0xF7):
            return b"", _szp_from(i.size, 0)  # the low half lands in AL/AX/EAX
        return b"", _szp_from(i.size, (i.modrm >> 3) & 7)
    if m in ("SHLD", "SHRD"):
        return _double_shift_fix(i)
    if m in ("BSF", "BSR"):
        if not rm_reg:
            return None  # a miss between would leave the host stack unbalanced
        # The guest's flags wait on the host stack; ZF alone comes from the host's.
        return b"\x9c", (
            b"\x9c\x41\x58"  # pushfq; pop r8
            + b"\x41\x83\xe0\x40"  # and r8d, ZF
            + b"\x48\x83\x24\x24\xbf"  # and qword [rsp], ~ZF
            + b"\x4c\x09\x04\x24"  # or [rsp], r8
            + b"\x9d"  # popfq
        )
    if i.opmap or i.code not in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3):
        return None
    if m not in ("SHL", "SAL", "SAR", "SHR") or differ & ~0x810:
        return None
    cnt = _shift_count(i)
    if cnt == 0:
        return b"", b""  # the flags stay as they were
    rm = i.modrm & 7
    if cnt is None and rm_reg and rm == 1:
        return None  # the shift changes CL, which says whether it shifted at all
    before = b""
    after = b""
    if differ & 0x800:  # SHR: OF is the operand's old top bit
        if not rm_reg or rm == ESP or (i.size == 1 and rm >= 4):
            return None
        before = (b"\x66" if i.size == 2 else b"") + bytes((0x41, 0x89, 0xC0 | rm << 3))
        if i.size == 1:
            before = bytes((0x44, 0x0F, 0xB6, 0xC0 | rm))  # movzx r8d, <reg8>
        after += b"\x66\x81\x24\x24\xff\xf7"  # and word [rsp], ~OF
        after += bytes((0x41, 0x0F, 0xBA, 0xE0, 8 * i.size - 1))  # bt r8d, top bit
        after += b"\x73\x06\x66\x81\x0c\x24\x00\x08"  # jnc +6; or word [rsp], OF
    if differ & 0x10:
        after = b"\x80\x24\x24\xef" + after  # and byte [rsp], ~AF
    if cnt is None:  # by CL: a count of 0 leaves the flags as they were
        after = b"\xf6\xc1\x1f" + bytes((0x74, len(after))) + after  # test cl, 31; jz
    return before, b"\x9c" + after + b"\x9d"  # pushfq ... popfq


_CARRY = ("copy", "push_r", "pop_r", "push_i", "moffs", "string1")


def _gives_flags(i: Insn, rf: RowFacts) -> bool:
    """Instruction i looks up memory, then neither reads nor writes a flag nor touches
    R11: the guest flags may stay in R11 for the next lookup (MOV, PUSH/POP, LODS, STOS)."""
    if i.row.native not in _CARRY or i.rep or i.row.flags_written or rf.read:
        return False
    if i.row.native == "copy":
        return i.mem is not None
    return i.row.native != "string1" or i.code in (0xAA, 0xAB, 0xAC, 0xAD)


def _takes_flags(i: Insn, rf: RowFacts) -> bool:
    """Instruction i's first flag-relevant code is its TLB lookup (which then saves the
    flags from R11, not from the host's)."""
    if i.row.native not in _CARRY or i.rep or rf.undefined:
        return False
    if i.row.native == "copy":
        return i.mem is not None and not (i.opmap and i.code in (0xA3, 0xAB, 0xB3, 0xBB))
    return i.row.native != "string1" or i.code in (0xAA, 0xAB, 0xAC, 0xAD)


def _reads(i: Insn, rf: RowFacts) -> int:
    """The flags instruction i reads: its row's, but a shift or rotate by a nonzero
    immediate reads none (RCL/RCR: CF), where the row's count may be 0 (all kept)."""
    if i.opmap == "" and i.code in (0xC0, 0xC1) and i.raw[-1] & 31:
        return 1 if (i.modrm >> 3) & 7 in (2, 3) else 0  # CF
    return rf.read


def _double_shift_fix(i: Insn) -> tuple[bytes, bytes] | None:
    """SHLD/SHRD on a register: AF clear and OF set where the destination's sign
    changed, for every count (the Python tiers' values; the host defines OF for a count
    of 1 only); a count of 0 changes no flag."""
    rm = i.modrm & 7
    if i.modrm >> 6 != 3 or rm == ESP:
        return None  # the old destination is not at hand before the lookup
    by_cl = i.code in (0xA5, 0xAD)
    if by_cl and rm == 1:
        return None  # the shift changes CL, which says whether it shifted at all
    if not by_cl and i.raw[-1] & 31 == 0:
        return b"", b""
    top = 8 * i.size - 1
    before = bytes((0x41, 0x89, 0xC0 | rm << 3))  # mov r8d, <destination>
    after = (
        b"\x80\x24\x24\xef"  # and byte [rsp], ~AF
        + b"\x66\x81\x24\x24\xff\xf7"  # and word [rsp], ~OF
        + bytes((0x44, 0x33, 0xC0 | rm))  # xor r8d, <destination>: the changed bits
        + bytes((0x41, 0x0F, 0xBA, 0xE0, top))  # bt r8d, top bit
        + b"\x73\x06\x66\x81\x0c\x24\x00\x08"  # jnc +6; or word [rsp], OF
    )
    if by_cl:  # a count of 0 leaves the flags as they were
        after = b"\xf6\xc1\x1f" + bytes((0x74, len(after))) + after  # test cl, 31; jz
    return before, b"\x9c" + after + b"\x9d"  # pushfq ... popfq


def _shift_count(i: Insn) -> int | None:
    """The count of a shift by an immediate or by 1 (None: by CL)."""
    if i.code in (0xD0, 0xD1):
        return 1
    if i.code in (0xC0, 0xC1):
        return i.raw[-1] & 31
    return None


# Rows the Python tiers end blocks at (so interrupts are taken after them) that
# translated code goes on after: they leave where an interrupt could be taken.
_GOES_ON = ("popf", "cli", "sti")


def _target(i: Insn) -> int | None:
    """Where a relative branch (Jcc, JMP, LOOP*, JECXZ) goes; None for other rows."""
    if i.row.native not in ("branch", "loop"):
        return None
    nxt = i.eip + len(i.raw)
    return (nxt + int.from_bytes(i.raw[i.imm_at :], "little", signed=True)) & 0xFFFFFFFF


def _item_target(it: tuple) -> int | None:
    """_target of _translate_code's item."""
    bf = it[2]
    if not bf[16]:  # (a relative branch: a Jcc, JMP, LOOP* or JECXZ)
        return None
    return _rel_target(it[0], it[1], bf[15])


def _rel_target(eip: int, raw: bytes, imm_at: int) -> int:
    """Where the relative branch at eip (its bytes raw, its displacement from imm_at) goes."""
    nxt = eip + len(raw)
    return (nxt + int.from_bytes(raw[imm_at:], "little", signed=True)) & 0xFFFFFFFF


def _ends(i: Insn) -> bool:
    """The block ends after i. A forward conditional branch (Jcc, LOOP*, JECXZ) does not
    end it: its taken side chains and the block goes on with the next instruction, so a
    loop whose body branches forward is one block (and a self-loop). After a backward one
    (a loop's end) the block ends: what follows is the loop's exit, a block of its own
    rather than a copy in each block that falls into the loop."""
    row = i.row
    if not row.ends_block or row.native in _GOES_ON:
        return False
    if row.native == "loop" or row.native == "branch" and row.mnemonic != "JMP":
        return i.raw[i.imm_at :][-1] >= 0x80  # a negative displacement (its top byte)
    return True


# Translators whose host code is a function of the instruction's bytes, the `restore`
# they are given and whether the guest flags wait in R11 (not of EIP, the block or the
# instruction's place in it) and whose only side effect is their TLB lookups' misses:
# Translator.build keeps what they emit and reuses it for the same bytes.
_FRAGMENT_KINDS = frozenset(("copy", "lea", "push_r", "push_i", "pop_r", "push_m", "pop_m",
                             "leave", "moffs"))  # fmt: skip
# (shape, immediate, restore, flags in R11) -> (host bytes, ((rel32 at, rel32 at, its
# _miss_exit) for each lookup), where the displacement goes (-1: none))
_FRAGMENTS: dict[tuple[bytes, bytes, bool, bool], tuple[bytes, tuple, int]] = {}


def build_facts(i: Insn) -> tuple:
    """What Translator.build asks of each instruction, from its bytes alone: (refused for
    naming ESP, the flags it reads, may leave the flags in R11, takes them from R11, ends
    the block, its host code may be kept, may leave before it (all flags live there),
    the flags it surely writes, host_differs (undefined flags where the host's
    instruction and the Python tiers' may disagree), its shape (the bytes before the
    displacement), the displacement's size, where its immediate goes (0: none, 1: in
    the kept code's key, 2: copied after the kept code), is STI, may run on any host
    flags (Translator.build's `blind`, but for the flag fix-ups and liveness), writes
    flags, where its immediate is (Insn.imm_at), is a relative branch (Jcc, LOOP*,
    JECXZ: _translate_code's first branch; JMP), is STI or a relative branch)."""
    rf = i.rf or facts(i.row)
    kind = i.row.native
    m = i.mem
    dsz = 0 if m is None else (4 if (m.mod == 0 and m.base is None) or m.mod == 2 else m.mod)
    reads = _reads(i, rf)
    branches = bool(i.row.ends_block) and kind in ("branch", "loop")
    return (kind not in _ESP_AWARE and _uses_esp(i), reads, _gives_flags(i, rf),
            _takes_flags(i, rf), _ends(i), kind in _FRAGMENT_KINDS,
            m is not None or not rf.plain or kind == "branch", rf.kill,
            host_differs(i) if rf.undefined else 0,
            i.raw[: i.imm_at - dsz], dsz, _imm_mode(i), kind == "sti",
            (m is None and kind == "copy" or kind == "lea") and not reads,
            bool(i.row.flags_written), i.imm_at, branches, kind == "sti" or branches)  # fmt: skip


def _imm_mode(i: Insn) -> int:
    """build_facts' immediate: a copied instruction's is the last bytes of its host code
    (but SHLD/SHRD's, whose count decides whether it is translated)."""
    if i.imm_at == len(i.raw):
        return 0
    return 2 if i.row.native == "copy" and i.row.mnemonic not in ("SHLD", "SHRD") else 1


def _writes_mem(i: Insn) -> bool:
    if i.row.mnemonic == "CMPXCHG8B":
        return True  # like CMPXCHG, it writes the old value back on a mismatch
    if not (i.rf or facts(i.row)).writes_first:
        return False
    return i.row.mnemonic not in _RD_ONLY


class Translator:
    """Builds the host code of one block."""

    __slots__ = ("a", "start", "host_tsc", "flags_in_r11", "n", "stubs", "reg_stubs", "disps",
                 "imm_end", "insns", "misses", "chains", "flag_exits")  # fmt: skip

    def __init__(self, start: int, host_tsc: bool = True) -> None:
        self.a = Asm()
        self.start = start
        self.host_tsc = host_tsc  # RDTSC may read the host clock (Cpu.rdtsc not replaced)
        self.flags_in_r11 = False  # the next lookup finds the guest flags in R11 (build)
        self.n = 0  # stubs made
        self.stubs: list[tuple] = []  # (label, eip, ndone, reason, eip_reg)
        self.reg_stubs = False  # a stub's EIP is a register's
        self.disps: list[int] = []  # where address() wrote displacements
        # Where copy() last ended a guest immediate: a kept fragment drops its immediate
        # only where the host code ends with it (an ESP operand's store follows it).
        self.imm_end = -1

    # -- exits ---------------------------------------------------------------------
    # Labels of stubs, chains, misses and flag exits are ints (self.n), the others
    # strings: making and hashing them is much of a small block's translation.
    def exit_to(self, eip: int | None, ndone: int, reason: int, eip_reg: int | None = None) -> int:
        """A stub leaving for Python with EIP = eip (or eip_reg); returns its label."""
        name = self.n
        self.n = name + 1
        self.stubs.append((name, eip, ndone, reason, eip_reg))
        if eip_reg is not None:
            self.reg_stubs = True
        return name

    def chain(self, target: int | None, ndone: int, in_r11: bool = False) -> int:
        """A stub that takes the block's `ndone` instructions off the budget and goes on
        at guest EIP target (None: the EIP in R8D) through the chain table, or leaves;
        returns its label. The guest flags are in the host's (in_r11: in R11 alone) and
        go to the next block in R11."""
        name = self.n
        self.n = name + 1
        self.chains.append((name, target, ndone, in_r11))
        return name

    def _emit_chains(self) -> None:
        a = self.a
        buf, labels = a.buf, a.labels
        start = self.start
        # `leave` first: the chains' rel32s to it are known when they are packed.
        leave = labels["leave"] = len(buf)
        buf += _JMP_OUT
        for name, target, ndone, in_r11 in self.chains:
            at = len(buf)
            labels[name] = at
            # [pushfq; pop r11]; sub [r15 + budget], ndone
            head, (ind, top, direct, fix1, fix2, fix3) = _CHAINS[in_r11]
            if target is None:
                # ...; mov r9d, r8d; jmp [r15 + dispatch]
                buf += ind.pack(head, ndone & 0xFFFFFFFF, _CHAIN_DISPATCH)
                continue
            rel = leave - at - 4
            if target == start:  # a loop: no lookup
                # ...; mov r9d, target; jle leave (budget spent); cmp [r15 + intr], 0; jne leave
                buf += top.pack(head, ndone & 0xFFFFFFFF, _MOV_R9, target, _JLE2, rel - fix1,
                                _CMP_INTR, _JNE2, rel - fix2)  # fmt: skip
                buf += b"\xe9" + _REL32.pack(-len(buf) - 5)  # jmp start (offset 0)
                continue
            slot = chain_slot(target) * 16
            # ... mov r8, [r15 + jtab]; cmp [r8 + slot], r9d; jne leave; jmp [r8 + slot + 8]
            buf += direct.pack(head, ndone & 0xFFFFFFFF, _MOV_R9, target, _JLE2, rel - fix1,
                               _CMP_INTR, _JNE2, rel - fix2, _CHAIN_CMP, slot, _JNE2,
                               rel - fix3, _CHAIN_JMP, slot + 8)  # fmt: skip

    def _emit_stubs(self) -> None:
        a = self.a
        buf, labels, fixups = a.buf, a.labels, a.fixups
        pack, pack_eip = _STUB_TAIL.pack, _STUB.pack
        stubs = self.stubs
        if not self.reg_stubs:  # all the same size: no fix-ups
            at = len(buf)
            size = _STUB.size
            epilogue = at + size * len(stubs)
            for name, eip, ndone, reason, _ in stubs:
                labels[name] = at
                at += size
                buf += pack_eip(_ST_EIP, eip & 0xFFFFFFFF, _ST_NDONE, ndone, _ST_REASON, reason,
                                0xE9, epilogue - at)  # fmt: skip
            labels["epilogue"] = len(buf)
            buf += _EPILOGUE
            return
        for name, eip, ndone, reason, eip_reg in stubs:
            labels[name] = len(buf)
            if eip_reg is not None:
                a.store32(R15, OFF_EIP, eip_reg)
                buf += pack(_ST_NDONE, ndone, _ST_REASON, reason, _JMP)
            else:
                buf += pack_eip(_ST_EIP, eip & 0xFFFFFFFF, _ST_NDONE, ndone, _ST_REASON, reason,
                                0xE9, 0)  # fmt: skip
            fixups.append((len(buf) - 4, "epilogue"))  # jmp epilogue
        labels["epilogue"] = len(buf)
        buf += _EPILOGUE  # pushfq; pop r11; registers and flags out; return

    # -- memory --------------------------------------------------------------------
    def address(self, m: MemOperand, dst: int, with_segment: bool = True) -> None:
        """dst32 = the operand's offset (+ its segment base); flags untouched."""
        a = self.a
        base = m.base
        if base == ESP:
            a.buf += _LOAD_R12_ESP
            base = R12
        # (self.disps: where the displacement went, for build's fragments)
        if base is None:
            a.mov_imm32(dst, m.disp)
            self.disps.append(len(a.buf) - 4)
            if m.index is not None:
                a._mem(b"\x8d", dst, dst, 0, index=m.index, scale=m.scale)
        else:
            a._mem(b"\x8d", dst, base, m.disp, index=m.index, scale=m.scale)
            self.disps.append(len(a.buf) - 4)
        if with_segment:
            a.buf += _ADD_SBASE[(dst, m.seg)]

    def lookup(self, addr: int, size: int, write: bool, k: int, restore: bool,
               reads: bool = True, saved: bool = False) -> None:  # fmt: skip
        """R10 = host address of the guest bytes at linear addr32 (R8, R10, R11 scratch),
        or leave at instruction k with the state before it. `saved`: R11 holds the guest
        flags already (the host's are clobbered)."""
        a = self.a
        if self.flags_in_r11:  # the previous instruction's lookup left them there
            saved = True
            self.flags_in_r11 = False
        key = (addr, size, write, restore, saved)
        t = _LOOKUP.get(key)
        if t is None:
            t = _LOOKUP[key] = _lookup_template(addr, size, write, restore, saved)
        code, fix1, fix2 = t
        at = len(a.buf)
        a.buf += code
        # A read-modify-write misses as a read first (#PF error code W=0), as the
        # closures, which read before they write. (The miss stub's two rel32s are
        # written when it is made: no labels.)
        kind = (1 if write else 0) | (2 if write and reads else 0)
        self.misses.append((at + fix1, at + fix2, _MISS.get(addr << 2 | kind)
                            or _miss_exit(addr, kind), k))  # fmt: skip

    def _emit_misses(self) -> None:
        """The TLB misses' exits, after the epilogue (emitted): each one the guest flags
        back into the host's, the miss's address and kind, EIP and the instructions done,
        EXIT_MISS, a jump back to the epilogue (one pack)."""
        buf = self.a.buf
        insns = self.insns
        epilogue = self.a.labels["epilogue"]
        pack = _REL32.pack_into
        for fix1, fix2, t, k in self.misses:
            at = len(buf)
            pack(buf, fix1, at - fix1 - 4)
            pack(buf, fix2, at - fix2 - 4)
            buf += t[0](t[1], insns[k][0] & 0xFFFFFFFF, t[2], k, t[3], epilogue - at - t[4])

    # -- instructions ----------------------------------------------------------------
    def copy(self, i: Insn, k: int, restore: bool) -> bool:
        """The guest instruction itself, its memory operand rewritten to [R10]."""
        a = self.a
        pre = b"\x66" if i.p66 else b""
        esc = b"\x0f" if i.opmap == "0F" else b""
        code = i.code
        if i.opmap == "" and code == 0x82:
            code = 0x80  # the 80 alias, invalid in 64-bit mode
        # Guest ESP lives in the state: as a register operand it becomes R12 (whose low
        # three bits are ESP's number), loaded before and stored after.
        rex = _esp_rex(i)
        if rex < 0:
            return False
        if rex:
            a.load32(R12, R15, OFF_ESP)
        if i.opmap == "" and 0x40 <= code <= 0x4F:  # INC/DEC r: REX prefixes on the host
            a.raw(pre + (bytes((0x40 | rex,)) if rex else b""))
            a.raw(bytes((0xFF, 0xC0 | (code & 8) | (code & 7))))
        elif not self._copy_rest(i, k, restore, pre, esc, code, rex):
            return False
        if rex:
            a.store32(R15, OFF_ESP, R12)
        return True

    def _copy_rest(self, i: Insn, k: int, restore: bool, pre: bytes, esc: bytes, code: int,
                   rex: int) -> bool:  # fmt: skip
        a = self.a
        imm = i.raw[i.imm_at :]
        if i.row.mnemonic in ("SHLD", "SHRD") and i.p66 and (not imm or imm[0] & 31 > 16):
            return False  # a 16-bit SHLD/SHRD past 16 bits: an undefined result
        if i.row.mnemonic == "BSWAP" and i.p66:
            return False  # BSWAP of a 16-bit register: undefined, the closures' value
        if i.mem is None and i.row.operands[:1] == "M":
            return False  # a register form of a memory-only operand: #UD, from Python
        if i.mem is None:
            a.raw(
                pre
                + (bytes((0x40 | rex,)) if rex else b"")
                + esc
                + bytes((code,))
                + (bytes((i.modrm,)) if i.modrm is not None else b"")
                + imm
            )
            self.imm_end = len(a.buf)
            return True
        reg = (i.modrm >> 3) & 7
        lock = b"\xf0" if i.lock else b""
        if i.opmap == "0F" and code in (0xA3, 0xAB, 0xB3, 0xBB):
            # A register bit offset reaches past the operand (signed, in dwords): the
            # address moves by offset >> 5 dwords, the host tests bit offset & 31.
            if i.p66 or reg == ESP:
                return False
            self.address(i.mem, R9)
            a.raw(_SAVE)  # the guest's flags through the arithmetic below
            a.mov_rr32(R12, reg)
            a._rr(b"\xc1", 7, R12)  # sar r12d, 5
            a.raw(b"\x05")
            a._mem(b"\x8d", R9, R9, 0, index=R12, scale=2)  # lea r9d, [r9 + r12*4]
            a.mov_rr32(R12, reg)
            a.and32(R12, 31)
            a.raw(_RESTORE)
            self.lookup(R9, 4, _writes_mem(i), k, restore)
            a.raw(lock + b"\x45\x0f" + bytes((code, 0x22)))  # bt* [r10], r12d
            return True
        if reg >= 4 and any(o[:1] == "G" and o.endswith("b") for o in (i.rf or facts(i.row)).ops):
            return self._high_byte(i, k, restore, esc, code, lock)
        self.address(i.mem, R9)
        store_only = i.row.mnemonic == "MOV" or i.row.mnemonic.startswith("SET")
        self.lookup(R9, _mem_size(i), _writes_mem(i), k, restore, reads=not store_only)
        a.raw(lock + pre + bytes((0x41 | rex,)) + esc + bytes((code, reg << 3 | 2)) + imm)
        self.imm_end = len(a.buf)
        return True

    def _high_byte(self, i: Insn, k: int, restore: bool, esc: bytes, code: int,
                   lock: bytes) -> bool:  # fmt: skip
        """A byte operation between AH..BH and memory: AH..BH cannot be named beside
        [R10] (a REX prefix makes them SPL..DIL), so the byte goes through a host stack
        slot, [RSP], which needs no REX; nothing here changes the host's flags."""
        if lock or code == 0x86:
            return False  # the copy through the stack would not be atomic (XCHG is)
        a = self.a
        reg = (i.modrm >> 3) & 7
        self.address(i.mem, R9)
        store_only = i.row.mnemonic == "MOV" and code == 0x88
        writes = _writes_mem(i)
        self.lookup(R9, 1, writes, k, restore, reads=not store_only)
        a.raw(b"\x45\x0f\xb6\x02")  # movzx r8d, byte [r10]
        a.raw(b"\x41\x50")  # push r8
        a.raw(esc + bytes((code, reg << 3 | 4, 0x24)))  # op [rsp], <ah..bh>
        if writes:
            a.raw(b"\x44\x8a\x04\x24")  # mov r8b, [rsp]
        a.raw(b"\x48\x8d\x64\x24\x08")  # lea rsp, [rsp + 8]
        if writes:
            a.raw(b"\x45\x88\x02")  # mov [r10], r8b
        return True

    def lea(self, i: Insn, k: int, restore: bool) -> bool:
        if i.mem is None or i.p66:
            return False
        self.address(i.mem, R9, with_segment=False)
        reg = (i.modrm >> 3) & 7
        if reg == ESP:
            self.a.store32(R15, OFF_ESP, R9)
        else:
            self.a.mov_rr32(reg, R9)
        return True

    def _stack_addr(self, delta: int) -> None:
        """R9 = ESP + delta, R12 = SS base + R9 (the linear address); flags untouched."""
        self.a.buf += _STACK_ADDR.get(delta) or _stack_addr_code(delta)

    def push_r(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, restore, reads=False)
        self.a.raw(bytes((0x41, 0x89, (i.code & 7) << 3 | 2)))  # mov [r10], r32
        self.a.store32(R15, OFF_ESP, R9)
        return True

    def push_i(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        imm = int.from_bytes(i.raw[i.imm_at :], "little", signed=True) & 0xFFFFFFFF
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, restore, reads=False)
        self.a.raw(b"\x41\xc7\x02" + imm.to_bytes(4, "little"))  # mov dword [r10], imm32
        self.a.store32(R15, OFF_ESP, R9)
        return True

    def pop_r(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        self._stack_addr(0)
        self.lookup(R12, 4, False, k, restore)
        self.a.raw(bytes((0x41, 0x8B, (i.code & 7) << 3 | 2)))  # mov r32, [r10]
        self.a.lea32(R9, R9, 4)
        self.a.store32(R15, OFF_ESP, R9)
        return True

    def call(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        nxt = (i.eip + len(i.raw)) & 0xFFFFFFFF
        target = (nxt + int.from_bytes(i.raw[i.imm_at :], "little", signed=True)) & 0xFFFFFFFF
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, restore, reads=False)
        self.a.raw(b"\x41\xc7\x02" + nxt.to_bytes(4, "little"))
        self.a.store32(R15, OFF_ESP, R9)
        self.a.jmp(self.chain(target, k + 1))
        return True

    def ret(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        extra = int.from_bytes(i.raw[i.imm_at :], "little") if i.code == 0xC2 else 0
        self._stack_addr(0)
        self.lookup(R12, 4, False, k, restore)
        self.a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]
        self.a.lea32(R9, R9, 4 + extra)
        self.a.store32(R15, OFF_ESP, R9)
        self.a.jmp(self.chain(None, k + 1))
        return True

    def leave(self, i: Insn, k: int, restore: bool) -> bool:
        """LEAVE: ESP = EBP, then POP EBP (nothing changes before the load can miss)."""
        if i.p66:
            return False
        a = self.a
        a.mov_rr32(R9, EBP)
        a.load32(R10, R15, OFF_SBASE + 4 * SS)
        a.lea32(R12, R9, 0, index=R10)
        self.lookup(R12, 4, False, k, restore)
        a.raw(b"\x41\x8b\x2a")  # mov ebp, [r10]
        a.lea32(R9, R9, 4)
        a.store32(R15, OFF_ESP, R9)
        return True

    def _operand_to_r8(self, i: Insn, k: int, restore: bool) -> None:
        """R8D = the 32-bit Ev operand (a register, or memory through the read TLB)."""
        a = self.a
        if i.mem is None:
            rm = i.modrm & 7
            if rm == ESP:
                a.load32(R8, R15, OFF_ESP)
            else:
                a.mov_rr32(R8, rm)
            return
        self.address(i.mem, R9)
        self.lookup(R9, 4, False, k, restore)
        a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]

    def push_m(self, i: Insn, k: int, restore: bool) -> bool:
        """PUSH r/m32: read the operand (held in the state), then the push."""
        if i.p66:
            return False
        self._operand_to_r8(i, k, restore)
        self.a.store32(R15, OFF_TMP, R8)
        self._push_state_field(k, restore, OFF_TMP, b"\x45\x89\x02")  # mov [r10], r8d
        return True

    def _push_state_field(self, k: int, restore: bool, field: int, store: bytes) -> None:
        """ESP -= 4 with the dword checked for writing, then `store` (R8 -> [R10]) of the
        state's field at `field` (the lookup clobbers R8: the value waits in the state)."""
        a = self.a
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, restore, reads=False)
        a.load32(R8, R15, field)
        a.raw(store)
        a.store32(R15, OFF_ESP, R9)

    def pop_m(self, i: Insn, k: int, restore: bool) -> bool:
        """POP r/m32: the stack's dword (held in the state), stored to the operand, then
        ESP += 4; a miss on either leaves with ESP as it was."""
        if i.p66 or (i.mem is not None and i.mem.base == ESP):
            return False  # an ESP-based operand's address uses the incremented ESP
        a = self.a
        self._stack_addr(0)
        self.lookup(R12, 4, False, k, True)  # the guest flags back for the next lookup
        a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]
        if i.mem is None:
            rm = i.modrm & 7
            a.lea32(R9, R9, 4)
            a.store32(R15, OFF_ESP, R9)
            if rm == ESP:
                a.store32(R15, OFF_ESP, R8)  # POP ESP: the popped value wins
            else:
                a.mov_rr32(rm, R8)
            return True
        a.store32(R15, OFF_TMP, R8)
        self.address(i.mem, R9)
        self.lookup(R9, 4, True, k, restore, reads=False)
        a.load32(R8, R15, OFF_TMP)
        a.raw(b"\x45\x89\x02")  # mov [r10], r8d
        a.load32(R9, R15, OFF_ESP)
        a.lea32(R9, R9, 4)
        a.store32(R15, OFF_ESP, R9)
        return True

    def div(self, i: Insn, k: int, restore: bool) -> bool:
        """DIV r/m32: a zero divisor or a quotient past 32 bits (EDX >= divisor) leaves for
        the Python tiers before the instruction (their #DE; the host's would be a
        SIGFPE); the flags stay as they were, as the closures keep them."""
        if i.size != 4:
            return False
        a = self.a
        fb = self._flags_fallback(i, k)
        if i.mem is None:
            a.raw(_SAVE)
            a.mov_rr32(R8, i.modrm & 7)
        else:
            self.address(i.mem, R9)
            self.lookup(R9, 4, False, k, False)  # R11: the guest flags
            a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]
        a.raw(b"\x45\x85\xc0")  # test r8d, r8d
        a.jcc(4, fb)
        a.raw(b"\x44\x39\xc2")  # cmp edx, r8d
        a.jcc(3, fb)  # JAE: the quotient does not fit
        a.raw(b"\x41\xf7\xf0")  # div r8d
        a.raw(_RESTORE)
        return True

    def jmp_m(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        self._operand_to_r8(i, k, restore)
        self.a.jmp(self.chain(None, k + 1))
        return True

    def call_m(self, i: Insn, k: int, restore: bool) -> bool:
        if i.p66:
            return False
        a = self.a
        nxt = (i.eip + len(i.raw)) & 0xFFFFFFFF
        self._operand_to_r8(i, k, restore)
        a.store32(R15, OFF_TMP, R8)
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, restore, reads=False)
        a.raw(b"\x41\xc7\x02" + nxt.to_bytes(4, "little"))
        a.store32(R15, OFF_ESP, R9)
        a.load32(R8, R15, OFF_TMP)
        a.jmp(self.chain(None, k + 1))
        return True

    def moffs(self, i: Insn, k: int, restore: bool) -> bool:
        """MOV AL/EAX <-> [DS:offset32]."""
        a = self.a
        disp = int.from_bytes(i.raw[i.imm_at :], "little")
        size = 1 if i.code in (0xA0, 0xA2) else (2 if i.p66 else 4)
        store = i.code in (0xA2, 0xA3)
        seg = DS if i.override is None else i.override
        self.address(MemOperand(0, 5, None, None, 0, disp, seg), R9)
        self.lookup(R9, size, store, k, restore, reads=False)
        pre = b"\x66" if i.p66 else b""
        op = (0x88 if size == 1 else 0x89) if store else (0x8A if size == 1 else 0x8B)
        a.raw(pre + bytes((0x41, op, 0x02)))  # mov [r10], al/ax/eax or the load
        return True

    def rep_string(self, i: Insn, k: int, restore: bool) -> bool:
        """REP MOVS / REP STOS with DF clear (set: the Python tiers run it): each pass
        does the elements that fit in the current page(s) with the host's own REP MOVS/
        STOS on the host addresses; a miss leaves with ECX/ESI/EDI as far as it got."""
        a = self.a
        movs = i.code in (0xA4, 0xA5)
        size = 1 if i.code in (0xA4, 0xAA) else (2 if i.p66 else 4)
        log = size.bit_length() - 1
        n = self.n
        self.n += 1
        top, done, miss_s, miss_d, df = (f"{x}{n}" for x in ("st", "sd", "ss", "sm", "sf"))
        a.pushfq()  # the guest's flags wait in the state: nothing here changes them
        a.pop(R11)
        a.store32(R15, OFF_TMP, R11)
        a.raw(b"\x41\xf7\x87" + OFF_EFLAGS.to_bytes(4, "little") + DF.to_bytes(4, "little"))
        a.jcc(5, df)  # test dword [r15 + eflags], DF; jnz
        # The closures' slice, in their steps (a run of pages in the TLB and one element is
        # a step): a fresh one unless this instruction goes on after a miss. Python counts
        # a step at each miss it fills (NativeTier._miss) and hands what is left to the
        # closure where it runs an element itself; REP_MOVES marks the count as this kind.
        go = f"sg{n}"
        a.cmp_mem_imm32(R15, OFF_REP_EIP, i.eip)
        a.jcc(4, go)
        a.store_imm32(R15, OFF_REP_LEFT, REP_SLICE | REP_MOVES)
        a.store_imm32(R15, OFF_REP_EIP, i.eip)
        a.label(go)
        a.label(top)
        a.raw(b"\x85\xc9")  # test ecx, ecx
        a.jcc(4, done)
        if movs:
            self._string_page(DS, 6, R14, R10, R12, log, miss_s)  # R10 source, R12 count
        self._string_page(ES, 7, R13, R8, R11, log, miss_d)  # R8 destination, R11 count
        if movs:
            a.raw(b"\x45\x39\xe3\x45\x0f\x42\xe3")  # cmp r11d, r12d; cmovb r12d, r11d
        else:
            a.raw(b"\x4d\x89\xdc")  # mov r12, r11
        a.raw(b"\x41\x39\xcc\x44\x0f\x47\xe1")  # cmp r12d, ecx; cmova r12d, ecx
        a.raw(b"\x56\x57\x51")  # push rsi; push rdi; push rcx (the guest's)
        if movs:
            a.raw(b"\x4c\x89\xd6")  # mov rsi, r10
        a.raw(b"\x4c\x89\xc7\x44\x89\xe1")  # mov rdi, r8; mov ecx, r12d
        a.raw(b"\xf3" + (b"\x66" if size == 2 else b"") + bytes((i.code,)))  # the host's REP
        a.raw(b"\x59\x5f\x5e")  # pop rcx; pop rdi; pop rsi
        a.raw(b"\x44\x29\xe1")  # sub ecx, r12d
        sib = (log << 6) | (4 << 3)  # [reg + r12 * size]
        if movs:
            a.raw(bytes((0x42, 0x8D, 0x34, sib | 6)))  # lea esi, [rsi + r12*size]
        a.raw(bytes((0x42, 0x8D, 0x3C, sib | 7)))  # lea edi, [rdi + r12*size]
        a.jmp(top)
        for label, seg, reg, kind in ((miss_s, DS, 6, 0), (miss_d, ES, 7, 1)):
            if label == miss_s and not movs:
                continue
            a.label(label)
            a.load32(R9, R15, OFF_SBASE + 4 * seg)
            a.raw(bytes((0x41, 0x01, 0xC1 | reg << 3)))  # add r9d, esi/edi
            a.store32(R15, OFF_MISS_ADDR, R9)
            a.store_imm32(R15, OFF_MISS_WRITE, kind)
            a._mem(b"\xff", 6, R15, OFF_TMP)  # push qword [r15 + tmp]
            a.popfq()
            a.jmp(self.exit_to(i.eip, k, EXIT_MISS))
        a.label(df)
        a._mem(b"\xff", 6, R15, OFF_TMP)
        a.popfq()
        a.jmp(self.exit_to(i.eip, k, EXIT_FALLBACK))
        a.label(done)
        a.store_imm32(R15, OFF_REP_EIP, 0xFFFFFFFF)
        a._mem(b"\xff", 6, R15, OFF_TMP)
        a.popfq()
        return True

    def _string_page(self, seg: int, reg: int, table: int, host: int, count: int, log: int,
                     miss: str) -> None:  # fmt: skip
        """host = the host address of seg:reg (ESI/EDI), count = the elements left in its
        page (0: one crosses the page: miss, as for no TLB entry); R9 scratch."""
        a = self.a
        a.load32(R9, R15, OFF_SBASE + 4 * seg)
        a.raw(bytes((0x41, 0x01, 0xC1 | reg << 3)))  # add r9d, esi/edi
        a.mov_rr32(host, R9)
        a.shr32(host, 12)
        a.load64_index8(host, table, host)
        a.test64(host, host)
        a.jcc(4, miss)
        a.and32(R9, 0xFFF)
        a.add64(host, R9)
        a.mov_imm32(count, 0x1000)
        a._rr(b"\x29", R9, count)  # sub count, r9d
        a.shr32(count, log)
        a.jcc(4, miss)  # an element crosses the page

    def loop(self, i: Insn, k: int, restore: bool) -> bool:
        """LOOP/LOOPE/LOOPNE/JECXZ: ECX counted with LEA and tested with JECXZ, so the
        guest's flags stay in the host's."""
        if i.p66:
            return False
        a = self.a
        nxt = (i.eip + len(i.raw)) & 0xFFFFFFFF
        target = (nxt + int.from_bytes(i.raw[i.imm_at :], "little", signed=True)) & 0xFFFFFFFF
        taken = self.chain(target, k + 1)
        # Not taken: on with the next instruction, or a chain there where the block ends
        # (see _ends).
        if i.code == 0xE3:  # JECXZ
            a.raw(b"\x67\xe3\x02\xeb\x05")  # jecxz over the next jmp; jmp over the jmp
            a.jmp(taken)
        else:
            a.raw(b"\x8d\x49\xff")  # lea ecx, [rcx - 1]
            if i.code == 0xE2:
                a.raw(b"\x67\xe3\x05")  # jecxz over the jmp
            else:  # LOOPNE: ZF set stops; LOOPE: ZF clear
                a.raw(b"\x67\xe3\x07" + (b"\x74\x05" if i.code == 0xE0 else b"\x75\x05"))
            a.jmp(taken)
        if i.bf[4]:  # (_ends)
            a.jmp(self.chain(nxt, k + 1))
        return True

    def string1(self, i: Insn, k: int, restore: bool) -> bool:
        """LODS, STOS, SCAS, CMPS of one element, and REPE/REPNE SCAS/CMPS as a loop of
        them (each element through the TLB; a miss leaves with ECX/ESI/EDI as far as they
        got). A REP loop yields after REP_SLICE elements, as the closures do: EIP stays
        on the instruction, which counts as run."""
        if i.rep and i.code in (0xAA, 0xAB):
            return self.rep_string(i, k, restore)
        a = self.a
        code = i.code
        size = 1 if code & 1 == 0 else (2 if i.p66 else 4)
        pre = b"\x66" if size == 2 else b""
        lods, scas, cmps = code in (0xAC, 0xAD), code in (0xAE, 0xAF), code in (0xA6, 0xA7)
        n = self.n
        self.n += 1
        top, done, yld = f"rt{n}", f"rd{n}", f"ry{n}"
        saved = False
        if i.rep:
            # A fresh slice unless this instruction goes on after a TLB miss.
            go = f"rg{n}"
            a.raw(_SAVE)
            a.cmp_mem_imm32(R15, OFF_REP_EIP, i.eip)
            a.jcc(4, go)
            a.store_imm32(R15, OFF_REP_LEFT, REP_SLICE)
            a.store_imm32(R15, OFF_REP_EIP, i.eip)
            a.label(go)
            a.raw(_RESTORE)
            a.raw(b"\x67\xe3\x05")  # ECX = 0: nothing, the flags as they were
            a.jmp(top)
            a.jmp(done)
            a.label(top)
            a.raw(_SAVE)  # the guest flags (a miss or the yield shows them)
            saved = True
        # CMPS reads DS:ESI first (R12 keeps its host address), then ES:EDI.
        if cmps:
            a.load32(R9, R15, OFF_SBASE + 4 * DS)
            a.lea32(R9, R9, 0, index=6)  # flags untouched
            self.lookup(R9, size, False, k, False, reads=False, saved=saved)
            a.raw(b"\x4d\x89\xd4")  # mov r12, r10
            saved = True
        seg, reg = (DS, 6) if lods else (ES, 7)
        a.load32(R9, R15, OFF_SBASE + 4 * seg)
        a.lea32(R9, R9, 0, index=reg)  # flags untouched
        keep = restore and not (scas or cmps)  # SCAS/CMPS write every flag
        self.lookup(R9, size, code in (0xAA, 0xAB), k, keep, reads=False, saved=saved)
        if i.rep:  # after the lookups: an element that misses is not counted
            a.sub_mem_imm32(R15, OFF_REP_LEFT, 1)
            a.jcc(2, yld)  # JB: REP_SLICE elements done
        if lods:
            a.raw(pre + b"\x41" + (b"\x8a" if size == 1 else b"\x8b") + b"\x02")  # mov al, [r10]
        elif scas:
            a.raw(pre + b"\x41" + (b"\x3a" if size == 1 else b"\x3b") + b"\x02")  # cmp al, [r10]
        elif cmps:
            op = b"\x8a" if size == 1 else b"\x8b"
            a.raw(pre + b"\x45" + op + b"\x04\x24")  # mov r8b/r8w/r8d, [r12]
            op = b"\x3a" if size == 1 else b"\x3b"
            a.raw(pre + b"\x45" + op + b"\x02")  # cmp r8b/r8w/r8d, [r10]
        else:
            a.raw(pre + b"\x41" + (b"\x88" if size == 1 else b"\x89") + b"\x02")  # mov [r10], al
        a.load64(R8, R15, OFF_DSTEP)
        sib = (size.bit_length() - 1) << 6  # [reg + r8 * size]
        for r in (6, 7) if cmps else (reg,):
            a.raw(bytes((0x42, 0x8D, 0x04 | r << 3, sib | r)))  # lea e?i, [r?i + r8*size]
        if i.rep:
            a.raw(b"\x8d\x49\xff")  # lea ecx, [rcx - 1]
            a.raw(b"\x67\xe3\x06")  # jecxz over the jcc: done
            a.jcc(5 if i.rep == 0xF2 else 4, top)  # REPNE: on while not equal
            a.jmp(done)
            a.label(yld)
            a.store_imm32(R15, OFF_REP_EIP, 0xFFFFFFFF)
            a.raw(_RESTORE)
            a.jmp(self.exit_to(i.eip, k + 1, EXIT_END))
            a.label(done)
            a.store_imm32(R15, OFF_REP_EIP, 0xFFFFFFFF)
        return True

    # -- EFLAGS beyond the arithmetic flags (state sysfl) ------------------------------
    def _imm_mem(self, ext: int, disp: int, imm: int) -> None:
        """op dword [r15 + disp], imm32 (81 /ext: 1 OR, 4 AND, 6 XOR, 7 CMP)."""
        self.a._mem(b"\x81", ext, R15, disp)
        self.a.raw(imm.to_bytes(4, "little"))

    def _leave_if_request_waits(self, fb: str | int) -> None:
        """Setting IF: to `fb` (leave before the instruction) when an interrupt may be
        waiting for it, so that it is taken right after, as on the Python tiers."""
        a = self.a
        a.cmp_mem_imm32(R15, OFF_INTR, 0)
        a.jcc(5, fb)
        a.cmp_mem_imm32(R15, OFF_IRQ, 0)
        a.jcc(5, fb)

    def _flags_fallback(self, i: Insn, k: int) -> str:
        """A stub that puts the guest flags (R11) back and leaves for the Python tiers
        at instruction k."""
        name = self.n
        self.n = name + 1
        self.flag_exits.append((name, i.eip, k))
        return name

    def _emit_flag_exits(self) -> None:
        a = self.a
        buf, labels, fixups = a.buf, a.labels, a.fixups
        for name, eip, k in self.flag_exits:
            labels[name] = len(buf)
            buf += _FLAG_EXIT  # the flags back into the host's; jmp (its stub)
            fixups.append((len(buf) - 4, self.exit_to(eip, k, EXIT_FALLBACK)))

    def pushf(self, i: Insn, k: int, restore: bool) -> bool:
        """PUSHF: the arithmetic flags from the host's, the rest from the state (VM and RF
        read as 0)."""
        if i.p66:
            return False
        a = self.a
        self._stack_addr(-4)
        self.lookup(R12, 4, True, k, False, reads=False)  # R11: the guest flags
        a.mov_rr32(R8, R11)
        a.shr32(R8, 8)
        a.and32(R8, ARITH & 0xFF)  # SF ZF AF PF CF
        a.mov_rr32(R12, R11)
        a.and32(R12, 1)
        a.shl32(R12, 11)  # OF
        a._rr(b"\x09", R12, R8)  # or r8d, r12d
        a._mem(b"\x0b", R8, R15, OFF_SYSFL)  # or r8d, [r15 + sysfl]
        a.and32(R8, 0xFCFFFF)
        a.raw(b"\x45\x89\x02")  # mov [r10], r8d
        a.store32(R15, OFF_ESP, R9)
        a.raw(_RESTORE)
        return True

    def popf(self, i: Insn, k: int, restore: bool) -> bool:
        """POPF changing the arithmetic flags and IF only (IF where CLI could: `ifok`);
        anything else (DF, TF, IOPL, AC, NT, ID) leaves for the Python tiers before the
        instruction, and so does setting IF while an interrupt may be pending (it is
        taken right after POPF there). Not a block end here: with no request pending,
        one that comes later leaves at the next chain."""
        if i.p66:
            return False
        a = self.a
        ok, setif = f"pk{self.n}", f"ps{self.n}"
        self.n += 1
        fb = self._flags_fallback(i, k)
        self._stack_addr(0)
        self.lookup(R12, 4, False, k, False)  # R11: the guest flags
        a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]
        a.mov_rr32(R10, R8)
        a._mem(b"\x33", R10, R15, OFF_SYSFL)  # xor r10d, [r15 + sysfl]
        a.and32(R10, 0x247FD5 & ~ARITH)  # what POPF may change (32-bit), but ARITH
        a.jcc(4, ok)  # JE: the arithmetic flags only
        a.cmp32(R10, IF)
        a.jcc(5, fb)  # something else changes: Python
        a.cmp_mem_imm32(R15, OFF_IFOK, 0)
        a.jcc(4, fb)  # CPL > IOPL: Python (IF stays, the rest as popped)
        a.raw(b"\x41\xf7\xc0" + IF.to_bytes(4, "little"))  # test r8d, IF
        a.jcc(4, setif)  # clearing IF
        self._leave_if_request_waits(fb)  # the Python tiers take it after POPF
        a.label(setif)
        self._imm_mem(6, OFF_SYSFL, IF)  # xor: IF as popped
        a.label(ok)
        a.lea32(R9, R9, 4)
        a.store32(R15, OFF_ESP, R9)
        a.and32(R8, ARITH)
        a.push(R8)
        a.popfq()
        return True

    def cli(self, i: Insn, k: int, restore: bool) -> bool:
        """CLI (CPL > IOPL: #GP from the Python tiers). Turning IF off needs no exit: a
        request then waits, as on the Python tiers."""
        a = self.a
        fb = self._flags_fallback(i, k)
        a.raw(_SAVE)
        a.cmp_mem_imm32(R15, OFF_IFOK, 0)
        a.jcc(4, fb)
        self._imm_mem(4, OFF_SYSFL, ~IF & 0xFFFFFFFF)
        a.raw(_RESTORE)
        return True

    def sti(self, i: Insn, k: int, restore: bool) -> bool:
        """STI: setting IF while an interrupt may be pending leaves for the Python tiers
        (which take it after the next instruction); otherwise IF is set and the next
        instruction, translated in the same block (required: it is STI's interrupt
        shadow, so no chain or exit may come between), runs before any chain polls."""
        if k + 1 >= len(self.insns):
            return False
        a = self.a
        fb = self._flags_fallback(i, k)
        done = f"si{self.n}"
        self.n += 1
        a.raw(_SAVE)
        a._mem(b"\xf7", 0, R15, OFF_SYSFL)
        a.raw(IF.to_bytes(4, "little"))  # test dword [r15 + sysfl], IF
        a.jcc(5, done)  # set already: nothing (and no shadow)
        a.cmp_mem_imm32(R15, OFF_IFOK, 0)
        a.jcc(4, fb)
        a.cmp_mem_imm32(R15, OFF_INTR, 0)
        a.jcc(5, fb)
        a.cmp_mem_imm32(R15, OFF_IRQ, 0)
        a.jcc(5, fb)
        self._imm_mem(1, OFF_SYSFL, IF)
        a.label(done)
        a.raw(_RESTORE)
        return True

    def _cpl0_or_leave(self, i: Insn, k: int) -> str:
        """The guest flags into R11, and a leave for Python (returned: the flag exit)
        unless CPL is 0 (CPL <= IOPL with IOPL 0, or real mode)."""
        a = self.a
        fb = self._flags_fallback(i, k)
        a.raw(_SAVE)
        a.cmp_mem_imm32(R15, OFF_IFOK, 0)
        a.jcc(4, fb)  # CPL > IOPL: CPL > 0
        a._mem(b"\xf7", 0, R15, OFF_SYSFL)
        a.raw((0x3000).to_bytes(4, "little"))  # test dword [r15 + sysfl], IOPL
        a.jcc(5, fb)  # IOPL > 0: CPL may be too
        return fb

    def rdtsc(self, i: Insn, k: int, restore: bool) -> bool:
        """RDTSC at CPL 0 (elsewhere CR4.TSD may fault: Python): clock_gettime
        (CLOCK_MONOTONIC) called from here, scaled as Cpu.rdtsc scales it (not where
        Cpu.rdtsc is replaced, as the fuzz replaces it with a fixed counter)."""
        if not self.host_tsc:
            return False
        a = self.a
        self._cpl0_or_leave(i, k)
        # The host stack is 8 mod 16 in translated code: 4 pushes and 24 bytes (the
        # timespec) align it for the call. RAX, RDX are RDTSC's; RCX, RSI, RDI and the
        # flags are saved; the callee keeps RBX, RBP, R12-R15.
        a.push(R11)
        a.raw(b"\x51\x56\x57")  # push rcx; push rsi; push rdi
        a.raw(b"\x48\x83\xec\x18")  # sub rsp, 24
        a.raw(b"\xbf\x01\x00\x00\x00")  # mov edi, CLOCK_MONOTONIC
        a.raw(b"\x48\x89\xe6")  # mov rsi, rsp
        a._mem(b"\xff", 2, R15, OFF_CLOCK)  # call [r15 + clock]
        a.raw(b"\x48\x69\x04\x24\x00\xca\x9a\x3b")  # imul rax, [rsp], 10^9
        a.raw(b"\x48\x03\x44\x24\x08")  # add rax, [rsp + 8]: nanoseconds
        a._mem(b"\xf7", 4, R15, OFF_TSC_HZ, w=True)  # mul qword [r15 + tsc_hz]
        a.raw(b"\x41\xb8\x00\xca\x9a\x3b")  # mov r8d, 10^9
        a.raw(b"\x49\xf7\xf0")  # div r8
        a._mem(b"\x03", RAX, R15, OFF_TSC_OFF, w=True)  # add rax, [r15 + tsc_off]
        a.raw(b"\x48\x89\xc2\x48\xc1\xea\x20")  # mov rdx, rax; shr rdx, 32
        a.raw(b"\x89\xc0")  # mov eax, eax
        a.raw(b"\x48\x83\xc4\x18")  # add rsp, 24
        a.raw(b"\x5f\x5e\x59")  # pop rdi; pop rsi; pop rcx
        a.pop(R11)
        a.raw(_RESTORE)
        return True

    def fence(self, i: Insn, k: int, restore: bool) -> bool:
        """LFENCE, MFENCE, SFENCE (the register forms; CLFLUSH and the rest: Python): the
        Python tiers order everything already, so do translated blocks. With 66, F2 or F3
        (NP in the SDM: #UD, or another instruction) Python runs it."""
        return i.mem is None and not i.p66 and not i.rep

    def push_cs(self, i: Insn, k: int, restore: bool) -> bool:
        """PUSH CS (32-bit): ESP -= 4 with the dword checked, only the low word written
        (the selector, NativeState.cs_sel), as the closure does."""
        if i.p66:
            return False
        self._push_state_field(k, restore, OFF_CS_SEL, b"\x66\x45\x89\x02")  # mov [r10], r8w
        return True

    def invlpg(self, i: Insn, k: int, restore: bool) -> bool:
        """INVLPG at CPL 0 of a page without translated code (codemap): its entries in
        the current TLB tables go here, the page goes into inv_ring and Python does the
        rest of Cpu.tlb_flush at the exit (NativeTier.invlpg_ring) before anything reads
        a TLB there. Elsewhere (CPL > 0, a code page, the ring full) Python runs it."""
        if i.mem is None:
            return False
        a = self.a
        fb = self._cpl0_or_leave(i, k)
        self.address(i.mem, R9)
        a.mov_rr32(R10, R9)
        a.shr32(R10, 12)
        a.load64(R8, R15, OFF_CODEMAP)
        a.raw(b"\x4d\x0f\xa3\x10")  # bt [r8], r10
        a.jcc(2, fb)  # JB: the page holds translated code
        a.load32(R8, R15, OFF_INV_N)
        a.cmp32(R8, INV_RING)
        a.jcc(3, fb)  # JAE: the ring is full
        a.raw(b"\x47\x89\x94\x87" + _s32(OFF_INV_RING))  # mov [r15 + r8*4 + ring], r10d
        a.lea32(R8, R8, 1)
        a.store32(R15, OFF_INV_N, R8)
        a.raw(b"\x4b\xc7\x04\xd6\x00\x00\x00\x00")  # mov qword [r14 + r10*8], 0
        a.raw(b"\x4b\xc7\x44\xd5\x00\x00\x00\x00\x00")  # mov qword [r13 + r10*8], 0
        a.raw(_RESTORE)
        a.jmp(self.chain((i.eip + len(i.raw)) & 0xFFFFFFFF, k + 1))
        return True

    def iret(self, i: Insn, k: int, restore: bool) -> bool:
        """IRET (32-bit) at CPL 0 to the same CS (Linux's sync_core), changing the
        arithmetic flags and IF only (IF set while a request may be pending: Python, as
        POPF): EIP, CS, EFLAGS read from the stack, the CS descriptor in the GDT checked
        to still hold what the CS cache came from (state iret_*: what Python's reload
        would give is then the cache as it is). Anything else (another CS or privilege,
        VM, NT, other flags, a miss) leaves before it with the state as it was. The
        descriptor check reads guest RAM at host addresses NativeTier.cs_changed
        validated, not through the TLB: Python's reload walks the page tables."""
        if i.p66:
            return False
        a = self.a
        fb = self._flags_fallback(i, k)
        ok = f"ik{self.n}"
        self.n += 1
        a.raw(_SAVE)
        a.cmp_mem_imm32(R15, OFF_IRET_OK, 0)
        a.jcc(4, fb)  # JE: not protected mode at CPL 0 with a GDT code selector
        a._mem(b"\xf7", 0, R15, OFF_SYSFL)
        a.raw((VM | NT).to_bytes(4, "little"))  # test dword [r15 + sysfl], VM | NT
        a.jcc(5, fb)
        self._stack_addr(0)
        self.lookup(R12, 12, False, k, False, saved=True)
        a.raw(b"\x45\x0f\xb7\x42\x04")  # movzx r8d, word [r10 + 4]: CS
        a._mem(b"\x3b", R8, R15, OFF_CS_SEL)  # cmp r8d, [r15 + cs_sel]
        a.jcc(5, fb)
        a.raw(b"\x45\x8b\x42\x08")  # mov r8d, [r10 + 8]: EFLAGS
        a.mov_rr32(R12, R8)
        a._mem(b"\x33", R12, R15, OFF_SYSFL)  # xor r12d, [r15 + sysfl]
        a.raw(b"\x41\xf7\xc4" + ((0x257FD5 | VM) & ~ARITH & ~IF).to_bytes(4, "little"))
        a.jcc(5, fb)  # test r12d, <the rest>; JNE: VM, TF, DF, IOPL, NT, RF, AC, ID change
        a.raw(b"\x41\xf7\xc4" + IF.to_bytes(4, "little"))  # test r12d, IF
        a.jcc(4, ok)  # IF stays
        a.raw(b"\x41\xf7\xc0" + IF.to_bytes(4, "little"))  # test r8d, IF
        a.jcc(4, ok)  # clearing IF
        self._leave_if_request_waits(fb)  # the Python tiers take it after IRET
        a.label(ok)
        a.store32(R15, OFF_TMP2, R8)
        a.raw(b"\x45\x8b\x02")  # mov r8d, [r10]: EIP
        a.store32(R15, OFF_TMP, R8)
        # The GDT page's PDE and PTE and the descriptor, in guest RAM, as they were.
        for ptr, val in ((OFF_IRET_PDE, OFF_IRET_PDEV), (OFF_IRET_PTE, OFF_IRET_PTEV)):
            a.load64(R8, R15, ptr)
            a.raw(b"\x45\x8b\x00")  # mov r8d, [r8]
            a._mem(b"\x3b", R8, R15, val)  # cmp r8d, [r15 + value]
            a.jcc(5, fb)
        a.load64(R8, R15, OFF_IRET_DHOST)
        a.raw(b"\x4d\x8b\x00")  # mov r8, [r8]
        a._mem(b"\x3b", R8, R15, OFF_IRET_DESC, w=True)  # cmp r8, [r15 + iret_desc]
        a.jcc(5, fb)  # changed: Python reloads it
        # Nothing has changed so far; now IRET's effects.
        a.load32(R8, R15, OFF_TMP2)
        a.raw(b"\x45\x33\x87" + _s32(OFF_SYSFL))  # xor r8d, [r15 + sysfl]
        a.and32(R8, IF)
        a._mem(b"\x31", R8, R15, OFF_SYSFL)  # xor [r15 + sysfl], r8d: IF as popped
        a.lea32(R9, R9, 12)
        a.store32(R15, OFF_ESP, R9)
        a.load32(R8, R15, OFF_TMP2)
        a.and32(R8, ARITH)
        a.push(R8)
        a.popfq()
        a.load32(R8, R15, OFF_TMP)
        a.jmp(self.chain(None, k + 1))
        return True

    def branch(self, i: Insn, k: int, restore: bool) -> bool:
        """JMP rel: the end of the block; Jcc: its taken side chains, the block goes on
        (see _ends). A branch to the block's start loops."""
        if i.p66:
            return False
        nxt = (i.eip + len(i.raw)) & 0xFFFFFFFF
        target = (nxt + int.from_bytes(i.raw[i.imm_at :], "little", signed=True)) & 0xFFFFFFFF
        taken = self.chain(target, k + 1)
        if i.row.mnemonic == "JMP":
            self.a.jmp(taken)
        else:
            self.a.jcc(i.code & 15, taken)
            if i.bf[4]:  # backward (_ends): the block ends, the fall side chains
                self.a.jmp(self.chain(nxt, k + 1))
        return True

    def _keep_fragment(self, key: tuple, k: int, at: int, dsz: int, mark: tuple,
                       imm: bytes) -> None:  # fmt: skip
        """Keep what instruction k just emitted from buf[at] (one of _FRAGMENT_KINDS: its
        bytes and TLB lookups, nothing else) for the next one with the same key: its shape,
        immediate, restore and flags in R11; a displacement (dsz: its size in the guest's
        bytes) is the four bytes address() wrote; `imm`, not in the key, ends the code."""
        a = self.a
        if imm and self.imm_end != len(a.buf):
            return  # something follows the immediate (ESP's store): not kept
        disp_at = -1
        if dsz:
            if len(self.disps) != mark[9] + 1:
                return
            disp_at = self.disps[-1] - at
        misses = self.misses[mark[2] :]
        if (len(a.fixups), len(self.chains), len(self.stubs), len(self.flag_exits),
                len(a.labels), self.n) != (mark[1], *mark[3:6], *mark[7:9]):  # fmt: skip
            return
        looks = []
        for f1, f2, t, kk in misses:
            if kk != k:
                return
            looks.append((f1 - at, f2 - at, t))
        if len(_FRAGMENTS) > _CACHE_MAX:
            _FRAGMENTS.clear()
        _FRAGMENTS[key] = (bytes(a.buf[at : len(a.buf) - len(imm)]), tuple(looks), disp_at)

    # -- the block -------------------------------------------------------------------
    def build(self, insns: list[tuple], fall: int) -> tuple[bytes | None, int]:
        """Host code for insns (_translate_code's items, all parsed; `fall` is the EIP
        after the last one) and how many of them it translates: fewer where one cannot
        be. The block then ends before that one, chaining to it; where the flag liveness
        it was built with differs from that ending (something after it killed flags the
        exit shows), it returns (None, the count) and the caller builds that prefix
        again."""
        self.insns = insns
        self.misses: list = []
        self.chains: list = []
        self.flag_exits: list = []
        # Flag liveness from the table: restore the guest flags after a TLB lookup only
        # where something reads them before they are all written (or the block ends).
        live = ARITH
        n = len(insns)
        live_out = [0] * n
        bfs = [it[2] for it in insns]
        for k in range(n - 1, -1, -1):
            live_out[k] = live
            bf = bfs[k]
            live = ARITH if bf[6] else (live & ~bf[7]) | bf[1]  # bf[6]: its TLB miss (or a
            # branch) may leave before it: all flags show there
        a = self.a
        buf, fixups, labels = a.buf, a.fixups, a.labels
        misses, chains, stubs, flag_exits = self.misses, self.chains, self.stubs, self.flag_exits
        done = 0
        # carry: the guest flags wait in R11 and the host's may be anything: at the start
        # (every block is entered so), after a lookup that did not put them back because
        # the next instruction's lookup saves them first, and through instructions that
        # neither read nor keep a live flag.
        carry = True
        self.flags_in_r11 = False
        match = MATCH_PYTHON_FLAGS
        for k, it in enumerate(insns):
            (esp_refused, reads, gives_ok, takes, ends, cached, _, kill, differs, shape, dsz,
             imm_mode, _, blind_ok, writes, imm_at, _, _) = bfs[k]  # fmt: skip
            lo = live_out[k]
            i = it[3]
            if differs and match and differs & lo:
                i = i or _full(it)
                fix = _flag_fix(i, differs & lo)
                if fix is None:
                    break  # the Python tiers run it, with their values of those flags
                fix0, fix1 = fix
            else:
                fix0 = fix1 = b""
            if esp_refused:
                break
            mark_carry = carry
            before = len(buf)
            # An instruction without a memory operand or an exit that reads no flag and
            # writes none (R11 keeps them) or writes every live one runs on whatever the
            # host's flags are.
            blind = carry and blind_ok and not (fix0 or fix1 or writes and lo & ~kill)
            if carry and not blind and (fix0 or not takes):
                buf += _RESTORE
                carry = False
            if fix0:
                buf += fix0
            in_r11 = carry and not blind
            # After a TLB lookup the guest flags go back into the host's only where the
            # instruction reads them or leaves some live ones as they were.
            gives = gives_ok and k + 1 < n and bfs[k + 1][3]
            restore = bool(reads | (lo & ~kill)) and not gives
            at = len(buf)
            if cached:
                key = (shape, it[1][imm_at:] if imm_mode == 1 else b"", restore, in_r11)
                frag = _FRAGMENTS.get(key)
            else:
                frag = key = None
            if frag is not None:  # the bytes this shape gave last time, and its misses
                buf += frag[0]
                if dsz:
                    _U32.pack_into(buf, at + frag[2], it[5] & 0xFFFFFFFF)
                if imm_mode == 2:
                    buf += it[1][imm_at:]
                for f1, f2, t in frag[1]:
                    misses.append((at + f1, at + f2, t, k))
            elif it[3] is None and it[4][4].native == "branch" and not it[4][5]:
                # Translator.branch, from the item (a quarter of a boot's instructions that
                # are not kept code): a Jcc's taken side or a JMP chains; a backward Jcc
                # ends the block, its fall side chaining too.
                raw = it[1]
                nxt = (it[0] + len(raw)) & 0xFFFFFFFF
                name = self.n
                chains.append(
                    (name, (nxt + int.from_bytes(raw[imm_at:], "little", signed=True))
                     & 0xFFFFFFFF, k + 1, False))  # fmt: skip
                jmp = it[4][4].mnemonic == "JMP"
                buf += b"\xe9" if jmp else _JCC[it[4][7] & 15]
                fixups.append((len(buf), name))
                buf += b"\0\0\0\0"
                if ends and not jmp:
                    name += 1
                    chains.append((name, nxt, k + 1, False))
                    buf += b"\xe9"
                    fixups.append((len(buf), name))
                    buf += b"\0\0\0\0"
                self.n = name + 1
            elif it[3] is None and it[4][4].native in ("call", "ret") and not it[4][5]:
                # Translator.call and .ret, from the item: the push or pop through the TLB
                # (the code before the stored or loaded dword kept by restore and flags in
                # R11), ESP, a chain to the target (CALL) or to the popped EIP (RET).
                raw = it[1]
                name = self.n
                self.n = name + 1
                if it[4][7] == 0xE8:  # CALL rel32
                    code, f1, f2 = _call_ret_head(True, restore, in_r11)
                    buf += code
                    misses.append((at + f1, at + f2, _MISS.get(R12 << 2 | 1)
                                   or _miss_exit(R12, 1), k))  # fmt: skip
                    nxt = (it[0] + len(raw)) & 0xFFFFFFFF
                    buf += _CALL_TAIL.pack(b"\x41\xc7\x02", nxt, _STORE_ESP_R9, 0xE9)
                    chains.append(
                        (name, (nxt + int.from_bytes(raw[imm_at:], "little", signed=True))
                         & 0xFFFFFFFF, k + 1, False))  # fmt: skip
                else:  # RET, RET imm16
                    code, f1, f2 = _call_ret_head(False, restore, in_r11)
                    buf += code
                    misses.append((at + f1, at + f2, _MISS.get(R12 << 2) or _miss_exit(R12, 0),
                                   k))  # fmt: skip
                    extra = int.from_bytes(raw[imm_at:], "little") if it[4][7] == 0xC2 else 0
                    a.lea32(R9, R9, 4 + extra)
                    buf += _STORE_ESP_R9 + b"\xe9"
                    chains.append((name, None, k + 1, False))
                fixups.append((len(buf), name))
                buf += b"\0\0\0\0"
            else:
                self.flags_in_r11 = in_r11
                mark = (before, len(fixups), len(misses), len(chains), len(stubs),
                        len(flag_exits), mark_carry, len(labels), self.n,
                        len(self.disps))  # fmt: skip
                if i is None:
                    i = _full(it)
                if getattr(self, i.row.native)(i, k, restore):
                    if cached:
                        self._keep_fragment(key, k, at, dsz, mark,
                                            it[1][imm_at:] if imm_mode == 2 else b"")  # fmt: skip
                else:
                    # What it emitted before refusing goes (its labels stay, unused).
                    del buf[mark[0] :], fixups[mark[1] :], misses[mark[2] :]
                    del chains[mark[3] :], stubs[mark[4] :], flag_exits[mark[5] :]
                    carry = mark[6]  # the flags still wait in R11 if they did before it
                    break
                assert not self.flags_in_r11  # its lookup took them
            # (blind: the flags it writes are the live ones; none: R11 still has them)
            carry = not writes if blind else gives
            if fix1:
                buf += fix1
            done = k + 1
            if ends:
                break
        if carry:  # the block ends before the instruction that was to take them
            buf += _RESTORE
        self.flags_in_r11 = False
        if done and bfs[done - 1][12]:
            return None, done - 1  # no chain or exit may come between STI and its shadow
        if done == 0:
            return None, 0
        last = insns[done - 1]
        if done < n:
            bf = bfs[done]  # (the flags live before it)
            if not bf[6] and (live_out[done] & ~bf[7]) | bf[1] != ARITH:
                return None, done  # built with the wrong liveness
            fall = (last[0] + len(last[1])) & 0xFFFFFFFF
            n = done
        if not bfs[done - 1][4]:  # (_ends)
            nxt = (last[0] + len(last[1])) & 0xFFFFFFFF
            if done == n and fall == nxt:
                a.jmp(self.chain(nxt, done))  # the block ends at its size or page limit
            else:
                a.jmp(self.exit_to(nxt, done, EXIT_FALLBACK))
        if flag_exits:
            self._emit_flag_exits()
        if chains:
            self._emit_chains()
        if stubs:
            self._emit_stubs()  # (and the epilogue)
        elif misses:
            labels["epilogue"] = len(buf)
            buf += _EPILOGUE  # (no exit goes there but these: none where neither is)
        if misses:
            self._emit_misses()
        pack = _REL32.pack_into  # (Asm.finish)
        for at, name in fixups:
            pack(buf, at, labels[name] - at - 4)
        return bytes(buf), done


def clear_caches() -> None:
    """Forget every memoized parse, encoding and kept host code (bench/native_translate.py:
    a replay's pass then costs what a boot's first translations cost)."""
    _SHAPE1[:] = [None] * 256
    for cache in (_SHAPES, _FRAGMENTS, _LOOKUP, _MISS, _STACK_ADDR, _ROWS, _FACTS, _CALL_RET):
        cache.clear()
    clear_encodings()


def translate_block(read, eip: int, page_left: int, flat: int = 0x3F,
                    host_tsc: bool = True, shadows: set[int] | None = None,
                    extent: list | None = None) -> tuple[bytes, int, int] | None:  # fmt: skip
    """Host code for the block at eip: read(n) gives the guest code bytes there (up to
    the end of its page, `page_left` bytes). Returns (code, instructions, the override
    segments its instructions name: bit i for segment i) or None.
    `shadows` gets the EIP of each instruction in a translated STI's shadow. `extent`
    gets the guest bytes (from eip) the result depends on and whether it depends on
    `flat` (an instruction with a segment override): with those bytes, those
    arguments and MATCH_PYTHON_FLAGS the same, the result is the same (NativeTier keeps
    translations by it)."""
    # Most blocks look at a few dozen bytes: the rest of the page is read only for a scan
    # that came near the end of the first part (whatever depends on where the bytes end
    # lies within 15 bytes of that end).
    n = page_left if page_left <= FIRST_READ else FIRST_READ
    code = read(n)
    scanned = [0, False]
    out = _translate_code(code, eip, flat, host_tsc, shadows, True, scanned)
    if n < page_left and scanned[0] + 15 > n:
        code = read(page_left)
        scanned = [0, False]
        out = _translate_code(code, eip, flat, host_tsc, shadows, True, scanned)
    if extent is not None:
        extent += (code[: scanned[0]], scanned[1])
    return out


def _translate_code(code: bytes, eip: int, flat: int, host_tsc: bool,
                    shadows: set[int] | None, skim: bool,
                    scanned: list[int]) -> tuple[bytes, int, int] | None:  # fmt: skip
    """translate_block on the guest bytes. With skim, the instructions after the first
    forward conditional branch are only measured (no Insn) until the block's end: they
    are kept only where the block is a loop's body (about 2 in 5 of the instructions a
    boot parses were dropped there), and where it is one the scan is done again in full.
    scanned: [the guest bytes looked at, whether `flat` was asked] (translate_block's
    extent)."""
    insns: list[tuple] = []  # _Item tuples
    skimmed = 0  # instructions measured only
    last_skim = -1  # offset of the last instruction measured only
    skim_end = -1  # where it ends (== pos at the end: the scan ended on it)
    pos = 0
    end = len(code)
    sti = False
    first_branch = 0  # instructions up to the first conditional branch
    looked = 0  # (scanned)
    end_loop = None  # the scan ended on a measured block end: it branches to eip
    shape1, shapes = _SHAPE1, _SHAPES
    for _ in range(MAX_INSNS):
        if pos >= end:
            break
        # parse's cache, inline (most instructions are in it)
        e = shape1[code[pos]] or shapes.get(code[pos : pos + 2]) or shapes.get(code[pos : pos + 3])
        if e is not None and pos + e[0] <= end and (e[1] < 0 or e[1] == flat):
            if e[1] >= 0:
                scanned[1] = True  # a segment override: allowed by `flat`
            bf = e[16]
            size = e[0]
            if first_branch and skim:  # past the first branch: measure
                if bf is None:
                    bf = e[17].get(code[pos + size - 1])
                if bf is not None:
                    if bf[4]:  # the block's end: a loop's body where it branches to eip
                        end_loop = bool(bf[16]) and _rel_target(
                            eip + pos, code[pos : pos + size], bf[15]) == eip  # fmt: skip
                        pos += size
                        break
                    last_skim = pos
                    pos += size
                    skim_end = pos
                    skimmed += 1
                    continue
            raw = code[pos : pos + size]
            if bf is None:
                bf = e[17].get(raw[-1])
            if bf is None:  # (its facts, first seen with this last byte)
                i = _insn(e, raw, (eip + pos) & 0xFFFFFFFF)
                it = (i.eip, raw, i.bf, i, e, 0 if i.mem is None else i.mem.disp)
                bf = i.bf
            elif e[3]:  # a displacement
                dpos = e[2]
                disp = int.from_bytes(raw[dpos : dpos + e[3]], "little", signed=True)
                it = ((eip + pos) & 0xFFFFFFFF, raw, bf, None, e, disp)
            else:
                it = ((eip + pos) & 0xFFFFFFFF, raw, bf, None, e, 0)
        else:
            if not scanned[1] and _has_override(code, pos):
                scanned[1] = True
            i = parse(code[pos : pos + 15], (eip + pos) & 0xFFFFFFFF, flat)
            if i is None:
                looked = pos + 15  # up to 15 bytes of the one it does not take
                break
            bf = i.bf
            it = (i.eip, i.raw, bf, i, None, 0 if i.mem is None else i.mem.disp)
            size = len(i.raw)
        insns.append(it)
        pos += size
        if bf[4]:  # it ends the block
            break
        if bf[17]:  # STI or a conditional branch
            sti = sti or bf[12]
            if not first_branch and bf[16]:
                first_branch = len(insns)
    if looked < pos:
        looked = pos
    if looked > scanned[0]:
        scanned[0] = looked
    # A block goes on past a forward conditional branch only where it is a loop's body
    # (it ends with a branch back to its start): elsewhere the code after the branch,
    # often cold or a join point that other blocks reach too, would be translated in
    # each block that falls into it.
    if skimmed or end_loop is not None:
        if end_loop is not None:
            loop = end_loop
        elif skim_end == pos:  # the scan ended on a measured one (MAX_INSNS, page end,
            # or one not taken after it)
            last = parse(code[last_skim : last_skim + 15], (eip + last_skim) & 0xFFFFFFFF, flat)
            loop = last is None or _target(last) == eip
        else:
            loop = _item_target(insns[-1]) == eip
        if loop:  # a loop's body: all of it, in full
            return _translate_code(code, eip, flat, host_tsc, shadows, False, scanned)
        insns = insns[:first_branch]
        pos = (insns[-1][0] - eip & 0xFFFFFFFF) + len(insns[-1][1])
    elif first_branch and first_branch < len(insns) and _item_target(insns[-1]) != eip:
        insns = insns[:first_branch]
        pos = (insns[-1][0] - eip & 0xFFFFFFFF) + len(insns[-1][1])
    if not insns:
        return None
    fall = (eip + pos) & 0xFFFFFFFF
    while True:
        out, done = Translator(eip, host_tsc).build(insns, fall)
        if out is not None:
            if shadows is not None and sti:
                shadows.update(insns[k + 1][0] for k in range(done - 1) if insns[k][2][12])
            segs = 0  # the override segments the code inlines (each flat when translated)
            if scanned[1]:  # (an override was seen)
                for it in insns[:done]:
                    seg = it[4][14] if it[3] is None else it[3].override
                    if seg is not None:
                        segs |= 1 << seg
            return out, done, segs
        if done == 0:
            return None
        insns = insns[:done]  # the block ends after them: build again with that liveness
        fall = (insns[-1][0] + len(insns[-1][1])) & 0xFFFFFFFF


__all__ = ["EXIT_END", "EXIT_FALLBACK", "EXIT_MISS", "RSI", "runtime_stubs", "translate_block"]
