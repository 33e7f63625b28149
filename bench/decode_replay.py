"""Benchmark: what the Python decoder (decode/) costs per guest instruction.

Boots a Linux kernel (the kit's i386 vmlinux, or a bzImage with --bzimage) to its init
marker and records every block the decoder was asked to translate: its guest bytes (from
the block's start to the end of its page, and the next linear page where that was
mapped for execution), EIP and the CPU state decoding reads (segment
bases, limits and rights, CS/SS size, mode_key, CPL, CR0/CR4, LOCK rule). Then it decodes
them all again, REPEAT times, on a CPU whose execute TLB maps those bytes at the same
linear addresses (one RAM frame per linear page), and reports the best pass in CPU
microseconds per decoded instruction, with a hash of the block boundaries (every instruction's EIP and length: equal hashes
mean the same blocks, the check for a change meant to make the decoder faster, not
different).

Usage: python bench/decode_replay.py KERNEL INITRD [--bzimage] [--repeat N]
       [--save FILE | --load FILE]   (a recording kept to replay without booting)
The last line printed is JSON: blocks, decoded_insns, replay_us_per_insn, boundary_sha256
(first 16 hex digits), boot_cpu_s (absent with --load).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import emu  # noqa: E402
from boite.accel.emu.accel import GC_THRESHOLD, _gc_adapt  # noqa: E402
from boite.accel.emu.cpu import Cpu  # noqa: E402
from boite.accel.emu.decode import core  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402

SCALARS = ("cs32", "ss32", "mode_key", "cs_key", "lock_ud", "cpl", "cr0", "cr4")
SEGS = ("sbase", "slimit", "slo", "srhi", "swhi", "sel")


def _page_bytes(c: Cpu, page: int) -> bytes | None:
    """The 4 KiB of a linear page mapped for execution, read without touching the TLB."""
    p = c.xtlb.get(page)
    if p is None:
        return None
    return bytes(c.ram[p : p + 0x1000])


def record(kernel: Path, initrd: Path, bzimage: bool) -> tuple[list, float]:
    """Boot; returns (one tuple per translate_block call, CPU s of the boot)."""
    recs: list[tuple] = []
    real = core.DecoderBase.translate_block

    def recording(self, pa: int, eip: int):
        c = self.c
        lin = (c.sbase[1] + eip) & 0xFFFFFFFF
        page = lin >> 12
        cur = _page_bytes(c, page)
        if cur is None:  # not RAM, or not in the execute TLB: read the bytes one by one
            cur = bytes(c.phys_read((pa & ~0xFFF) + i, 1) for i in range(0x1000))
        nxt = _page_bytes(c, (page + 1) & 0xFFFFF) if lin & 0xFFF > 0xFF0 else None
        state = tuple(getattr(c, a) for a in SCALARS) + tuple(list(getattr(c, a)) for a in SEGS)
        recs.append((lin, eip, cur, nxt, state))
        return real(self, pa, eip)

    core.DecoderBase.translate_block = recording  # type: ignore[method-assign]
    try:
        if bzimage:
            _, cpu_s = emu.linux_emu(kernel, initrd, 256, "linux-unpacked", emu.READY, 7200,
                                     emu.STOCK_CMDLINE)  # fmt: skip
        else:
            _, cpu_s = emu.linux_emu(kernel, initrd)
    finally:
        core.DecoderBase.translate_block = real  # type: ignore[method-assign]
    # Keep each distinct page once (most blocks share their page with others).
    pages: dict[bytes, bytes] = {}
    out = []
    for lin, eip, cur, nxt, state in recs:
        cur = pages.setdefault(cur, cur)
        if nxt is not None:
            nxt = pages.setdefault(nxt, nxt)
        out.append((lin, eip, cur, nxt, state))
    return out, cpu_s


def _frames(recs: list) -> dict[int, int]:
    """A RAM frame of the replay for each linear page the blocks start in or run into
    (one page, one frame: blocks keep their distinct physical addresses)."""
    frames: dict[int, int] = {}
    for lin, _, _, nxt, _ in recs:
        for page in (lin >> 12, ((lin >> 12) + 1) & 0xFFFFF) if nxt is not None else (lin >> 12,):
            frames.setdefault(page, (len(frames) + 1) << 12)
    return frames


def _replay_cpu(ram: int) -> Cpu:
    c = Cpu(GuestMemory.with_ram(ram))
    c.native = None
    c.paging = True

    def unmapped(lin: int) -> int:  # a page the boot had not mapped: a not-present #PF
        c.cr2 = lin
        raise core.CpuFault(14, 0x10 if c.nx else 0)

    c.fill_fetch = unmapped  # type: ignore[method-assign]
    return c


def replay(recs: list, repeat: int, decode: bool = True) -> tuple[float, int, str]:
    """Best CPU seconds over `repeat` passes, the instruction count and the boundary hash.
    With decode False, only the per-block setup (to subtract)."""
    gc.set_threshold(*GC_THRESHOLD)  # the collector's pace in a boot (EmuAccelerator)
    if _gc_adapt not in gc.callbacks:
        gc.callbacks.append(_gc_adapt)
    frames = _frames(recs)
    c = _replay_cpu((len(frames) + 2) << 12)
    dec = c.decoder
    ram = c.ram
    best = float("inf")
    insns = 0
    digest = ""
    for _ in range(repeat):
        h = hashlib.sha256()
        insns = 0
        c.blocks.clear()
        c.code_pages.clear()
        # Every block stays alive through the pass, as in a boot (freeing the block a
        # new one replaces in c.blocks is no cost of decoding).
        keep = []
        t0 = time.process_time()
        for lin, eip, cur, nxt, state in recs:
            for a, v in zip(SCALARS, state, strict=False):
                setattr(c, a, v)
            for a, v in zip(SEGS, state[len(SCALARS) :], strict=True):
                getattr(c, a)[:] = v
            page = lin >> 12
            frame = frames[page]
            tlb = {page: frame}
            ram[frame : frame + 0x1000] = cur
            if nxt is not None:
                page2 = (page + 1) & 0xFFFFF
                frame2 = tlb[page2] = frames[page2]
                ram[frame2 : frame2 + 0x1000] = nxt
            c.xtlb = c.rtlb = tlb
            if not decode:
                continue
            try:
                b = dec.translate_block(frame | (lin & 0xFFF), eip)
            except core.CpuFault as f:
                h.update(b"F%d" % f.vector)
                continue
            keep.append(b)
            insns += len(b.fns)
            h.update(repr(b.info).encode())
        best = min(best, time.process_time() - t0)
        del keep
        digest = h.hexdigest()[:16]
    return best, insns, digest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", type=Path, nargs="?")
    ap.add_argument("initrd", type=Path, nargs="?")
    ap.add_argument("--bzimage", action="store_true", help="a bzImage (Debian's 686), 256 MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", type=Path, help="keep the recording in this file")
    ap.add_argument("--load", type=Path, help="replay a recording kept with --save")
    a = ap.parse_args()
    cpu_s = None
    if a.load:
        recs = pickle.loads(a.load.read_bytes())
    else:
        if a.kernel is None or a.initrd is None:
            ap.error("KERNEL and INITRD are needed without --load")
        recs, cpu_s = record(a.kernel, a.initrd, a.bzimage)
        if a.save:
            a.save.write_bytes(pickle.dumps(recs, protocol=pickle.HIGHEST_PROTOCOL))
    setup, _, _ = replay(recs, a.repeat, decode=False)
    total, insns, digest = replay(recs, a.repeat)
    us = 1e6 * (total - setup) / max(1, insns)
    print(f"{len(recs)} blocks, {insns} instructions decoded: {us:.2f} us each "
          f"(replay, best of {a.repeat}, setup {1e6 * setup / max(1, insns):.2f} us/insn "
          "taken off)", file=sys.stderr)  # fmt: skip
    out = {"blocks": len(recs), "decoded_insns": insns, "replay_us_per_insn": round(us, 2),
           "boundary_sha256": digest}  # fmt: skip
    if cpu_s is not None:
        out["boot_cpu_s"] = round(cpu_s, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
