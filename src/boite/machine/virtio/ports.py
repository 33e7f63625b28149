"""virtio-console with named ports (virtio 1.x, section 5.3, VIRTIO_CONSOLE_F_MULTIPORT).

Linux shows each port as /dev/vportNpM with its name in /sys/class/virtio-ports/*/name;
QEMU's virtserialport and the qemu-guest-agent channel work the same way. boite uses it
for the guest tools channel (`org.boite.tools.0`): the kit kernel has CONFIG_VIRTIO_CONSOLE
already, where a virtio-vsock device would need a kernel rebuild.

Queues: port 0 rx/tx are 0/1, the control queues 2 (device -> driver) and 3 (driver ->
device), port n >= 1 uses 2n+2/2n+3. The handshake: the driver sends DEVICE_READY; the
device announces each port (DEVICE_ADD); the driver answers PORT_READY, and the device
gives the port its NAME and says the host side is open (PORT_OPEN 1). The driver says
PORT_OPEN 1/0 as a guest program opens and closes the port.

Each port has a host-side user (`PortUser`): `receive(data)` gets what the guest writes
(on the vCPU's thread: keep it short), `opened(bool)` follows the guest's open/close, and
the user writes to the guest with `port.send(data, timeout)`.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from boite.errors import CheckpointError, GuestError
from boite.machine.state import Data, Nested, StateRecord, data, flag, items, text
from boite.machine.virtio.mmio import STATUS_DRIVER_OK, VIRTIO_ID_CONSOLE, VirtioBackend, bit
from boite.machine.virtio.queue import VirtQueue, scatter

VIRTIO_CONSOLE_F_MULTIPORT = 1

DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CONTROL = struct.Struct("<IHH")  # id, event, value
CONTROL_RX, CONTROL_TX = 2, 3
# Bytes the host may have waiting for a port before send() waits for the guest to read.
SEND_WINDOW = 256 << 10
MAX_PORTS = 31


class PortUser(Protocol):
    name: str

    def connect(self, port: SerialPort) -> None: ...

    def receive(self, data: bytes) -> None: ...

    def opened(self, is_open: bool) -> None: ...


class SerialPort:
    """One port: its name, the guest's view of it, and the host's pending bytes."""

    def __init__(self, device: VirtioPorts, index: int, user: PortUser) -> None:
        self.device = device
        self.index = index
        self.user = user
        self.name = user.name
        self.ready = False  # the driver sent PORT_READY
        self.guest_open = False  # a guest program has the port open
        self.pending = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0
        self._room = threading.Event()
        self._room.set()

    @property
    def rxq(self) -> int:
        return 0 if self.index == 0 else 2 * self.index + 2

    def send(self, data: bytes, timeout: float | None = None) -> bool:
        """Queue `data` for the guest (any thread), whole: it waits until the unread bytes
        leave room for all of it, so concurrent senders never interleave. False when
        `timeout` passed first or the port is not open in the guest (Linux drops what
        reaches a port nobody has open)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.guest_open:
                return False
            t = self.device.transport
            if t is None:
                return False
            with t.lock:
                if not self.pending or len(self.pending) + len(data) <= SEND_WINDOW:
                    self.pending += data
                    if t.status & STATUS_DRIVER_OK and not t.broken:
                        t.run_backend(self.device.fill_rx, self)
                    return True
                self._room.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._room.wait(0.2 if left is None else min(left, 0.2))


@dataclass(frozen=True)
class VirtioPortState(StateRecord):
    VERSION = 1
    name: str = text(64)
    ready: bool = flag()
    open: bool = flag()
    pending: bytes = data(max_len=SEND_WINDOW)  # host bytes not yet in the guest


@dataclass(frozen=True)
class VirtioPortsState(StateRecord):
    """Control messages waiting for buffers and each port's state (checked field by
    field on restore, as every device's: machine/state.py)."""

    VERSION = 1
    control_out: tuple[bytes, ...] = items(Data(max_len=256), max_len=4 * MAX_PORTS + 16)
    ports: tuple[VirtioPortState, ...] = items(Nested(VirtioPortState), max_len=MAX_PORTS)


class VirtioPorts(VirtioBackend):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-ports"

    def __init__(self, users: list[PortUser]) -> None:
        super().__init__()
        if not 1 <= len(users) <= MAX_PORTS:
            raise ValueError(f"virtio-ports: 1..{MAX_PORTS} ports, got {len(users)}")
        self.ports = [SerialPort(self, i, u) for i, u in enumerate(users)]
        # Two queues per port plus the control pair.
        self.queue_sizes = (64,) * (2 * (len(users) + 1))
        self.control_out: deque[bytes] = deque()  # control messages waiting for buffers
        for port in self.ports:
            port.user.connect(port)

    def device_features(self) -> int:
        return bit(VIRTIO_CONSOLE_F_MULTIPORT)

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 0, 0, len(self.ports), 0)

    def _port_of_queue(self, index: int) -> SerialPort | None:
        port = 0 if index < 2 else index // 2 - 1
        if index in (CONTROL_RX, CONTROL_TX) or port >= len(self.ports):
            return None
        return self.ports[port]

    def notify(self, queue: VirtQueue) -> None:
        if queue.index == CONTROL_RX:
            self._fill_control(queue)
            return
        if queue.index == CONTROL_TX:
            self._take_control(queue)
            return
        port = self._port_of_queue(queue.index)
        if port is None:
            return
        if queue.index == port.rxq:
            self.fill_rx(port)
            return
        done = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            data = b"".join(bytes(v) for v in chain.readable)
            self.used(queue, chain.head, 0)
            done = True
            if data:
                port.bytes_out += len(data)
                port.user.receive(data)
        if done:
            self.signal(queue)

    # --- control --------------------------------------------------------------------
    def _control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        self.control_out.append(CONTROL.pack(port_id, event, value) + extra)

    def _take_control(self, queue: VirtQueue) -> None:
        done = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            msg = b"".join(bytes(v) for v in chain.readable)
            self.used(queue, chain.head, 0)
            done = True
            if len(msg) < CONTROL.size:
                raise GuestError(f"virtio-ports: control message of {len(msg)} bytes")
            port_id, event, value = CONTROL.unpack_from(msg)
            self._on_control(port_id, event, value)
        if done:
            self.signal(queue)
        assert self.transport is not None
        self._fill_control(self.transport.queues[CONTROL_RX])

    def _on_control(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if value == 1:
                for port in self.ports:
                    self._control(port.index, DEVICE_ADD, 0)
            return
        if port_id >= len(self.ports):
            return  # Linux sends PORT_READY 0 for a port it could not add; nothing to do
        port = self.ports[port_id]
        if event == PORT_READY and value == 1:
            port.ready = True
            self._control(port.index, PORT_NAME, 1, port.name.encode())
            self._control(port.index, PORT_OPEN, 1)  # the host side is always there
        elif event == PORT_OPEN:
            port.guest_open = bool(value)
            if not port.guest_open:
                port.pending.clear()  # Linux would drop it anyway
                port._room.set()
            port.user.opened(port.guest_open)

    def _fill_control(self, queue: VirtQueue) -> None:
        done = False
        while self.control_out and queue.ready:
            chain = queue.pop()
            if chain is None:
                break
            msg = self.control_out.popleft()
            n = scatter(chain.writable, msg)
            self.used(queue, chain.head, n)
            done = True
        if done:
            self.signal(queue)

    # --- host to guest ---------------------------------------------------------------
    def fill_rx(self, port: SerialPort) -> None:
        assert self.transport is not None
        if self.deliver(self.transport.queues[port.rxq], port.pending):
            port._room.set()

    def activate(self, queues: list[VirtQueue], features: int) -> None:
        if queues[CONTROL_RX].ready:
            self._fill_control(queues[CONTROL_RX])

    def reset(self) -> None:
        self.control_out.clear()
        for port in self.ports:
            was_open = port.guest_open
            port.ready = port.guest_open = False
            port.pending.clear()
            port._room.set()
            if was_open:
                port.user.opened(False)

    def save_state(self) -> dict[str, Any]:
        return VirtioPortsState(
            control_out=tuple(bytes(m) for m in self.control_out),
            ports=tuple(
                VirtioPortState(p.name, p.ready, p.guest_open, bytes(p.pending)) for p in self.ports
            ),
        ).to_dict()

    def check_state(self, state: Any) -> VirtioPortsState:
        rec = VirtioPortsState.from_dict(state)
        saved = [p.name for p in rec.ports]
        if saved != [p.name for p in self.ports]:
            raise CheckpointError(
                f"virtio-ports: ports: saved {saved} do not match this machine's "
                f"{[p.name for p in self.ports]}"
            )
        return rec

    def apply_state(self, rec: VirtioPortsState) -> None:
        self.control_out = deque(rec.control_out)
        for port, saved in zip(self.ports, rec.ports, strict=True):
            port.ready = saved.ready
            port.guest_open = saved.open
            port.pending = bytearray(saved.pending)
            port.user.opened(port.guest_open)
