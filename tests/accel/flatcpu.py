"""A CPU in 32-bit protected mode with flat ring-0 segments (CS 0x08, data 0x10, base 0,
limit 4 GiB) over 1 MiB of RAM: where the unit tests of the CPU tiers start."""

from __future__ import annotations

from boite.accel.emu.cpu import Cpu
from boite.machine.memory import GuestMemory


def flat32_cpu() -> Cpu:
    cpu = Cpu(GuestMemory.with_ram(1 << 20))
    cpu.set_cr(0, 0x11)
    cpu.set_seg_raw(1, 0x08, 0, 0xFFFFFFFF, 0xC09B)
    for i in (0, 2, 3, 4, 5):
        cpu.set_seg_raw(i, 0x10, 0, 0xFFFFFFFF, 0xC093)
    cpu.tlb_switch()
    return cpu
