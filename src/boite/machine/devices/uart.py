"""16550A UART (National Semiconductor PC16550D datasheet) and its host-side backends.

Transmission is instantaneous: a byte written to THR goes to the backend at once, so THR
and the transmitter are always empty again when the guest looks (LSR.THRE|TEMT). Input
from the host (`feed`, thread-safe) waits in a host-side queue and moves into the receive
FIFO (or the one-byte RBR in 16450 mode) as room appears: the host is never overrun, the
way a flow-controlled line behaves. The receiver "character timeout" (IIR=0xC) is
reported as soon as data sits below the FIFO trigger level, since the device has no timer
of its own; drivers handle it exactly like "data available".

Like QEMU and unlike a PC motherboard, the IRQ output is not gated by MCR.OUT2.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boite.errors import ConfigError
from boite.machine.device import Device
from boite.machine.irq import IrqLine
from boite.machine.state import StateRecord, bits, data, flag, uint

# (base port, ISA IRQ) of COM1..COM4
COM_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status

IIR_NONE = 0x01
IIR_MSR = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_RXFIFO_ERR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16
TRIGGER_LEVELS = (1, 4, 8, 14)
# Host-side input not yet in the FIFO; beyond this, `feed` drops (and counts) bytes.
HOST_INPUT_LIMIT = 1 << 20


# --------------------------------------------------------------------------- backends


class SerialBackend:
    """Where a UART's output goes and its input comes from.

    `connect(feed)` is called once by the UART with its thread-safe input function; a
    backend with an input source (pipe, console) calls it from any thread.
    """

    def connect(self, feed: Callable[[bytes], None]) -> None:
        self._feed = feed

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional
        pass


class NullBackend(SerialBackend):
    """A port with nothing attached: output is discarded."""

    def write(self, data: bytes) -> None:
        pass


class FileBackend(SerialBackend):
    """`serialN.fileType = "file"`: output appended to a file, no input."""

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None) -> None:
        """`fd`: the file already opened for appending (a box's serial file is opened by
        box/paths.py: inside the box, no symlinks, 0600)."""
        self.path = Path(path)
        try:
            if fd is None:
                fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            self._f = open(fd, "ab", buffering=0)  # noqa: SIM115 - lives with the VM
        except OSError as e:
            raise ConfigError(f"serial port file {self.path}: cannot open: {e.strerror}") from e

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.close()


class PipeBackend(SerialBackend):
    """`serialN.fileType = "pipe"`: named pipes (FIFOs), as QEMU's `-serial pipe:PATH`.

    Output goes to `PATH.out` and input comes from `PATH.in` when both exist, else `PATH`
    carries output only (a FIFO read by whoever opens it). Missing FIFOs are created. The
    output FIFO is opened read-write and non-blocking so the guest never waits for a reader:
    what the pipe cannot take is kept in a bounded buffer and flushed on the next write.
    """

    def __init__(self, path: str | os.PathLike[str], buffer_limit: int = 1 << 20) -> None:
        base = Path(path)
        self.out_path = Path(f"{base}.out")
        self.in_path: Path | None = Path(f"{base}.in")
        if not (self.out_path.exists() and self.in_path.exists()):
            self.out_path, self.in_path = base, None
        for p in (self.out_path, self.in_path):
            if p is None:
                continue
            if not p.exists():
                try:
                    os.mkfifo(p, 0o600)
                except OSError as e:
                    raise ConfigError(f"serial pipe {p}: cannot create: {e.strerror}") from e
            elif not stat.S_ISFIFO(p.stat().st_mode):
                raise ConfigError(f"serial pipe {p}: exists and is not a named pipe (FIFO)")
        self._out_fd = os.open(self.out_path, os.O_RDWR | os.O_NONBLOCK)
        self._pending = bytearray()
        self._limit = buffer_limit
        self.dropped = 0
        self._lock = threading.Lock()
        self._in_fd: int | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    def connect(self, feed: Callable[[bytes], None]) -> None:
        super().connect(feed)
        if self.in_path is not None and self._thread is None:
            self._in_fd = os.open(self.in_path, os.O_RDWR | os.O_NONBLOCK)
            self._thread = threading.Thread(
                target=self._reader, name=f"serial-pipe {self.in_path}", daemon=True
            )
            self._thread.start()

    def _reader(self) -> None:
        import select

        assert self._in_fd is not None
        while True:
            ready, _, _ = select.select([self._in_fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._in_fd, 4096)
            except BlockingIOError:
                continue
            if data:
                self._feed(data)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            try:
                while self._pending:
                    n = os.write(self._out_fd, self._pending)
                    del self._pending[:n]
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
            excess = len(self._pending) - self._limit
            if excess > 0:  # nobody reads: keep the newest output
                del self._pending[:excess]
                self.dropped += excess

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._out_fd, self._in_fd, self._stop_r, self._stop_w):
            if fd is not None:
                os.close(fd)


class ConsoleClient:
    """One attached console viewer (a `boite console` connection, a terminal). Output
    waits in its own buffer of `limit` bytes and a thread of its own hands it to the
    (possibly blocking) writer, so a viewer that stops reading never stalls the guest or
    the other viewers: once its buffer is full, output for it is dropped (counted in
    `dropped`, and a one-line note tells it when it catches up)."""

    def __init__(
        self,
        writer: Callable[[bytes], Any],
        limit: int,
        on_gone: Callable[[ConsoleClient], None],
    ) -> None:
        self.writer = writer
        self.limit = limit
        self.dropped = 0
        self._unreported = 0
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._writing = False
        self._on_gone = on_gone
        self._thread = threading.Thread(target=self._pump, name="console-client", daemon=True)
        self._thread.start()

    def push(self, data: bytes) -> None:
        """Queue output; never blocks on the viewer."""
        with self._cond:
            if self._closed:
                return
            if len(self._buffer) + len(data) > self.limit:
                self.dropped += len(data)
                self._unreported += len(data)
                return
            self._buffer += data
            self._cond.notify()

    def _pump(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                if self._closed and not self._buffer:
                    return
                data = bytes(self._buffer)
                self._buffer.clear()
                self._writing = True
                lost, self._unreported = self._unreported, 0
            if lost:
                data += f"\r\n[boite: {lost} bytes of console output dropped]\r\n".encode()
            try:
                self.writer(data)
            except (OSError, ValueError):  # the viewer went away
                self.close()
                self._on_gone(self)
                return
            finally:
                self._writing = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until what was queued has been handed to the writer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if self._closed or not (self._buffer or self._writing):
                    return
            time.sleep(0.005)


class ConsoleBackend(SerialBackend):
    """The attachable console (`boite console`, `boite boot`'s stdio), for any number of
    viewers at once.

    While nobody is attached, output collects in a ring buffer of `ring_size` bytes (the
    oldest bytes go first); `attach(writer)` replays that buffer to the new viewer (at
    once, in the caller's thread), then sends it output live until `detach(client)`.
    Every viewer gets all output; each has its own bounded buffer (`client_buffer`
    bytes), so a slow one loses output rather than slowing the guest. `send(data)` types
    into the guest from any thread.
    """

    def __init__(self, ring_size: int = 1 << 20, client_buffer: int | None = None) -> None:
        self.ring_size = ring_size
        # BOITE_CONSOLE_CLIENT_BUFFER: a smaller buffer lets tests see a slow viewer's
        # output dropped within seconds of a slowly printing guest.
        self.client_buffer = client_buffer or int(
            os.environ.get("BOITE_CONSOLE_CLIENT_BUFFER", "") or 1 << 20
        )
        self._ring: collections.deque[bytes] = collections.deque()
        self._ring_len = 0
        self._clients: list[ConsoleClient] = []
        self._lock = threading.Lock()
        self.dropped = 0

    @property
    def attached(self) -> bool:
        return bool(self._clients)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def attach(self, writer: Callable[[bytes], Any]) -> ConsoleClient:
        with self._lock:
            backlog = b"".join(self._ring)
            self._ring.clear()
            self._ring_len = 0
            if backlog:
                writer(backlog)
            client = ConsoleClient(writer, self.client_buffer, self._gone)
            self._clients.append(client)
            return client

    def detach(self, client: ConsoleClient | None = None) -> None:
        """Detach one viewer (None: every viewer); the others keep their output."""
        with self._lock:
            gone = list(self._clients) if client is None else [client]
            self._clients = [c for c in self._clients if c not in gone]
        for c in gone:
            c.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every viewer has been handed what was written."""
        deadline = time.monotonic() + timeout
        for client in list(self._clients):
            client.flush(max(0.0, deadline - time.monotonic()))

    def _gone(self, client: ConsoleClient) -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c is not client]

    def buffered(self) -> bytes:
        with self._lock:
            return b"".join(self._ring)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._clients:
                for client in self._clients:
                    client.push(bytes(data))
                return
            self._ring.append(bytes(data))
            self._ring_len += len(data)
            while self._ring_len > self.ring_size:
                head = self._ring.popleft()
                over = self._ring_len - self.ring_size
                if len(head) > over:
                    self._ring.appendleft(head[over:])
                    self._ring_len -= over
                    self.dropped += over
                else:
                    self._ring_len -= len(head)
                    self.dropped += len(head)

    def send(self, data: bytes) -> None:
        feed = getattr(self, "_feed", None)
        if feed is not None:
            feed(data)


class TeeBackend(SerialBackend):
    """Several backends on one port: output goes to each, input comes from any (a box's
    serial0 log file and the attachable console together)."""

    def __init__(self, *backends: SerialBackend) -> None:
        self.backends = backends

    def connect(self, feed: Callable[[bytes], None]) -> None:
        super().connect(feed)
        for b in self.backends:
            b.connect(feed)

    def write(self, data: bytes) -> None:
        for b in self.backends:
            b.write(data)

    def close(self) -> None:
        for b in self.backends:
            b.close()


# --------------------------------------------------------------------------- the UART


@dataclass(frozen=True)
class UartState(StateRecord):
    """The 16550A's registers (each as wide as the chip's; write-only bits masked as the
    register writes mask them), its receive FIFO and the host input not yet received."""

    VERSION = 1
    dll: int = uint(8)
    dlm: int = uint(8)
    ier: int = bits(0x0F)
    lcr: int = uint(8)
    mcr: int = bits(0x1F)
    lsr: int = bits(0x7F)  # bit 7 (FIFO error) is computed on read, never stored
    msr: int = uint(8)
    scr: int = uint(8)
    fcr: int = bits(0xC9)
    rx: bytes = data(max_len=FIFO_SIZE)
    thr_ipending: bool = flag()
    host_input: bytes = data(max_len=HOST_INPUT_LIMIT)

    def validate(self) -> None:
        capacity = FIFO_SIZE if self.fcr & FCR_ENABLE else 1
        if len(self.rx) > capacity:
            raise self.invalid(
                "rx", f"{len(self.rx)} bytes, the receiver holds {capacity} with this FCR"
            )


class Uart16550(Device):
    name = "uart16550"

    def __init__(self, irq: IrqLine, backend: SerialBackend | None = None) -> None:
        self.irq = irq
        self.backend = backend or NullBackend()
        self._lock = threading.RLock()
        self._host_input: collections.deque[int] = collections.deque()
        self.input_dropped = 0
        self.reset()
        self.backend.connect(self.feed)

    # -- state -------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.dll = 0x0C  # the divisor is not reset (datasheet): 9600 baud, as QEMU has it
            self.dlm = 0
            self.ier = 0
            self.lcr = 0
            self.mcr = 0
            self.lsr = LSR_THRE | LSR_TEMT
            self.msr = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is always there
            self.scr = 0
            self.fcr = 0
            self.rx: collections.deque[int] = collections.deque()
            self.thr_ipending = False  # THRE interrupt latched, cleared by IIR read/THR write
            self._host_input.clear()
            self._update_irq()

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return UartState.of(
                self, rx=bytes(self.rx), host_input=bytes(self._host_input)
            ).to_dict()

    def check_state(self, state: Any) -> UartState:
        return UartState.from_dict(state)

    def apply_state(self, rec: UartState) -> None:
        with self._lock:
            rec.put(self, "rx", "host_input")
            self.rx = collections.deque(rec.rx)
            self._host_input = collections.deque(rec.host_input)
            self._update_irq()

    # -- helpers -----------------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def divisor(self) -> int:
        return self.dll | (self.dlm << 8)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _trigger_level(self) -> int:
        return TRIGGER_LEVELS[self.fcr >> 6] if self.fifo_enabled else 1

    def _pump_input(self) -> None:
        """Move waiting host input into the receiver as room appears."""
        cap = self._rx_capacity()
        while self._host_input and len(self.rx) < cap:
            self.rx.append(self._host_input.popleft())
        if self.rx:
            self.lsr |= LSR_DR

    def _receive(self, byte: int) -> None:
        """A byte arriving on the line (loopback): it can overrun, as on the chip."""
        if len(self.rx) >= self._rx_capacity():
            self.lsr |= LSR_OE
            if not self.fifo_enabled:
                self.rx[-1] = byte  # 16450: the new character overwrites RBR
        else:
            self.rx.append(byte)
        self.lsr |= LSR_DR

    def _interrupt_id(self) -> int:
        """The highest-priority pending interrupt, as IIR bits 0-3."""
        if self.ier & IER_ELSI and self.lsr & LSR_ERRORS:
            return IIR_RLS
        if self.ier & IER_ERBFI and self.rx:
            if len(self.rx) >= self._trigger_level():
                return IIR_RDA
            return IIR_CTI
        if self.ier & IER_ETBEI and self.thr_ipending:
            return IIR_THRE
        if self.ier & IER_EDSSI and self.msr & 0x0F:
            return IIR_MSR
        return IIR_NONE

    def _update_irq(self) -> None:
        self.irq.set(self._interrupt_id() != IIR_NONE)

    def _modem_inputs(self) -> int:
        """MSR bits 4-7 as the lines are now (loopback wires them to MCR)."""
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _set_modem_inputs(self, new: int) -> None:
        old = self.msr & 0xF0
        delta = self.msr & 0x0F
        changed = old ^ new
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:  # trailing edge of ring indicator
            delta |= MSR_TERI
        self.msr = new | delta

    # -- host side ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Input from the host side of the line. Thread-safe; never blocks."""
        with self._lock:
            room = HOST_INPUT_LIMIT - len(self._host_input)
            if len(data) > room:
                self.input_dropped += len(data) - max(room, 0)
                data = data[: max(room, 0)]
            if self.mcr & MCR_LOOP:
                return  # in loopback the receiver is disconnected from the line
            self._host_input.extend(data)
            self._pump_input()
            self._update_irq()

    # -- bus ---------------------------------------------------------------------------

    def bus_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset & 7)

    def _read(self, reg: int) -> int:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            if not self.mcr & MCR_LOOP:
                self._pump_input()
            if not self.rx:
                self.lsr &= ~LSR_DR
            self._update_irq()
            return value
        if reg == IER_DLM:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if reg == IIR_FCR:
            iid = self._interrupt_id()
            if iid == IIR_THRE:
                self.thr_ipending = False  # reading IIR with THRE as the source clears it
                self._update_irq()
            return iid | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr
            if self.fifo_enabled and self.lsr & (LSR_PE | LSR_FE | LSR_BI):
                value |= LSR_RXFIFO_ERR  # parity/framing/break in the FIFO; not overrun
            self.lsr &= ~LSR_ERRORS  # error bits clear on read
            self._update_irq()
            return value
        if reg == MSR:
            self._set_modem_inputs(self._modem_inputs())
            value = self.msr
            self.msr &= 0xF0  # delta bits clear on read
            self._update_irq()
            return value
        return self.scr

    def bus_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset & 7, value & 0xFF)

    def _write(self, reg: int, value: int) -> None:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self._receive(value)
            else:
                self.backend.write(bytes((value,)))
            # The byte left at once: THR is empty again, which is a new THRE event.
            self.lsr |= LSR_THRE | LSR_TEMT
            self.thr_ipending = True
        elif reg == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_ETBEI and not was & IER_ETBEI and self.lsr & LSR_THRE:
                self.thr_ipending = True  # enabling ETBEI with THR empty interrupts at once
        elif reg == IIR_FCR:
            enable_changed = (value ^ self.fcr) & FCR_ENABLE
            if value & FCR_CLEAR_RX or enable_changed:
                self.rx.clear()
                self.lsr &= ~(LSR_DR | LSR_OE)
            self.fcr = value & 0xC9  # trigger level, DMA mode, enable
            if not self.mcr & MCR_LOOP:
                self._pump_input()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & 0x1F
            self._set_modem_inputs(self._modem_inputs())
            if was_loop and not self.mcr & MCR_LOOP:
                self._pump_input()
        elif reg == LSR:
            pass  # factory test register: writes are ignored
        elif reg == MSR:
            pass
        else:
            self.scr = value
        self._update_irq()
