"""The tools protocol against the real agent (guest/tools/boite-tools.c) on a socketpair:
commands, streams, exit statuses, PTYs, file copies both ways, a huge output, an agent
that stops answering, and hostile frames."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent import AgentOnHost, build_agent  # noqa: E402 - beside this file

from boite.errors import ToolsError
from boite.tools import host as tools_host
from boite.tools.protocol import MAX_PAYLOAD, FrameReader, MsgType, encode


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory):
    return build_agent(tmp_path_factory.mktemp("agent"))


@pytest.fixture
def agent(agent_binary, tmp_path):
    a = AgentOnHost(agent_binary, tmp_path, "-p", f"touch {tmp_path}/powered-off")
    yield a
    a.close()


def run(agent, argv, **kw):
    out, err = bytearray(), bytearray()
    with agent.client() as c:
        status = c.exec(argv, stdout=out.extend, stderr=err.extend, **kw)
    return status, bytes(out), bytes(err)


def test_exec_streams_stdout_and_stderr_and_returns_the_status(agent):
    status, out, err = run(agent, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (status, out, err) == (7, b"out\n", b"err\n")


def test_exec_passes_stdin_env_and_cwd(agent, tmp_path):
    data = bytes(range(256)) * 1000
    status, out, _ = run(agent, ["cat"], stdin=data)
    assert status == 0 and out == data
    status, out, _ = run(agent, ["sh", "-c", "echo $GREETING; pwd"], env={"GREETING": "hi"},
                         cwd=str(tmp_path))  # fmt: skip
    assert out == f"hi\n{tmp_path}\n".encode()


def test_a_signal_is_128_plus_its_number(agent):
    assert run(agent, ["sh", "-c", "kill -9 $$"])[0] == 128 + 9


def test_a_missing_command_is_a_clear_error(agent):
    with pytest.raises(ToolsError, match="no-such-command: No such file"):
        run(agent, ["no-such-command"])


def test_a_huge_output_arrives_whole(agent):
    status, out, _ = run(agent, ["seq", "1", "2000000"])
    assert status == 0
    assert (
        hashlib.sha256(out).hexdigest()
        == hashlib.sha256("".join(f"{i}\n" for i in range(1, 2000001)).encode()).hexdigest()
    )


def test_binary_copy_both_ways_checked_by_hash(agent, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 << 20) + b"\0" * 12345)
    src.chmod(0o640)
    remote = tmp_path / "in-guest" / "blob.bin"
    remote.parent.mkdir()
    back = tmp_path / "back.bin"
    with agent.client() as c:
        assert c.put(src, str(remote)) == src.stat().st_size
        assert c.get(str(remote), back) == src.stat().st_size
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert remote.stat().st_mode & 0o777 == 0o640
    assert not list(remote.parent.glob("*.boite-tools.*")), "no temporary file is left"


def test_copy_errors_name_the_path(agent, tmp_path):
    with agent.client() as c:
        with pytest.raises(ToolsError, match="/no/such/dir/x: No such file"):
            c.put(__file__, "/no/such/dir/x")
        with pytest.raises(ToolsError, match="/no/such/file: No such file"):
            c.get("/no/such/file", tmp_path / "x")
        with pytest.raises(ToolsError, match="is a directory"):
            c.get("/", tmp_path / "x")
        assert c.exec(["true"]) == 0  # the client is still usable


def test_several_clients_at_once(agent):
    with agent.client() as a, agent.client() as b:
        out_a, out_b = bytearray(), bytearray()
        import threading

        t = threading.Thread(
            target=lambda: a.exec(["sh", "-c", "sleep 0.3; echo a"], stdout=out_a.extend)
        )
        t.start()
        assert b.exec(["echo", "b"], stdout=out_b.extend) == 0
        t.join()
        assert (bytes(out_a), bytes(out_b)) == (b"a\n", b"b\n")


def test_pty_with_a_size_and_a_resize(agent):
    out = bytearray()
    with agent.client() as c:

        def started(stream):
            c.resize(stream, 33, 101)
            c.send_input(stream, b"stty size; tty; exit 5\n")

        status = c.exec(["sh"], pty=True, size=(24, 80), stdout=out.extend, on_started=started)
    assert status == 5
    assert b"33 101" in out and b"/dev/pts/" in out


def test_info_names_the_addresses(agent):
    with agent.client() as c:
        info = c.info()
    assert info["hostname"] == socket.gethostname()
    assert {"interface": "lo", "address": "127.0.0.1/8"} in info["ips"]


def test_power_off_through_the_tools(agent, tmp_path):
    assert agent.host.power()
    deadline = time.monotonic() + 10
    while not (tmp_path / "powered-off").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_agent_that_stops_answering(agent_binary, tmp_path, monkeypatch):
    monkeypatch.setattr(tools_host, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(tools_host, "DEAD_AFTER_S", 0.5)
    agent = AgentOnHost(agent_binary, tmp_path)
    try:
        with agent.client() as c:
            out = bytearray()

            def stop_it(stream):
                os.kill(agent.proc.pid, signal.SIGSTOP)

            with pytest.raises(ToolsError, match="stopped answering"):
                c.exec(["sleep", "30"], stdout=out.extend, on_started=stop_it)
            assert not agent.host.status()["running"]
            with pytest.raises(ToolsError, match="stopped answering"):
                c.exec(["true"])
            os.kill(agent.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while not agent.host.running:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.exec(["true"]) == 0
        assert any("stopped answering" in line for line in agent.log)
    finally:
        agent.close()


def test_a_restored_machine_has_its_agent_say_hello_again(agent, monkeypatch):
    """A machine rebuilt from a memory snapshot: the guest's port is open and its agent
    said hello long before; the host asks again, and sets the clock on the answer."""
    monkeypatch.setattr(tools_host, "HEARTBEAT_S", 0.1)
    clock_set = []
    monkeypatch.setattr(agent.host, "set_time", lambda: clock_set.append(time.monotonic()))
    agent.host.connect(agent.port)  # what a rebuilt machine's port does
    agent.host.opened(True)  # and the restored port state: open
    assert not agent.host.running
    deadline = time.monotonic() + 10
    while not (agent.host.running and clock_set):
        assert time.monotonic() < deadline, agent.log
        time.sleep(0.05)
    assert run(agent, ["true"])[0] == 0


def test_the_relay_refuses_an_oversized_frame(agent):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(agent.socket_path))
    sock.sendall(struct.pack("<IHHI", MAX_PAYLOAD + 1, MsgType.EXEC, 0, 1))
    reader = FrameReader()
    frames = []
    while not frames:
        data = sock.recv(4096)
        assert data, "the relay closed without saying why"
        frames = list(reader.feed(data))
    assert frames[0].type == MsgType.ERROR and b"at most" in frames[0].payload
    sock.close()
    assert run(agent, ["true"])[0] == 0  # others are not affected


def test_a_client_that_goes_away_abandons_its_command(agent, tmp_path):
    marker = tmp_path / "still-running"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(agent.socket_path))
    from boite.tools.protocol import exec_payload

    sock.sendall(encode(MsgType.EXEC, 1, exec_payload(["sh", "-c", f"sleep 1; touch {marker}"])))
    assert sock.recv(4096)  # STARTED
    sock.close()
    time.sleep(1.5)
    assert not marker.exists()


def test_the_agent_leaves_on_a_malformed_frame(agent_binary):
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([str(agent_binary), "-1", "-f", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)  # fmt: skip
    theirs.close()
    ours.sendall(struct.pack("<IHHI", 1 << 30, MsgType.EXEC, 0, 1))
    assert proc.wait(timeout=10) == 1
    assert b"frame too long" in proc.stderr.read()
    ours.close()
