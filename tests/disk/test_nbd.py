"""The NBD client against a real qemu-nbd on loopback, and against hostile servers."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boite.disk.nbd import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_REPLY_MAGIC,
    REP_ERR_UNSUP,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    NbdAddress,
    NbdImage,
    open_nbd,
)
from boite.errors import DiskError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-nbd and qemu-io (Debian package qemu-utils)",
)

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def qemu_nbd(image: Path, fmt: str, *extra: str, export: str = "disk") -> Iterator[str]:
    """Serve `image` with a real qemu-nbd on 127.0.0.1 and yield its nbd:// URL."""
    port = free_port()
    args = ["qemu-nbd", "-f", fmt, "-b", "127.0.0.1", "-p", str(port), "-x", export]
    args += ["--persistent", "--shared=4", *extra, str(image)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(400):
            if proc.poll() is not None:
                pytest.fail(f"qemu-nbd exited: {proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.025)
        else:
            pytest.fail("qemu-nbd did not start listening")
        yield f"nbd://127.0.0.1:{port}/{export}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def qemu_io(image: Path | str, fmt: str, *commands: str) -> str:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "fail" not in text.lower(), text
    return text


def make_image(tmp_path: Path, fmt: str, size: str = "64M", *opts: str) -> Path:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *opts, str(path), size], check=True, timeout=60
    )
    return path


def test_write_through_boite_verified_by_qemu_io_raw(tmp_path):
    image = make_image(tmp_path, "raw")
    with qemu_nbd(image, "raw") as url, open_nbd(url) as disk:
        assert disk.size == 64 * MIB and not disk.read_only
        disk.write(0, b"\xab" * 65536)
        disk.write(5 * MIB + 512, b"\x5c" * 4096)
        # Bigger than one request may carry (32 MiB): split into several.
        disk.write(20 * MIB, b"\x3e" * (34 * MIB))
        disk.write(63 * MIB + 100, b"tail")  # unaligned, up to a byte
        disk.flush()
        assert disk.read(5 * MIB + 512, 4096) == b"\x5c" * 4096
    qemu_io(
        image,
        "raw",
        "read -P 0xab 0 64k",
        "read -P 0 64k 64k",
        f"read -P 0x5c {5 * MIB + 512} 4096",
        f"read -P 0x3e {20 * MIB} {34 * MIB}",
    )
    data = image.read_bytes()
    assert data[63 * MIB + 100 : 63 * MIB + 104] == b"tail"


def test_data_written_by_qemu_io_is_read_by_boite_vmdk(tmp_path):
    image = make_image(tmp_path, "vmdk")
    qemu_io(image, "vmdk", "write -P 0x5a 1M 256k", "write -P 0x17 33M 4k")
    with qemu_nbd(image, "vmdk") as url, open_nbd(url) as disk:
        assert disk.read(MIB, 256 * 1024) == b"\x5a" * (256 * 1024)
        assert disk.read(33 * MIB, 4096) == b"\x17" * 4096
        assert disk.read(0, MIB) == bytes(MIB)  # unallocated grains read as zeroes
        assert disk.read(MIB - 3, 6) == b"\0\0\0ZZZ"  # any byte range
        disk.write(8 * MIB, b"\xc3" * MIB)
        disk.write(4096 + 100, b"x" * 300)
    qemu_io(image, "vmdk", "read -P 0xc3 8M 1M", "read -P 0x5a 1M 256k")
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = subprocess.run(
        ["qemu-io", "-f", "vmdk", "-c", "read -v 4196 300", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "xxxxxxxx" in out.stdout


def test_qemus_nbd_client_and_boite_see_each_others_writes(tmp_path):
    image = make_image(tmp_path, "raw", "16M")
    with qemu_nbd(image, "raw") as url:
        qemu_io(url, "raw", "write -P 0x42 2M 128k")
        with open_nbd(url) as disk:
            assert disk.read(2 * MIB, 128 * 1024) == b"\x42" * (128 * 1024)
            disk.write(3 * MIB, b"\x99" * 8192)
        qemu_io(url, "raw", "read -P 0x99 3M 8k")


def test_trim_punches_holes_in_the_served_file(tmp_path):
    image = make_image(tmp_path, "raw", "8M")
    with qemu_nbd(image, "raw", "--discard=unmap") as url, open_nbd(url) as disk:
        disk.write(0, b"\xee" * (2 * MIB))
        disk.flush()
        disk.discard(MIB, MIB)
        disk.flush()
        assert disk.read(MIB, MIB) == bytes(MIB)
        assert disk.read(0, MIB) == b"\xee" * MIB
    qemu_io(image, "raw", "read -P 0xee 0 1M", "read -P 0 1M 1M")


def test_read_only_export(tmp_path):
    image = make_image(tmp_path, "raw", "4M")
    qemu_io(image, "raw", "write -P 0x77 0 4k")
    with qemu_nbd(image, "raw", "--read-only") as url, open_nbd(url) as disk:
        assert disk.read_only
        assert disk.read(0, 4096) == b"\x77" * 4096
        with pytest.raises(DiskError, match="read-only"):
            disk.write(0, bytes(512))
        with pytest.raises(DiskError, match="read-only"):
            disk.discard(0, 4096)
        disk.flush()  # nothing to flush, never an error


def test_read_only_open_of_a_writable_export(tmp_path):
    image = make_image(tmp_path, "raw", "4M")
    with qemu_nbd(image, "raw") as url, open_nbd(url, read_only=True) as disk:
        with pytest.raises(DiskError, match="read-only"):
            disk.write(0, bytes(512))
    assert image.read_bytes() == bytes(4 * MIB)


def test_unix_socket_url(tmp_path):
    image = make_image(tmp_path, "raw", "4M")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", "e", "-t", str(image)],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            if sock.exists():
                break
            time.sleep(0.025)
        with open_nbd(f"nbd+unix:///e?socket={sock}") as disk:
            disk.write(MIB, b"unix" * 128)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert image.read_bytes()[MIB : MIB + 4] == b"unix"


def test_missing_export_and_out_of_range_requests(tmp_path):
    image = make_image(tmp_path, "raw", "1M")
    with qemu_nbd(image, "raw") as url:
        wrong = url.rsplit("/", 1)[0] + "/nope"
        with pytest.raises(DiskError, match="no such export|refused export 'nope'"):
            open_nbd(wrong)
        with open_nbd(url) as disk:
            with pytest.raises(DiskError, match="outside the export"):
                disk.read(MIB - 10, 20)
            with pytest.raises(DiskError, match="outside the export"):
                disk.write(MIB, b"x")
            assert disk.read(MIB - 10, 10) == bytes(10)  # still usable


def test_connection_refused_is_a_disk_error():
    with pytest.raises(DiskError, match="cannot connect"):
        open_nbd(f"nbd://127.0.0.1:{free_port()}/x")


@pytest.mark.parametrize(
    "url",
    ["http://host/x", "nbd:///noexport", "nbd://host:99999/x", "nbd+unix:///e"],
)
def test_bad_urls(url):
    with pytest.raises(DiskError):
        NbdAddress.parse(url)


def test_address_defaults():
    a = NbdAddress.parse("nbd://san.example/vol%201")
    assert (a.host, a.port, a.export) == ("san.example", 10809, "vol 1")


# -- servers that misbehave -----------------------------------------------------------------


@contextlib.contextmanager
def scripted_server(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection TCP server on loopback running `handler` on the accepted socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                handler(conn)
            except OSError:
                pass
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"nbd://127.0.0.1:{port}/disk"
    finally:
        done.set()
        listener.close()
        thread.join(timeout=10)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("client went away")
        data += chunk
    return data


def greet(conn: socket.socket) -> None:
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    recv_exact(conn, 4)


def read_option(conn: socket.socket) -> tuple[int, bytes]:
    magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
    assert magic == IHAVEOPT
    return option, recv_exact(conn, length)


def test_silent_server_times_out_instead_of_hanging():
    with scripted_server(lambda conn: None) as url:
        with pytest.raises(DiskError, match="no reply from the server within 0.3 s"):
            NbdImage(url, timeout=0.3)


def test_garbage_greeting():
    with scripted_server(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")) as url:
        with pytest.raises(DiskError, match="greeting magic"):
            open_nbd(url)


def test_server_that_hangs_up_during_the_handshake():
    def handler(conn):
        greet(conn)
        read_option(conn)
        conn.close()

    with scripted_server(handler) as url:
        with pytest.raises(DiskError, match="closed the connection"):
            open_nbd(url)


def test_huge_option_reply_is_refused():
    def handler(conn):
        greet(conn)
        read_option(conn)
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, 3, 1 << 30))

    with scripted_server(handler) as url:
        with pytest.raises(DiskError, match="option reply of 1073741824 bytes"):
            open_nbd(url)


class ExportNameOnlyServer:
    """An old server: no NBD_OPT_GO, just NBD_OPT_EXPORT_NAME and simple replies. It can
    misbehave on request `bad_after` by sending a wrong cookie. With `min_block` it is a
    GO server instead, that takes only whole blocks of that size (and checks it)."""

    def __init__(self, size: int, bad_after: int | None = None, min_block: int = 0) -> None:
        self.data = bytearray(size)
        self.bad_after = bad_after
        self.min_block = min_block
        self.requests = 0
        self.unaligned = 0

    def __call__(self, conn: socket.socket) -> None:
        greet(conn)
        option, _ = read_option(conn)
        assert option == OPT_GO
        if self.min_block:
            for info in (
                struct.pack(">HQH", 0, len(self.data), 1 | 4),
                struct.pack(">HIII", 3, self.min_block, self.min_block, 1 << 20),
                b"",
            ):
                reply_type = 3 if info else 1
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, reply_type, len(info)))
                conn.sendall(info)
        else:
            conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, REP_ERR_UNSUP, 0))
            option, name = read_option(conn)
            assert option == OPT_EXPORT_NAME and name == b"disk"
            # Client asked for NO_ZEROES (we offered it): size and flags only.
            conn.sendall(struct.pack(">QH", len(self.data), 1 | 4))
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", recv_exact(conn, 28)
            )
            assert magic == REQUEST_MAGIC
            self.requests += 1
            if self.bad_after is not None and self.requests > self.bad_after:
                cookie ^= 0xFFFF
            if cmd == 2:
                return
            if self.min_block and (offset % self.min_block or length % self.min_block):
                self.unaligned += 1
            if cmd == 1:
                self.data[offset : offset + length] = recv_exact(conn, length)
            reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie)
            if cmd == 0:
                reply += bytes(self.data[offset : offset + length])
            conn.sendall(reply)


def test_fallback_to_export_name_for_servers_without_go():
    server = ExportNameOnlyServer(MIB)
    with scripted_server(server) as url:
        with open_nbd(url) as disk:
            assert disk.size == MIB
            disk.write(4096, b"old server" * 10)
            assert disk.read(4096, 100) == b"old server" * 10
    assert server.data[4096:4196] == b"old server" * 10


def test_reply_with_a_wrong_cookie_breaks_the_connection_cleanly():
    with scripted_server(ExportNameOnlyServer(MIB, bad_after=1)) as url:
        disk = open_nbd(url)
        disk.read(0, 512)
        with pytest.raises(DiskError, match="reply for request"):
            disk.read(0, 512)
        with pytest.raises(DiskError, match="connection is closed"):
            disk.read(0, 512)
        disk.close()


def test_unaligned_requests_become_whole_blocks_for_a_server_that_wants_them():
    server = ExportNameOnlyServer(MIB, min_block=4096)
    server.data[:] = bytes(range(256)) * (MIB // 256)
    reference = bytearray(server.data)
    with scripted_server(server) as url:
        with open_nbd(url) as disk:
            assert (disk.min_block, disk.max_payload) == (4096, 1 << 20)
            assert disk.read(5000, 10) == bytes(reference[5000:5010])
            disk.write(4090, b"edge")  # across a block boundary: read-modify-write
            reference[4090:4094] = b"edge"
            disk.write(8192, b"z" * 4096)
            reference[8192:12288] = b"z" * 4096
            assert disk.read(0, MIB) == bytes(reference)
    assert server.unaligned == 0
    assert server.data == reference


def valid_go_stream(size: int = MIB) -> bytes:
    """What a well-behaved server sends up to the end of a GO handshake."""
    info = struct.pack(">HQH", 0, size, 1 | 4)
    return (
        struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
        + struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, 3, len(info))
        + info
        + struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, 1, 0)
    )


def replay(stream: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.sendall(stream)
        # Then answer nothing, whatever the client asks.

    return handler


def test_truncated_and_corrupted_handshakes_are_disk_errors():
    import random

    good = valid_go_stream()
    rng = random.Random(1234)
    streams = [good[:cut] for cut in range(0, len(good), 4)]
    for _ in range(15):
        corrupt = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        streams.append(bytes(corrupt))
    for stream in streams:
        with scripted_server(replay(stream)) as url:
            try:
                disk = NbdImage(url, timeout=0.2)
            except DiskError:
                continue
            # A corruption the protocol cannot detect (a size, a flag): the disk opened;
            # its first request then times out against the silent server, as a DiskError.
            if disk.size:
                with pytest.raises(DiskError, match="no reply"):
                    disk.read(0, min(512, disk.size))
            disk.close()


def test_a_box_with_a_disk_on_nbd(tmp_path, monkeypatch):
    from boite.box import Box

    monkeypatch.setenv("BOITE_RUNTIME_DIR", str(tmp_path / "runtime"))
    image = make_image(tmp_path, "raw", "48M")
    box = Box.create(tmp_path / "san", disk_size=None)
    with qemu_nbd(image, "raw") as url:
        box.vmx["scsi0.present"] = "TRUE"
        box.vmx["scsi0:0.present"] = "TRUE"
        box.vmx["scsi0:0.fileName"] = url
        box.save()
        again = Box.open(box.dir)
        assert again.check() == []
        assert again.info()["disks"][0]["capacity"] == 48 * MIB
    problems = Box.open(box.dir).check()
    assert [p.key for p in problems] == ["scsi0:0.fileName"]
    assert "cannot connect" in problems[0].message


def test_threads_sharing_one_connection(tmp_path):
    image = make_image(tmp_path, "raw", "16M")
    errors: list[BaseException] = []
    with qemu_nbd(image, "raw") as url, open_nbd(url) as disk:

        def worker(n: int) -> None:
            try:
                for i in range(20):
                    offset = (n * 20 + i) * 64 * 1024
                    disk.write(offset, bytes([n + 1]) * 65536)
                    assert disk.read(offset, 65536) == bytes([n + 1]) * 65536
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    commands = [f"read -P {n + 1} {n * 20 * 65536} {20 * 65536}" for n in range(4)]
    qemu_io(image, "raw", *commands)
