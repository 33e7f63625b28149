"""virtio-net (virtio 1.x, section 5.1) on a TAP device.

TX happens on the guest's kick, in the vCPU thread: each chain minus its 12-byte
virtio_net_hdr is written to the TAP with one writev over guest memory. RX runs on a
thread of its own that waits on the TAP and on a wake pipe (kicked when the guest posts
receive buffers), and scatters each frame with one readv straight into the guest's buffers.
`poll_rx()` is the same work without the thread, for a VMM that has its own event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from boite.errors import ConfigError, GuestError
from boite.machine.state import StateRecord, data
from boite.machine.virtio.mmio import STATUS_DRIVER_OK, VIRTIO_ID_NET, VirtioBackend, bit
from boite.machine.virtio.queue import VirtQueue, VirtQueueError, split_views

log = logging.getLogger("boite.virtio.net")

VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

NET_HDR_LEN = 12  # struct virtio_net_hdr with num_buffers (always, under VERSION_1)
MTU = 1500
MAX_FRAME = 65535 + 14  # larger writes are a guest bug; the TAP would refuse them anyway
RXQ, TXQ = 0, 1


class FrameTransport(Protocol):
    """The host side of the NIC (a TapDevice, or anything that moves whole frames)."""

    def fileno(self) -> int: ...

    def send(self, views: list[memoryview]) -> int: ...

    def recv_into(self, views: list[memoryview]) -> int: ...


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6:
        raise ConfigError(f"MAC address {text!r}: expected six hex bytes like 00:0c:29:12:34:56")
    return mac


@dataclass(frozen=True)
class VirtioNetState(StateRecord):
    """Frames are handed over whole; the MAC address the guest was shown stays its own."""

    VERSION = 1
    mac: bytes = data(max_len=6, exact=6)


class VirtioNet(VirtioBackend):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"
    queue_sizes = (256, 256)

    def __init__(self, tap: FrameTransport, mac: str | bytes) -> None:
        super().__init__()
        self.tap = tap
        self.mac = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
        if len(self.mac) != 6:
            raise ConfigError(f"MAC address {self.mac.hex(':')}: expected 6 bytes")
        self.tx_frames = 0
        self.rx_frames = 0
        self.tx_dropped = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._stop = False

    def device_features(self) -> int:
        return bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MTU)

    def config_bytes(self) -> bytes:
        # mac[6], status, max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, MTU)

    def save_state(self) -> dict[str, Any]:
        return VirtioNetState(self.mac).to_dict()

    def check_state(self, state: Any) -> VirtioNetState:
        return VirtioNetState.from_dict(state)

    def apply_state(self, rec: VirtioNetState) -> None:
        self.mac = rec.mac

    # --- TX -------------------------------------------------------------------------
    def notify(self, queue: VirtQueue) -> None:
        if queue.index == RXQ:
            self._wake()  # new receive buffers: the RX thread may go on
            return
        sent = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            self._transmit(chain.readable)
            self.used(queue, chain.head, 0)
            sent = True
        if sent:
            self.signal(queue)

    def _transmit(self, readable: list[memoryview]) -> None:
        _hdr, frame = split_views(readable, NET_HDR_LEN)
        size = sum(len(v) for v in frame)
        if size < 14 or size > MAX_FRAME:
            self.tx_dropped += 1
            return
        try:
            self.tap.send(frame)
            self.tx_frames += 1
        except OSError as e:
            # A full TAP queue or a down link drops the frame, as a real wire would.
            self.tx_dropped += 1
            if e.errno not in (errno.EAGAIN, errno.EIO, errno.ENOBUFS):
                log.warning("virtio-net: TAP write failed: %s", e)

    # --- RX -------------------------------------------------------------------------
    def _rx_ready(self) -> bool:
        t = self.transport
        if t is None or t.broken or not t.status & STATUS_DRIVER_OK:
            return False
        return t.queues[RXQ].ready

    def poll_rx(self) -> int:
        """Deliver frames waiting on the TAP into posted buffers; returns how many."""
        t = self.transport
        assert t is not None
        delivered = 0
        with t.lock:
            while self._rx_ready():
                try:
                    if not self._receive_one(t.queues[RXQ]):
                        break
                except GuestError as e:
                    t.needs_reset(str(e))
                    break
                delivered += 1
            if delivered:
                t.signal_used(t.queues[RXQ])
        return delivered

    def _receive_one(self, q: VirtQueue) -> bool:
        chain = q.pop()
        if chain is None:
            return False
        hdr, data = split_views(chain.writable, NET_HDR_LEN)
        if sum(len(v) for v in hdr) < NET_HDR_LEN:
            raise VirtQueueError(f"virtio-net: receive buffer {chain.head} is under 12 bytes")
        try:
            n = self.tap.recv_into(data) if data else 0
        except BlockingIOError:
            q.last_avail_idx = (q.last_avail_idx - 1) & 0xFFFF  # give the buffer back
            return False
        except OSError as e:
            log.warning("virtio-net: TAP read failed: %s", e)
            q.last_avail_idx = (q.last_avail_idx - 1) & 0xFFFF
            return False
        # virtio_net_hdr: no checksum/GSO offload, one buffer.
        header = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
        pos = 0
        for v in hdr:
            v[:] = header[pos : pos + len(v)]
            pos += len(v)
        self.used(q, chain.head, NET_HDR_LEN + n)
        self.rx_frames += 1
        return True

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def activate(self, queues: list[VirtQueue], features: int) -> None:
        # The driver is up: frames can flow. The RX thread lives until close().
        self.start()

    def start(self) -> None:
        """Run RX on a thread of its own (started by DRIVER_OK; close() stops it)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._rx_loop, name="virtio-net-rx", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _rx_loop(self) -> None:
        tap_fd = self.tap.fileno()
        while not self._stop:
            t = self.transport
            can = False
            if t is not None:
                with t.lock:
                    if self._rx_ready():
                        try:
                            can = t.queues[RXQ].has_pending()
                        except GuestError as e:  # a bad avail idx: the device needs reset
                            t.needs_reset(str(e))
            buffered = getattr(self.tap, "buffered", None)
            if can and buffered is not None and buffered():
                self.poll_rx()  # frames the backend already holds (passt's stream)
                continue
            tap_fd = self.tap.fileno()  # a backend may swap it (passt gone: an idle fd)
            fds = [self._wake_r, tap_fd] if can else [self._wake_r]
            readable, _, _ = select.select(fds, [], [], 1.0)
            if self._wake_r in readable:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if tap_fd in readable and not self._stop:
                self.poll_rx()

    def reset(self) -> None:
        self._wake()  # re-evaluate whether RX can run

    def close(self) -> None:
        self.stop()
        close_tap = getattr(self.tap, "close", None)
        if callable(close_tap):
            close_tap()
        # Once only: a second close must not hit descriptors reused by someone else.
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
