"""Run a bare-metal guest program on a small machine and collect what it printed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from boite.accel.base import RunResult
from boite.accel.cpustate import CpuState
from boite.machine.devices import IsaDebugExit, SerialBackend, Uart16550
from boite.machine.irq import IrqLine
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from guests import boot
from guests.build import assemble

# Where each kind of guest is loaded and how its vCPU starts.
MODES: dict[str, tuple[int, Callable[[GuestMemory, int], CpuState]]] = {
    "real": (0x8000, lambda mem, entry: boot.real_mode(entry)),
    "flat32": (0x100000, boot.flat32),
    "long64": (0x200000, boot.long64),
}

MMIO_TEST_BASE = 0xD000_0000
MULTIBOOT_MAGIC = (0x1BADB002).to_bytes(4, "little")


class CollectedOutput(SerialBackend):
    """COM1's host side for tests: everything the guest sends, kept in order."""

    def __init__(self) -> None:
        self.output = bytearray()

    def write(self, data: bytes) -> None:
        self.output += data

    def send(self, data: bytes) -> None:
        self._feed(data)


class ComPort(Uart16550):
    """COM1 for tests that wire their own machine: the real 16550, its output collected
    in `output`, `data` waiting as input (its IRQ line goes nowhere)."""

    def __init__(self, data: bytes = b"") -> None:
        self._collected = CollectedOutput()
        super().__init__(IrqLine(4), self._collected)
        if data:
            self._collected.send(data)

    @property
    def output(self) -> bytearray:
        return self._collected.output


DebugExit = IsaDebugExit  # the name other tests import


class TimesThreePlusOne:
    """The MMIO test device: `result` answers value * 3 + 1; every access is logged."""

    def __init__(self) -> None:
        self.value = 0
        self.accesses: list[tuple[str, int, int, int]] = []

    def bus_read(self, offset: int, size: int) -> int:
        result = (self.value * 3 + 1) & 0xFFFF_FFFF if offset == 4 else 0
        self.accesses.append(("read", offset, size, result))
        return result

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))
        if offset == 0:
            self.value = value


@dataclass
class GuestRun:
    result: RunResult
    output: bytes
    machine: Machine
    mmio_device: TimesThreePlusOne


def build_guest_machine(
    name: str,
    mode: str,
    *,
    vcpus: int = 1,
    input: bytes = b"",
    memsize: int = 16 << 20,
    **defines: int,
) -> tuple[Machine, CollectedOutput, TimesThreePlusOne]:
    """A machine with COM1, debug-exit and the MMIO test device, the guest loaded."""
    load_addr, make_state = MODES[mode]
    memory = GuestMemory.with_ram(memsize)
    machine = Machine(memory, num_vcpus=vcpus)
    com1 = CollectedOutput()
    uart = machine.add_device("com1", Uart16550(machine.irqs.line(4), com1))
    machine.pio.register(0x3F8, 8, uart)
    machine.pio.register(0xF4, 1, machine.add_device("debug-exit", IsaDebugExit(machine)))
    if input:
        com1.send(input)
    dev = TimesThreePlusOne()
    machine.mmio.register(MMIO_TEST_BASE, 0x1000, dev)
    image = assemble(name, **defines).read_bytes()
    memory.write(load_addr, image)
    state = make_state(memory, load_addr)
    if image[:4] == MULTIBOOT_MAGIC and mode == "flat32":
        state.rip = int.from_bytes(image[28:32], "little")  # a.out kludge entry_addr
    machine.boot_state = [state]
    return machine, com1, dev


def run_guest(name: str, mode: str, accel_factory, **kwargs) -> GuestRun:
    machine, com1, dev = build_guest_machine(name, mode, **kwargs)
    accel = accel_factory()
    try:
        accel.create(machine)
        result = accel.run()
    finally:
        accel.close()
    run = GuestRun(result, bytes(com1.output), machine, dev)
    machine.memory.close()
    return run
