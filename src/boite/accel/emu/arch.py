"""Architectural constants shared by the CPU, the decoder, the opcode table and the
translators: register and segment numbers, EFLAGS bits, exception vectors, mode_key bits,
and the exceptions an instruction raises. It imports nothing from the emulator, so every
other module can import it (this breaks the cpu <-> decode <-> jit import circle).
"""

from __future__ import annotations

M8, M16, M32 = 0xFF, 0xFFFF, 0xFFFFFFFF

# Segment register numbers, in the order the ModRM reg field names them.
ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# EFLAGS bits.
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 1, 4, 0x10, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800
IOPL, NT, RF, VM, AC, ID = 0x3000, 0x4000, 0x10000, 0x20000, 0x40000, 0x200000
ARITH = CF | PF | AF | ZF | SF | OF

# Lazy flag operations: the flags of the last arithmetic result are computed on demand.
OP_NONE, OP_ADD, OP_SUB, OP_LOGIC, OP_INC, OP_DEC = range(6)

PARITY = bytes(4 if bin(i).count("1") % 2 == 0 else 0 for i in range(256))

# Exception vectors.
DE, DB, NMI, BP, OF_VEC, BR, UD, NM, DF_VEC, TS, NP, SS_VEC, GP, PF_VEC = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14,
)  # fmt: skip
MF, XM = 16, 19  # x87 floating-point error, SIMD floating-point exception
CONTRIBUTORY = frozenset((DE, TS, NP, SS_VEC, GP))
HAS_ERROR_CODE = frozenset((DF_VEC, TS, NP, SS_VEC, GP, PF_VEC, 17))

# Segment checks on access (Intel SDM vol. 3, 5.3 and 5.4). Each segment register has an
# offset range [slo, srhi] for reads and [slo, swhi] for writes, computed whenever its
# hidden cache changes; an access of n bytes at offset o is good when o >= slo and
# o + n - 1 <= the high end. An unreadable/unwritable/null segment has a high end of -1.
# A 4 GiB expand-up segment gets SEG_BIG, so offsets that wrap past 4 GiB do not fault.
SEG_BIG = 1 << 33
# mode_key bit: ES, SS or DS is not flat (4 GiB, expand-up, present, writable data), so
# decode/ emits closures that check every access through them and the block compiler
# inlines nothing. Accesses through CS, FS and GS (prefixed) are always checked at run time.
SEGCHK = 8
FLAT_SEGS_MASK = (1 << ES) | (1 << SS) | (1 << DS)
OVERRIDE_SEGS_MASK = (1 << CS) | (1 << FS) | (1 << GS)
STACK16 = 64  # mode_key bit: SS is a 16-bit stack segment
# Virtual-8086 mode segments: present, DPL 3, read/write data (as VMX loads them), with
# real-mode bases and 64 KiB limits.
VM86_SEG_ATTR = 0xF3


def override_flat_bits(segs: int) -> int:
    """The mode_key bits that say "not flat" for the override segments (CS, FS, GS)
    among `segs` (bit i = segment i): what inlined overrides depend on."""
    return (segs & OVERRIDE_SEGS_MASK) << 4


class CpuFault(Exception):
    """An architectural exception raised while executing an instruction."""

    __slots__ = ("vector", "error")

    def __init__(self, vector: int, error: int | None = None) -> None:
        self.vector = vector
        self.error = error


class TripleFault(Exception):
    pass


class CpuHalt(Exception):
    """HLT executed: the run loop waits for an interrupt."""


class CpuStop(Exception):
    """Leave the run loop at an instruction boundary (I/O asked for power-off, pause)."""


# Operand size in bytes -> value mask / sign bit (8: IDIV r/m32's EDX:EAX dividend).
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
SIGN = {1: 0x80, 2: 0x8000, 4: 0x80000000, 8: 1 << 63}
# Segment-override prefix byte -> segment register number.
SEG_PREFIX = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}


def sx8(v: int) -> int:
    """A byte as a signed value."""
    return v - 0x100 if v & 0x80 else v
