"""virtio-console with named ports (the guest tools' channel) through the Python guest
driver: Linux's handshake, bytes both ways, whole sends, and hostile control messages."""

from __future__ import annotations

import struct
import threading

from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.virtio import mmio as r
from boite.machine.virtio.guestdriver import (
    ALL_RING_FEATURES,
    Buffer,
    GuestAllocator,
    VirtioMmioDriver,
)
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.ports import (
    DEVICE_ADD,
    DEVICE_READY,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    VirtioPorts,
)

BASE = 0xD000_4000
BUF = 0x200000
CTRL = struct.Struct("<IHH")


class User:
    name = "org.boite.tools.0"

    def __init__(self) -> None:
        self.got = bytearray()
        self.opens: list[bool] = []
        self.port = None

    def connect(self, port) -> None:
        self.port = port

    def receive(self, data: bytes) -> None:
        self.got += data

    def opened(self, is_open: bool) -> None:
        self.opens.append(is_open)


def bring_up():
    user = User()
    backend = VirtioPorts([user])
    memory = GuestMemory.with_ram(8 << 20)
    bus = Bus("mmio")
    dev = VirtioMmio(backend, memory, IrqLine(9), base=BASE)
    bus.register(BASE, r.MMIO_SIZE, dev)
    drv = VirtioMmioDriver(bus, BASE, memory, GuestAllocator(0x10000, BUF))
    drv.init(ALL_RING_FEATURES | 0xFFFFFFFF, expect_id=backend.device_id)
    return memory, dev, drv, user


def test_handshake_then_bytes_both_ways() -> None:
    memory, dev, drv, user = bring_up()
    assert drv.read_config(4, 4) == 1  # max_nr_ports
    rx, tx, crx, ctx = drv.queues
    # The driver posts control buffers, then says it is ready.
    for i in range(4):
        crx.add([Buffer(BUF + i * 0x100, 0x100, writable=True)])
    crx.kick()
    memory.write(BUF + 0x1000, CTRL.pack(0xFFFFFFFF, DEVICE_READY, 1))
    ctx.add([Buffer(BUF + 0x1000, CTRL.size)])
    ctx.kick()
    got = crx.reap()
    assert len(got) == 1
    assert CTRL.unpack(memory.read(BUF, CTRL.size)) == (0, DEVICE_ADD, 0)
    # PORT_READY: the device names the port and says the host side is open.
    memory.write(BUF + 0x1100, CTRL.pack(0, PORT_READY, 1))
    ctx.add([Buffer(BUF + 0x1100, CTRL.size)])
    ctx.kick()
    msgs = [memory.read(BUF + (i + 1) * 0x100, n) for i, (_, n) in enumerate(crx.reap())]
    assert CTRL.unpack(msgs[0][:8]) == (0, PORT_NAME, 1) and msgs[0][8:] == user.name.encode()
    assert CTRL.unpack(msgs[1]) == (0, PORT_OPEN, 1)
    # The guest program opens the port.
    memory.write(BUF + 0x1200, CTRL.pack(0, PORT_OPEN, 1))
    ctx.add([Buffer(BUF + 0x1200, CTRL.size)])
    ctx.kick()
    assert user.opens == [True]
    # Guest to host.
    memory.write(BUF + 0x2000, b"hello host")
    tx.add([Buffer(BUF + 0x2000, 5), Buffer(BUF + 0x2005, 5)])
    tx.kick()
    assert bytes(user.got) == b"hello host"
    # Host to guest: queued until buffers come, then in order.
    assert user.port.send(b"hello guest", timeout=1)
    rx.add([Buffer(BUF + 0x3000, 4, writable=True)])
    rx.add([Buffer(BUF + 0x4000, 64, writable=True)])
    rx.kick()
    assert [n for _, n in rx.reap()] == [4, 7]
    assert memory.read(BUF + 0x3000, 4) + memory.read(BUF + 0x4000, 7) == b"hello guest"
    # Closed by the guest: sends are refused (Linux would drop them).
    memory.write(BUF + 0x1300, CTRL.pack(0, PORT_OPEN, 0))
    ctx.add([Buffer(BUF + 0x1300, CTRL.size)])
    ctx.kick()
    assert user.opens == [True, False]
    assert not user.port.send(b"lost", timeout=0.1)


def test_concurrent_sends_arrive_whole() -> None:
    memory, dev, drv, user = bring_up()
    backend = dev.backend
    user.port.guest_open = True
    a, b = b"A" * 200_000, b"B" * 200_000
    threads = [threading.Thread(target=user.port.send, args=(x, 10)) for x in (a, b)]
    for t in threads:
        t.start()
    rx = drv.queues[0]
    data = bytearray()
    posted = False
    while len(data) < len(a) + len(b):
        if not posted:
            rx.add([Buffer(BUF, 0x10000, writable=True)])
            posted = True
        rx.kick()  # also picks up what a sender queued since
        for _, n in rx.reap():
            data += memory.read(BUF, n)
            posted = False
    for t in threads:
        t.join()
    assert bytes(data) in (a + b, b + a)
    assert backend.ports[0].bytes_in == len(a) + len(b)


def test_a_short_control_message_needs_a_reset() -> None:
    memory, dev, drv, user = bring_up()
    ctx = drv.queues[3]
    memory.write(BUF, b"\x01\x02")
    ctx.add([Buffer(BUF, 2)])
    ctx.kick()
    assert dev.broken and dev.status & r.STATUS_DEVICE_NEEDS_RESET
