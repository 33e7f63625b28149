"""Differential testing of the emulator's x87/SSE against the host CPU.

Each case is one instruction (assembled by nasm as 32-bit code, its memory operand at
[ebx+0x80]) run between an FRSTOR of a random x87 state (and an LDMXCSR / MOVDQU loads of
random XMM state) and an FNSAVE (FXSAVE for SSE). The host runs the same bytes natively:
the encodings used are the same in 64-bit mode ([ebx+disp32] is [rbx+disp32]), and
FRSTOR/FNSAVE use the 32-bit protected-mode layout there too. The emulator runs them in
32-bit flat protected mode. Both results are compared bit for bit: control, status and
tag words, the eight registers, the memory operand after the instruction, EAX and the
arithmetic flags (and MXCSR and XMM0-7 for SSE forms).
"""

from __future__ import annotations

import platform
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from boite.accel.emu.cpu import Cpu, CpuFault, CpuHalt
from boite.machine.memory import GuestMemory

CTX_SIZE = 0x600
MEM = 0x80  # memory operand
SAVE = 0x100  # FNSAVE image (108 bytes) / FXSAVE image at 0x200 (512, aligned)
FXS = 0x200
FLAGS = 0x1C0
EAX = 0x1C8
FLAGS_IN = 0x1D0
FAULT = 0x1D8  # the signal the host took (SIGFPE for #MF/#XM, SIGSEGV #GP, SIGILL #UD)
_SIGNAL_OF = {16: 8, 19: 8, 0: 8, 13: 11, 14: 11, 12: 11, 6: 4}
XMM_IN = 0x400  # 8 x 16 bytes loaded into XMM0-7 before the instruction
MXCSR_IN = 0x480

_HOST_C = r"""
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static unsigned char ctx[%(ctx)d] __attribute__((aligned(64)));
static sigjmp_buf jb;
static void on_fault(int sig) { siglongjmp(jb, sig); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGFPE, &sa, 0);
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGILL, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    unsigned char *code = mmap(0, 65536, PROT_READ|PROT_WRITE|PROT_EXEC,
                               MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    uint32_t n;
    while (fread(&n, 4, 1, stdin) == 1) {
        if (n > 60000 || fread(code, 1, n, stdin) != n) return 2;
        if (fread(ctx, 1, sizeof ctx, stdin) != sizeof ctx) return 2;
        int sig = sigsetjmp(jb, 1);
        if (sig == 0)
            ((void (*)(void *))code)(ctx);
        else
            ctx[%(fault)d] = (unsigned char)sig;
        fwrite(ctx, 1, sizeof ctx, stdout);
        fflush(stdout);
    }
    return 0;
}
"""


def host_supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and shutil.which("gcc") is not None


def nasm(src: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "a.asm").write_text(src)
        subprocess.run(["nasm", "-f", "bin", "-o", str(p / "a.bin"), str(p / "a.asm")], check=True)
        return (p / "a.bin").read_bytes()


def assemble(lines: list[str]) -> list[bytes]:
    """Each line assembled alone as 32-bit code (one nasm run for all)."""
    src = ["bits 32"]
    for i, ln in enumerate(lines):
        src += [f"s{i}:", ln]
    src.append(f"s{len(lines)}:")
    # a table of offsets after the code
    src += [f"dd s{i}" for i in range(len(lines) + 1)]
    blob = nasm("\n".join(src) + "\n")
    n = len(lines) + 1
    offs = [int.from_bytes(blob[len(blob) - 4 * n + 4 * i :][:4], "little") for i in range(n)]
    return [blob[offs[i] : offs[i + 1]] for i in range(len(lines))]


# Prologue/epilogue: the same bytes run as 64-bit code on the host (with REX where the
# host needs a 64-bit register) and as 32-bit code in the emulator.
def _frame(op: bytes, host: bool, sse: bool) -> bytes:
    rex = b"\x48" if host else b""
    pro = (b"\x53" + rex + b"\x89\xfb") if host else b""  # push rbx; mov rbx, rdi
    pro += b"\xdb\xe3\xdd\x23"  # fninit (drop a fault's pending exception); frstor [ebx]
    if sse:
        pro += b"\x0f\xae\x93" + MXCSR_IN.to_bytes(4, "little")  # ldmxcsr [ebx+MXCSR_IN]
        for i in range(8):  # movdqu xmmi, [ebx+XMM_IN+16i]
            pro += (
                b"\xf3\x0f\x6f" + bytes([0x83 | (i << 3)]) + (XMM_IN + 16 * i).to_bytes(4, "little")
            )
    # random arithmetic flags (FCMOVcc reads them, FCOMI writes them): mov eax,
    # [ebx+FLAGS_IN]; push eax; popf; mov eax, 0
    pro += b"\x8b\x83" + FLAGS_IN.to_bytes(4, "little") + b"\x50\x9d\xb8" + bytes(4)
    epi = b"\x89\x83" + EAX.to_bytes(4, "little")  # mov [ebx+EAX], eax
    if sse:
        epi += b"\x0f\xae\x83" + FXS.to_bytes(4, "little")  # fxsave [ebx+FXS]
    epi += b"\xdd\xb3" + SAVE.to_bytes(4, "little")  # fnsave [ebx+SAVE]
    epi += b"\x9c\x58"  # pushf; pop eax
    epi += b"\x89\x83" + FLAGS.to_bytes(4, "little")
    epi += (b"\x5b\xc3") if host else b"\xf4"  # pop rbx; ret / hlt
    return pro + op + epi


class HostRunner:
    def __init__(self, workdir: Path) -> None:
        src = workdir / "fpuhost.c"
        src.write_text(_HOST_C % {"ctx": CTX_SIZE, "fault": FAULT})
        exe = workdir / "fpuhost"
        subprocess.run(["gcc", "-O1", "-no-pie", "-o", str(exe), str(src)], check=True)
        self.exe = exe

    def run(self, cases: list[tuple[bytes, bytes]], sse: bool = False) -> list[bytes]:
        data = bytearray()
        for op, ctx in cases:
            code = _frame(op, True, sse)
            data += len(code).to_bytes(4, "little") + code + ctx
        out = subprocess.run(
            [str(self.exe)], input=bytes(data), capture_output=True, check=True
        ).stdout
        return [out[i * CTX_SIZE : (i + 1) * CTX_SIZE] for i in range(len(cases))]


CODE = 0x10000
CTX = 0x20000


class EmuRunner:
    def __init__(self) -> None:
        self.mem = GuestMemory.with_ram(1 << 20)
        cpu = Cpu(self.mem, translate=False)
        cpu.set_cr(0, 0x33)  # PE, MP, ET, NE
        cpu.set_cr(4, 0x600)  # OSFXSR, OSXMMEXCPT
        cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF, 0xC09B)
        for i in (0, 2, 3, 4, 5):
            cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
        cpu.tlb_switch()
        self.cpu = cpu

    def run(self, op: bytes, ctx: bytes, sse: bool = False) -> bytes | str:
        cpu = self.cpu
        code = _frame(op, False, sse)
        self.mem.write(CODE, code)
        self.mem.write(CTX, ctx)
        cpu.flush_blocks()
        cpu.eip = CODE
        cpu.r[3] = CTX
        cpu.r[4] = 0x80000
        cpu.set_flags(0x2, 0x3F7FD5)
        for _ in range(100):
            fn, _n = cpu.decoder.decode_one(cpu.eip)
            try:
                fn()
            except CpuHalt:
                return bytes(self.mem.read(CTX, CTX_SIZE))
            except CpuFault as f:
                out = bytearray(self.mem.read(CTX, CTX_SIZE))
                out[FAULT] = _SIGNAL_OF.get(f.vector, 0x80 | f.vector)
                return bytes(out)
        return "no halt"


# ------------------------------------------------------------------ random operands
def rand_ext(r: random.Random) -> int:
    k = r.randrange(16)
    s = r.getrandbits(1) << 79
    if k == 0:
        return s
    if k == 1:  # denormal
        return s | r.getrandbits(63) >> r.randrange(63)
    if k == 2:  # pseudo-denormal
        return s | (1 << 63) | r.getrandbits(63)
    if k == 3:
        return s | (0x7FFF << 64) | (1 << 63)  # infinity
    if k == 4:  # QNaN
        return s | (0x7FFF << 64) | (3 << 62) | r.getrandbits(62)
    if k == 5:  # SNaN
        return s | (0x7FFF << 64) | (1 << 63) | (r.getrandbits(62) or 1)
    if k == 6:  # unnormal / pseudo-inf / pseudo-NaN
        return s | (r.randrange(1, 0x8000) << 64) | r.getrandbits(63)
    if k == 7:  # small integers
        n = r.randrange(1, 1 << r.randrange(1, 20))
        return s | ((16383 + n.bit_length() - 1) << 64) | (n << (64 - n.bit_length()))
    if k == 8:  # extreme exponents
        return (
            s | (r.choice([1, 2, 0x7FFE, 0x7FFD, 60, 0x7FC0]) << 64) | (1 << 63) | r.getrandbits(63)
        )
    if k == 9:  # near single/double range limits
        e = r.choice(
            [
                16383 - 126,
                16383 - 149,
                16383 + 127,
                16383 - 1022,
                16383 - 1074,
                16383 + 1023,
                16383 - 1023,
            ]
        )
        return s | ((e + r.randrange(-2, 3)) << 64) | (1 << 63) | r.getrandbits(63)
    if k == 10:  # few significant bits (exact results, ties)
        return s | (r.randrange(16370, 16400) << 64) | (1 << 63) | (r.getrandbits(12) << 51)
    # ordinary values around 1
    return s | (r.randrange(16383 - 70, 16383 + 70) << 64) | (1 << 63) | r.getrandbits(63)


def rand_int(r: random.Random, bits: int) -> int:
    k = r.randrange(6)
    if k == 0:
        return r.choice([0, 1, (1 << bits) - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1])
    if k == 1:
        return r.getrandbits(r.randrange(1, bits + 1))
    return r.getrandbits(bits)


def rand_ieee(r: random.Random, bits: int) -> int:
    eb, fb = (8, 23) if bits == 32 else (11, 52)
    k = r.randrange(8)
    s = r.getrandbits(1) << (bits - 1)
    emax = (1 << eb) - 1
    if k == 0:
        return s
    if k == 1:
        return s | r.getrandbits(fb)  # denormal
    if k == 2:
        return s | (emax << fb)  # inf
    if k == 3:
        return s | (emax << fb) | (r.getrandbits(fb) or 1)  # NaN
    return s | (r.randrange(1, emax) << fb) | r.getrandbits(fb)


def rand_bcd(r: random.Random) -> int:
    v = 0
    for i in range(r.randrange(1, 19)):
        v |= r.randrange(10) << (4 * i)
    return v | (r.getrandbits(1) << 79)


def rand_cw(r: random.Random, all_masked_p: float = 0.7) -> int:
    masks = 0x3F if r.random() < all_masked_p else r.getrandbits(6)
    pc = r.choice([0, 2, 3, 3])
    rc = r.randrange(4)
    return 0x40 | masks | (pc << 8) | (rc << 10)


def rand_state(r: random.Random, n_valid: int, cw: int) -> bytes:
    """A 108-byte FRSTOR image: ST(0)..ST(n_valid-1) valid, the rest empty; C0-C3 and
    masked sticky flags random (never an unmasked one: that would fault at FRSTOR's
    next waiting instruction)."""
    top = r.randrange(8)
    sw = (r.getrandbits(16) & 0x4700) | (r.getrandbits(6) & cw & 0x3F) | (top << 11)
    tw = 0
    regs = []
    for i in range(8):
        regs.append(rand_ext(r) if i < n_valid else r.choice([0, rand_ext(r)]))
        phys = (top + i) & 7
        tw |= (0 if i < n_valid else 3) << (2 * phys)
    env = b"".join((w | 0xFFFF0000).to_bytes(4, "little") for w in (cw, sw, tw)) + bytes(16)
    return env + b"".join(v.to_bytes(10, "little") for v in regs)


@dataclass
class Form:
    """One instruction form: nasm source with its memory operand at [ebx+0x80]."""

    name: str
    asm: str
    mem: str = ""  # m32 m64 m80 i16 i32 i64 bcd ("" = none)
    stack: int = 2  # how many ST registers hold values (others empty)
    tolerance_ulps: int = 0  # transcendental: the SDM promises < 1 ulp, not exactness
    flags_random: bool = False  # (EFLAGS are always random; kept for the form's intent)
    mem_compare: int = 0x80  # bytes of the memory operand compared (FIP/FDP differ)
    mem_tail: tuple[int, int] | None = None  # and this range of it
    st0_max_lead: int | None = None  # ST(0) below 2**this (the SDM's domain), specials kept


def rand_simd(r: random.Random) -> bytes:
    """16 bytes: four singles, two doubles (with the special values) or integer lanes
    with edge values."""
    k = r.randrange(3)
    if k < 2:
        bits = 32 if k == 0 else 64
        v = 0
        for i in range(128 // bits):
            v |= rand_ieee(r, bits) << (bits * i)
        return v.to_bytes(16, "little")
    out = bytearray()
    while len(out) < 16:
        k = r.randrange(6)
        if k == 0:
            out += bytes([r.choice([0, 0xFF, 0x80, 0x7F, 1])] * r.choice([1, 2, 4, 8]))
        else:
            out += r.getrandbits(32).to_bytes(4, "little")
    return bytes(out[:16])


def rand_mem(r: random.Random, kind: str) -> bytes:
    if kind == "m32":
        v, n = rand_ieee(r, 32), 4
    elif kind == "m64":
        v, n = rand_ieee(r, 64), 8
    elif kind == "m80":
        v, n = rand_ext(r), 10
    elif kind == "bcd":
        v, n = rand_bcd(r), 10
    elif kind.startswith("i"):
        bits = int(kind[1:])
        v, n = rand_int(r, bits), bits // 8
    else:
        v, n = r.getrandbits(128), 16
    return v.to_bytes(n, "little")


def make_ctx(r: random.Random, form: Form) -> bytes:
    ctx = bytearray(r.getrandbits(8) for _ in range(CTX_SIZE))
    cw = rand_cw(r)
    st = form.stack if r.random() < 0.9 else r.randrange(0, 9)
    ctx[0:108] = rand_state(r, st, cw)
    if form.st0_max_lead is not None:
        v = _ext_of(ctx[28:38])
        e = (v >> 64) & 0x7FFF
        if 0 < e < 0x7FFF and e - 16383 >= form.st0_max_lead:
            v = (v & ~(0x7FFF << 64)) | ((16383 + form.st0_max_lead - 1 - r.randrange(8)) << 64)
            ctx[28:38] = v.to_bytes(10, "little")
    if form.mem == "env":
        m = rand_state(r, 0, rand_cw(r, 0.5))[:28]
        ctx[MEM : MEM + 28] = m
    elif form.mem == "fxsave":  # a random FXRSTOR image at FXS: x87, MXCSR, XMM
        img = bytearray(r.getrandbits(8) for _ in range(512))
        st = rand_state(r, r.randrange(9), rand_cw(r, 0.5))
        img[0:2], img[2:4] = st[0:2], st[4:6]
        img[4] = r.getrandbits(8)
        for i in range(8):
            img[32 + 16 * i : 42 + 16 * i] = st[28 + 10 * i : 38 + 10 * i]
        img[24:28] = (r.getrandbits(16) & 0xFFFF).to_bytes(4, "little")
        ctx[FXS : FXS + 512] = img
    elif form.mem in ("env16", "save16"):  # the 16-bit protected-mode layouts
        st = rand_state(r, r.randrange(9), rand_cw(r, 0.5))
        words = b"".join(st[4 * i : 4 * i + 2] for i in range(3)) + r.getrandbits(64).to_bytes(
            8, "little"
        )
        img = words + (st[28:108] if form.mem == "save16" else b"")
        ctx[MEM : MEM + len(img)] = img
    elif form.mem == "save":
        ctx[MEM : MEM + 108] = rand_state(r, r.randrange(9), rand_cw(r, 0.5))
    elif form.mem:
        m = rand_mem(r, form.mem)
        ctx[MEM : MEM + len(m)] = m
    ctx[FLAGS_IN : FLAGS_IN + 4] = ((r.getrandbits(12) & 0x8D5) | 2).to_bytes(4, "little")
    for i in range(8):  # XMM0-7 (loaded by the SSE prologue), lanes with edge values
        ctx[XMM_IN + 16 * i : XMM_IN + 16 * i + 16] = rand_simd(r)
    if form.mem == "simd":
        ctx[MEM : MEM + 16] = rand_simd(r)
    elif form.mem == "mxcsr":
        ctx[MEM : MEM + 4] = (r.getrandbits(16) & 0xFFFF).to_bytes(4, "little")
    masks = 0x3F if r.random() < 0.7 else r.getrandbits(6)
    mx = (masks << 7) | (r.randrange(4) << 13) | (0x8040 & r.getrandbits(16))  # DAZ FTZ
    ctx[MXCSR_IN : MXCSR_IN + 4] = mx.to_bytes(4, "little")
    ctx[FAULT] = 0
    return bytes(ctx)


def _ext_of(b: bytes) -> int:
    return int.from_bytes(b, "little")


def ulps_apart(a: int, b: int) -> int:
    """Distance in units of the last place between two finite 80-bit values of the same
    sign and exponent neighbourhood (large when they are not comparable)."""
    if (a ^ b) >> 79 or (a >> 64) & 0x7FFF == 0x7FFF or (b >> 64) & 0x7FFF == 0x7FFF:
        return 0 if a == b else 1 << 20

    def lin(x: int) -> int:
        e = (x >> 64) & 0x7FFF
        return e * (1 << 63) + (x & ((1 << 63) - 1)) if e else x & ((1 << 64) - 1)

    return abs(lin(a) - lin(b))


def compare(
    form: Form, ctx_in: bytes, host: bytes, emu: bytes | str, sse: bool = False
) -> str | None:
    """None when equal, else a one-line description of the first difference."""
    if isinstance(emu, str):
        return emu
    h, e = host, emu
    if h[FAULT] != e[FAULT]:
        return f"fault: host signal {h[FAULT]} emu {e[FAULT]}"
    diffs = []
    for name, off, n in (("cw", SAVE, 2), ("sw", SAVE + 4, 2), ("tw", SAVE + 8, 2)):
        if h[off : off + n] != e[off : off + n]:
            diffs.append(
                f"{name} host {_ext_of(h[off : off + n]):#06x} emu {_ext_of(e[off : off + n]):#06x}"
            )
    for i in range(8):
        o = SAVE + 28 + 10 * i
        hv, ev = _ext_of(h[o : o + 10]), _ext_of(e[o : o + 10])
        if hv != ev and not (form.tolerance_ulps and ulps_apart(hv, ev) <= form.tolerance_ulps):
            diffs.append(f"st{i} host {hv:#022x} emu {ev:#022x}")
    if form.tolerance_ulps and diffs and diffs[0].startswith("sw "):
        # C1 (rounded up) follows the hardware's internal approximation, not the exact value
        hs, es = _ext_of(h[SAVE + 4 : SAVE + 6]), _ext_of(e[SAVE + 4 : SAVE + 6])
        if (hs ^ es) & ~0x200 == 0:
            diffs.pop(0)
    n = form.mem_compare
    tail = form.mem_tail
    if h[MEM : MEM + n] != e[MEM : MEM + n] or (
        tail and h[MEM + tail[0] : MEM + tail[1]] != e[MEM + tail[0] : MEM + tail[1]]
    ):
        diffs.append(f"mem host {h[MEM : MEM + 28].hex()} emu {e[MEM : MEM + 28].hex()}")
    if (_ext_of(h[FLAGS : FLAGS + 4]) ^ _ext_of(e[FLAGS : FLAGS + 4])) & 0x8D5:
        diffs.append(
            f"eflags host {_ext_of(h[FLAGS : FLAGS + 4]):#x} emu {_ext_of(e[FLAGS : FLAGS + 4]):#x}"
        )
    if h[EAX : EAX + 4] != e[EAX : EAX + 4]:
        diffs.append(f"eax host {h[EAX : EAX + 4].hex()} emu {e[EAX : EAX + 4].hex()}")
    if sse:
        for name, off, n in (("mxcsr", FXS + 24, 4), ("xmm", FXS + 160, 128)):
            if h[off : off + n] != e[off : off + n]:
                diffs.append(f"{name} host {h[off : off + n].hex()} emu {e[off : off + n].hex()}")
    return "; ".join(diffs) if diffs else None


def describe_input(ctx: bytes, form: Form) -> str:
    cw = _ext_of(ctx[0:2])
    sw = _ext_of(ctx[4:6])
    tw = _ext_of(ctx[8:10])
    top = (sw >> 11) & 7
    regs = []
    for i in range(3):
        p = (top + i) & 7
        v = _ext_of(ctx[28 + 10 * i : 38 + 10 * i])
        regs.append("empty" if (tw >> (2 * p)) & 3 == 3 else f"{v:#022x}")
    mem = ctx[MEM : MEM + 16].hex() if form.mem else ""
    return f"cw={cw:#06x} sw={sw:#06x} st0-2={' '.join(regs)} mem={mem}"


def run_forms(forms: list[Form], n: int, seed: int = 1, sse: bool = False,
              ctx_fn=make_ctx) -> dict[str, tuple[int, int, list[str]]]:  # fmt: skip
    """Per form: (passed, total, first failures)."""
    r = random.Random(seed)
    ops = assemble([f.asm for f in forms])
    workdir = Path(tempfile.mkdtemp(prefix="fpudiff"))
    host = HostRunner(workdir)
    emu = EmuRunner()
    results = {}
    for form, op in zip(forms, ops, strict=True):
        cases = [(op, ctx_fn(r, form)) for _ in range(n)]
        outs = host.run(cases, sse)
        ok = 0
        fails: list[str] = []
        for (o, ctx), h in zip(cases, outs, strict=True):
            d = compare(form, ctx, h, emu.run(o, ctx, sse), sse)
            if d is None:
                ok += 1
            elif len(fails) < 3:
                fails.append(f"{describe_input(ctx, form)} -> {d}")
        results[form.name] = (ok, n, fails)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def report(results: dict[str, tuple[int, int, list[str]]]) -> str:
    lines = []
    for name, (ok, n, fails) in results.items():
        lines.append(f"{name:28s} {ok:5d}/{n:<5d} {100.0 * ok / n:6.2f}%")
        for f in fails:
            lines.append(f"    {f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ QEMU TCG as a peer
QEMU_WORK = 0x400000  # where each case's context is copied (64-byte aligned)
QEMU_CASES = 0x800000  # the cases' input contexts (loaded with the image)
# What a case sends back: the regions compare() looks at.
DUMP = ((MEM, SAVE + 108), (FLAGS, FAULT + 1), (FXS + 24, FXS + 288))


def qemu_supported() -> bool:
    return shutil.which("qemu-system-i386") is not None and shutil.which("nasm") is not None


def _qemu_guest(frames: list[bytes], n_cases: int) -> str:
    """A multiboot kernel that runs frame i on the context of case i, sends the DUMP
    regions to COM1, and takes every exception as 'the case faulted' (its signal in
    FAULT) before going on with the next case."""
    lines = [
        "bits 32",
        "org 0x100000",
        "mb: dd 0x1badb002, 0x00010000, -(0x1badb002 + 0x00010000)",
        "    dd mb, mb, data_end, bss_end, start",
        "start:",
        "    mov esp, 0x300000",
        "    mov eax, cr0",
        "    and eax, ~0xC",
        "    or eax, 0x22",
        "    mov cr0, eax",
        "    mov eax, cr4",
        "    or eax, 0x600",
        "    mov cr4, eax",
        "    mov ax, cs",
        "    mov [sel], ax",
        "    mov edi, idt",
        "    mov ecx, 32",
        "    mov esi, stubs",
        ".gate:",
        "    mov eax, esi",
        "    mov [edi], ax",
        "    mov ax, [sel]",
        "    mov [edi+2], ax",
        "    mov word [edi+4], 0x8e00",
        "    shr eax, 16",
        "    mov [edi+6], ax",
        "    add edi, 8",
        "    add esi, 16",
        "    loop .gate",
        "    lidt [idtr]",
        "    mov dword [case_no], 0",
        "next_case:",
        "    mov eax, [case_no]",
        f"    cmp eax, {n_cases}",
        "    je finish",
        f"    imul esi, eax, {CTX_SIZE}",
        f"    add esi, {QEMU_CASES}",
        f"    mov edi, {QEMU_WORK}",
        f"    mov ecx, {CTX_SIZE // 4}",
        "    rep movsd",
        f"    mov ebx, {QEMU_WORK}",
        "    mov [saved_esp], esp",
        "    call [frames + eax*4]",
        "after:",
        "    mov esp, [saved_esp]",
    ]
    for lo, hi in DUMP:
        lines += [f"    mov esi, {QEMU_WORK + lo}", f"    mov ecx, {hi - lo}", "    mov dx, 0x3f8",
                  "    rep outsb"]  # fmt: skip
    lines += [
        "    inc dword [case_no]",
        "    jmp next_case",
        "finish:",
        "    mov dx, 0xf4",
        "    mov al, 0x31",
        "    out dx, al",
        "    hlt",
        "fault_common:",
        f"    mov [{QEMU_WORK + FAULT}], al",
        "    jmp after",
        "align 16",
        "stubs:",
    ]
    for v in range(32):
        sig = _SIGNAL_OF.get(v, 0x80 | v)
        lines += [f"    mov al, {sig}", "    jmp fault_common", "    align 16"]
    lines += ["align 4", "frames:"] + [f"    dd frame{i}" for i in range(len(frames))]
    for i, fr in enumerate(frames):
        lines += [f"frame{i}:", "    db " + ", ".join(str(b) for b in fr)]
    lines += ["align 8", "idtr: dw 32*8-1", "    dd idt", "sel: dw 0", "case_no: dd 0",
              "saved_esp: dd 0", "data_end:", "idt: times 32*8 db 0", "bss_end:"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_qemu(cases: list[tuple[bytes, bytes]], sse: bool) -> list[bytes]:
    """Run the cases under qemu-system-i386 -accel tcg: each result is a full context
    (the DUMP regions from QEMU, the rest as the input had it)."""
    frames = [_frame(op, False, sse)[:-1] + b"\xc3" for op, _ in cases]  # hlt -> ret
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "g.asm").write_text(_qemu_guest(frames, len(cases)))
        subprocess.run(["nasm", "-f", "bin", "-o", str(p / "g.bin"), str(p / "g.asm")], check=True)
        (p / "cases.bin").write_bytes(b"".join(ctx for _, ctx in cases))
        out = p / "out.bin"
        subprocess.run(
            ["qemu-system-i386", "-accel", "tcg", "-cpu", "core2duo", "-m", "64",
             "-kernel", str(p / "g.bin"),
             "-device", f"loader,file={p / 'cases.bin'},addr={QEMU_CASES:#x},force-raw=on",
             "-display", "none", "-serial", f"file:{out}", "-monitor", "none", "-no-reboot",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
            timeout=600, check=False, capture_output=True,
        )  # fmt: skip
        data = out.read_bytes()
    per = sum(hi - lo for lo, hi in DUMP)
    results = []
    for i, (_, ctx) in enumerate(cases):
        chunk = data[i * per : (i + 1) * per]
        res = bytearray(ctx)
        if len(chunk) == per:
            pos = 0
            for lo, hi in DUMP:
                res[lo:hi] = chunk[pos : pos + hi - lo]
                pos += hi - lo
        else:
            res[FAULT] = 0xFF  # QEMU did not get this far
        results.append(bytes(res))
    return results


def run_forms_qemu(forms: list[Form], n: int, seed: int = 1, sse: bool = False,
                   ctx_fn=make_ctx) -> dict[str, tuple[int, int, list[str]]]:  # fmt: skip
    """Per form: the emulator against QEMU TCG (one QEMU run for every case)."""
    r = random.Random(seed)
    ops = assemble([f.asm for f in forms])
    emu = EmuRunner()
    cases = []
    for form, op in zip(forms, ops, strict=True):
        cases += [(form, op, ctx_fn(r, form)) for _ in range(n)]
    outs = run_qemu([(op, ctx) for _, op, ctx in cases], sse)
    results: dict[str, tuple[int, int, list[str]]] = {}
    for (form, op, ctx), q in zip(cases, outs, strict=True):
        ok, tot, fails = results.get(form.name, (0, 0, []))
        d = compare(form, ctx, q, emu.run(op, ctx, sse), sse)
        if d is None:
            ok += 1
        elif len(fails) < 2:
            fails = [*fails, f"{describe_input(ctx, form)} -> qemu vs emu: {d}"]
        results[form.name] = (ok, tot + 1, fails)
    return results
