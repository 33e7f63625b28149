"""Writes to guest RAM that bypass the emulated CPU must drop the code translated from it.

The emulator caches translated (and compiled) blocks by physical address. A device that
DMAs new code over such a page (Linux reusing a page-cache page for a freshly read
program), or a device thread (TAP RX) writing RAM while the vCPU runs, must not leave the
old translation in place. Needs nasm, not KVM.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from boite.accel.base import StopReason
from boite.accel.emu import EmuAccelerator
from boite.disk import open_disk
from boite.machine.devices import IsaDebugExit, Uart16550
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from boite.machine.virtio.blk import VirtioBlk
from boite.machine.virtio.mmio import MMIO_SIZE, VirtioMmio
from guests import boot
from guests.build import assemble
from guests.runner import CollectedOutput

pytestmark = [
    pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed"),
    pytest.mark.emu_tiers,
]  # both tiers (tests/conftest.py)

LOAD = 0x100000
VBLK_BASE = 0xD000_1000
FUNC = 0x300000  # the page the guest runs code from and DMAs new code into
OLD, NEW = 0x1111AAAA, 0x2222BBBB
MODES = [pytest.param(True, id="translated"), pytest.param(False, id="interpreted")]


def _func(value: int) -> bytes:
    return b"\xb8" + value.to_bytes(4, "little") + b"\xc3"  # mov eax, value; ret


def _dma_guest(tmp_path: Path) -> tuple[Machine, CollectedOutput, VirtioMmio]:
    """tests/guests/dmacode32.asm with a virtio-blk disk: sector 0 holds the old function,
    sector 1 the new one."""
    raw = tmp_path / "code.raw"
    raw.write_bytes(
        _func(OLD).ljust(512, b"\xcc") + _func(NEW).ljust(512, b"\xcc") + bytes(7 * 512)
    )
    memory = GuestMemory.with_ram(16 << 20)
    machine = Machine(memory)
    com1 = CollectedOutput()
    uart = machine.add_device("com1", Uart16550(machine.irqs.line(4), com1))
    machine.pio.register(0x3F8, 8, uart)
    machine.pio.register(0xF4, 1, machine.add_device("debug-exit", IsaDebugExit(machine)))
    dev = VirtioMmio(VirtioBlk(open_disk(str(raw))), memory, machine.irqs.line(5), base=VBLK_BASE)
    machine.mmio.register(VBLK_BASE, MMIO_SIZE, dev)
    machine.add_device("virtio-blk", dev)
    memory.write(LOAD, assemble("dmacode32").read_bytes())
    machine.boot_state = [boot.flat32(memory, LOAD)]
    return machine, com1, dev


@pytest.mark.parametrize("translate", MODES)
def test_virtio_blk_dma_over_compiled_code(tmp_path: Path, translate: bool) -> None:
    machine, com1, dev = _dma_guest(tmp_path)
    acc = EmuAccelerator(translate=translate, hot_block=2)
    try:
        acc.create(machine)
        res = acc.run()
        assert acc.cpu is not None
        code_pages = set(acc.cpu.code_pages)
    finally:
        acc.close()
        dev.backend.close()
        machine.memory.close()
    assert res.reason is StopReason.SHUTDOWN, (res, bytes(com1.output))
    assert res.exit_status == (0x31 << 1) | 1, (res, bytes(com1.output))
    assert bytes(com1.output) == b"dmacode: the new code ran\n"
    if acc.native:  # the [native] run: the old function ran as host code before the DMA
        assert acc.tier_stats()["native_instructions"] > 0
    # The function's page was translated again after the DMA (the block cache is on).
    assert (FUNC >> 12 in code_pages) is translate


def test_guest_sees_stale_code_without_the_observer(tmp_path: Path) -> None:
    """The guest really runs the old function from the block cache when nobody tells the
    emulator about the DMA: what the test above guards against."""
    machine, com1, dev = _dma_guest(tmp_path)
    acc = EmuAccelerator(translate=True, hot_block=2)
    try:
        acc.create(machine)
        assert acc.cpu is not None
        machine.memory.remove_write_observer(acc.cpu.note_dma_write)
        res = acc.run()
    finally:
        acc.close()
        dev.backend.close()
        machine.memory.close()
    assert res.exit_status == (0x32 << 1) | 1, (res, bytes(com1.output))
    assert b"stale translation" in bytes(com1.output)


def _asm(tmp_path: Path, body: str) -> bytes:
    src = tmp_path / "g.asm"
    src.write_text(f"bits 32\norg {LOAD:#x}\n{body}\n")
    out = tmp_path / "g.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("translate", MODES)
def test_write_from_another_thread_while_the_cpu_runs(tmp_path: Path, translate: bool) -> None:
    """A device thread (as virtio-net's TAP reader) replaces code the vCPU is calling in
    a loop; the loop must see the new function and end."""
    loop = f"top: call {FUNC:#x}\n cmp eax, {NEW:#x}\n jne top\n mov al, 0x31\n out 0xf4, al\n hlt"
    memory = GuestMemory.with_ram(8 << 20)
    machine = Machine(memory)
    machine.pio.register(0xF4, 1, machine.add_device("debug-exit", IsaDebugExit(machine)))
    memory.write(LOAD, _asm(tmp_path, loop))
    memory.write(FUNC, _func(OLD))
    machine.boot_state = [boot.flat32(memory, LOAD)]
    acc = EmuAccelerator(translate=translate, hot_block=2)
    acc.create(machine)
    cpu = acc.cpu
    assert cpu is not None
    finished = threading.Event()
    wrote: list[bool] = []

    def device() -> None:
        # Wait until the function runs from the block cache (compiled), or for a while
        # of interpretation; a generous bound only guards against a hang.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not finished.is_set():
            block = cpu.blocks.get(FUNC)
            if (block is not None and block.fn is not None) or (not translate and cpu.icount):
                memory.write(FUNC, _func(NEW))  # reports itself to the write observers
                wrote.append(True)
                break
            time.sleep(0.001)
        if not finished.wait(60):
            acc.pause()

    th = threading.Thread(target=device)
    th.start()
    try:
        res = acc.run()
    finally:
        finished.set()
        th.join()
        acc.close()
        memory.close()
    assert wrote, "the function was never compiled"
    assert res.reason is StopReason.SHUTDOWN, res
    assert res.exit_status == (0x31 << 1) | 1
