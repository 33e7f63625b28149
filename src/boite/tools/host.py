"""The VMM's end of the guest tools channel.

`ToolsHost` is the user of the virtio port `org.boite.tools.0`: it reads the agent's
frames, keeps a heartbeat (PING every HEARTBEAT_S; the agent counts as answering while
any frame came within DEAD_AFTER_S), sets the guest clock whenever the agent says HELLO
(boot, restart, and after a restore or resume, when the host asks for one), and relays
host clients. Clients connect to the box's `NAME.tools` Unix socket (as Firecracker
exposes vsock through a Unix socket) and speak the same frames with their own stream
numbers; the relay maps them onto the channel's and back, so several `boite exec`,
`cp` and `shell` run at once. The VMM itself asks through `request()` (power off,
reboot, info).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boite.errors import ToolsError
from boite.tools.protocol import (
    PORT_NAME,
    POWER_OFF,
    POWER_REBOOT,
    PROTOCOL_VERSION,
    Frame,
    FrameReader,
    MsgType,
    encode,
    parse_hello,
    parse_info,
    time_payload,
    u32,
)

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 30.0  # generous: an emulated guest on a loaded host can be slow to run its agent
SEND_TIMEOUT_S = 10.0
# Bytes queued for one client before the channel waits for it (backpressure on the
# guest's output), and how long it waits before dropping a client that reads nothing.
CLIENT_WINDOW = 8 << 20
CLIENT_STALL_S = 60.0
# Types a client may start a stream with, and those that continue one.
STARTS = {MsgType.EXEC, MsgType.PUT, MsgType.GET, MsgType.INFO, MsgType.TIME, MsgType.POWER}
CONTINUES = {MsgType.STDIN, MsgType.DATA, MsgType.RESIZE, MsgType.KILL, MsgType.CLOSE}
LOCAL_BASE = 0x8000_0000  # stream numbers of the VMM's own requests


def _ends_stream(frame: Frame) -> bool:
    t = frame.type
    return t in (MsgType.EXIT, MsgType.ERROR, MsgType.OK, MsgType.INFO) or (
        t == MsgType.DATA and not frame.payload
    )


class _Client:
    """One connection on NAME.tools: a writer thread drains a bounded queue to it."""

    def __init__(self, host: ToolsHost, sock: socket.socket) -> None:
        self.host = host
        self.sock = sock
        self.out: deque[bytes] = deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.closed = False
        self.finishing = False  # no more input: send what is queued, then close
        self.streams: dict[int, int] = {}  # client stream -> channel stream

    def send(self, data: bytes) -> None:
        with self.cond:
            deadline = time.monotonic() + CLIENT_STALL_S
            while self.queued > CLIENT_WINDOW and not self.closed:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    self.host.log("A tools client read nothing for a minute; dropped.")
                    self.close()
                    return
            if self.closed:
                return
            self.out.append(data)
            self.queued += len(data)
            self.cond.notify_all()

    def writer(self) -> None:
        while True:
            with self.cond:
                while not self.out and not self.closed and not self.finishing:
                    self.cond.wait()
                if self.closed or not self.out:
                    break
                data = self.out.popleft()
            try:
                self.sock.sendall(data)
            except OSError:
                self.close()
                return
            with self.cond:
                self.queued -= len(data)
                self.cond.notify_all()
        self.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def finish(self) -> None:
        with self.cond:
            self.finishing = True
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.out.clear()
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ToolsHost:
    name = PORT_NAME

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda message: None)
        self.port: Any = None
        self.reader = FrameReader()
        self.agent: str | None = None
        self.version: int | None = None
        self.last_seen: float | None = None
        self.guest_open = False
        self.answering = False
        self._lock = threading.RLock()
        self._routes: dict[int, tuple[_Client | None, int]] = {}
        self._replies: dict[int, queue.Queue[Frame]] = {}
        self._next_stream = itertools.count(1)
        self._next_local = itertools.count(LOCAL_BASE)
        self._hello_asked = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._server: socket.socket | None = None
        self.socket_path: Path | None = None
        self._clients: set[_Client] = set()
        self._taken: int | None = None

    # --- the port (PortUser) ---------------------------------------------------------
    def connect(self, port: Any) -> None:
        """A new machine's port (power-on, guest reset): the old channel is gone."""
        with self._lock:
            self.port = port
            self.reader = FrameReader()
            self._channel_lost("the machine was reset")

    def opened(self, is_open: bool) -> None:
        with self._lock:
            self.guest_open = is_open
            if not is_open:
                self._channel_lost("the guest tools closed their port")

    def receive(self, data: bytes) -> None:
        try:
            frames = list(self.reader.feed(data))
        except ToolsError as exc:
            self.log(f"Guest tools: {exc}; channel reset.")
            with self._lock:
                self.reader = FrameReader()
                self._channel_lost(str(exc))
            return
        for frame in frames:
            self._from_agent(frame)

    def _from_agent(self, frame: Frame) -> None:
        now = time.monotonic()
        with self._lock:
            self.last_seen = now
            if not self.answering and self.agent is not None:
                self.log("Guest tools answer again.")
            if frame.type == MsgType.HELLO:
                try:
                    version, agent = parse_hello(frame.payload)
                except ToolsError as exc:
                    self.log(f"Guest tools: {exc}")
                    return
                if not self._hello_asked:
                    # An unasked HELLO: the agent (re)started; nothing it had is left.
                    self._fail_routes("the guest tools restarted")
                self._hello_asked = False
                first = self.agent is None or self.agent != agent or self.version != version
                self.agent, self.version = agent, version
                self.answering = version == PROTOCOL_VERSION
                if first:
                    self.log(f"Guest tools running: {agent} (protocol {version}).")
                if version != PROTOCOL_VERSION:
                    self.log(
                        f"Guest tools speak protocol {version}, boite speaks "
                        f"{PROTOCOL_VERSION}: not used."
                    )
                    return
                threading.Thread(target=self.set_time, daemon=True, name="tools-time").start()
                return
            self.answering = self.version == PROTOCOL_VERSION
            if frame.type == MsgType.PONG or frame.stream == 0:
                return
            route = self._routes.get(frame.stream)
            if route is None:
                return
            if _ends_stream(frame):
                del self._routes[frame.stream]
            client, client_stream = route
        if client is None:
            reply_queue = self._replies.get(frame.stream)
            if reply_queue is not None:
                reply_queue.put(frame)
            return
        if client_stream in client.streams and _ends_stream(frame):
            client.streams.pop(client_stream, None)
        client.send(encode(frame.type, client_stream, frame.payload))

    def _channel_lost(self, why: str) -> None:
        self.agent = None
        self.version = None
        self.answering = False
        self._hello_asked = False
        self._fail_routes(why)

    def _fail_routes(self, why: str) -> None:
        routes, self._routes = self._routes, {}
        for stream, (client, client_stream) in routes.items():
            error = encode(MsgType.ERROR, client_stream if client else stream, why.encode())
            if client is None:
                reply_queue = self._replies.get(stream)
                if reply_queue is not None:
                    reply_queue.put(Frame(MsgType.ERROR, stream, why.encode()))
            else:
                client.streams.pop(client_stream, None)
                client.send(error)

    def _to_agent(self, data: bytes, timeout: float = SEND_TIMEOUT_S) -> bool:
        port = self.port
        return port is not None and port.send(data, timeout)

    def _note_progress(self) -> None:
        """The guest taking what we send counts as an answer (a long copy into the guest
        has the agent reading, not writing)."""
        taken = getattr(self.port, "bytes_in", None)
        if taken is not None and taken != self._taken:
            self._taken = taken
            self.last_seen = time.monotonic()

    # --- state ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.guest_open and self.answering and self.agent is not None

    def status(self) -> dict[str, Any]:
        with self._lock:
            seen = self.last_seen
            return {
                "running": self.running,
                "agent": self.agent,
                "protocol": self.version,
                "last_seen_s": None if seen is None else round(time.monotonic() - seen, 3),
            }

    def why_not_running(self) -> str:
        if not self.guest_open:
            return "the guest tools are not running (no agent has the tools port open)"
        if self.agent is None:
            return "the guest tools have not said hello yet"
        if self.version != PROTOCOL_VERSION:
            return f"the guest tools speak protocol {self.version}, boite {PROTOCOL_VERSION}"
        return f"the guest tools stopped answering (nothing for over {DEAD_AFTER_S:g} s)"

    # --- the VMM's own requests --------------------------------------------------------
    def request(self, type: MsgType, payload: bytes = b"", timeout: float = 10.0) -> Frame:
        """Send one request and return its final frame (OK, INFO, ERROR, ...)."""
        if not self.running:
            raise ToolsError(self.why_not_running())
        stream = next(self._next_local)
        replies: queue.Queue[Frame] = queue.Queue()
        with self._lock:
            self._routes[stream] = (None, stream)
            self._replies[stream] = replies
        try:
            if not self._to_agent(encode(type, stream, payload), timeout):
                raise ToolsError("the guest tools do not read their port")
            try:
                frame = replies.get(timeout=timeout)
            except queue.Empty:
                raise ToolsError(f"the guest tools did not answer within {timeout:g} s") from None
            if frame.type == MsgType.ERROR:
                raise ToolsError(f"guest tools: {frame.text()}")
            return frame
        finally:
            with self._lock:
                self._routes.pop(stream, None)
                self._replies.pop(stream, None)

    def power(self, reboot: bool = False, timeout: float = 5.0) -> bool:
        """Ask the guest to power off (or reboot) through the tools. False when the tools
        cannot take the request (not running, not answering, refused)."""
        try:
            self.request(MsgType.POWER, u32(POWER_REBOOT if reboot else POWER_OFF), timeout)
        except ToolsError as exc:
            self.log(f"Guest tools cannot {'reboot' if reboot else 'power off'}: {exc}.")
            return False
        return True

    def info(self, timeout: float = 10.0) -> dict[str, Any]:
        return parse_info(self.request(MsgType.INFO, b"", timeout).payload)

    def set_time(self) -> None:
        """Set the guest clock to the host's (after boot, resume, restore)."""
        ns = time.time_ns()
        try:
            self.request(MsgType.TIME, time_payload(ns // 10**9, ns % 10**9), timeout=10.0)
        except ToolsError as exc:
            self.log(f"Guest tools: setting the clock failed: {exc}.")
        else:
            self.log("Guest tools: the guest clock was set to the host's.")

    def resync(self) -> None:
        """After a restore or resume: ask the agent to say HELLO (which sets the time)."""
        with self._lock:
            if not self.guest_open:
                return
            self._hello_asked = True
        self._to_agent(encode(MsgType.HELLO, 0, u32(PROTOCOL_VERSION)), timeout=1.0)

    # --- heartbeat --------------------------------------------------------------------
    def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="tools-beat")
            self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if not self.guest_open:
                    continue
                if self.agent is None:
                    # The port is open but no HELLO came since this machine was made: a
                    # guest restored from a snapshot, whose agent said hello long ago (or
                    # a HELLO that was lost). Ask for one; it sets the clock too.
                    self._hello_asked = True
                    frame = encode(MsgType.HELLO, 0, u32(PROTOCOL_VERSION))
                else:
                    self._note_progress()
                    seen = self.last_seen
                    stale = seen is None or time.monotonic() - seen > DEAD_AFTER_S
                    if stale and self.answering:
                        self.answering = False
                        self.log(
                            f"Guest tools stopped answering (nothing for {DEAD_AFTER_S:g} s)."
                        )
                        self._fail_routes(self.why_not_running())
                    frame = encode(MsgType.PING, 0, b"boite")
            self._to_agent(frame, timeout=0.5)

    # --- clients on NAME.tools ------------------------------------------------------------
    def serve(self, path: Path) -> None:
        from boite.vmm import _short_path

        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_path, dfd = _short_path(path)
        try:
            sock.bind(bind_path)
        finally:
            if dfd is not None:
                os.close(dfd)
        os.chmod(path, 0o600)
        sock.listen(16)
        self._server = sock
        self.socket_path = path
        threading.Thread(target=self._accept, daemon=True, name="tools-accept").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            server = self._server
            if server is None:
                return
            try:
                conn, _ = server.accept()
            except OSError:
                return
            client = _Client(self, conn)
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=client.writer, daemon=True, name="tools-out").start()
            threading.Thread(
                target=self._serve_client, args=(client,), daemon=True, name="tools-in"
            ).start()

    def _serve_client(self, client: _Client) -> None:
        reader = FrameReader()
        try:
            while not client.closed:
                try:
                    data = client.sock.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                for frame in reader.feed(data):
                    self._from_client(client, frame)
        except ToolsError as exc:
            client.send(encode(MsgType.ERROR, 0, str(exc).encode()))
        finally:
            self._drop_client(client)

    def _from_client(self, client: _Client, frame: Frame) -> None:
        try:
            kind = MsgType(frame.type)
        except ValueError:
            client.send(encode(MsgType.ERROR, frame.stream, f"unknown type {frame.type}".encode()))
            return
        if kind == MsgType.HELLO:  # a client's "are the tools there?"
            if self.running:
                reply = encode(
                    MsgType.HELLO, 0, u32(self.version or 0) + (self.agent or "").encode()
                )
            else:
                reply = encode(MsgType.ERROR, 0, self.why_not_running().encode())
            client.send(reply)
            return
        if frame.stream == 0:
            client.send(encode(MsgType.ERROR, 0, b"requests need a stream number other than 0"))
            return
        with self._lock:
            stream = client.streams.get(frame.stream)
            if stream is None:
                if kind not in STARTS:
                    return  # the stream ended (or never was): late input is dropped
                if not self.running:
                    client.send(
                        encode(MsgType.ERROR, frame.stream, self.why_not_running().encode())
                    )
                    return
                stream = next(self._next_stream)
                if stream >= LOCAL_BASE:
                    self._next_stream = itertools.count(1)
                    stream = next(self._next_stream)
                client.streams[frame.stream] = stream
                self._routes[stream] = (client, frame.stream)
            elif kind not in CONTINUES:
                client.send(encode(MsgType.ERROR, frame.stream, b"stream already in use"))
                return
        if kind == MsgType.CLOSE:
            with self._lock:
                client.streams.pop(frame.stream, None)
                self._routes.pop(stream, None)
        if not self._to_agent(encode(kind, stream, frame.payload)):
            with self._lock:
                client.streams.pop(frame.stream, None)
                self._routes.pop(stream, None)
            client.send(
                encode(MsgType.ERROR, frame.stream, b"the guest tools do not read their port")
            )

    def _drop_client(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)
            streams = list(client.streams.values())
            client.streams.clear()
            for stream in streams:
                self._routes.pop(stream, None)
        for stream in streams:  # whatever it ran is abandoned
            self._to_agent(encode(MsgType.CLOSE, stream), timeout=1.0)
        client.finish()

    def close(self) -> None:
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        with self._lock:
            clients = list(self._clients)
            self._fail_routes("the box powered off")
        for client in clients:
            client.close()


def tools_socket_path(box_dir: Path, name: str) -> Path:
    return box_dir / f"{name}.tools"
