"""Legacy prefixes on every row the native tier translates, against the Python tiers.

The random fuzz rarely puts odd prefixes on an instruction, and seed 711014 showed what
hides there (F2 0F AE ED ran as LFENCE natively; the Python tiers raise #UD). Here each
row whose `native` is set, in a register form and a memory form (where it has ModRM),
gets each prefix of PREFIXES (66, 67, F2, F3, LOCK, the six segment overrides, and the
pairs and repeats that change their meaning: 66+F3, F2+F3, 66 66, ...). Where the
native translator takes the instruction (parse returns an Insn), it runs as native code
and as the Python tiers' closure from the same random registers and flags: registers,
EIP, memory and the fault raised must be equal, the flags too except where the host
computes undefined flags its own way (host_differs). Where the translator refuses the
form, the Python tiers run it and there is nothing to compare.

The default run tries a few operand patterns per form; the slow sweep many more, with
prefix triples.
"""

from __future__ import annotations

import random

import pytest
from flatcpu import flat32_cpu

from boite.accel.emu.arch import CpuFault
from boite.accel.emu.cpu import Cpu
from boite.accel.emu.native import NativeTier, native_available
from boite.accel.emu.native import translate as native_translate
from boite.accel.emu.native.translate import host_differs, parse
from boite.accel.emu.optable import ROWS, Op, has_modrm, imm_bytes

pytestmark = pytest.mark.skipif(not native_available(), reason="no native tier on this host")

CODE, DATA = 0x1000, 0x4000
_RAM0 = bytes(1 << 20)
_DATA0 = random.Random(0).randbytes(0x400)  # no period: an FS base of 0x100 shows
_SEGS = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
PREFIXES = [bytes([b]) for b in (0x66, 0x67, 0xF2, 0xF3, 0xF0, *_SEGS)] + [
    bytes.fromhex(h)
    for h in (
        "66f3",
        "f366",
        "66f2",
        "f266",
        "f2f3",
        "f3f2",
        "6666",
        "f3f3",
        "f2f2",
        "f0f0",
        "f066",
        "66f0",
        "f0f3",
        "f3f0",
        "f0f2",
        "6667",
        "6766",
        "2e3e",
        "3e64",
        "6426",
        "64f3",
        "f364",
        "66f0f3",
        "f066f2",
        "2e66f3",
        "3e" * 6,  # long runs: up to the 15-byte limit (#GP past it)
        "662e" * 3,
        "f3" * 12,
        "3e" * 13,
    )  # fmt: skip
]
# The slow sweep: every ordered pair of distinct prefixes, and a few triples more.
_ALL = (0x66, 0x67, 0xF2, 0xF3, 0xF0, *_SEGS)
SWEEP = PREFIXES + [bytes((a, b)) for a in _ALL for b in _ALL if a != b] + [
    bytes((a, b, c)) for a in (0x66, 0xF0, 0x64) for b in (0xF2, 0xF3, 0x66) for c in (0xF3, 0x2E, 0x66)
]  # fmt: skip
_NATIVE_ROWS = [r for r in ROWS if r.native]
_STRING = ("rep_string", "string1", "moffs")


def _row_id(r: Op) -> str:
    return f"{r.map}{r.code:02x}{'' if r.ext is None else '/' + str(r.ext)}-{r.mnemonic}"


def _cpu(user: bool = False) -> Cpu:
    """Ring 0, or ring 3 (user) with DPL-3 data segments."""
    cpu = flat32_cpu()
    data, attr = (0x23, 0xC0F3) if user else (0x10, 0xC093)
    if user:
        cpu.load_cs(0x1B, 0, 0xFFFFFFFF, 0xC0FB, 3)
        for i in (0, 2, 3):
            cpu.set_seg_raw(i, data, 0, 0xFFFFFFFF, attr)
    # FS: flat (no limit checks) but based, so an FS override must add its base; GS:
    # with a limit (its overrides need checks: left to Python).
    cpu.set_seg_raw(4, data, 0x100, 0xFFFFFFFF, attr)
    cpu.set_seg_raw(5, data, 0, 0x4FFF, attr)
    cpu.tlb_switch()
    cpu.native = NativeTier(cpu)
    cpu.rdtsc = lambda: 0x1234_5678_9ABC  # both tiers read the same counter
    return cpu


def _body(r: Op, rnd: random.Random, memory: bool, p66: bool) -> bytes | None:
    """The row's bytes after the prefixes: a register form, or a memory form ([EBX +
    disp32]; [EBP + disp8] and [ESP + disp8], SIB: the SS default; [disp32]); None where
    it has no such form."""
    out = bytes([0x0F, r.code]) if r.map == "0F" else bytes([r.code])
    if has_modrm(r):
        reg = r.ext if r.ext is not None else rnd.randrange(8)
        form = rnd.random()
        if not memory:
            out += bytes([0xC0 | reg << 3 | rnd.randrange(8)])
        elif form < 0.5:
            out += bytes([0x80 | reg << 3 | 3]) + rnd.randrange(0, 40).to_bytes(4, "little")
        elif form < 0.7:
            out += bytes([0x40 | reg << 3 | 5, rnd.randrange(0, 40)])
        elif form < 0.85:
            out += bytes([0x44 | reg << 3, 0x24, rnd.randrange(0, 40)])
        else:
            out += bytes([0x05 | reg << 3]) + (DATA + rnd.randrange(0, 40)).to_bytes(4, "little")
    elif memory:
        return None
    return out + rnd.randbytes(imm_bytes(r, p66))


def _run(cpu: Cpu | None, code: bytes, regs: list[int], fl: int, native: bool, user: bool):
    """The state after the instruction at CODE (a REP string instruction resumed until it
    is done, up to a bound), or the fault it raised; None where the native tier does not
    translate it. On `cpu`, or on a fresh CPU where None: IRET and POPF change what
    set_flags alone does not undo (VM86, IOPL, CS)."""
    own = cpu is None
    if cpu is None:
        cpu = _cpu(user)
    cpu.ram[:] = _RAM0
    cpu.ram[CODE : CODE + len(code) + 1] = code + b"\xf4"  # HLT: not translated
    cpu.ram[DATA : DATA + len(_DATA0)] = _DATA0
    cpu.ram[0x7FC0:0x8040] = bytes(range(0x80))  # around ESP: what POP, RET, IRET read
    cpu.flush_blocks()
    cpu.tlb_flush()
    cpu.r[:] = regs
    cpu.set_flags(fl)
    cpu.eip = CODE
    try:
        for _ in range(8):
            if native:
                f = cpu.native.translate(CODE, CODE)
                if f is None:
                    return None  # the translator refused the block after all
                while f() == 0:  # TLB misses filled: go on
                    pass
            else:
                cpu.decoder.decode(CODE)[0]()
            if cpu.eip != CODE:
                break
        return list(cpu.r), cpu.get_flags() & 0x8D5, bytes(cpu.ram[0:0x10000]), cpu.eip, cpu.sel[:]
    except CpuFault as e:
        return ("fault", e.vector, cpu.eip)
    finally:
        if own:
            cpu.close()


def _differences(
    r: Op, prefixes: list[bytes], samples: int, exact: bool = False, user: bool = False
) -> tuple[int, list[str]]:
    """(forms compared, a line per difference). exact: every flag must agree (the
    translator's flag fix-ups on, as in a guest run). user: at CPL 3, IOPL 0 or 3."""
    rnd = random.Random(f"prefix{_row_id(r)}{user}")
    compared, bad = 0, []
    cpu = None if r.native in ("iret", "popf") else _cpu(user)
    for pre in prefixes:
        for memory in (False, True):
            for _ in range(samples):
                body = _body(r, rnd, memory, 0x66 in pre)
                if body is None:
                    break
                code = pre + body
                insn = parse(code, CODE)
                if insn is None:
                    continue  # refused: the Python tiers run it
                regs = [rnd.choice((0, 1, 0x7F, 0x80, 0xFFFF, 0xFFFFFFFF, rnd.getrandbits(32)))
                        for _ in range(8)]  # fmt: skip
                regs[3], regs[4], regs[5] = DATA, 0x8000, DATA + 0x20  # EBX, ESP, EBP
                if r.native in _STRING:  # short strings within RAM
                    regs[1] = rnd.choice((0, 1, 3, 17))
                    regs[6], regs[7] = DATA + rnd.randrange(32), DATA + 0x100 + rnd.randrange(32)
                fl = rnd.getrandbits(12) & 0x8D5 | rnd.choice((0, 0x400))  # DF too
                if user:
                    fl |= 0x200 | rnd.choice((0, 0x3000))  # IF; IOPL 0 or 3
                got = _run(cpu, code, regs, fl, True, user)
                if got is None:
                    continue
                want = _run(cpu, code, regs, fl, False, user)
                if want[0] != "fault" and want[3] == CODE and r.native not in _STRING:
                    continue  # a branch to itself: native code loops on where a closure stops
                compared += 1
                if got[0] == "fault" or want[0] == "fault":
                    same = got == want
                else:
                    same = (
                        got[0] == want[0]
                        and got[2:] == want[2:]
                        and not ((got[1] ^ want[1]) & (0xFFF if exact else ~host_differs(insn)))
                    )
                if not same:
                    bad.append(f"{code.hex()}: native {_short(got)}, python {_short(want)}")
    if cpu is not None:
        cpu.close()
    return compared, bad


def _short(state: tuple) -> str:
    if state[0] == "fault":
        return f"#{state[1]} at {state[2]:#x}"
    return f"eip {state[3]:#x} flags {state[1]:#x} regs {[hex(v) for v in state[0]]}"


@pytest.mark.parametrize("row", _NATIVE_ROWS, ids=_row_id)
def test_prefixed_native_rows_agree_with_the_closures(row: Op, monkeypatch) -> None:
    monkeypatch.setattr(native_translate, "MATCH_PYTHON_FLAGS", False)  # each row as it is
    _, bad = _differences(row, PREFIXES, 2)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("row", [r for r in _NATIVE_ROWS if r.native == "copy"], ids=_row_id)
def test_prefixed_rows_give_the_python_flags(row: Op) -> None:
    """With the flag fix-ups on (MATCH_PYTHON_FLAGS, as in a guest run), prefixed forms
    (66: 16-bit multiplies and shifts) end with every flag as the closure's."""
    _, bad = _differences(row, PREFIXES, 1, exact=True)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("row", [r for r in _NATIVE_ROWS if r.native != "copy"], ids=_row_id)
def test_prefixed_rows_at_cpl3(row: Op) -> None:
    """The rows the translator does not copy (IOPL-sensitive CLI, STI, POPF, PUSHF, IRET;
    privileged INVLPG; RDTSC; stack and branch rows) at CPL 3, with IOPL 0 and 3."""
    _, bad = _differences(row, PREFIXES + [b""], 2, user=True)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
@pytest.mark.parametrize("row", _NATIVE_ROWS, ids=_row_id)
def test_prefix_sweep(row: Op, monkeypatch) -> None:
    """Every ordered pair of prefixes and some triples, more operand patterns."""
    monkeypatch.setattr(native_translate, "MATCH_PYTHON_FLAGS", False)
    _, bad = _differences(row, SWEEP, 6)
    assert not bad, "\n".join(bad[:20])
