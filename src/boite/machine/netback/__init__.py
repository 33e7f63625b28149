"""Host sides of virtual NICs. virtio-net talks to a backend, never to a host API.

A backend moves whole Ethernet frames (the `FrameTransport` of virtio/net.py):

    fileno()            a descriptor that becomes readable when a frame may be waiting
    send(views)         write one frame gathered from `views`
    recv_into(views)    read one frame scattered into `views` (BlockingIOError: none)
    buffered()          optional: frames already read from the host and waiting
    close()

- `tap.TapDevice`: a host TAP interface (`hostonly`, `bridged`, `custom`): needs
  CAP_NET_ADMIN or a persistent TAP the user owns.
- `passt.PasstBackend`: user-mode networking through Debian's passt (`nat`, the default),
  no privileges: DHCP, DNS, the gateway reaching the host, and port forwards.

`open_backend(connection_type, ...)` picks one; `attach_problem()` says why a NIC cannot
be attached here (for `boite check`) without opening anything.
"""

from __future__ import annotations

import os
from typing import Any

from boite.errors import NetError

NAT_CONNECTIONS = ("nat",)
TAP_CONNECTIONS = ("bridged", "hostonly", "custom")


def open_backend(
    connection_type: str,
    *,
    tap_name: str = "",
    mac: str = "",
    forwards: tuple[str, ...] = (),
    log: Any = None,
) -> Any:
    kind = connection_type.lower()
    if kind in NAT_CONNECTIONS:
        from boite.machine.netback.passt import PasstBackend

        return PasstBackend(forwards=forwards, log=log)
    if kind in TAP_CONNECTIONS:
        from boite.machine.netback.tap import TapDevice

        return TapDevice(tap_name)
    raise NetError(
        f"connectionType {connection_type!r}: boite knows nat (passt), "
        f"{', '.join(TAP_CONNECTIONS)} (TAP)"
    )


def attach_problem(connection_type: str, tap_name: str = "") -> str | None:
    """Why a NIC of this kind cannot be attached on this host, or None if it can."""
    kind = connection_type.lower()
    if kind in NAT_CONNECTIONS:
        from boite.machine.netback.passt import find_passt

        if find_passt() is None:
            return "nat needs passt: ./dev setup builds it (or apt-get install passt)"
        return None
    if kind in TAP_CONNECTIONS:
        if not os.path.exists("/dev/net/tun"):
            return f"{kind} needs a TAP device, and /dev/net/tun is missing"
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            return f"{kind} needs a TAP device, and /dev/net/tun is not accessible"
        if os.geteuid() != 0 and not _has_net_admin() and not _persistent_tap_ours(tap_name):
            return (
                f"{kind} needs CAP_NET_ADMIN or a persistent TAP owned by you "
                f"(ip tuntap add {tap_name or 'NAME'} mode tap user $USER, then "
                'ethernetN.vnet = "NAME"); use connectionType = "nat" without privileges'
            )
        return None
    return f"connectionType {connection_type!r} is not one boite knows"


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return False


def _persistent_tap_ours(name: str) -> bool:
    if not name:
        return False
    try:
        with open(f"/sys/class/net/{name}/owner") as f:
            return int(f.read().strip()) == os.geteuid()
    except (OSError, ValueError):
        return False
