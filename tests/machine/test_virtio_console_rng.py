"""virtio-console (hvc0) and virtio-rng through the Python guest driver."""

from __future__ import annotations

from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.console import VirtioConsole
from boite.machine.virtio.guestdriver import (
    ALL_RING_FEATURES,
    Buffer,
    GuestAllocator,
    VirtioMmioDriver,
)
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.rng import VirtioRng

BASE = 0xD000_3000
BUF = 0x200000


def bring_up(backend, gsi: int = 8):
    memory = GuestMemory.with_ram(8 << 20)
    bus = Bus("mmio")
    irq = IrqLine(gsi)
    dev = VirtioMmio(backend, memory, irq, base=BASE)
    bus.register(BASE, r.MMIO_SIZE, dev)
    drv = VirtioMmioDriver(bus, BASE, memory, GuestAllocator(0x10000, BUF))
    drv.init(ALL_RING_FEATURES | 0xFFFFFFFF, expect_id=backend.device_id)
    return memory, dev, drv


def test_console_output_input_and_backlog() -> None:
    out: list[bytes] = []
    con = VirtioConsole()
    memory, dev, drv = bring_up(con)
    assert drv.read_config(0, 2) == 80 and drv.read_config(2, 2) == 25
    rxq, txq = drv.queues
    # Written while no console is attached: kept, then replayed on attach.
    memory.write(BUF, b"Linux version 6.1\n")
    txq.add([Buffer(BUF, 9), Buffer(BUF + 9, 9)])
    txq.kick()
    assert [n for _, n in txq.reap()] == [0]
    con.attach(out.append)
    assert b"".join(out) == b"Linux version 6.1\n"
    # Emergency write works before any queue.
    drv.bus.write(BASE + r.CONFIG_OFFSET + 8, 4, ord("!"))
    assert out[-1] == b"!"
    # Input typed before the guest posts buffers waits, then fills them in order.
    con.feed(b"root\n")
    assert con.pending_input == b"root\n"
    rxq.add([Buffer(BUF + 0x1000, 3, writable=True)])
    rxq.add([Buffer(BUF + 0x2000, 64, writable=True)])
    rxq.kick()
    got = rxq.reap()
    assert [n for _, n in got] == [3, 2]
    assert memory.read(BUF + 0x1000, 3) + memory.read(BUF + 0x2000, 2) == b"root\n"
    # With a buffer already posted, input goes straight in.
    rxq.add([Buffer(BUF + 0x3000, 64, writable=True)])
    rxq.kick()
    con.feed(b"ls\n")
    assert rxq.reap()[0][1] == 3 and memory.read(BUF + 0x3000, 3) == b"ls\n"
    # A terminal resize is a config-change interrupt.
    con.resize(132, 50)
    assert drv.read_reg(r.REG_INTERRUPT_STATUS) & r.INT_CONFIG_CHANGE
    assert drv.read_config(0, 2) == 132
    assert dev.irq.level


def test_rng_fills_buffers_with_fresh_bytes() -> None:
    rng = VirtioRng()
    memory, dev, drv = bring_up(rng)
    (q,) = drv.queues
    q.add([Buffer(BUF, 64, writable=True), Buffer(BUF + 4096, 64, writable=True)])
    q.add([Buffer(BUF + 8192, 128, writable=True)])
    q.kick()
    done = q.reap()
    assert [n for _, n in done] == [128, 128]
    a, b, c = memory.read(BUF, 64), memory.read(BUF + 4096, 64), memory.read(BUF + 8192, 128)
    assert len({a, b, c[:64], c[64:]}) == 4 and a != bytes(64)
    assert rng.bytes_served == 256
    # A device-readable buffer gets nothing (the device only writes).
    q.add([Buffer(BUF, 16)])
    q.kick()
    assert q.reap()[0][1] == 0
