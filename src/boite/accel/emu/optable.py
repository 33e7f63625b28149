"""The opcode table: one row per opcode (or opcode + ModRM reg extension) that the
emulator knows, and everything about it that is not its semantics.

Every tier reads this table instead of keeping its own copy:
- the decoder (`decode/`) dispatches on it (`Op.decode` names the `Decoder` method that
  builds the instruction's closure), takes from it where LOCK is legal and where a
  block must end;
- the block compiler (`jit.py`) inlines exactly the rows whose `Op.jit` names one of its
  `Emitter` methods, and calls the closure for the others;
- the native tier (`native/`) translates the rows whose `Op.native` is set and ends its
  block before any other.

Columns (SDM vol. 2 notation for the operands, e.g. "Ev,Gv": E = ModRM r/m, G = ModRM
reg, I = immediate, J = relative offset, M = memory only, S = segment register; b/w/d/v/z
sizes):
- `flags_read` / `flags_written` / `flags_undefined`: EFLAGS masks. Written means the
  instruction defines the bit; undefined bits may change in a way the SDM leaves open
  (tests compare them only where both peers define them).
- `lock`: LOCK is legal (with a memory destination); otherwise a LOCK prefix is #UD.
- `ends_block`: the instruction ends a translated block (control flow, a change of mode,
  of the interrupt flag or of anything translated code assumes, device side effects).
- `privilege`: "" any CPL; "cpl0": #GP outside ring 0; "iopl": needs CPL <= IOPL (in
  virtual-8086 mode: IOPL = 3); "io": IOPL or the TSS I/O bitmap; "pm": #UD in real and
  virtual-8086 mode; "tsd": ring 0 only when CR4.TSD is set; "pce": ring 0 unless CR4.PCE
  is set.

How to add an instruction (e.g. an x87 or SSE one):
1. Write the decoder method that builds its closure in a `decode/` group module (a mixin
   class, e.g. `decode/fpu.py` `class FpuOps`), calling the semantics in `fpu.py`/`sse.py`,
   and add the mixin to `Decoder`'s bases in `decode/__init__.py`.
2. Add its rows below with `decode="_that_method"`: `op(0xD9, "FLD", "m32fp", ext=0, ...)`
   for a ModRM-extension row, `op(0x58, "ADDPS", "Vps,Wps", map="0F", ...)`, with
   `prefix=0x66/0xF2/0xF3` for a mandatory-prefix form (rows of one opcode that differ by
   `ext` or `prefix` may name different methods: the decoder selects among them).
3. `tests/accel/test_optable.py` checks the table (unique keys, methods exist, flag
   columns against the closures) - run it.
The Python tiers need nothing else: an instruction without a `jit` method runs through
its closure inside compiled blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from boite.accel.emu.arch import AF, CF, DF, IF, OF, PF, SF, TF, ZF

_FLAG_LETTERS = {"c": CF, "p": PF, "a": AF, "z": ZF, "s": SF, "t": TF, "i": IF, "d": DF, "o": OF}
ALL_FLAGS = 0x3F7FD5  # every EFLAGS bit software can see (POPF, IRET, SAHF-like rows)


def flags(spec: str) -> int:
    """EFLAGS mask from letters ("oszapc"), or "*" for all of them."""
    if spec == "*":
        return ALL_FLAGS
    m = 0
    for ch in spec:
        m |= _FLAG_LETTERS[ch]
    return m


@dataclass(frozen=True, slots=True)
class Op:
    map: str  # "" one-byte, "0F" two-byte (later "0F38", "0F3A")
    code: int
    ext: int | None  # ModRM reg field of a group opcode; None: the whole opcode
    prefix: int | None  # mandatory prefix (0x66, 0xF2, 0xF3) of an SSE form; None: any
    mnemonic: str
    operands: str
    flags_read: int
    flags_written: int
    flags_undefined: int
    lock: bool
    ends_block: bool
    privilege: str
    decode: str  # Decoder method building the closure
    jit: str | None  # Emitter method inlining it (jit.py); None: the closure is called
    native: str | None  # native tier translator; None: ends a native block

    @property
    def tiers(self) -> tuple[str, ...]:
        """Which tiers implement the row ("closures" always: it is the reference)."""
        return ("closures",) + (("jit",) if self.jit else ()) + (("native",) if self.native else ())


ROWS: list[Op] = []


def op(
    code: int,
    mnemonic: str,
    operands: str = "",
    *,
    map: str = "",  # noqa: A002 - the SDM's name for it
    ext: int | None = None,
    prefix: int | None = None,
    r: str = "",
    w: str = "",
    u: str = "",
    lock: bool = False,
    end: bool = False,
    priv: str = "",
    decode: str,
    jit: str | None = None,
    native: str | None = None,
) -> None:
    """Add a row: r/w/u are the flags read, written and left undefined (letters)."""
    ROWS.append(
        Op(map, code, ext, prefix, mnemonic, operands, flags(r), flags(w), flags(u), lock, end,
           priv, decode, jit, native)
    )  # fmt: skip


# Condition codes (the low nibble of Jcc/SETcc/CMOVcc) -> their mnemonic suffix and the
# flags they read.
CONDITIONS = (
    ("O", "o"), ("NO", "o"), ("B", "c"), ("AE", "c"), ("E", "z"), ("NE", "z"), ("BE", "cz"),
    ("A", "cz"), ("S", "s"), ("NS", "s"), ("P", "p"), ("NP", "p"), ("L", "so"), ("GE", "so"),
    ("LE", "zso"), ("G", "zso"),
)  # fmt: skip
ALU_NAMES = ("ADD", "OR", "ADC", "SBB", "AND", "SUB", "XOR", "CMP")
SHIFT_NAMES = ("ROL", "ROR", "RCL", "RCR", "SHL", "SHR", "SAL", "SAR")
OSZAPC = "oszapc"


def _alu_flags(n: int) -> dict[str, str]:
    """Flags of ALU operation n (the ModRM reg / opcode bits 5:3)."""
    if n in (1, 4, 6):  # OR AND XOR: OF=CF=0, AF undefined
        return {"w": "oszpc", "u": "a"}
    return {"w": OSZAPC, "r": "c" if n in (2, 3) else ""}


def _shift_flags(n: int, by_count: bool) -> dict[str, str]:
    """Flags of shift/rotate n (the ModRM reg field). A count from CL or an immediate may
    be 0 (after masking), which leaves every flag as it was: those forms read what they
    write."""
    if n in (0, 1):
        fl = {"w": "co", "u": "o"}  # OF defined for a count of 1 only
    elif n in (2, 3):
        fl = {"r": "c", "w": "co", "u": "o"}
    else:
        fl = {"w": "oszpc", "u": "ao"}
    if by_count:
        fl["r"] = fl["w"] + fl["u"]
    return fl


# ------------------------------------------------------------------ one-byte map
for _n, _name in enumerate(ALU_NAMES):
    _b = _n << 3
    _lk = _n != 7
    for _i, _form in enumerate(("Eb,Gb", "Ev,Gv", "Gb,Eb", "Gv,Ev", "AL,Ib", "eAX,Iz")):
        op(_b + _i, _name, _form, **_alu_flags(_n), lock=_lk and _i < 2, decode="_alu",
           jit="j_alu", native="copy")  # fmt: skip
for _b, _s in ((0x06, "ES"), (0x0E, "CS"), (0x16, "SS"), (0x1E, "DS")):
    op(_b, "PUSH", _s, decode="_push_seg", native="push_cs" if _b == 0x0E else None)
for _b, _s in ((0x07, "ES"), (0x17, "SS"), (0x1F, "DS")):
    op(_b, "POP", _s, end=True, decode="_pop_seg")
op(0x27, "DAA", r="ac", w="szapc", u="o", decode="_bcd")
op(0x2F, "DAS", r="ac", w="szapc", u="o", decode="_bcd")
op(0x37, "AAA", r="a", w="ac", u="oszp", decode="_bcd")
op(0x3F, "AAS", r="a", w="ac", u="oszp", decode="_bcd")
for _b in range(0x40, 0x48):
    op(_b, "INC", "Zv", w="oszap", decode="_incdec_r", jit="j_incdec_r", native="copy")
for _b in range(0x48, 0x50):
    op(_b, "DEC", "Zv", w="oszap", decode="_incdec_r", jit="j_incdec_r", native="copy")
for _b in range(0x50, 0x58):
    op(_b, "PUSH", "Zv", decode="_push_r", jit="j_push_r", native="push_r")
for _b in range(0x58, 0x60):
    op(_b, "POP", "Zv", decode="_pop_r", jit="j_pop_r", native="pop_r")
op(0x60, "PUSHA", decode="_pusha")
op(0x61, "POPA", decode="_pusha")
op(0x62, "BOUND", "Gv,Ma", decode="_bound")
op(0x63, "ARPL", "Ew,Gw", w="z", priv="pm", decode="_arpl")
op(0x68, "PUSH", "Iz", decode="_push_i", jit="j_push_i", native="push_i")
op(0x69, "IMUL", "Gv,Ev,Iz", w="oc", u="szap", decode="_imul3", jit="j_imul3", native="copy")
op(0x6A, "PUSH", "Ib", decode="_push_i", jit="j_push_i", native="push_i")
op(0x6B, "IMUL", "Gv,Ev,Ib", w="oc", u="szap", decode="_imul3", jit="j_imul3", native="copy")
op(0x6C, "INSB", "Yb,DX", r="d", priv="io", decode="_string")
op(0x6D, "INSW/D", "Yz,DX", r="d", priv="io", decode="_string")
op(0x6E, "OUTSB", "DX,Xb", r="d", priv="io", decode="_string")
op(0x6F, "OUTSW/D", "DX,Xz", r="d", priv="io", decode="_string")
for _cc, (_sfx, _rd) in enumerate(CONDITIONS):
    op(0x70 + _cc, "J" + _sfx, "Jb", r=_rd, end=True, decode="_jcc", jit="j_jcc", native="branch")
for _b, _form in ((0x80, "Eb,Ib"), (0x81, "Ev,Iz"), (0x82, "Eb,Ib"), (0x83, "Ev,Ib")):
    for _n, _name in enumerate(ALU_NAMES):
        # 82 (the 80 alias) takes no LOCK here, as before the table (not checked on a peer).
        op(_b, _name, _form, ext=_n, **_alu_flags(_n), lock=_n != 7 and _b != 0x82,
           decode="_grp1", jit="j_grp1", native="copy")  # fmt: skip
op(0x84, "TEST", "Eb,Gb", w="oszpc", u="a", decode="_test", jit="j_test", native="copy")
op(0x85, "TEST", "Ev,Gv", w="oszpc", u="a", decode="_test", jit="j_test", native="copy")
op(0x86, "XCHG", "Eb,Gb", lock=True, decode="_xchg", jit="j_xchg", native="copy")
op(0x87, "XCHG", "Ev,Gv", lock=True, decode="_xchg", jit="j_xchg", native="copy")
for _b, _form in ((0x88, "Eb,Gb"), (0x89, "Ev,Gv"), (0x8A, "Gb,Eb"), (0x8B, "Gv,Ev")):
    op(_b, "MOV", _form, decode="_mov", jit="j_mov", native="copy")
op(0x8C, "MOV", "Ev,Sw", decode="_mov_sreg")
op(0x8D, "LEA", "Gv,M", decode="_lea", jit="j_lea", native="lea")
op(0x8E, "MOV", "Sw,Ew", end=True, decode="_mov_sreg")
op(0x8F, "POP", "Ev", ext=0, decode="_pop_rm", native="pop_m")
op(0x90, "NOP", decode="_xchg_ax", jit="j_nop", native="copy")
for _b in range(0x91, 0x98):
    op(_b, "XCHG", "Zv,eAX", decode="_xchg_ax", jit="j_xchg_ax", native="copy")
op(0x98, "CBW/CWDE", decode="_misc1", jit="j_cwde", native="copy")
op(0x99, "CWD/CDQ", decode="_misc1", jit="j_cdq", native="copy")
op(0x9A, "CALLF", "Ap", end=True, decode="_far_ptr")
op(0x9B, "WAIT", decode="_fwait")
op(0x9C, "PUSHF", "Fv", r="*", priv="iopl", decode="_pushf", native="pushf")
op(0x9D, "POPF", "Fv", w="*", end=True, priv="iopl", decode="_pushf", native="popf")
op(0x9E, "SAHF", w="szapc", decode="_misc1")
op(0x9F, "LAHF", r="szapc", decode="_misc1")
for _b, _form in ((0xA0, "AL,Ob"), (0xA1, "eAX,Ov"), (0xA2, "Ob,AL"), (0xA3, "Ov,eAX")):
    op(_b, "MOV", _form, decode="_mov_moffs", jit="j_moffs", native="moffs")
# Native: REP MOVS/STOS (rep_string); LODS, STOS, SCAS, REPE/REPNE SCAS (string1).
_STRING_NATIVE = {
    0xA4: "rep_string",
    0xA5: "rep_string",
    0xA6: "string1",
    0xA7: "string1",
    0xAA: "string1",
    0xAB: "string1",
    0xAC: "string1",
    0xAD: "string1",
    0xAE: "string1",
    0xAF: "string1",
}
for _b, _name, _form, _fl in (
    (0xA4, "MOVSB", "Yb,Xb", {}), (0xA5, "MOVSW/D", "Yv,Xv", {}),
    (0xA6, "CMPSB", "Xb,Yb", {"w": OSZAPC}), (0xA7, "CMPSW/D", "Xv,Yv", {"w": OSZAPC}),
    (0xAA, "STOSB", "Yb,AL", {}), (0xAB, "STOSW/D", "Yv,eAX", {}),
    (0xAC, "LODSB", "AL,Xb", {}), (0xAD, "LODSW/D", "eAX,Xv", {}),
    (0xAE, "SCASB", "AL,Yb", {"w": OSZAPC}), (0xAF, "SCASW/D", "eAX,Yv", {"w": OSZAPC}),
):  # fmt: skip
    # REPE/REPNE CMPS/SCAS read ZF to stop; the rest read DF only.
    op(_b, _name, _form, r="dz" if _fl else "d", **_fl, decode="_string",
       native=_STRING_NATIVE.get(_b))  # fmt: skip
op(0xA8, "TEST", "AL,Ib", w="oszpc", u="a", decode="_test", jit="j_test", native="copy")
op(0xA9, "TEST", "eAX,Iz", w="oszpc", u="a", decode="_test", jit="j_test", native="copy")
for _b in range(0xB0, 0xB8):
    op(_b, "MOV", "Zb,Ib", decode="_mov_ri", jit="j_mov_ri", native="copy")
for _b in range(0xB8, 0xC0):
    op(_b, "MOV", "Zv,Iv", decode="_mov_ri", jit="j_mov_ri", native="copy")
for _b, _form in (
    (0xC0, "Eb,Ib"), (0xC1, "Ev,Ib"), (0xD0, "Eb,1"), (0xD1, "Ev,1"), (0xD2, "Eb,CL"),
    (0xD3, "Ev,CL"),
):  # fmt: skip
    for _n, _name in enumerate(SHIFT_NAMES):
        # jit.py inlines ROL/ROR and the shifts by an immediate, and the shifts by CL.
        _j = ("j_grp2" if _n not in (2, 3) else None) if _b < 0xD2 else (
            "j_shift_cl" if _n >= 4 else None)  # fmt: skip
        op(_b, _name, _form, ext=_n, **_shift_flags(_n, _b not in (0xD0, 0xD1)), decode="_grp2",
           jit=_j, native="copy")  # fmt: skip
op(0xC2, "RET", "Iw", end=True, decode="_ret", jit="j_ret", native="ret")
op(0xC3, "RET", end=True, decode="_ret", jit="j_ret", native="ret")
op(0xC4, "LES", "Gz,Mp", end=True, decode="_les")
op(0xC5, "LDS", "Gz,Mp", end=True, decode="_les")
op(0xC6, "MOV", "Eb,Ib", ext=0, decode="_mov_mi", jit="j_mov_mi", native="copy")
op(0xC7, "MOV", "Ev,Iz", ext=0, decode="_mov_mi", jit="j_mov_mi", native="copy")
op(0xC8, "ENTER", "Iw,Ib", decode="_enter")
op(0xC9, "LEAVE", decode="_leave", jit="j_leave", native="leave")
op(0xCA, "RETF", "Iw", end=True, decode="_retf")
op(0xCB, "RETF", end=True, decode="_retf")
op(0xCC, "INT3", end=True, decode="_int")
op(0xCD, "INT", "Ib", end=True, priv="iopl", decode="_int")
op(0xCE, "INTO", r="o", end=True, decode="_int")
op(0xCF, "IRET", w="*", end=True, priv="iopl", decode="_iret", native="iret")
op(0xD4, "AAM", "Ib", w="szp", u="oac", decode="_bcd")
op(0xD5, "AAD", "Ib", w="szp", u="oac", decode="_bcd")
op(0xD6, "SALC", r="c", decode="_misc1")
op(0xD7, "XLAT", decode="_misc1")
# x87 escapes (decode/fpu.py, semantics in fpu.py): one row per ModRM reg extension; the
# mnemonics name the memory form / the register forms (mod = 3) sharing the extension.
_X87 = {
    0xD8: ("FADD", "FMUL", "FCOM", "FCOMP", "FSUB", "FSUBR", "FDIV", "FDIVR"),
    0xD9: ("FLD", "FXCH", "FST/FNOP", "FSTP", "FLDENV/FCHS/FABS/FTST/FXAM", "FLDCW/FLDconst",
           "FNSTENV/F2XM1/FYL2X/FPTAN/FPATAN/FXTRACT/FPREM1/FDECSTP/FINCSTP",
           "FNSTCW/FPREM/FYL2XP1/FSQRT/FSINCOS/FRNDINT/FSCALE/FSIN/FCOS"),
    0xDA: ("FIADD/FCMOVB", "FIMUL/FCMOVE", "FICOM/FCMOVBE", "FICOMP/FCMOVU", "FISUB",
           "FISUBR/FUCOMPP", "FIDIV", "FIDIVR"),
    0xDB: ("FILD/FCMOVNB", "FISTTP/FCMOVNE", "FIST/FCMOVNBE", "FISTP/FCMOVNU",
           "FNCLEX/FNINIT", "FLD m80/FUCOMI", "FCOMI", "FSTP m80"),
    0xDC: ("FADD", "FMUL", "FCOM", "FCOMP", "FSUB/FSUBR", "FSUBR/FSUB", "FDIV/FDIVR",
           "FDIVR/FDIV"),
    0xDD: ("FLD/FFREE", "FISTTP/FXCH", "FST", "FSTP", "FRSTOR/FUCOM", "FUCOMP", "FNSAVE",
           "FNSTSW"),
    0xDE: ("FIADD/FADDP", "FIMUL/FMULP", "FICOM/FCOMP", "FICOMP/FCOMPP", "FISUB/FSUBRP",
           "FISUBR/FSUBP", "FIDIV/FDIVRP", "FIDIVR/FDIVP"),
    0xDF: ("FILD/FFREEP", "FISTTP/FXCH", "FIST/FSTP", "FISTP/FSTP", "FBLD/FNSTSW AX",
           "FILD m64/FUCOMIP", "FBSTP/FCOMIP", "FISTP m64"),
}  # fmt: skip
for _b, _names in _X87.items():
    for _ext, _name in enumerate(_names):
        # F(U)COMI(P) set ZF PF CF and clear OF SF AF; FCMOVcc read ZF PF CF
        _w = "oszapc" if (_b, _ext) in ((0xDB, 5), (0xDB, 6), (0xDF, 5), (0xDF, 6)) else ""
        _r = "zpc" if _b in (0xDA, 0xDB) and _ext < 4 else ""
        op(_b, _name, "x87", ext=_ext, r=_r, w=_w, decode="_fpu")
op(0xE0, "LOOPNE", "Jb", r="z", end=True, decode="_loop", native="loop")
op(0xE1, "LOOPE", "Jb", r="z", end=True, decode="_loop", native="loop")
op(0xE2, "LOOP", "Jb", end=True, decode="_loop", jit="j_loop", native="loop")
op(0xE3, "JCXZ", "Jb", end=True, decode="_loop", native="loop")
for _b, _form in (
    (0xE4, "IN AL,Ib"), (0xE5, "IN eAX,Ib"), (0xE6, "OUT Ib,AL"), (0xE7, "OUT Ib,eAX"),
    (0xEC, "IN AL,DX"), (0xED, "IN eAX,DX"), (0xEE, "OUT DX,AL"), (0xEF, "OUT DX,eAX"),
):  # fmt: skip
    # Device side effects (power-off, IRQs) are seen at once: the block ends.
    op(_b, _form[:3].strip(), _form[3:].strip(), end=True, priv="io", decode="_io")
op(0xE8, "CALL", "Jz", end=True, decode="_call", jit="j_call", native="call")
op(0xE9, "JMP", "Jz", end=True, decode="_jmp", jit="j_jmp", native="branch")
op(0xEA, "JMPF", "Ap", end=True, decode="_far_ptr")
op(0xEB, "JMP", "Jb", end=True, decode="_jmp", jit="j_jmp", native="branch")
op(0xF1, "INT1", end=True, decode="_int")
op(0xF4, "HLT", end=True, priv="cpl0", decode="_hlt")
op(0xF5, "CMC", r="c", w="c", decode="_flagop", native="copy")
for _n, (_name, _fl) in enumerate((
    ("TEST", {"w": "oszpc", "u": "a"}), ("TEST", {"w": "oszpc", "u": "a"}), ("NOT", {}),
    ("NEG", {"w": OSZAPC}), ("MUL", {"w": "oc", "u": "szap"}), ("IMUL", {"w": "oc", "u": "szap"}),
    ("DIV", {"u": OSZAPC}), ("IDIV", {"u": OSZAPC}),
)):  # fmt: skip
    # jit.py inlines TEST/NOT/NEG, and MUL/IMUL r/m32 (F7 only).
    for _b, _form in ((0xF6, "Eb"), (0xF7, "Ev")):
        _j = "j_grp3" if _n < 4 or (_n < 6 and _b == 0xF7) else None
        # The native tier copies all but DIV/IDIV (a #DE would be the host's SIGFPE):
        # DIV r/m32 checks first (translate.div), IDIV stays in Python.
        _imm = (",Ib" if _b == 0xF6 else ",Iz") if _n < 2 else ""
        op(_b, _name, _form + _imm, ext=_n, **_fl, lock=_n in (2, 3),
           decode="_grp3", jit=_j,
           native="copy" if _n < 6 else ("div" if _n == 6 and _b == 0xF7 else None))  # fmt: skip
op(0xF8, "CLC", w="c", decode="_flagop", native="copy")
op(0xF9, "STC", w="c", decode="_flagop", native="copy")
op(0xFA, "CLI", w="i", end=True, priv="iopl", decode="_flagop", native="cli")
op(0xFB, "STI", w="i", end=True, priv="iopl", decode="_flagop", native="sti")
op(0xFC, "CLD", w="d", decode="_flagop")
op(0xFD, "STD", w="d", decode="_flagop")
op(0xFE, "INC", "Eb", ext=0, w="oszap", lock=True, decode="_grp45", jit="j_grp45", native="copy")
op(0xFE, "DEC", "Eb", ext=1, w="oszap", lock=True, decode="_grp45", jit="j_grp45", native="copy")
op(0xFF, "INC", "Ev", ext=0, w="oszap", lock=True, decode="_grp45", jit="j_grp45", native="copy")
op(0xFF, "DEC", "Ev", ext=1, w="oszap", lock=True, decode="_grp45", jit="j_grp45", native="copy")
op(0xFF, "CALL", "Ev", ext=2, end=True, decode="_grp45", jit="j_grp45", native="call_m")
op(0xFF, "CALLF", "Mp", ext=3, end=True, decode="_grp45")
op(0xFF, "JMP", "Ev", ext=4, end=True, decode="_grp45", jit="j_grp45", native="jmp_m")
op(0xFF, "JMPF", "Mp", ext=5, end=True, decode="_grp45")
op(0xFF, "PUSH", "Ev", ext=6, decode="_grp45", jit="j_grp45", native="push_m")

# ------------------------------------------------------------------ two-byte map (0F)
for _n, _name in enumerate(("SLDT", "STR", "LLDT", "LTR", "VERR", "VERW")):
    op(0x00, _name, "Ew", map="0F", ext=_n, w="z" if _n >= 4 else "", end=True,
       priv="cpl0" if _n in (2, 3) else "pm", decode="_grp6")  # fmt: skip
for _n, _name, _form in (
    (0, "SGDT", "Ms"), (1, "SIDT", "Ms"), (2, "LGDT", "Ms"), (3, "LIDT", "Ms"),
    (4, "SMSW", "Ew"), (6, "LMSW", "Ew"), (7, "INVLPG", "M"),
):  # fmt: skip
    op(0x01, _name, _form, map="0F", ext=_n, end=True, priv="cpl0" if _n in (2, 3, 6, 7) else "",
       decode="_grp7", native="invlpg" if _n == 7 else None)  # fmt: skip
op(0x02, "LAR", "Gv,Ew", map="0F", w="z", priv="pm", decode="_larlsl")
op(0x03, "LSL", "Gv,Ew", map="0F", w="z", priv="pm", decode="_larlsl")
op(0x06, "CLTS", map="0F", end=True, priv="cpl0", decode="_sys0f")
op(0x08, "INVD", map="0F", end=True, priv="cpl0", decode="_sys0f")
op(0x09, "WBINVD", map="0F", end=True, priv="cpl0", decode="_sys0f")
for _b in range(0x18, 0x20):
    op(_b, "NOP", "Ev", map="0F", decode="_nop_rm")
for _b, _form in ((0x20, "Rd,Cd"), (0x21, "Rd,Dd"), (0x22, "Cd,Rd"), (0x23, "Dd,Rd")):
    op(_b, "MOV", _form, map="0F", u=OSZAPC, end=True, priv="cpl0", decode="_sys0f")
op(0x30, "WRMSR", map="0F", end=True, priv="cpl0", decode="_sys0f")
op(0x31, "RDTSC", map="0F", priv="tsd", decode="_sys0f", native="rdtsc")
op(0x32, "RDMSR", map="0F", end=True, priv="cpl0", decode="_sys0f")
op(0x33, "RDPMC", map="0F", priv="pce", decode="_sys0f")
op(0x34, "SYSENTER", map="0F", w="i", end=True, decode="_sysenter")
op(0x35, "SYSEXIT", map="0F", end=True, priv="cpl0", decode="_sysenter")
for _cc, (_sfx, _rd) in enumerate(CONDITIONS):
    op(
        0x40 + _cc,
        "CMOV" + _sfx,
        "Gv,Ev",
        map="0F",
        r=_rd,
        decode="_cmov",
        jit="j_cmov",
        native="copy",
    )
    op(
        0x80 + _cc,
        "J" + _sfx,
        "Jz",
        map="0F",
        r=_rd,
        end=True,
        decode="_jcc",
        jit="j_jcc0f",
        native="branch",
    )
    op(
        0x90 + _cc,
        "SET" + _sfx,
        "Eb",
        map="0F",
        r=_rd,
        decode="_setcc",
        jit="j_setcc",
        native="copy",
    )
op(0xA0, "PUSH", "FS", map="0F", decode="_push_seg")
op(0xA1, "POP", "FS", map="0F", end=True, decode="_pop_seg")
op(0xA2, "CPUID", map="0F", decode="_sys0f")
op(0xA8, "PUSH", "GS", map="0F", decode="_push_seg")
op(0xA9, "POP", "GS", map="0F", end=True, decode="_pop_seg")
for _b, _name in ((0xA3, "BT"), (0xAB, "BTS"), (0xB3, "BTR"), (0xBB, "BTC")):
    # Native: with a memory operand the bit offset reaches past it (translate.py moves
    # the address).
    op(_b, _name, "Ev,Gv", map="0F", w="c", u="osap", lock=_name != "BT", decode="_bt",
       jit="j_bt", native="copy")  # fmt: skip
for _n, _name in ((4, "BT"), (5, "BTS"), (6, "BTR"), (7, "BTC")):
    op(0xBA, _name, "Ev,Ib", map="0F", ext=_n, w="c", u="osap", lock=_n != 4, decode="_bt",
       jit="j_bt", native="copy")  # fmt: skip
for _b, _name, _form in (
    (0xA4, "SHLD", "Ev,Gv,Ib"), (0xA5, "SHLD", "Ev,Gv,CL"), (0xAC, "SHRD", "Ev,Gv,Ib"),
    (0xAD, "SHRD", "Ev,Gv,CL"),
):  # fmt: skip
    op(_b, _name, _form, map="0F", r="oszapc", w="oszpc", u="ao", decode="_shd", native="copy")
op(0xAF, "IMUL", "Gv,Ev", map="0F", w="oc", u="szap", decode="_imul3", jit="j_imul2", native="copy")
op(0xB0, "CMPXCHG", "Eb,Gb", map="0F", w=OSZAPC, lock=True, decode="_cmpxchg", native="copy")
op(0xB1, "CMPXCHG", "Ev,Gv", map="0F", w=OSZAPC, lock=True, decode="_cmpxchg", native="copy")
op(0xB2, "LSS", "Gz,Mp", map="0F", end=True, decode="_les")
op(0xB4, "LFS", "Gz,Mp", map="0F", end=True, decode="_les")
op(0xB5, "LGS", "Gz,Mp", map="0F", end=True, decode="_les")
op(0xB6, "MOVZX", "Gv,Eb", map="0F", decode="_movx", jit="j_movx", native="copy")
op(0xB7, "MOVZX", "Gv,Ew", map="0F", decode="_movx", jit="j_movx", native="copy")
op(0xBC, "BSF", "Gv,Ev", map="0F", w="z", u="osapc", decode="_bsf", native="copy")
op(0xBD, "BSR", "Gv,Ev", map="0F", w="z", u="osapc", decode="_bsf", native="copy")
op(0xBE, "MOVSX", "Gv,Eb", map="0F", decode="_movx", jit="j_movx", native="copy")
op(0xBF, "MOVSX", "Gv,Ew", map="0F", decode="_movx", jit="j_movx", native="copy")
op(0xC0, "XADD", "Eb,Gb", map="0F", w=OSZAPC, lock=True, decode="_xadd", native="copy")
op(0xC1, "XADD", "Ev,Gv", map="0F", w=OSZAPC, lock=True, decode="_xadd", native="copy")
op(0xC7, "CMPXCHG8B", "Mq", map="0F", ext=1, w="z", lock=True, decode="_grp9", native="copy")
op(0xC7, "RDRAND", "Rv", map="0F", ext=6, w=OSZAPC, decode="_grp9")
for _b in range(0xC8, 0xD0):
    op(_b, "BSWAP", "Zd", map="0F", decode="_bswap", jit="j_bswap", native="copy")


# ------------------------------------------------------------------ operand forms
def operands_of(row: Op) -> list[str]:
    """The operands of the row's first form ("Pq,Qq|Vdq,Wdq": the MMX and the prefixed
    XMM forms of one opcode encode alike)."""
    return row.operands.split("|")[0].split(",") if row.operands else []


def is_modrm_operand(o: str) -> bool:
    """E/G/M/R/C/D/S, and the MMX/XMM P/Q/N/V/W/U, + a lowercase size ("Ev", "Gb", "M",
    "Sw", "Wdq"): encoded by ModRM."""
    return o[:1] in ("E", "G", "M", "R", "C", "D", "S", "P", "Q", "N", "V", "W", "U") and (
        len(o) == 1 or o[1].islower()
    )


def has_modrm(row: Op) -> bool:
    return any(is_modrm_operand(o) for o in operands_of(row))


def imm_bytes(row: Op, opsize16: bool, addr16: bool = False) -> int:
    """Bytes of immediates (relative offsets, far pointers, MOV moffs) after
    ModRM/SIB/displacement."""
    n = 0
    for o in operands_of(row):
        if o in ("Ib", "Jb"):
            n += 1
        elif o == "Iw":
            n += 2
        elif o in ("Iz", "Iv", "Jz"):
            n += 2 if opsize16 else 4
        elif o == "Ap":
            n += 4 if opsize16 else 6
        elif o in ("Ob", "Ov"):
            n += 2 if addr16 else 4
    return n


# ------------------------------------------------------------------ indexes# MMX and SSE2 integer forms (decode/sse.py, semantics in sse.py): the 66 prefix selects
# the XMM form; the closures refuse (#UD) the prefixes an opcode does not have.
_PACKED = {
    0x60: "PUNPCKLBW", 0x61: "PUNPCKLWD", 0x62: "PUNPCKLDQ", 0x63: "PACKSSWB",
    0x64: "PCMPGTB", 0x65: "PCMPGTW", 0x66: "PCMPGTD", 0x67: "PACKUSWB", 0x68: "PUNPCKHBW",
    0x69: "PUNPCKHWD", 0x6A: "PUNPCKHDQ", 0x6B: "PACKSSDW", 0x6C: "PUNPCKLQDQ",
    0x6D: "PUNPCKHQDQ", 0x74: "PCMPEQB", 0x75: "PCMPEQW", 0x76: "PCMPEQD", 0xD1: "PSRLW",
    0xD2: "PSRLD", 0xD3: "PSRLQ", 0xD4: "PADDQ", 0xD5: "PMULLW", 0xD8: "PSUBUSB",
    0xD9: "PSUBUSW", 0xDA: "PMINUB", 0xDB: "PAND", 0xDC: "PADDUSB", 0xDD: "PADDUSW",
    0xDE: "PMAXUB", 0xDF: "PANDN", 0xE0: "PAVGB", 0xE1: "PSRAW", 0xE2: "PSRAD",
    0xE3: "PAVGW", 0xE4: "PMULHUW", 0xE5: "PMULHW", 0xE8: "PSUBSB", 0xE9: "PSUBSW",
    0xEA: "PMINSW", 0xEB: "POR", 0xEC: "PADDSB", 0xED: "PADDSW", 0xEE: "PMAXSW",
    0xEF: "PXOR", 0xF1: "PSLLW", 0xF2: "PSLLD", 0xF3: "PSLLQ", 0xF4: "PMULUDQ",
    0xF5: "PMADDWD", 0xF6: "PSADBW", 0xF8: "PSUBB", 0xF9: "PSUBW", 0xFA: "PSUBD",
    0xFB: "PSUBQ", 0xFC: "PADDB", 0xFD: "PADDW", 0xFE: "PADDD",
}  # fmt: skip
for _b, _name in _PACKED.items():
    op(_b, _name, "Pq,Qq|Vdq,Wdq", map="0F", decode="_packed")
for _b, _name in ((0x71, "PSxxW"), (0x72, "PSxxD"), (0x73, "PSxxQ/PSxxDQ")):
    op(_b, _name, "Nq,Ib|Udq,Ib", map="0F", decode="_shift_imm")
for _b, _name in ((0x6E, "MOVD"), (0x6F, "MOVQ/MOVDQA/MOVDQU"), (0x7E, "MOVD/MOVQ"),
                  (0x7F, "MOVQ/MOVDQA/MOVDQU"), (0xD6, "MOVQ")):  # fmt: skip
    op(_b, _name, "simd", map="0F", decode="_movdq")
op(0x70, "PSHUFW/PSHUFD/PSHUFHW/PSHUFLW", "Pq,Qq,Ib|Vdq,Wdq,Ib", map="0F", decode="_pshuf")
op(0x77, "EMMS", map="0F", decode="_emms")
op(0xD7, "PMOVMSKB", "Gd,Nq|Gd,Udq", map="0F", decode="_pmovmskb")
for _n, _name in enumerate(("FXSAVE", "FXRSTOR", "LDMXCSR", "STMXCSR", None, "LFENCE",
                            "MFENCE", "SFENCE/CLFLUSH")):  # fmt: skip
    if _name:
        op(0xAE, _name, "M|-", map="0F", ext=_n, decode="_grp15",
           native="fence" if _n >= 5 else None)  # the register forms only  # fmt: skip
# SSE/SSE2 floating point: no prefix PS, 66 PD, F3 SS, F2 SD (decode/sse.py _ssefp).
_SSEFP = {
    0x10: "MOVUPS/MOVSS", 0x11: "MOVUPS/MOVSS", 0x14: "UNPCKLPS", 0x15: "UNPCKHPS",
    0x28: "MOVAPS", 0x29: "MOVAPS", 0x2A: "CVTSI2SS", 0x2C: "CVTTSS2SI", 0x2D: "CVTSS2SI",
    0x2E: "UCOMISS", 0x2F: "COMISS", 0x50: "MOVMSKPS", 0x51: "SQRTPS", 0x54: "ANDPS",
    0x55: "ANDNPS", 0x56: "ORPS", 0x57: "XORPS", 0x58: "ADDPS", 0x59: "MULPS",
    0x5A: "CVTPS2PD", 0x5C: "SUBPS", 0x5D: "MINPS", 0x5E: "DIVPS", 0x5F: "MAXPS",
    0xC2: "CMPPS", 0xC6: "SHUFPS",
}  # fmt: skip
for _b, _name in _SSEFP.items():
    _w = "oszapc" if _b in (0x2E, 0x2F) else ""
    _form = "Vps,Wps,Ib" if _b in (0xC2, 0xC6) else "Vps,Wps"  # CMPPS/SHUFPS: imm8
    op(_b, _name + "/..PD/..SS/..SD", _form, map="0F", w=_w, decode="_ssefp")
_SSEMISC = {
    0x12: "MOVLPS/MOVHLPS/MOVLPD", 0x13: "MOVLPS/MOVLPD", 0x16: "MOVHPS/MOVLHPS/MOVHPD",
    0x17: "MOVHPS/MOVHPD", 0x2B: "MOVNTPS/MOVNTPD", 0x52: "RSQRTPS/RSQRTSS",
    0x53: "RCPPS/RCPSS", 0x5B: "CVTDQ2PS/CVTPS2DQ/CVTTPS2DQ", 0xC3: "MOVNTI",
    0xC4: "PINSRW", 0xC5: "PEXTRW", 0xE6: "CVTTPD2DQ/CVTDQ2PD/CVTPD2DQ",
    0xE7: "MOVNTQ/MOVNTDQ", 0xF7: "MASKMOVQ/MASKMOVDQU",
}  # fmt: skip
for _b, _name in _SSEMISC.items():
    op(_b, _name, "simd", map="0F", decode="_ssemisc")

MAPS = ("", "0F")
# (map, opcode) -> its rows, in table order.
BY_OPCODE: dict[tuple[str, int], tuple[Op, ...]] = {}
for _row in ROWS:
    BY_OPCODE[(_row.map, _row.code)] = BY_OPCODE.get((_row.map, _row.code), ()) + (_row,)


def reg_mask(rows: tuple[Op, ...], pred) -> int:
    """Bit mask over the ModRM reg field (bit i: reg = i) of the rows where pred holds:
    0xFF for a row without an extension."""
    m = 0
    for row in rows:
        if pred(row):
            m |= 0xFF if row.ext is None else 1 << row.ext
    return m


def lock_regs(map_: str, code: int) -> int | None:
    """The ModRM reg fields where LOCK is legal on this opcode, None where it never is."""
    m = reg_mask(BY_OPCODE.get((map_, code), ()), lambda row: row.lock)
    return m or None


def end_regs(map_: str, code: int) -> int:
    """The ModRM reg fields where this opcode ends a block (0xFF: always)."""
    return reg_mask(BY_OPCODE.get((map_, code), ()), lambda row: row.ends_block)


def lookup(map_: str, code: int, modrm: int | None = None, prefix: int | None = None) -> Op | None:
    """The row of one encoding (modrm: the ModRM byte, for group opcodes)."""
    for row in BY_OPCODE.get((map_, code), ()):
        if row.ext is not None and (modrm is None or (modrm >> 3) & 7 != row.ext):
            continue
        if row.prefix is not None and row.prefix != prefix:
            continue
        return row
    return None
