"""A disk on a remote block device, over the NBD protocol (what qemu-nbd and nbdkit serve).

    fileName = "nbd://HOST:PORT/EXPORT"       TCP, port 10809 when left out
    fileName = "nbd+unix:///EXPORT?socket=/path/to/socket"

The client speaks the fixed newstyle handshake: it asks for the export with NBD_OPT_GO
(which also reports size, flags and block sizes) and falls back to NBD_OPT_EXPORT_NAME
when an older server does not know GO. It negotiates no structured replies, so every
reply is a simple reply. Requests go one at a time on one connection.

The server is another machine: every length, magic and cookie it sends is checked, every
socket operation has a timeout, and any surprise ends the connection with a `DiskError`
naming the URL and what was expected. Nothing hangs and nothing is retried silently.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from boite.disk.base import BlockImage
from boite.errors import DiskError

NBD_DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 30.0

# Handshake (NBD protocol document, "Newstyle negotiation").
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle servers send this instead of IHAVEOPT
OPT_REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERRORS = {
    REP_ERR | 1: "unsupported option",
    REP_ERR | 2: "forbidden by server policy",
    REP_ERR | 3: "invalid request",
    REP_ERR | 4: "not supported on this platform",
    REP_ERR | 5: "the server requires TLS",
    REP_ERR | 6: "no such export",
    REP_ERR | 7: "the server is shutting down",
    REP_ERR | 8: "the server requires block size negotiation",
    REP_ERR | 9: "request too big",
}
REP_ERR_UNSUP = REP_ERR | 1
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM"}

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")

# Without block size information a client must not send more than 32 MiB per request.
MAX_PAYLOAD = 32 << 20
# Option replies are small; a server promising more is broken or hostile.
MAX_OPTION_REPLY = 64 << 10


@dataclass(frozen=True)
class NbdAddress:
    """Where an export lives: TCP host and port, or a Unix socket; and the export name."""

    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket_path: str | None = None

    @classmethod
    def parse(cls, url: str) -> NbdAddress:
        parts = urlsplit(url)
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.scheme == "nbd":
            if not parts.hostname:
                raise DiskError(f"{url}: expected nbd://HOST[:PORT]/EXPORT")
            try:
                port = parts.port or NBD_DEFAULT_PORT
            except ValueError:
                raise DiskError(f"{url}: the port is not a number from 1 to 65535") from None
            return cls(export, host=parts.hostname, port=port)
        if parts.scheme == "nbd+unix":
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise DiskError(f"{url}: expected nbd+unix:///EXPORT?socket=PATH")
            return cls(export, socket_path=sockets[0])
        raise DiskError(f"{url}: not an NBD URL (expected nbd://HOST:PORT/EXPORT)")


class NbdImage(BlockImage):
    """An NBD export as a BlockImage: read, write, flush, discard (NBD's TRIM)."""

    def __init__(
        self,
        url: str,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = url
        self.address = NbdAddress.parse(url)
        self.timeout = timeout
        self._mutex = threading.RLock()  # reentrant: a read-modify-write holds it across both
        self._cookie = 0
        self._sock: socket.socket | None = None
        self._broken: str | None = None
        self.transmission_flags = 0
        self.min_block = 1
        self.preferred_block = 4096
        self.max_payload = MAX_PAYLOAD
        self.size = 0
        self._sock = self._connect()
        try:
            self._handshake()
        except BaseException:
            self._drop()
            raise
        self.read_only = read_only or bool(self.transmission_flags & TF_READ_ONLY)

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        a = self.address
        try:
            if a.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(a.socket_path)
            else:
                assert a.host is not None
                sock = socket.create_connection((a.host, a.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise DiskError(
                f"{self.url}: no answer from the server within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise DiskError(f"{self.url}: cannot connect: {exc.strerror or exc}") from None
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _fail(self, what: str) -> DiskError:
        """The connection is unusable after a protocol error: close it and say why."""
        self._broken = what
        self._drop()
        return DiskError(f"{self.url}: {what}")

    def _recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), what)
        return bytes(buf)

    def _recv_into(self, view: memoryview, what: str) -> None:
        assert self._sock is not None
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError:
                raise self._fail(
                    f"no reply from the server within {self.timeout:g} s while reading {what}"
                ) from None
            except OSError as exc:
                raise self._fail(f"connection failed while reading {what}: {exc}") from None
            if n == 0:
                raise self._fail(
                    f"the server closed the connection while boite read {what} "
                    f"({got} of {len(view)} bytes)"
                )
            got += n

    def _send(self, *chunks: bytes | memoryview, what: str) -> None:
        assert self._sock is not None
        try:
            for chunk in chunks:
                self._sock.sendall(chunk)
        except TimeoutError:
            raise self._fail(f"the server took no data for {self.timeout:g} s ({what})") from None
        except OSError as exc:
            raise self._fail(f"connection failed while sending {what}: {exc}") from None

    # -- handshake -----------------------------------------------------------------------

    def _handshake(self) -> None:
        magic, opt_magic = struct.unpack(">QQ", self._recv_exact(16, "the server greeting"))
        if magic != NBDMAGIC:
            raise self._fail(f"greeting magic {magic:#018x}, expected NBDMAGIC {NBDMAGIC:#018x}")
        if opt_magic == CLISERV_MAGIC:
            raise self._fail("the server speaks the oldstyle protocol; boite needs newstyle")
        if opt_magic != IHAVEOPT:
            raise self._fail(f"greeting magic {opt_magic:#018x}, expected IHAVEOPT")
        (server_flags,) = struct.unpack(">H", self._recv_exact(2, "the handshake flags"))
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            raise self._fail("the server does not offer the fixed newstyle handshake")
        client_flags = FLAG_C_FIXED_NEWSTYLE
        if server_flags & FLAG_NO_ZEROES:
            client_flags |= FLAG_C_NO_ZEROES
        self._send(struct.pack(">I", client_flags), what="the client flags")
        if not self._opt_go():
            self._opt_export_name(no_zeroes=bool(client_flags & FLAG_C_NO_ZEROES))
        if self.size % max(self.min_block, 1):
            raise self._fail(f"export size {self.size} is not a multiple of its block size")

    def _send_option(self, option: int, data: bytes) -> None:
        self._send(_OPT.pack(IHAVEOPT, option, len(data)), data, what=f"option {option}")

    def _opt_go(self) -> bool:
        """NBD_OPT_GO: True when the export is open, False when the server lacks GO."""
        name = self.address.export.encode()
        requests = struct.pack(">H", INFO_BLOCK_SIZE)
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 1) + requests
        self._send_option(OPT_GO, data)
        have_export = False
        while True:
            head = self._recv_exact(_OPT_REPLY.size, "an option reply")
            magic, option, reply, length = _OPT_REPLY.unpack(head)
            if magic != OPT_REPLY_MAGIC:
                raise self._fail(f"option reply magic {magic:#x}, expected {OPT_REPLY_MAGIC:#x}")
            if option != OPT_GO:
                raise self._fail(f"the server answered option {option}; boite asked {OPT_GO}")
            if length > MAX_OPTION_REPLY:
                raise self._fail(f"option reply of {length} bytes (at most {MAX_OPTION_REPLY})")
            payload = self._recv_exact(length, "an option reply's data")
            if reply == REP_ACK:
                if not have_export:
                    raise self._fail("the server accepted GO without telling the export size")
                return True
            if reply == REP_INFO:
                have_export |= self._info(payload)
                continue
            if reply == REP_ERR_UNSUP:
                return False
            if reply & REP_ERR:
                why = REP_ERRORS.get(reply, f"error {reply & ~REP_ERR}")
                detail = payload.decode("utf-8", "replace").strip()
                raise self._fail(
                    f"the server refused export {self.address.export!r}: {why}"
                    + (f" ({detail})" if detail else "")
                )
            # Unknown non-error replies must be ignored, says the protocol.

    def _info(self, payload: bytes) -> bool:
        if len(payload) < 2:
            raise self._fail(f"info reply of {len(payload)} bytes, expected at least 2")
        (kind,) = struct.unpack_from(">H", payload)
        if kind == INFO_EXPORT:
            if len(payload) != 12:
                raise self._fail(f"NBD_INFO_EXPORT of {len(payload)} bytes, expected 12")
            self.size, self.transmission_flags = struct.unpack_from(">QH", payload, 2)
            return True
        if kind == INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise self._fail(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, expected 14")
            minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            sane = (
                _power_of_two(minimum)
                and minimum <= 64 << 10  # the protocol's bound on the minimum
                and _power_of_two(preferred)
                and maximum >= minimum
            )
            if not sane:
                raise self._fail(
                    f"block sizes min {minimum}, preferred {preferred}, max {maximum}: expected "
                    "powers of two with a minimum of at most 64 KiB and max >= min"
                )
            self.min_block, self.preferred_block = minimum, preferred
            # The payload limit is the server's maximum, rounded down to whole blocks.
            self.max_payload = max(minimum, min(maximum, MAX_PAYLOAD) // minimum * minimum)
        return False

    def _opt_export_name(self, no_zeroes: bool) -> None:
        self._send_option(OPT_EXPORT_NAME, self.address.export.encode())
        tail = 10 + (0 if no_zeroes else 124)
        data = self._recv_exact(tail, f"the answer to export {self.address.export!r}")
        self.size, self.transmission_flags = struct.unpack_from(">QH", data)

    # -- transmission --------------------------------------------------------------------

    def _request(
        self,
        command: int,
        offset: int,
        length: int,
        payload: bytes | memoryview | None = None,
        into: memoryview | None = None,
    ) -> None:
        if self._sock is None:
            raise DiskError(
                f"{self.url}: the connection is closed"
                + (f" ({self._broken})" if self._broken else "")
            )
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        cookie = self._cookie
        name = COMMAND_NAMES.get(command, str(command))
        header = _REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length)
        if payload is not None:
            self._send(header, payload, what=f"{name} at offset {offset}")
        else:
            self._send(header, what=f"{name} at offset {offset}")
        what = f"the reply to {name} at offset {offset}"
        magic, error, got_cookie = _REPLY.unpack(self._recv_exact(_REPLY.size, what))
        if magic == STRUCTURED_REPLY_MAGIC:
            raise self._fail(f"structured reply to {name}, which boite did not negotiate")
        if magic != SIMPLE_REPLY_MAGIC:
            raise self._fail(f"reply magic {magic:#010x}, expected {SIMPLE_REPLY_MAGIC:#010x}")
        if got_cookie != cookie:
            raise self._fail(f"reply for request {got_cookie}, expected {cookie} ({name})")
        if error:
            # The request failed but the stream is intact: the connection stays usable.
            text = os.strerror(error) if error in errno.errorcode else f"error {error}"
            raise DiskError(
                f"{self.url}: {name} of {length} bytes at offset {offset} failed on the "
                f"server: {text}"
            )
        if into is not None:
            self._recv_into(into, f"the data of READ at offset {offset}")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(
                f"{self.url}: {what} of {length} bytes at offset {offset} is outside the "
                f"export ({self.size} bytes)"
            )

    def _chunks(self, offset: int, length: int):
        """(offset, length) pieces no larger than the server takes in one request."""
        step = self.max_payload
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            yield offset, n
            offset += n

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view), "read")
        if not len(view):
            return
        mb = self.min_block
        start, end = offset // mb * mb, -(-(offset + len(view)) // mb) * mb
        with self._mutex:
            if start == offset and end == offset + len(view):
                for pos, n in self._chunks(offset, len(view)):
                    self._request(CMD_READ, pos, n, into=view[pos - offset : pos - offset + n])
                return
            # The server only takes whole blocks: read the covering blocks, copy the middle.
            bounce = bytearray(end - start)
            bview = memoryview(bounce)
            for pos, n in self._chunks(start, end - start):
                self._request(CMD_READ, pos, n, into=bview[pos - start : pos - start + n])
            view[:] = bview[offset - start : offset - start + len(view)]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.read_only:
            raise DiskError(f"{self.url}: the disk is read-only; WRITE at offset {offset} refused")
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        mb = self.min_block
        with self._mutex:
            if offset % mb or len(view) % mb:
                # Read-modify-write the edge blocks, so callers may write any range.
                start, end = offset // mb * mb, -(-(offset + len(view)) // mb) * mb
                merged = bytearray(end - start)
                self.read_into(start, merged)
                merged[offset - start : offset - start + len(view)] = view
                offset, view = start, memoryview(merged)
            for pos, n in self._chunks(offset, len(view)):
                self._request(CMD_WRITE, pos, n, payload=view[pos - offset : pos - offset + n])

    def flush(self) -> None:
        if self.read_only or not self.transmission_flags & TF_SEND_FLUSH:
            return  # nothing to flush, or the server writes through
        with self._mutex:
            self._request(CMD_FLUSH, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise DiskError(f"{self.url}: the disk is read-only; TRIM at offset {offset} refused")
        self._check_range(offset, length, "discard")
        if not self.transmission_flags & TF_SEND_TRIM:
            return  # discard is a hint; a server without TRIM keeps the data
        mb = self.min_block
        start, end = -(-offset // mb) * mb, (offset + length) // mb * mb
        with self._mutex:
            for pos, n in self._chunks(start, max(0, end - start)):
                self._request(CMD_TRIM, pos, n)

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            if not self.read_only and self._broken is None:
                self.flush()
        finally:
            with self._mutex:
                if self._sock is not None:
                    try:
                        header = _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
                        self._sock.sendall(header)
                    except OSError:
                        pass
                self._drop()

    def __repr__(self) -> str:
        return f"NbdImage({self.url!r}, size={self.size}, read_only={self.read_only})"


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def open_nbd(url: str, read_only: bool = False, timeout: float = DEFAULT_TIMEOUT) -> NbdImage:
    """Connect to `nbd://HOST:PORT/EXPORT` (or `nbd+unix:///EXPORT?socket=PATH`)."""
    return NbdImage(url, read_only=read_only, timeout=timeout)
