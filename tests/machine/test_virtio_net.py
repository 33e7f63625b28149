"""virtio-net against a real TAP in a network namespace of the test's own.

A Python "guest driver" sends ARP and ICMP frames through the TX queue and receives the
kernel's answers (and a UDP datagram sent from inside the namespace) on the RX queue.
Nothing leaves the namespace: the TAP exists only there and is gone when the test ends.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import uuid

import pytest

from boite.machine.bus import Bus
from boite.machine.irq import IrqLine
from boite.machine.memory import GuestMemory
from boite.machine.netback.tap import TapDevice
from boite.machine.virtio import mmio as r
from boite.machine.virtio.guestdriver import (
    ALL_RING_FEATURES,
    Buffer,
    GuestAllocator,
    VirtioMmioDriver,
)
from boite.machine.virtio.mmio import VirtioMmio
from boite.machine.virtio.net import NET_HDR_LEN, VirtioNet, parse_mac

BASE = 0xD000_2000
GUEST_MAC = "00:0c:29:ab:cd:ef"
GUEST_IP = bytes([10, 99, 0, 2])
HOST_IP = bytes([10, 99, 0, 1])
RX_BUF = 0x400000
TX_BUF = 0x600000


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a TAP"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "needs /dev/net/tun"
    try:
        subprocess.run(["ip", "-V"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "needs iproute2 (ip)"
    return None


pytestmark = pytest.mark.skipif(_can_netns() is not None, reason=str(_can_netns()))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    name = f"boite-vt-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_request(mac: bytes) -> bytes:
    eth = b"\xff" * 6 + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, GUEST_IP, bytes(6), HOST_IP)
    return eth + arp


def icmp_echo(mac: bytes, dst_mac: bytes, ident: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    iph = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0, GUEST_IP, HOST_IP
    )
    iph = iph[:10] + struct.pack("!H", checksum(iph)) + iph[12:]
    return dst_mac + mac + b"\x08\x00" + iph + icmp


class NetRig:
    def __init__(self, tap: TapDevice) -> None:
        self.memory = GuestMemory.with_ram(16 << 20)
        self.bus = Bus("mmio")
        self.net = VirtioNet(tap, GUEST_MAC)
        self.dev = VirtioMmio(self.net, self.memory, IrqLine(7), base=BASE)
        self.bus.register(BASE, r.MMIO_SIZE, self.dev)
        self.drv = VirtioMmioDriver(self.bus, BASE, self.memory, GuestAllocator(0x10000, RX_BUF))
        self.drv.init(ALL_RING_FEATURES | 0xFFFFFFFF, expect_id=r.VIRTIO_ID_NET)
        self.rxq, self.txq = self.drv.queues
        self.posted: dict[int, int] = {}
        for i in range(16):
            addr = RX_BUF + i * 2048
            head = self.rxq.add([Buffer(addr, NET_HDR_LEN + 1514, writable=True)])
            self.posted[head] = addr
        self.rxq.kick()

    def send(self, frame: bytes, check: bool = True) -> None:
        self.memory.write(TX_BUF, bytes(NET_HDR_LEN) + frame)
        # Header and frame in separate descriptors, as Linux does without ANY_LAYOUT.
        self.txq.add([Buffer(TX_BUF, NET_HDR_LEN), Buffer(TX_BUF + NET_HDR_LEN, len(frame))])
        self.txq.kick()
        done = self.txq.reap()
        assert done or not check

    def receive(self, want, deadline: float = 10.0) -> bytes:
        """Wait for a frame `want(frame)` accepts; repost every buffer we read."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for head, length in self.rxq.reap():
                addr = self.posted.pop(head)
                frame = self.memory.read(addr + NET_HDR_LEN, length - NET_HDR_LEN)
                self.posted[self.rxq.add([Buffer(addr, NET_HDR_LEN + 1514, writable=True)])] = addr
                self.rxq.kick()
                if want(frame):
                    return frame
            time.sleep(0.01)
        raise AssertionError("no matching frame arrived")


def test_config_space_has_the_box_mac_and_link_up() -> None:
    class NoWire:
        def fileno(self) -> int:
            return -1

    net = VirtioNet(NoWire(), GUEST_MAC)  # type: ignore[arg-type]
    cfg = net.config_bytes()
    assert cfg[:6] == parse_mac(GUEST_MAC)
    assert struct.unpack_from("<H", cfg, 6)[0] == 1


def test_arp_icmp_and_udp_through_a_tap_in_a_namespace(netns: str) -> None:
    ip("netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    ip("netns", "exec", netns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    tap = TapDevice("btap0", netns=netns)
    try:
        ip("-n", netns, "link", "set", tap.name, "up")
        ip("-n", netns, "addr", "add", "10.99.0.1/24", "dev", tap.name)
        rig = NetRig(tap)
        rig.net.start()
        mac = parse_mac(GUEST_MAC)

        # ARP: who has 10.99.0.1? The namespace's kernel answers.
        rig.send(arp_request(mac))
        reply = rig.receive(
            lambda f: f[12:14] == b"\x08\x06" and struct.unpack("!H", f[20:22])[0] == 2
        )
        assert reply[0:6] == mac
        host_mac = reply[22:28]
        assert reply[28:32] == HOST_IP

        # ICMP echo: the kernel replies with our payload.
        payload = os.urandom(56)
        rig.send(icmp_echo(mac, host_mac, 0x4242, payload))
        echo = rig.receive(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0)
        assert echo[26:30] == HOST_IP and echo[30:34] == GUEST_IP
        assert echo[34 + 8 :][: len(payload)] == payload

        # UDP from a socket inside the namespace to the guest.
        ip("-n", netns, "neigh", "replace", "10.99.0.2", "lladdr", GUEST_MAC, "dev", tap.name)
        code = (
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
            "s.sendto(b'hello from the namespace', ('10.99.0.2', 9999))"
        )
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True)
        udp = rig.receive(lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
        assert udp[42:].startswith(b"hello from the namespace")
        assert struct.unpack("!H", udp[36:38])[0] == 9999
        assert rig.net.tx_frames == 2 and rig.net.rx_frames >= 3
        assert not rig.dev.broken
    finally:
        if "rig" in locals():
            rig.net.close()
        tap.close()


def test_hostile_rx_buffer_resets_only_the_nic(netns: str) -> None:
    tap = TapDevice("btap1", netns=netns)
    try:
        ip("-n", netns, "link", "set", tap.name, "up")
        ip("-n", netns, "addr", "add", "10.99.0.1/24", "dev", tap.name)
        rig = NetRig(tap)
        # A 4-byte receive buffer cannot hold the 12-byte header: a protocol violation.
        rig.rxq.add([Buffer(RX_BUF + 0x100000, 4, writable=True)])
        rig.rxq.kick()
        mac = parse_mac(GUEST_MAC)
        rig.net.start()
        rig.send(arp_request(mac))
        end = time.monotonic() + 10
        while not rig.dev.broken and time.monotonic() < end:
            # Drain the good buffers; the bad one comes after them.
            rig.rxq.reap()
            rig.send(arp_request(mac), check=False)
            time.sleep(0.01)
        assert rig.dev.broken
        assert rig.drv.status() & r.STATUS_DEVICE_NEEDS_RESET
        # TX is refused while broken; a reset brings the NIC back.
        rig.drv.init(ALL_RING_FEATURES | 0xFFFFFFFF)
        assert not rig.dev.broken
        rig.net.close()
    finally:
        tap.close()
