"""Machines for the bare-metal disk-driver guests (vblk32.asm, ata32.asm): a virtio-blk
device at 0xd0001000 (IRQ 5) or the primary ATA channel (0x1f0/0x3f6, IRQ 14) on a disk
file, plus COM1 and isa-debug-exit. Shared by tests/machine and bench/devices.py."""

from __future__ import annotations

from dataclasses import dataclass

from boite.accel.base import RunResult
from boite.disk import open_disk
from boite.disk.base import BlockImage
from boite.machine.devices import IsaDebugExit, Uart16550
from boite.machine.devices.ata import AtaChannel, AtaDrive
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from boite.machine.virtio.blk import VirtioBlk
from boite.machine.virtio.mmio import MMIO_SIZE, VirtioMmio
from guests import boot
from guests.build import assemble
from guests.runner import CollectedOutput

VBLK_BASE = 0xD000_1000
LOAD = 0x100000


@dataclass
class DiskGuestRun:
    result: RunResult
    output: bytes
    exits: int  # VM exits the accelerator counted
    accesses: int  # register accesses the device saw
    seconds: float


def build(kind: str, disk_path: str, *, memsize: int = 64 << 20, **defines: int):
    """(machine, com1 output, device, image) with the guest for `kind` loaded."""
    memory = GuestMemory.with_ram(memsize)
    machine = Machine(memory)
    com1 = CollectedOutput()
    uart = machine.add_device("com1", Uart16550(machine.irqs.line(4), com1))
    machine.pio.register(0x3F8, 8, uart)
    machine.pio.register(0xF4, 1, machine.add_device("debug-exit", IsaDebugExit(machine)))
    image: BlockImage = open_disk(disk_path)
    if kind == "virtio":
        dev = VirtioMmio(VirtioBlk(image), memory, machine.irqs.line(5), base=VBLK_BASE)
        machine.mmio.register(VBLK_BASE, MMIO_SIZE, dev)
        machine.add_device("virtio-blk", dev)
        program = "vblk32"
    elif kind == "ata":
        dev = AtaChannel(machine.irqs.line(14), AtaDrive(image))
        dev.register(machine.pio)
        machine.add_device("ata0", dev)
        program = "ata32"
    else:
        raise ValueError(kind)
    memory.write(LOAD, assemble(program, **defines).read_bytes())
    machine.boot_state = [boot.flat32(memory, LOAD)]
    return machine, com1, dev, image


def device_accesses(dev) -> int:
    if isinstance(dev, VirtioMmio):
        return dev.register_reads + dev.register_writes
    return dev.accesses


def run(kind: str, disk_path: str, accel_factory, **defines: int) -> DiskGuestRun:
    import time

    machine, com1, dev, image = build(kind, disk_path, **defines)
    accel = accel_factory()
    try:
        accel.create(machine)
        t0 = time.perf_counter()
        result = accel.run()
        seconds = time.perf_counter() - t0
        exits = getattr(accel, "exits", 0)
    finally:
        accel.close()
        image.close()
    out = DiskGuestRun(result, bytes(com1.output), exits, device_accesses(dev), seconds)
    machine.memory.close()
    return out
