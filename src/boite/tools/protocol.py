"""The guest tools protocol (docs/tools-protocol.md is its description; keep them in step).

Frames, both ways, over a byte stream (the virtio-console port org.boite.tools.0, or the
VMM's NAME.tools socket for host clients):

    u32 length   payload bytes, at most MAX_PAYLOAD
    u16 type     one of MsgType
    u16 flags    0 (a receiver ignores it; reserved for later versions)
    u32 stream   0 for the channel itself, else the request's stream
    payload

All integers little-endian. A frame longer than MAX_PAYLOAD is a protocol error: the
receiver drops the channel (a byte stream cannot be resynchronised).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from boite.errors import ToolsError

PROTOCOL_VERSION = 1
PORT_NAME = "org.boite.tools.0"
HEADER = struct.Struct("<IHHI")
MAX_PAYLOAD = 65536
# Data frames carry at most this much, leaving room under MAX_PAYLOAD.
CHUNK = 32768

EXEC_PTY = 1
POWER_OFF = 1
POWER_REBOOT = 2


class MsgType(enum.IntEnum):
    HELLO = 1
    PING = 2
    PONG = 3
    EXEC = 4
    STARTED = 5
    STDIN = 6
    STDOUT = 7
    STDERR = 8
    EXIT = 9
    RESIZE = 10
    KILL = 11
    PUT = 12
    GET = 13
    DATA = 14
    OK = 15
    ERROR = 16
    INFO = 17
    TIME = 18
    POWER = 19
    CLOSE = 20
    FILEINFO = 21


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes

    def encode(self) -> bytes:
        return encode(self.type, self.stream, self.payload)

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def encode(type: int, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ToolsError(f"tools frame of {len(payload)} bytes: at most {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), int(type), 0, stream) + payload


class FrameReader:
    """Cuts a byte stream into frames; a length over MAX_PAYLOAD raises ToolsError."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            length, type_, _flags, stream = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                self._buf.clear()
                raise ToolsError(
                    f"tools frame header says {length} bytes of payload: at most {MAX_PAYLOAD}"
                )
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield Frame(type_, stream, payload)

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- payloads ------------------------------------------------------------------------
def exec_payload(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    pty: bool = False,
    rows: int = 0,
    cols: int = 0,
) -> bytes:
    if not argv:
        raise ToolsError("exec: no command given")
    strings = [a.encode() for a in argv] + [b""]
    strings += [f"{k}={v}".encode() for k, v in (env or {}).items()] + [b""]
    strings.append((cwd or "").encode())
    body = b"".join(s + b"\0" for s in strings)
    payload = struct.pack("<IHH", EXEC_PTY if pty else 0, rows & 0xFFFF, cols & 0xFFFF) + body
    if len(payload) > MAX_PAYLOAD:
        raise ToolsError(f"exec: the command line is {len(payload)} bytes, at most {MAX_PAYLOAD}")
    return payload


def path_payload(path: str, mode: int | None = None) -> bytes:
    raw = path.encode()
    if not raw or b"\0" in raw or len(raw) >= 4096:
        raise ToolsError(f"guest path {path!r}: expected 1..4095 bytes without NUL")
    return (struct.pack("<I", mode & 0o7777) if mode is not None else b"") + raw + b"\0"


def u32(value: int) -> bytes:
    return struct.pack("<I", value & 0xFFFFFFFF)


def read_u32(payload: bytes, what: str) -> int:
    if len(payload) < 4:
        raise ToolsError(f"tools {what}: {len(payload)} bytes, expected 4")
    return struct.unpack_from("<I", payload)[0]


def time_payload(seconds: int, nanoseconds: int) -> bytes:
    return struct.pack("<QI", seconds, nanoseconds)


def parse_fileinfo(payload: bytes) -> tuple[int, int]:
    """(mode, size) of a FILEINFO frame."""
    if len(payload) != 12:
        raise ToolsError(f"tools FILEINFO: {len(payload)} bytes, expected 12")
    mode, size = struct.unpack("<IQ", payload)
    return mode, size


def parse_hello(payload: bytes) -> tuple[int, str]:
    version = read_u32(payload, "HELLO")
    return version, payload[4:].decode("utf-8", errors="replace")


def parse_info(payload: bytes) -> dict[str, object]:
    """INFO's `key=value` lines; `ip` may repeat (`ip=IFACE ADDR/PREFIX`)."""
    info: dict[str, object] = {"ips": []}
    for line in payload.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "ip":
            iface, _, addr = value.partition(" ")
            info["ips"].append({"interface": iface, "address": addr})  # type: ignore[union-attr]
        else:
            info[key] = value
    return info
