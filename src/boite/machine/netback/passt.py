"""User-mode networking through passt (Debian package passt), for `connectionType = "nat"`.

Why passt rather than libslirp or slirp4netns: it is a maintained program that needs no
privileges and no library binding, and it speaks QEMU's stream socket protocol (each
frame preceded by its length as a 4-byte big-endian number), which boite can talk over a
socketpair handed to passt with `--fd`; it serves DHCP (the guest's address, gateway and
DNS from the host's own configuration), maps the gateway address to the host's loopback
(the guest reaches host services there) and forwards host ports into the guest (`-t`,
`-u`). libslirp would need a C binding and its own event loop in the VMM.

Which passt: `$BOITE_PASST` if set, else the one `./dev setup` builds from Debian 13's
source (host/build-passt.sh, in boite's cache), else `passt` on PATH (Debian's package).
Debian 12's passt resets a guest-opened TCP connection 24 s after its SYN-ACK while the
host side has sent nothing (docs/architecture.md, netback); the built one does not.

Forwards come from `ethernetN.boite.forward = "tcp:2222:22, udp:5353:53"` (host port,
guest port).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from boite.errors import NetError

MAX_FRAME = 65535 + 14
# The guest's side of NAT, fixed as QEMU's user networking does (so a box's address does
# not follow the host's): passt serves it by DHCP, maps the gateway to the host's
# loopback and forwards DNS queries sent to DNS_ADDRESS to the host's resolver.
GUEST_ADDRESS = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"


# Pinned with the tarball's SHA-256 in host/build-passt.sh (a test keeps the two equal).
BUILT_PASST_VERSION = "0.0~git20250503.587980c"


def built_passt() -> Path:
    """Where host/build-passt.sh puts its passt (present or not)."""
    base = os.environ.get("BOITE_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "boite" if xdg else Path.home() / ".cache" / "boite")
    return Path(base) / f"passt-{BUILT_PASST_VERSION}" / "passt"


def find_passt() -> str | None:
    """$BOITE_PASST, then the built passt, then PATH's."""
    explicit = os.environ.get("BOITE_PASST")
    if explicit:
        return explicit
    built = built_passt()
    if os.access(built, os.X_OK):
        return str(built)
    return shutil.which("passt")


def passt_version(binary: str) -> str:
    """The first line of `passt --version` ("passt 0.0~git..."), or why there is none."""
    if os.path.realpath(binary) == os.path.realpath(built_passt()):
        # Its --version writes to a buffered stdout and _exit()s: nothing through a pipe.
        return f"passt {BUILT_PASST_VERSION} (built by boite from Debian 13's source)"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"version unknown ({exc})"
    first = out.stdout.strip().splitlines()[:1]
    version = first[0] if first else "version unknown"
    if "unknown" in version and os.path.realpath(binary) == "/usr/bin/passt":
        # Debian 12's passt was built without its version: ask its package instead.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "passt"],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
            if pkg.returncode == 0 and pkg.stdout.strip():
                version = f"passt {pkg.stdout.strip()} (Debian package)"
    return version


_FORWARD = re.compile(r"(tcp|udp):(\d{1,5}):(\d{1,5})")


def parse_forwards(text: str, where: str = "forward") -> tuple[str, ...]:
    """`tcp:2222:22, udp:5353:53` -> ("tcp:2222:22", "udp:5353:53"), each checked."""
    out = []
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        m = _FORWARD.fullmatch(item.lower())
        if m is None or not all(0 < int(p) < 65536 for p in m.groups()[1:]):
            raise NetError(
                f"{where} {item!r}: expected PROTO:HOSTPORT:GUESTPORT, PROTO tcp or udp, "
                "ports 1..65535 (e.g. tcp:2222:22)"
            )
        out.append(item.lower())
    return tuple(out)


def passt_options(forwards: tuple[str, ...] = ()) -> list[str]:
    """passt's options for a box's NAT (all but how it meets the VMM: --fd here, --socket
    for QEMU's `-netdev stream` in bench/net.py)."""
    args = ["--foreground", "--quiet", "--stderr", "--ipv4-only", "--address", GUEST_ADDRESS,
            "--netmask", str(PREFIX), "--gateway", GATEWAY, "--dns", DNS_ADDRESS,
            "--dns-forward", DNS_ADDRESS]  # fmt: skip
    for forward in forwards:
        proto, host_port, guest_port = forward.split(":")
        args += ["-t" if proto == "tcp" else "-u", f"{host_port}:{guest_port}"]
    return args


class PasstBackend:
    """A passt process joined to us by a socketpair; frames with a 4-byte length."""

    def __init__(
        self,
        forwards: tuple[str, ...] = (),
        log: Callable[[str], None] | None = None,
        passt: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.log = log or (lambda message: None)
        binary = passt or find_passt()
        if binary is None:
            raise NetError(
                'connectionType "nat" needs passt: ./dev setup builds it, or apt-get install '
                "passt (Debian's, with its 24 s reset of connections to a silent host)"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [binary, *passt_options(forwards), "--fd", str(theirs.fileno()), *extra_args]
        try:
            self.proc = subprocess.Popen(
                args, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            raise NetError(f"passt: cannot start ({exc.strerror})") from None
        finally:
            theirs.close()
        self.sock = ours
        self.forwards = forwards
        self._buf = bytearray()
        self._dead = False
        self._idle_r, self._idle_w = os.pipe()  # a never-readable fd once passt is gone
        self._send_lock = threading.Lock()
        threading.Thread(target=self._stderr, daemon=True, name="passt-log").start()
        self.binary = binary
        self.version = passt_version(binary)
        self.log(
            f"NAT through passt {binary} ({self.version}, pid {self.proc.pid})"
            + (f", forwards {', '.join(forwards)}" if forwards else "")
            + "."
        )

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            # Newer passt logs to stderr by itself and warns that --stderr (which Debian
            # 12's needs) will go away: noise in vmware.log.
            if line and "syslog" not in line and "--stderr will be dropped" not in line:
                self.log(f"passt: {line}")

    # --- FrameTransport ----------------------------------------------------------------
    def fileno(self) -> int:
        return self._idle_r if self._dead else self.sock.fileno()

    def send(self, views: list[memoryview]) -> int:
        frame = b"".join(views)
        if self._dead:
            return len(frame)  # dropped, as a cable that was pulled
        try:
            with self._send_lock:
                self.sock.sendall(len(frame).to_bytes(4, "big") + frame)
        except OSError as exc:
            self._gone(f"sending failed ({exc.strerror})")
        return len(frame)

    def buffered(self) -> bool:
        return self._whole_frame() is not None

    def _whole_frame(self) -> int | None:
        if len(self._buf) < 4:
            return None
        length = int.from_bytes(self._buf[:4], "big")
        return length if len(self._buf) >= 4 + length else None

    def recv_into(self, views: list[memoryview]) -> int:
        while self._whole_frame() is None and not self._dead:
            try:
                data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise
            except OSError as exc:
                self._gone(f"reading failed ({exc.strerror})")
                break
            if not data:
                self._gone("it closed the connection")
                break
            self._buf += data
            if len(self._buf) >= 4 and int.from_bytes(self._buf[:4], "big") > MAX_FRAME:
                self._gone(f"it sent a frame of {int.from_bytes(self._buf[:4], 'big')} bytes")
        length = self._whole_frame()
        if length is None:
            raise BlockingIOError("no whole frame yet")
        frame = memoryview(self._buf)[4 : 4 + length]
        pos = 0
        for v in views:  # a frame longer than the buffers is cut, as a NIC would
            n = min(len(v), length - pos)
            v[:n] = frame[pos : pos + n]
            pos += n
            if pos >= length:
                break
        frame.release()
        del self._buf[: 4 + length]
        return pos

    def _gone(self, why: str) -> None:
        if not self._dead:
            self._dead = True
            self._buf.clear()
            code = self.proc.poll()
            self.log(
                f"passt stopped serving this NIC: {why}"
                + (f" (exit status {code})" if code is not None else "")
                + "; the NIC is unplugged."
            )

    def close(self) -> None:
        self._dead = True
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._idle_r, self._idle_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._idle_r = self._idle_w = -1
