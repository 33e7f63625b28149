"""Decode once: each x86 instruction becomes a Python closure that executes it.

The interpreter decodes the instruction at EIP every time and calls its closure; the
block translator decodes a basic block once, keeps the closures in the block cache keyed
by physical address, and replays them until a write to the code page or a paging change
throws them away. Both run the same closures, so the two paths agree by construction on
semantics, and differ only in when decoding happens.

A closure finishes by storing the next EIP; it raises CpuFault *before* changing any
architectural state it cannot leave half-done, so a fault restarts at the instruction.

Layout: `core.py` fetches, reads prefixes, dispatches through the opcode table
(`optable.py`: which method builds each opcode's closure, where a block ends, where LOCK
is legal) and builds blocks; each opcode group is a mixin in its own module (`alu`,
`move`, `stack`, `branch`, `string`, `bits`, `system`, `fpu` for x87 and `sse` for
MMX/SSE), and `Decoder` is all of them.
"""

from __future__ import annotations

from boite.accel.emu.decode.alu import AluOps
from boite.accel.emu.decode.bits import BitOps
from boite.accel.emu.decode.branch import BranchOps
from boite.accel.emu.decode.core import MAX_BLOCK, Block, Ctx, DecoderBase, Fn
from boite.accel.emu.decode.fpu import FpuOps
from boite.accel.emu.decode.move import MoveOps
from boite.accel.emu.decode.sse import SseOps
from boite.accel.emu.decode.stack import StackOps
from boite.accel.emu.decode.string import StringOps
from boite.accel.emu.decode.system import SystemOps

__all__ = ["MAX_BLOCK", "Block", "Ctx", "Decoder", "Fn"]


class Decoder(
    AluOps, MoveOps, StackOps, BranchOps, StringOps, BitOps, SystemOps, FpuOps, SseOps, DecoderBase
):
    """The decoder of the emulated CPU: every opcode group the table names."""
