"""Benchmark: the Python cost around each native entry and each cold block (issue 11).

Small flat 32-bit ring-0 guests run under `Cpu.run` with the native tier, each a loop:

- `exit1`: `L: inc esi; cpuid; jmp L`: native code leaves once a pass (CPUID is not
  translated: Cpu.run, the CPUID closure, one entry for `jmp L; inc esi`);
- `alt`: `A: inc esi; jmp B` (native) / `B: cpuid; cpuid; jmp A` (Python-compiled): a
  pass alternates one native entry and one Python block;
- `iret`: `L: pushfd; push cs; push L; iret` under paging, with a GDT (Linux's
  sync_core: IRET and its descriptor load in Python, a native entry for the pushes);
- `cold`: 64 blocks of `inc esi; jmp next` with the compilers off: closures only, what
  cold (untranslated, run-few-times) code costs per block in Cpu.run's loop.

Reports CPU microseconds per pass (best of REPEAT, `time.process_time`) for each; the
last line printed is JSON.

Usage: python bench/native_entry.py [--passes N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from boite.accel.emu.cpu import Cpu  # noqa: E402
from boite.accel.emu.native import NativeTier, native_available  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402

CODE = 0x1000


def _cpu(code: bytes, native: bool = True, compile_blocks: bool = True) -> Cpu:
    cpu = Cpu(GuestMemory.with_ram(4 << 20))
    cpu.set_cr(0, 0x11)
    cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF, 0xC09B)
    for i in (0, 2, 3, 4, 5):
        cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    cpu.tlb_switch()
    cpu.ram[CODE : CODE + len(code)] = code
    cpu.eip = CODE
    cpu.r[4] = 0x8000
    cpu.intr = False
    cpu.compile_blocks = compile_blocks
    if native:
        cpu.native = NativeTier(cpu)
    return cpu


def _jmp(frm: int, to: int) -> bytes:
    return b"\xe9" + ((to - (frm + 5)) & 0xFFFFFFFF).to_bytes(4, "little")


def exit1() -> tuple[Cpu, int]:
    # inc esi; cpuid; jmp CODE  (1 + 2 + 2 bytes)
    return _cpu(bytes([0x46, 0x0F, 0xA2, 0xEB, 0xFB])), 3


def alt() -> tuple[Cpu, int]:
    a = bytes([0x46]) + _jmp(CODE + 1, 0x2000)
    cpu = _cpu(a)
    b = bytes([0x0F, 0xA2, 0x0F, 0xA2]) + _jmp(0x2004, CODE)
    cpu.ram[0x2000 : 0x2000 + len(b)] = b
    return cpu, 5


def iret() -> tuple[Cpu, int]:
    # L: pushfd; push cs; push L; iret
    cpu, _ = exit1()
    gdt = 0x3000
    cpu.ram[gdt + 8 : gdt + 24] = (0x00CF9B000000FFFF).to_bytes(8, "little") + (
        0x00CF93000000FFFF
    ).to_bytes(8, "little")
    cpu.gdt_base, cpu.gdt_limit = gdt, 23
    pd = 0x100000  # 4 MiB pages (PSE), identity
    cpu.ram[pd : pd + 4] = (0x83).to_bytes(4, "little")
    cpu.cr3 = pd
    cpu.set_cr(4, 0x10)
    cpu.set_cr(0, 0x80000011)
    code = bytes([0x9C, 0x0E, 0x68]) + CODE.to_bytes(4, "little") + bytes([0xCF])
    cpu.ram[CODE : CODE + len(code)] = code
    cpu.flush_blocks()
    return cpu, 4


def cold() -> tuple[Cpu, int]:
    code = b""
    nblocks = 64
    for i in range(nblocks):
        at = CODE + 16 * i
        nxt = CODE + 16 * ((i + 1) % nblocks)
        code += (bytes([0x46]) + _jmp(at + 1, nxt)).ljust(16, b"\x90")
    return _cpu(code, native=False, compile_blocks=False), 2


def measure(make, passes: int, repeat: int) -> float:
    cpu, per = make()
    want = passes * per
    cpu.run(want)  # warm: blocks decoded, hot ones translated
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        done = 0
        while done < want:
            done += cpu.run(want - done)
        best = min(best, time.process_time() - t0)
    if cpu.native is not None and make is not cold:
        assert cpu.native.entries > 0, "native code did not run"
    cpu.close()
    return best / passes * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not native_available():
        print(json.dumps({"error": "no native tier on this host"}))
        return
    out = {}
    for make in (exit1, alt, iret, cold):
        us = measure(make, args.passes, args.repeat)
        out[f"{make.__name__}_us"] = round(us, 3)
        print(f"{make.__name__}: {us:.3f} us a pass", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
