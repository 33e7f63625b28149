"""Block compiler: a hot basic block becomes one Python function built from source.

The common 32-bit forms (MOV, ALU, TEST, INC/DEC, PUSH/POP, LEA, MOVZX/MOVSX, Jcc,
JMP, CALL, RET) are re-decoded here from the instruction bytes and emitted inline,
with the condition of a block-ending Jcc computed straight from the operands of the
instruction that set the flags when that instruction is in the same block. Everything
else calls the instruction's closure from decode.py. Lazy-flag state is always written
to the CPU object, so closures and inline code can be mixed freely.

A fault inside the block leaves EIP at the faulting instruction: `_i` holds the index
of the instruction running, and the handler stores that instruction's address.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import TYPE_CHECKING, Any

from boite.accel.emu.cpu import DS, PARITY, SS, CpuFault

if TYPE_CHECKING:
    from boite.accel.emu.cpu import Cpu

M = 0xFFFFFFFF
_DEBUG = os.environ.get("BOITE_EMU_JIT_DEBUG") == "1"
_ALU = {0: "+", 1: "|", 4: "&", 5: "-", 6: "^", 7: "-"}
_KIND = {0: "add", 1: "logic", 4: "logic", 5: "sub", 6: "logic", 7: "sub"}


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _load32(dst: str, addr: str) -> list[str]:
    """dst = the dword at linear addr, through the TLB inline (rd32 on a miss)."""
    return [
        f"_a = {addr}",
        "_p = rt.get(_a >> 12)",
        f"{dst} = U32(ram, _p | (_a & 0xFFF))[0] if _p is not None and (_a & 0xFFF) <= 0xFFC "
        "else rd32(_a)",
    ]


def _store32(addr: str, val: str, addr_is_a: bool = False) -> list[str]:
    lines = [] if addr_is_a else [f"_a = {addr}"]
    return lines + [
        "_p = wt.get(_a >> 12)",
        "if _p is not None and (_a & 0xFFF) <= 0xFFC:",
        f"    P32(ram, _p | (_a & 0xFFF), {val})",
        "else:",
        f"    wr32(_a, {val})",
    ]


def _rget(n: int, size: int) -> str:
    if size == 4:
        return f"r[{n}]"
    if n < 4:
        return f"(r[{n}] & 0xFF)"
    return f"((r[{n - 4}] >> 8) & 0xFF)"


def _rset(n: int, size: int, val: str) -> str:
    if size == 4:
        return f"r[{n}] = {val}"
    if n < 4:
        return f"r[{n}] = (r[{n}] & 0xFFFFFF00) | {val}"
    return f"r[{n - 4}] = (r[{n - 4}] & 0xFFFF00FF) | ({val} << 8)"


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def u8(self) -> int:
        v = self.d[self.p]
        self.p += 1
        return v

    def s8(self) -> int:
        v = self.u8()
        return v - 256 if v & 0x80 else v

    def u32(self) -> int:
        v = int.from_bytes(self.d[self.p : self.p + 4], "little")
        self.p += 4
        return v


def _ea32(bs: _Bytes, mod: int, rm: int) -> str:
    """Source for the linear address of a 32-bit ModRM memory operand (no prefixes)."""
    base, idx, sh = rm, -1, 0
    if rm == 4:
        sib = bs.u8()
        sh, idx, base = sib >> 6, (sib >> 3) & 7, sib & 7
        if idx == 4:
            idx = -1
    if base == 5 and mod == 0:
        base = -1
        d = bs.u32()
    else:
        d = 0 if mod == 0 else bs.s8() if mod == 1 else _s32(bs.u32())
    seg = SS if base in (4, 5) else DS
    parts = [f"sb[{seg}]"]
    if base >= 0:
        parts.append(f"r[{base}]")
    if idx >= 0:
        parts.append(f"(r[{idx}] << {sh})" if sh else f"r[{idx}]")
    if d:
        parts.append(str(d))
    return "((" + " + ".join(parts) + ") & 0xFFFFFFFF)"


class Emitter:
    """Turns (bytes, eip, next eip) of one instruction into inline source, or None."""

    def __init__(self) -> None:
        self.k = 0
        self.flags: tuple[str, str, str, str] | None = None  # (kind, a, b, res) locals

    def emit(self, raw: bytes, eip: int, nxt: int) -> tuple[list[str], bool] | None:
        """Returns (lines, may_fault) or None when the instruction is not inlined."""
        k = self.k
        bs = _Bytes(raw)
        op = bs.u8()
        a, b, res = f"a{k}", f"b{k}", f"x{k}"
        if op < 0x40 and op & 7 in (1, 3, 5) and (op >> 3) & 7 not in (2, 3):
            alu = (op >> 3) & 7
            sym, kind = _ALU[alu], _KIND[alu]
            if op & 7 == 5:
                return self._alu(kind, sym, alu == 7, ("r", 0), ("i", bs.u32()), a, b, res)
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            other = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            if op & 7 == 1:
                return self._alu(kind, sym, alu == 7, other, ("r", reg), a, b, res)
            return self._alu(kind, sym, alu == 7, ("r", reg), other, a, b, res)
        if op < 0x40 and op & 7 in (0, 2, 4) and (op >> 3) & 7 not in (2, 3):
            alu = (op >> 3) & 7
            sym, kind = _ALU[alu], _KIND[alu]
            if op & 7 == 4:
                return self._alu(kind, sym, alu == 7, ("r", 0), ("i", bs.u8()), a, b, res, 1)
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            other = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            if op & 7 == 0:
                return self._alu(kind, sym, alu == 7, other, ("r", reg), a, b, res, 1)
            return self._alu(kind, sym, alu == 7, ("r", reg), other, a, b, res, 1)
        if op in (0x80, 0x82):
            m = bs.u8()
            mod, alu, rm = m >> 6, (m >> 3) & 7, m & 7
            if alu in (2, 3):
                return None
            dst = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            imm = bs.u8()
            return self._alu(_KIND[alu], _ALU[alu], alu == 7, dst, ("i", imm), a, b, res, 1)
        if op == 0x84:
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            other = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            return self._alu("logic", "&", True, other, ("r", reg), a, b, res, 1)
        if op in (0xA8, 0xA9):
            size = 1 if op == 0xA8 else 4
            imm = bs.u8() if size == 1 else bs.u32()
            return self._alu("logic", "&", True, ("r", 0), ("i", imm), a, b, res, size)
        if op in (0xF6, 0xF7):
            m = bs.u8()
            mod, sub, rm = m >> 6, (m >> 3) & 7, m & 7
            if sub != 0:
                return None
            size = 1 if op == 0xF6 else 4
            dst = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            imm = bs.u8() if size == 1 else bs.u32()
            return self._alu("logic", "&", True, dst, ("i", imm), a, b, res, size)
        if op in (0x88, 0x8A):
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            if mod == 3:
                d, sr = (rm, reg) if op == 0x88 else (reg, rm)
                return [f"{a} = {_rget(sr, 1)}", _rset(d, 1, a)], False
            ea = _ea32(bs, mod, rm)
            if op == 0x88:
                return [f"wr8({ea}, {_rget(reg, 1)})"], True
            return [f"{a} = rd8({ea})", _rset(reg, 1, a)], True
        if op == 0xC6:
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            if reg:
                return None
            if mod == 3:
                return [_rset(rm, 1, str(bs.u8()))], False
            ea = _ea32(bs, mod, rm)
            return [f"wr8({ea}, {bs.u8()})"], True
        if 0xB0 <= op <= 0xB7:
            return [_rset(op & 7, 1, str(bs.u8()))], False
        if op in (0x81, 0x83):
            m = bs.u8()
            mod, alu, rm = m >> 6, (m >> 3) & 7, m & 7
            if alu in (2, 3):
                return None
            dst = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            imm = bs.u32() if op == 0x81 else bs.s8() & M
            return self._alu(_KIND[alu], _ALU[alu], alu == 7, dst, ("i", imm), a, b, res)
        if op == 0x85:
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            other = ("r", rm) if mod == 3 else ("m", _ea32(bs, mod, rm))
            return self._alu("logic", "&", True, other, ("r", reg), a, b, res)
        if op in (0x89, 0x8B):
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            if mod == 3:
                d, s = (rm, reg) if op == 0x89 else (reg, rm)
                return [f"r[{d}] = r[{s}]"], False
            ea = _ea32(bs, mod, rm)
            if op == 0x89:
                return _store32(ea, f"r[{reg}]"), True
            return _load32(f"r[{reg}]", ea), True
        if op == 0xC7:
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            if reg:
                return None
            if mod == 3:
                return [f"r[{rm}] = {bs.u32()}"], False
            ea = _ea32(bs, mod, rm)
            return _store32(ea, str(bs.u32())), True
        if 0xB8 <= op <= 0xBF:
            return [f"r[{op & 7}] = {bs.u32()}"], False
        if op in (0xC1, 0xD1):
            m = bs.u8()
            mod, sop, rm = m >> 6, (m >> 3) & 7, m & 7
            cnt = (bs.u8() if op == 0xC1 else 1) & 31
            if mod != 3 or sop not in (4, 5, 7) or cnt == 0:
                return None
            self.flags = None
            lines = [f"{a} = r[{rm}]"]
            if sop == 4:
                lines += [
                    f"{res} = ({a} << {cnt}) & 0xFFFFFFFF",
                    f"{b} = ({a} >> {32 - cnt}) & 1",
                    f"_o = (({res} >> 31) ^ {b}) << 11",
                ]
            elif sop == 5:
                lines += [
                    f"{res} = {a} >> {cnt}",
                    f"{b} = ({a} >> {cnt - 1}) & 1",
                    f"_o = ({a} >> 20) & 0x800",
                ]
            else:
                lines += [
                    f"{res} = ((({a} ^ 0x80000000) - 0x80000000) >> {cnt}) & 0xFFFFFFFF",
                    f"{b} = ((({a} ^ 0x80000000) - 0x80000000) >> {cnt - 1}) & 1",
                    "_o = 0",
                ]
            lines += [
                f"r[{rm}] = {res}",
                f"c.fl = (c.fl & ~0x8D5) | {b} | _o | PAR[{res} & 0xFF] | "
                f"(0x40 if {res} == 0 else 0) | (({res} >> 24) & 0x80)",
                "c.lop = 0",
            ]
            return lines, False
        if 0x40 <= op <= 0x4F:
            n = op & 7
            dec = op >= 0x48
            cf = "c.get_cf()"
            if self.flags is not None and self.flags[4] == 4:
                kind, fa, fb, fres, _ = self.flags
                if kind == "sub":
                    cf = f"(1 if {fa} < {fb} else 0)"
                elif kind == "add":
                    cf = f"(1 if {fres} > 0xFFFFFFFF else 0)"
                elif kind == "logic":
                    cf = "0"
            self.flags = ("dec" if dec else "inc", a, "1", res, 4)
            return [
                f"c.lcf = {cf}",
                f"{a} = r[{n}]",
                f"{res} = {a} {'-' if dec else '+'} 1",
                f"r[{n}] = {res} & 0xFFFFFFFF",
                f"c.lop = {5 if dec else 4}; c.la = {a}; c.lb = 1; c.lres = {res}; "
                "c.lmask = 0xFFFFFFFF",
            ], False
        if 0x50 <= op <= 0x57:
            n = op & 7
            return [
                "if c.ss32:",
                f"    {a} = (r[4] - 4) & 0xFFFFFFFF",
                *("    " + ln for ln in _store32(f"(sb[2] + {a}) & 0xFFFFFFFF", f"r[{n}]")),
                f"    r[4] = {a}",
                "else:",
                f"    c.push(r[{n}], 4)",
            ], True
        if 0x58 <= op <= 0x5F:
            n = op & 7
            return [
                "if c.ss32:",
                *("    " + ln for ln in _load32(a, "(sb[2] + r[4]) & 0xFFFFFFFF")),
                "    r[4] = (r[4] + 4) & 0xFFFFFFFF",
                f"    r[{n}] = {a}",
                "else:",
                f"    r[{n}] = c.pop(4)",
            ], True
        if op == 0x8D:
            m = bs.u8()
            mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
            if mod == 3:
                return None
            ea = _ea32(bs, mod, rm)
            seg = SS if "sb[2]" in ea else DS
            return [f"r[{reg}] = ({ea} - sb[{seg}]) & 0xFFFFFFFF"], False
        if op == 0x0F:
            op2 = bs.u8()
            if op2 in (0xB6, 0xB7, 0xBE, 0xBF):
                m = bs.u8()
                mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
                if mod == 3:
                    if op2 in (0xB6, 0xBE):
                        src = f"(r[{rm}] & 0xFF)" if rm < 4 else f"((r[{rm - 4}] >> 8) & 0xFF)"
                    else:
                        src = f"(r[{rm}] & 0xFFFF)"
                else:
                    src = f"rd{8 if op2 in (0xB6, 0xBE) else 16}({_ea32(bs, mod, rm)})"
                if op2 == 0xBE:
                    return [
                        f"{a} = {src}",
                        f"r[{reg}] = ({a} - 0x100 if {a} & 0x80 else {a}) & 0xFFFFFFFF",
                    ], mod != 3  # noqa: E501
                if op2 == 0xBF:
                    return [
                        f"{a} = {src}",
                        f"r[{reg}] = ({a} - 0x10000 if {a} & 0x8000 else {a}) & 0xFFFFFFFF",
                    ], mod != 3  # noqa: E501
                return [f"r[{reg}] = {src}"], mod != 3
            if 0x90 <= op2 <= 0x9F:
                m = bs.u8()
                mod, _, rm = m >> 6, (m >> 3) & 7, m & 7
                val = f"(1 if {self._cond(op2 & 15)} else 0)"
                if mod == 3:
                    return [f"{a} = {val}", _rset(rm, 1, a)], False
                return [f"wr8({_ea32(bs, mod, rm)}, {val})"], True
            if 0x40 <= op2 <= 0x4F:
                m = bs.u8()
                mod, reg, rm = m >> 6, (m >> 3) & 7, m & 7
                src = f"r[{rm}]" if mod == 3 else f"rd32({_ea32(bs, mod, rm)})"
                return [f"{a} = {src}", f"if {self._cond(op2 & 15)}:", f"    r[{reg}] = {a}"], (
                    mod != 3
                )
            if 0x80 <= op2 <= 0x8F:
                d = _s32(bs.u32())
                return self._jcc(op2 & 15, (nxt + d) & M, nxt), False
            return None
        if 0x70 <= op <= 0x7F:
            d = bs.s8()
            return self._jcc(op & 15, (nxt + d) & M, nxt), False
        if op in (0xEB, 0xE9):
            d = bs.s8() if op == 0xEB else _s32(bs.u32())
            return [f"c.eip = {(nxt + d) & M}"], False
        if op == 0xE8:
            d = _s32(bs.u32())
            return [
                "if c.ss32:",
                f"    {a} = (r[4] - 4) & 0xFFFFFFFF",
                *("    " + ln for ln in _store32(f"(sb[2] + {a}) & 0xFFFFFFFF", str(nxt))),
                f"    r[4] = {a}",
                "else:",
                f"    c.push({nxt}, 4)",
                f"c.eip = {(nxt + d) & M}",
            ], True
        if op == 0xC3:
            return [
                "if c.ss32:",
                *("    " + ln for ln in _load32(a, "(sb[2] + r[4]) & 0xFFFFFFFF")),
                "    r[4] = (r[4] + 4) & 0xFFFFFFFF",
                f"    c.eip = {a}",
                "else:",
                "    c.eip = c.pop(4)",
            ], True
        return None

    def _alu(self, kind, sym, no_write, dst, src, a, b, res, size=4):
        mask = 0xFF if size == 1 else 0xFFFFFFFF
        rd = "rd8" if size == 1 else "rd32"
        wr = "wr8" if size == 1 else "wr32"
        lines = []
        fault = False
        if dst[0] == "m":
            if size == 4:
                lines += _load32(a, dst[1])
                lines.append("_d = _a")
            else:
                lines.append(f"_d = {dst[1]}")
                lines.append(f"{a} = {rd}(_d)")
            fault = True
        else:
            lines.append(f"{a} = {_rget(dst[1], size)}")
        if src[0] == "m":
            if size == 4:
                lines += _load32(b, src[1])
            else:
                lines.append(f"{b} = {rd}({src[1]})")
            fault = True
        elif src[0] == "r":
            lines.append(f"{b} = {_rget(src[1], size)}")
        else:
            lines.append(f"{b} = {src[1]}")
        lines.append(f"{res} = {a} {sym} {b}")
        if not no_write:
            val = res if kind == "logic" else f"({res} & {mask})"
            if dst[0] == "m":
                if size == 4:
                    lines.append("_a = _d")
                    lines += _store32("_a", val, addr_is_a=True)
                else:
                    lines.append(f"{wr}(_d, {val})")
            else:
                lines.append(_rset(dst[1], size, val))
        if kind == "logic":
            lines.append(f"c.lop = 3; c.lres = {res}; c.lmask = {mask}")
        else:
            lines.append(
                f"c.lop = {1 if kind == 'add' else 2}; c.la = {a}; c.lb = {b}; c.lres = {res}; "
                f"c.lmask = {mask}"
            )
        self.flags = (kind, a, b, res, size)
        return lines, fault

    def _cond(self, cc: int) -> str:
        """Source for condition cc, from the flag-setting instruction's locals if known."""
        cond = None
        if self.flags is not None:
            kind, a, b, res, size = self.flags
            mask = 0xFF if size == 1 else 0xFFFFFFFF
            sign = 0x80 if size == 1 else 0x80000000
            k = cc >> 1
            if k == 2:
                cond = f"({res} & {mask}) == 0"
            elif k == 4:
                cond = f"({res} & {sign}) != 0"
            elif kind == "sub":
                if k == 1:
                    cond = f"{a} < {b}"
                elif k == 3:
                    cond = f"{a} <= {b}"
                elif k == 6:
                    cond = f"({a} ^ {sign}) < ({b} ^ {sign})"
                elif k == 7:
                    cond = f"({a} ^ {sign}) <= ({b} ^ {sign})"
            elif kind == "logic":
                if k == 1 or k == 0:
                    cond = "False"
                elif k == 3:
                    cond = f"{res} == 0"
                elif k == 6:
                    cond = f"({res} & {sign}) != 0"
                elif k == 7:
                    cond = f"({res} & {sign}) != 0 or {res} == 0"
        if cond is None:
            cond = f"c.cond({cc & ~1})"
        if cc & 1:
            cond = f"not ({cond})"
        return cond

    def _jcc(self, cc: int, tgt: int, nxt: int) -> list[str]:
        return [f"c.eip = {tgt} if {self._cond(cc)} else {nxt}"]


def compile_block(cpu: Cpu, insns: list[tuple[Any, int, int, bytes]]) -> Any:
    """insns: (closure, eip, length, raw bytes) of each instruction of the block."""
    em = Emitter()
    ns: dict[str, Any] = {
        "c": cpu, "r": cpu.r, "sb": cpu.sbase, "rd8": cpu.rd8, "rd16": cpu.rd16,
        "rd32": cpu.rd32, "wr8": cpu.wr8, "wr32": cpu.wr32, "CpuFault": CpuFault,
        "PAR": PARITY, "ram": cpu.ram, "U32": struct.Struct("<I").unpack_from,
        "P32": struct.Struct("<I").pack_into,
    }  # fmt: skip
    eips = []
    body: list[str] = []
    code32 = cpu.cs32
    last_jump = False
    for k, (fn, eip, n, raw) in enumerate(insns):
        em.k = k
        eips.append(eip)
        nxt = (eip + n) & (M if code32 else 0xFFFF)
        out = None
        if code32 and raw and raw[0] not in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67):
            try:
                out = em.emit(raw, eip, nxt)
            except IndexError:
                out = None
        if cpu.mode_key & 8:  # SEGCHK: ES/SS/DS need segment checks; only closures make them
            out = None
        if out is None:
            ns[f"f{k}"] = fn
            body.append(f"_i = {k}")
            body.append(f"f{k}()")
            em.flags = None
            last_jump = True  # the closure stored EIP itself
        else:
            lines, may_fault = out
            if may_fault:
                body.append(f"_i = {k}")
            body.extend(lines)
            last_jump = any("c.eip =" in ln for ln in lines)
            if any("c.cond" in ln for ln in lines):
                em.flags = None
    if not last_jump:
        nxt = (insns[-1][1] + insns[-1][2]) & (M if code32 else 0xFFFF)
        body.append(f"c.eip = {nxt}")
    ns["EIPS"] = tuple(eips)
    # The TLB dicts are per privilege level; no instruction inside a block changes CPL.
    src = ["def block():", "    _i = 0", "    rt = c.rtlb", "    wt = c.wtlb", "    try:"]
    src += ["        " + ln for ln in body]
    src += [
        "    except CpuFault:",
        "        c.eip = EIPS[_i]",
        "        raise",
        f"    return {len(insns)}",
    ]
    text = "\n".join(src)
    if _DEBUG:
        print(text, file=sys.stderr)
    code = compile(text, "<emu block>", "exec")
    exec(code, ns)  # noqa: S102 - our own generated source, from decoded guest bytes
    return ns["block"]
