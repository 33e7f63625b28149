"""virtio-console (virtio 1.x, section 5.3): port 0 only, which Linux names hvc0.

Output from the guest goes to `output` (a callable taking bytes: the box console, a log
file, a pipe); while nothing is attached it is kept in a bounded backlog that the next
`attach()` receives, so detaching a console loses nothing recent. Input is given with
`feed()` from any thread and waits in a buffer until the guest posts receive buffers.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.machine.state import StateRecord, data, uint
from boite.machine.virtio.mmio import STATUS_DRIVER_OK, VIRTIO_ID_CONSOLE, VirtioBackend, bit
from boite.machine.virtio.queue import VirtQueue

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_EMERG_WRITE = 2
RXQ, TXQ = 0, 1
BACKLOG = 64 << 10  # bytes of output kept while no console is attached
INPUT_LIMIT = 1 << 20  # typed-ahead input beyond this is dropped


@dataclass(frozen=True)
class VirtioConsoleState(StateRecord):
    VERSION = 1
    pending_input: bytes = data(max_len=INPUT_LIMIT)  # typed ahead, not yet in the guest
    cols: int = uint(16)
    rows: int = uint(16)


class VirtioConsole(VirtioBackend):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"
    queue_sizes = (64, 64)

    def __init__(
        self, output: Callable[[bytes], None] | None = None, cols: int = 80, rows: int = 25
    ) -> None:
        super().__init__()
        self.output = output
        self.cols, self.rows = cols, rows
        self.backlog: deque[bytes] = deque()
        self.backlog_len = 0
        self.pending_input = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0

    def device_features(self) -> int:
        return bit(VIRTIO_CONSOLE_F_SIZE) | bit(VIRTIO_CONSOLE_F_EMERG_WRITE)

    def config_bytes(self) -> bytes:
        # cols, rows, max_nr_ports, emerg_wr
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == 8:  # emerg_wr: one character, usable before the queues exist
            self._emit(bytes([value & 0xFF]))

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        if self.transport is not None:
            self.transport.config_changed()

    def save_state(self) -> dict[str, Any]:
        return VirtioConsoleState(bytes(self.pending_input), self.cols, self.rows).to_dict()

    def check_state(self, state: Any) -> VirtioConsoleState:
        return VirtioConsoleState.from_dict(state)

    def apply_state(self, rec: VirtioConsoleState) -> None:
        self.pending_input = bytearray(rec.pending_input)
        self.cols, self.rows = rec.cols, rec.rows

    # --- output ---------------------------------------------------------------------
    def attach(self, output: Callable[[bytes], None]) -> None:
        """Connect a console; it first gets what was written while none was attached."""
        self.output = output
        while self.backlog:
            output(self.backlog.popleft())
        self.backlog_len = 0

    def detach(self) -> None:
        self.output = None

    def _emit(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.output is not None:
            self.output(data)
            return
        self.backlog.append(data)
        self.backlog_len += len(data)
        while self.backlog_len > BACKLOG:
            self.backlog_len -= len(self.backlog.popleft())

    def notify(self, queue: VirtQueue) -> None:
        if queue.index == RXQ:
            self._fill_rx(queue)
            return
        done = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            data = b"".join(bytes(v) for v in chain.readable)
            if data:
                self._emit(data)
            self.used(queue, chain.head, 0)
            done = True
        if done:
            self.signal(queue)

    # --- input ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Keyboard input for hvc0 (any thread)."""
        t = self.transport
        if t is None:
            return
        with t.lock:
            room = INPUT_LIMIT - len(self.pending_input)
            self.pending_input += data[: max(room, 0)]
            if t.status & STATUS_DRIVER_OK and not t.broken:
                t.run_backend(self._fill_rx, t.queues[RXQ])

    def _fill_rx(self, queue: VirtQueue) -> None:
        self.bytes_in += self.deliver(queue, self.pending_input)

    def reset(self) -> None:
        pass
