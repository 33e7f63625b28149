"""Full emulation: an IA-32 CPU in Python (decoder, execution, lazy flags, MMU/TLB,
exceptions, block cache) behind the Accelerator interface. See cpu.py for what CPUID
reports and what is not emulated."""

from boite.accel.emu.accel import EmuAccelerator, cpu_to_state, state_to_cpu
from boite.accel.emu.arch import CpuFault
from boite.accel.emu.cpu import Cpu

__all__ = ["Cpu", "CpuFault", "EmuAccelerator", "cpu_to_state", "state_to_cpu"]
