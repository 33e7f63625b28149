"""Run inside a network namespace made by test_nat.py (`unshare -n`): a host with only a
dummy uplink, so passt has a default route to copy and nothing leaves the namespace.
Prints one JSON line with what it saw."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

GUEST_MAC = bytes.fromhex("000c29aabbcc")


def setup_namespace() -> None:
    for cmd in (
        "ip link set lo up",
        "ip tuntap add dummy0 mode tap",  # an uplink that leads nowhere (no dummy module)
        "ip addr add 192.168.77.1/24 dev dummy0",
        "ip link set dummy0 up",
        "ip route add default via 192.168.77.254",
    ):
        subprocess.run(cmd.split(), check=True)


def dhcp_discover(xid: int) -> bytes:
    """An Ethernet frame with a DHCPDISCOVER from GUEST_MAC (RFC 2131)."""
    bootp = struct.pack("!BBBBIHHIIII16s64s128sI", 1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0,
                        GUEST_MAC, b"", b"", 0x63825363)  # fmt: skip
    options = bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
    udp_payload = bootp + options
    udp = struct.pack("!HHHH", 68, 67, 8 + len(udp_payload), 0) + udp_payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes(4), b"\xff\xff\xff\xff")  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + ip + udp


def parse_offer(frame: bytes, xid: int) -> dict | None:
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    udp = frame[14 + ihl :]
    if struct.unpack("!H", udp[2:4])[0] != 68:
        return None
    bootp = udp[8:]
    if struct.unpack("!I", bootp[4:8])[0] != xid:
        return None
    yiaddr = socket.inet_ntoa(bootp[16:20])
    opts, i, found = bootp[240:], 0, {}
    while i < len(opts) and opts[i] != 255:
        if opts[i] == 0:
            i += 1
            continue
        code, length = opts[i], opts[i + 1]
        found[code] = opts[i + 2 : i + 2 + length]
        i += 2 + length
    return {
        "yiaddr": yiaddr,
        "type": found.get(53, b"\0")[0],
        "router": socket.inet_ntoa(found[3][:4]) if 3 in found else None,
        "dns": socket.inet_ntoa(found[6][:4]) if 6 in found else None,
    }


def dhcp() -> dict:
    from boite.machine.netback.passt import PasstBackend

    log: list[str] = []
    backend = PasstBackend(log=log.append)
    try:
        xid = 0x1234ABCD
        deadline = time.monotonic() + 20
        offer = None
        while offer is None and time.monotonic() < deadline:
            backend.send([memoryview(dhcp_discover(xid))])
            end = time.monotonic() + 1
            while offer is None and time.monotonic() < end:
                buf = bytearray(2048)
                try:
                    n = backend.recv_into([memoryview(buf)])
                except BlockingIOError:
                    time.sleep(0.05)
                    continue
                offer = parse_offer(bytes(buf[:n]), xid)
        return {"offer": offer, "log": log}
    finally:
        backend.close()


def sink(
    listener: socket.socket, received: bytearray, greet: bool, pause_s: float = 0
) -> threading.Thread:
    """A host service taking one connection and keeping what it reads. `greet`: one byte
    to the guest first; Debian 12's passt resets a guest-to-host stream 24 s in while the
    guest has acknowledged nothing from the host side (bench/RESULTS.md, net). `pause_s`:
    read nothing for so long (the guest waits on TCP's window meanwhile)."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            if greet:
                conn.sendall(b"!")
            time.sleep(pause_s)
            while chunk := conn.recv(65536):
                received.extend(chunk)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return server


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


GUEST_IP, HOST_IP = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")


def tcp_frame(
    dst_mac: bytes, ports: tuple[int, int], seq: int, ack: int, flags: int, payload: bytes = b""
) -> bytes:
    """An Ethernet frame with one TCP segment from the guest's address to the gateway."""
    tcp = struct.pack("!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    csum = _checksum(GUEST_IP + HOST_IP + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     GUEST_IP, HOST_IP)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + tcp


def parse_tcp(frame: bytes) -> dict | None:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0xF) * 4
    seg = frame[14 + ihl :]
    seq, ack, offset, flags = struct.unpack("!IIBB", seg[4:14])
    return {"seq": seq, "ack": ack, "flags": flags, "data": seg[(offset >> 4) * 4 :]}


SYN, RST, PSH, ACK, FIN = 0x02, 0x04, 0x08, 0x10, 0x01


def upload(seconds: float, greet: bool) -> dict:
    """A guest-to-host TCP stream straight on passt's frame socket, from a minimal TCP
    sender written here (no guest kernel involved): one 1000-byte segment a second for
    `seconds`, every segment of the host's acknowledged at once. With `greet` the host
    service sends one byte first, which the sender acknowledges. Debian 12's passt resets
    the stream 24 s in unless the guest has acknowledged data from it (bench/RESULTS.md)."""
    from boite.machine.netback.passt import PasstBackend

    log: list[str] = []
    backend = PasstBackend(log=log.append)
    listener = socket.create_server(("127.0.0.1", 9097))
    received = bytearray()
    server = sink(listener, received, greet)

    def frames(wait: float) -> list[bytes]:
        out, end = [], time.monotonic() + wait
        while time.monotonic() < end:
            buf = bytearray(70000)
            try:
                n = backend.recv_into([memoryview(buf)])
            except BlockingIOError:
                time.sleep(0.01)
                continue
            out.append(bytes(buf[:n]))
        return out

    ports, mac, seq = (40000, 9097), b"\xff" * 6, 1000
    try:
        backend.send([memoryview(tcp_frame(mac, ports, seq, 0, SYN))])
        start = time.monotonic()
        synack = None
        while synack is None and time.monotonic() - start < 10:
            for frame in frames(0.5):
                seg = parse_tcp(frame)
                if seg and seg["flags"] & (SYN | ACK) == SYN | ACK:
                    synack, mac = seg, frame[6:12]
        if synack is None:
            return {"error": "no SYN-ACK from passt", "log": log}
        seq, rcv = seq + 1, (synack["seq"] + 1) & 0xFFFFFFFF
        backend.send([memoryview(tcp_frame(mac, ports, seq, rcv, ACK))])
        sent, reset_at, greeting = bytearray(), None, bytearray()
        while reset_at is None and time.monotonic() - start < seconds:
            chunk = os.urandom(1000)
            backend.send([memoryview(tcp_frame(mac, ports, seq, rcv, PSH | ACK, chunk))])
            seq += len(chunk)
            sent += chunk
            for frame in frames(1.0):
                seg = parse_tcp(frame)
                if seg is None:
                    continue
                if seg["flags"] & RST:
                    reset_at = round(time.monotonic() - start, 1)
                elif seg["data"] and seg["seq"] == rcv:
                    greeting += seg["data"]
                    rcv = (rcv + len(seg["data"])) & 0xFFFFFFFF
                    backend.send([memoryview(tcp_frame(mac, ports, seq, rcv, ACK))])
        if reset_at is None:
            backend.send([memoryview(tcp_frame(mac, ports, seq, rcv, FIN | ACK))])
        server.join(10)
        return {"seconds": round(time.monotonic() - start, 1), "reset_at": reset_at,
                "sent_sha256": hashlib.sha256(sent).hexdigest(), "sent_len": len(sent),
                "received_sha256": hashlib.sha256(received).hexdigest(),
                "received_len": len(received), "greeting": greeting.decode(), "log": log}  # fmt: skip
    finally:
        backend.close()
        listener.close()


def box_traffic(box_dir: str) -> dict:
    """Start the kit box (nat, forward tcp:18080:8080) and move bytes both ways."""
    from boite import launch

    payload = os.urandom(96 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    # Guest to host, the payload eight times over, the host reading nothing for its first
    # 30 s (host time: the guest's clock under the emulator is not the host's): the
    # stream lives past passt's 24 s whatever the emulator's pace.
    result: dict = {"sha256": digest, "sha256_x8": hashlib.sha256(payload * 8).hexdigest()}
    # Host service the guest reaches through the gateway (passt maps it to loopback).
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 9099))
    listener.listen(1)
    received = bytearray()
    server = sink(listener, received, greet=True, pause_s=30)
    launch.start(box_dir, "emu")
    try:
        with launch.tools_client(box_dir, wait_s=900) as tools:
            deadline = time.monotonic() + 300
            while True:  # init configures eth0 in the background
                info = tools.info()
                if any(ip["interface"] == "eth0" for ip in info["ips"]):
                    break
                if time.monotonic() > deadline:
                    out = bytearray()
                    tools.exec(["sh", "-c", "ip addr; ip route; ps"], stdout=out.extend)
                    result["diagnosis"] = out.decode(errors="replace")
                    break
                time.sleep(2)
            result["ips"] = info["ips"]
            # `list --all` shows the running box with its state, accelerator, IP and tools.
            listed = subprocess.run(
                [sys.executable, "-m", "boite", "list", "--all", str(Path(box_dir).parent),
                 "--json"], capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            result["listed"] = (
                json.loads(listed.stdout) if listed.returncode == 0 else listed.stderr
            )
            # `info` names the passt behind the NIC (path and version).
            shown = subprocess.run(
                [sys.executable, "-m", "boite", "info", box_dir, "--json"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            result["info"] = json.loads(shown.stdout) if shown.returncode == 0 else shown.stderr
            # How the address came: the lease (udhcpc's script wrote DNS and the route),
            # not a static boite.ip= on the command line.
            out = bytearray()
            tools.exec(["sh", "-c", "cat /proc/cmdline; echo ---; cat /etc/resolv.conf; "
                        "echo ---; ip route; echo ---; ps"], stdout=out.extend)  # fmt: skip
            cmdline, resolv, routes, ps = out.decode(errors="replace").split("---\n")
            result["lease"] = {"cmdline": cmdline.strip(), "resolv": resolv.strip(),
                               "routes": routes.strip(), "udhcpc": "udhcpc -i eth0" in ps}  # fmt: skip
            # A host address that is not loopback (the namespace's uplink): how the
            # outside world is reached, through passt's sockets on the host.
            uplink = socket.create_server(("192.168.77.1", 9098))
            got = bytearray()

            def outside() -> None:
                conn, _ = uplink.accept()
                with conn:
                    while chunk := conn.recv(65536):
                        got.extend(chunk)

            outside_thread = threading.Thread(target=outside, daemon=True)
            outside_thread.start()
            result["outside_status"] = tools.exec(
                ["sh", "-c", "echo hello outside | nc 192.168.77.1 9098"]
            )
            outside_thread.join(120)
            result["outside_got"] = got.decode(errors="replace")
            Path(box_dir, "payload.bin").write_bytes(payload)
            tools.put(Path(box_dir, "payload.bin"), "/tmp/payload.bin")
            # guest -> host
            out = bytearray()
            p = "/tmp/payload.bin"
            started = time.monotonic()
            result["to_host_status"] = tools.exec(
                ["sh", "-c", f"cat {' '.join([p] * 8)} | nc 10.0.2.2 9099 > /tmp/greeting"],
                stderr=out.extend,
            )
            server.join(120)
            result["to_host_seconds"] = round(time.monotonic() - started, 1)
            result["to_host_sha256"] = hashlib.sha256(received).hexdigest()
            result["to_host_len"] = len(received)
            result["to_host_first_diff"] = next(
                (i for i, (a, b) in enumerate(zip(received, payload * 8, strict=False)) if a != b),
                None,
            )
            result["to_host_stderr"] = out.decode(errors="replace")
            # host -> guest through the forward: the guest listens on 8080
            done = threading.Event()
            status: list[int] = []

            def listen() -> None:
                with launch.tools_client(box_dir) as t2:
                    # nc's stdin stays open (a FIFO held read-write): busybox nc stops
                    # reading the network when its stdin ends.
                    listen_cmd = (
                        "mkfifo /tmp/in; exec 3<>/tmp/in; nc -l -p 8080 <&3 > /tmp/from-host.bin"
                    )
                    status.append(t2.exec(["sh", "-c", listen_cmd]))
                done.set()

            threading.Thread(target=listen, daemon=True).start()
            # passt accepts on the host at once; connect only once the guest listens.
            listening = ["sh", "-c", "grep -q ':1F90 00000000:0000 0A' /proc/net/tcp"]
            deadline = time.monotonic() + 120
            while tools.exec(listening) != 0 and time.monotonic() < deadline:
                time.sleep(1)
            sent = False
            deadline = time.monotonic() + 120
            while not sent and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", 18080), timeout=30) as c:
                        c.sendall(payload)
                        c.shutdown(socket.SHUT_WR)
                        c.settimeout(60)
                        c.recv(1)  # the guest closes once it has everything
                    sent = True
                except OSError:
                    time.sleep(1)
            done.wait(120)
            result["from_host_status"] = status[0] if status else None
            out = bytearray()
            tools.exec(["sha256sum", "/tmp/from-host.bin"], stdout=out.extend)
            result["from_host_sha256"] = out.decode().split()[0] if out else None
    finally:
        launch.stop(box_dir, "hard")
    return result


if __name__ == "__main__":
    setup_namespace()
    what = sys.argv[1]
    if what == "dhcp":
        out = dhcp()
    elif what == "upload":
        out = upload(float(sys.argv[2]), greet=sys.argv[3] == "greet")
    else:
        out = box_traffic(sys.argv[2])
    print(json.dumps(out))
