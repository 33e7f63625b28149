"""A host client of the guest tools: run commands, copy files, ask for addresses.

    with ToolsClient(tools_socket_path(box.dir, box.name)) as tools:
        status = tools.exec(["uname", "-a"], stdout=sys.stdout.buffer.write)
        tools.put("local.bin", "/tmp/remote.bin")
        tools.get("/etc/hostname", "hostname.txt")
        tools.info()["ips"]

One request at a time per client (open several clients for several at once). Each call
raises ToolsError when the agent refuses, the tools are not running, or the channel
breaks; `exec` returns the guest command's exit status (0..255; 128 + N for signal N).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from boite.errors import ToolsError
from boite.tools.protocol import (
    CHUNK,
    Frame,
    FrameReader,
    MsgType,
    encode,
    exec_payload,
    parse_fileinfo,
    parse_hello,
    parse_info,
    path_payload,
    read_u32,
)

Sink = Callable[[bytes], Any]


class ToolsClient:
    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        from boite.vmm import _short_path

        self.path = Path(path)
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target, dfd = _short_path(self.path) if self.path.parent.exists() else (str(path), None)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            raise ToolsError(
                f"cannot reach the guest tools relay at {self.path}: "
                f"{exc.strerror or exc} (is the box running?)"
            ) from None
        finally:
            if dfd is not None:
                os.close(dfd)
        self.sock = sock
        self._frames: queue.Queue[Frame | None] = queue.Queue()
        self._stream = 0
        self._pushback: deque[Frame] = deque()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="tools-client")
        self._reader.start()

    def __enter__(self) -> ToolsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _read(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                for frame in reader.feed(data):
                    self._frames.put(frame)
        except (OSError, ToolsError):
            pass
        self._frames.put(None)

    def _send(self, type: MsgType, stream: int, payload: bytes = b"") -> None:
        try:
            with self._send_lock:
                self.sock.sendall(encode(type, stream, payload))
        except OSError as exc:
            raise ToolsError(f"the guest tools relay went away: {exc.strerror or exc}") from None

    def _next(self, timeout: float | None) -> Frame:
        """The next frame (ERROR raised); timeout 0 with one queued peeks at it."""
        if self._pushback:
            frame = self._pushback.popleft()
            if frame.type == MsgType.ERROR:
                raise ToolsError(f"guest tools: {frame.text()}")
            return frame
        try:
            frame = self._frames.get(timeout=timeout)
        except queue.Empty:
            raise ToolsError(f"the guest tools did not answer within {timeout:g} s") from None
        if frame is None:
            self._frames.put(None)  # stays closed
            raise ToolsError("the VMM closed the guest tools channel (did the box stop?)")
        if frame.type == MsgType.ERROR:
            raise ToolsError(f"guest tools: {frame.text()}")
        if timeout == 0:
            self._pushback.append(frame)
        return frame

    def _new_stream(self) -> int:
        self._stream += 1
        return self._stream

    # --- requests ----------------------------------------------------------------------
    def hello(self, timeout: float | None = None) -> tuple[int, str]:
        """(protocol version, agent) when the tools run; ToolsError when they do not."""
        self._send(MsgType.HELLO, 0)
        return parse_hello(self._next(timeout or self.timeout).payload)

    def wait_ready(self, timeout: float) -> tuple[int, str]:
        """Wait until the agent has said hello (a box that is still booting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.hello()
            except ToolsError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def info(self) -> dict[str, Any]:
        stream = self._new_stream()
        self._send(MsgType.INFO, stream)
        return parse_info(self._expect(stream, MsgType.INFO).payload)

    def _expect(self, stream: int, kind: MsgType) -> Frame:
        while True:
            frame = self._next(self.timeout)
            if frame.stream != stream:
                continue
            if frame.type != kind:
                raise ToolsError(f"guest tools: expected {kind.name}, got type {frame.type}")
            return frame

    def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: Sink | None = None,
        stderr: Sink | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        pty: bool = False,
        size: tuple[int, int] = (0, 0),
        on_started: Callable[[int], None] | None = None,
    ) -> int:
        """Run `argv` in the guest; stream its output to the sinks; its exit status.
        `stdin`: bytes, a binary file (read in a thread until EOF) or None (EOF at once).
        `on_started(stream)` lets a caller send input, RESIZE or KILL while it runs."""
        stream = self._new_stream()
        rows, cols = size
        self._send(MsgType.EXEC, stream, exec_payload(argv, env, cwd, pty, rows, cols))
        started = self._expect(stream, MsgType.STARTED)
        read_u32(started.payload, "STARTED")
        if on_started is not None:
            on_started(stream)
        if isinstance(stdin, bytes | bytearray):
            for i in range(0, len(stdin), CHUNK):
                self._send(MsgType.STDIN, stream, bytes(stdin[i : i + CHUNK]))
            self._send(MsgType.STDIN, stream)
        elif stdin is not None:
            threading.Thread(target=self._pump, args=(stream, stdin), daemon=True).start()
        elif not pty:
            self._send(MsgType.STDIN, stream)
        while True:
            frame = self._next(None)  # a command may run long and say nothing
            if frame.stream != stream:
                continue
            if frame.type == MsgType.STDOUT:
                if stdout is not None:
                    stdout(frame.payload)
            elif frame.type == MsgType.STDERR:
                if stderr is not None:
                    stderr(frame.payload)
            elif frame.type == MsgType.EXIT:
                return read_u32(frame.payload, "EXIT") & 0xFF

    def _pump(self, stream: int, source: IO[bytes]) -> None:
        try:
            while True:
                data = source.read(CHUNK) if not hasattr(source, "read1") else source.read1(CHUNK)
                if not data:
                    break
                self._send(MsgType.STDIN, stream, data)
            self._send(MsgType.STDIN, stream)
        except (OSError, ValueError, ToolsError):
            pass

    def send_input(self, stream: int, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            self._send(MsgType.STDIN, stream, data[i : i + CHUNK])

    def resize(self, stream: int, rows: int, cols: int) -> None:
        self._send(MsgType.RESIZE, stream, rows.to_bytes(2, "little") + cols.to_bytes(2, "little"))

    def kill(self, stream: int, signal: int) -> None:
        self._send(MsgType.KILL, stream, signal.to_bytes(4, "little"))

    def put(self, local: Path | str, remote: str, mode: int | None = None) -> int:
        """Copy a host file into the guest (written under a temporary name, then renamed);
        the size the guest reports."""
        local = Path(local)
        try:
            source = open(local, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ToolsError(f"{local}: {exc.strerror}") from None
        with source:
            if mode is None:
                mode = os.fstat(source.fileno()).st_mode & 0o7777
            stream = self._new_stream()
            self._send(MsgType.PUT, stream, path_payload(remote, mode))
            while True:
                # An early ERROR (a path the guest cannot write) ends the copy.
                if not self._frames.empty():
                    self._next(0)
                data = source.read(CHUNK)
                if not data:
                    break
                self._send(MsgType.DATA, stream, data)
            self._send(MsgType.DATA, stream)
        reply = self._expect(stream, MsgType.OK)
        return int.from_bytes(reply.payload[:8], "little")

    def get(self, remote: str, local: Path | str) -> int:
        """Copy a guest file to the host (written under a temporary name, then renamed);
        its size."""
        local = Path(local)
        stream = self._new_stream()
        self._send(MsgType.GET, stream, path_payload(remote))
        mode, size = parse_fileinfo(self._expect(stream, MsgType.FILEINFO).payload)
        tmp = local.with_name(f".{local.name}.boite-cp.{os.getpid()}")
        written = 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    frame = self._next(self.timeout)
                    if frame.stream != stream:
                        continue
                    if frame.type != MsgType.DATA:
                        raise ToolsError(f"guest tools: expected DATA, got type {frame.type}")
                    if not frame.payload:
                        break
                    out.write(frame.payload)
                    written += len(frame.payload)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode & 0o777)
            os.replace(tmp, local)
        except OSError as exc:
            raise ToolsError(f"{local}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if written != size and size:
            # A file that changed while it was read: say so rather than pass it off whole.
            raise ToolsError(f"{remote}: {size} bytes announced, {written} received")
        return written
