"""The guest agent run on the host: compiled from guest/tools/boite-tools.c and joined to
a ToolsHost by a socketpair, so the protocol is tested against the real agent without a
VM (the virtio port is only a byte pipe between them)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

AGENT_SOURCE = Path(__file__).resolve().parents[2] / "guest" / "tools" / "boite-tools.c"


def build_agent(out_dir: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the guest agent")
    digest = hashlib.sha256(AGENT_SOURCE.read_bytes()).hexdigest()[:16]
    binary = out_dir / f"boite-tools-{digest}"
    if binary.exists():
        return binary
    tmp = binary.with_suffix(".tmp")
    for flags in (["-static", "-m32"], []):  # the kit's build, else whatever this host has
        proc = subprocess.run(
            ["gcc", *flags, "-Os", "-Wall", "-o", str(tmp), str(AGENT_SOURCE)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode == 0:
            tmp.rename(binary)
            return binary
    pytest.fail(f"the agent does not compile:\n{proc.stderr}")


class SocketPort:
    """A PortUser's port over a socket: what virtio-ports does, minus the guest."""

    def __init__(self, sock: socket.socket, user) -> None:
        self.sock = sock
        self.user = user
        self.lock = threading.Lock()
        user.connect(self)
        user.opened(True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            self.user.receive(data)
        self.user.opened(False)

    def send(self, data: bytes, timeout: float | None = None) -> bool:
        self.sock.settimeout(timeout)
        try:
            with self.lock:
                self.sock.sendall(data)
        except (TimeoutError, OSError):
            return False
        return True


class AgentOnHost:
    """An agent process, a ToolsHost, and the relay socket clients connect to."""

    def __init__(self, binary: Path, where: Path, *agent_args: str) -> None:
        from boite.tools.host import ToolsHost

        self.log: list[str] = []
        self.host = ToolsHost(log=self.log.append)
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary), "-1", "-f", str(theirs.fileno()), *agent_args],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.port = SocketPort(ours, self.host)
        self.socket_path = where / "box.tools"
        self.host.serve(self.socket_path)
        self.host.start()
        deadline = time.monotonic() + 10
        while not self.host.running:
            assert time.monotonic() < deadline, f"no HELLO from the agent: {self.log}"
            time.sleep(0.01)

    def client(self, timeout: float = 30.0):
        from boite.tools.client import ToolsClient

        return ToolsClient(self.socket_path, timeout=timeout)

    def close(self) -> None:
        self.host.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, 9)
        self.proc.wait()
        self.port.sock.close()
