"""A TAP network interface opened through /dev/net/tun (ioctl numbers from <linux/if_tun.h>)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import threading

from boite.errors import ConfigError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class TapDevice:
    """The host side of a virtual NIC: one Ethernet frame per read/write, no packet info.

    `netns` (a name under /var/run/netns) creates the interface inside that network
    namespace: the open happens on a short-lived thread that enters the namespace, so the
    rest of the process keeps its own.
    """

    def __init__(self, name: str = "", *, netns: str | None = None) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(f"TAP interface name {name!r} is longer than {IFNAMSIZ - 1}")
        self.fd = -1
        if netns is None:
            self.fd, self.name = self._open(name)
        else:
            self.fd, self.name = self._open_in_netns(name, netns)

    @staticmethod
    def _open(name: str) -> tuple[int, str]:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"/dev/net/tun: cannot open ({e.strerror})") from None
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"TAP {name or '(any)'}: TUNSETIFF failed ({e.strerror})") from None
        return fd, out[:IFNAMSIZ].rstrip(b"\0").decode()

    @classmethod
    def _open_in_netns(cls, name: str, netns: str) -> tuple[int, str]:
        result: list[tuple[int, str] | BaseException] = []

        def enter_and_open() -> None:
            try:
                own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
                target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
                try:
                    _setns(target)
                    try:
                        result.append(cls._open(name))
                    finally:
                        _setns(own)
                finally:
                    os.close(own)
                    os.close(target)
            except BaseException as e:  # handed to the caller's thread
                result.append(e)

        t = threading.Thread(target=enter_and_open, name=f"tap-netns-{netns}")
        t.start()
        t.join()
        got = result[0]
        if isinstance(got, BaseException):
            if isinstance(got, OSError):
                raise ConfigError(f"network namespace {netns!r}: {got}") from None
            raise got
        return got

    def fileno(self) -> int:
        return self.fd

    def send(self, views: list[memoryview]) -> int:
        """Write one frame gathered from `views` (no copy)."""
        return os.writev(self.fd, views)

    def recv_into(self, views: list[memoryview]) -> int:
        """Read one frame scattered into `views`; raises BlockingIOError when none waits."""
        return os.readv(self.fd, views)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
