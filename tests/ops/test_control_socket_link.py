"""The CLI talks only to a control socket file made by this user, never through a link a
shipped box could hold (NAME.ctl -> another service's socket)."""

from __future__ import annotations

import socket

import pytest

from boite.errors import BoxError
from boite.vmm import control_request


def test_a_control_socket_that_is_a_link_is_refused(tmp_path) -> None:
    other = tmp_path / "other.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(other))
    server.listen(1)
    try:
        link = tmp_path / "box.ctl"
        link.symlink_to(other)
        with pytest.raises(BoxError, match="symbolic link"):
            control_request(link, {"op": "status"})
        regular = tmp_path / "file.ctl"
        regular.write_text("")
        with pytest.raises(BoxError, match="not a socket"):
            control_request(regular, {"op": "status"})
        with pytest.raises(BoxError, match="no control socket"):
            control_request(tmp_path / "missing.ctl", {"op": "status"})
    finally:
        server.close()
