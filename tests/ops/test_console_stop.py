"""Issue 14 items 5, 9, 11 and issue 13: console viewers, stopping, one logging path.

Console output reaches every `boite console` at once, each through its own bounded
buffer: a viewer that stops reading loses output, never stalls the guest, and a hard stop
always works. A soft stop asks the guest through the first way it has (guest tools, ACPI
power button, Ctrl-Alt-Del), counts down, and says truthfully how the box stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from opstools import boite, make_box, start_detached, stop_hard, wait_for

from boite.errors import BoxError, DiskError
from boite.vmm import SoftStopMethod, Vmm, control_request
from conftest import kvm_available
from guests.runner import build_guest_machine


def _console(box_dir) -> socket.socket:
    from boite.vmm import connect_control

    sock = connect_control(box_dir / f"{box_dir.name}.ctl", timeout=30)
    sock.sendall(b'{"cmd": "console"}\n')
    reply = b""
    while not reply.endswith(b"\n"):
        reply += sock.recv(1)
    assert json.loads(reply)["ok"]
    return sock


def _read(sock: socket.socket, at_least: int) -> int:
    got = 0
    while got < at_least:
        chunk = sock.recv(65536)
        assert chunk, f"console closed after {got} bytes"
        got += len(chunk)
    return got


def test_a_stalled_console_viewer_never_stalls_the_guest_or_a_hard_stop(tmp_path):
    """Before: one viewer that stopped reading froze the guest, the other viewers and
    `boite stop BOX hard` ("still holds its lock"); a second viewer stole the output."""
    box_dir = make_box(tmp_path, "chat", "mb_chatter", disk_size=None)
    try:
        # A 4 KiB buffer per viewer: a guest printing ~12 KB/s (KVM exits per byte on a
        # nested host) overflows it in seconds.
        start_detached(box_dir, env={"BOITE_CONSOLE_CLIENT_BUFFER": "4096"})
        stalled = _console(box_dir)  # never reads
        reader = _console(box_dir)
        # Far more than the stalled viewer's socket (32 KiB) and buffer (4 KiB) hold.
        assert _read(reader, 160 << 10) >= 160 << 10
        # A third viewer gets output too; detaching it leaves the others and the box.
        third = _console(box_dir)
        seen = b""
        while b"chatter" not in seen:
            seen += third.recv(65536)
        third.close()
        assert _read(reader, 16 << 10)
        status = control_request(box_dir / "chat.ctl", {"cmd": "status"})["status"]
        assert status["state"] == "running"
        stop = boite("stop", box_dir, "hard", timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "stopped (hard)" in stop.stdout
        stalled.close()
        reader.close()
    finally:
        stop_hard(box_dir)


def test_console_backend_fans_out_and_drops_per_viewer():
    """The backend alone: every viewer gets every byte; one whose writer blocks loses
    output once its buffer is full and is told how much when it catches up."""
    from boite.machine.devices import ConsoleBackend

    console = ConsoleBackend(client_buffer=1000)
    console.write(b"before anyone ")
    fast: list[bytes] = []
    gate = threading.Event()
    slow: list[bytes] = []

    def slow_writer(data: bytes) -> None:
        gate.wait(10)
        slow.append(data)

    a = console.attach(fast.append)
    b = console.attach(slow_writer)
    for _ in range(100):
        console.write(b"x" * 100)  # never blocks, whatever the slow viewer does
        a.flush()  # the fast viewer keeps up
    assert b"".join(fast) == b"before anyone " + b"x" * 10000
    gate.set()
    b.flush()
    assert b.dropped > 0
    console.write(b"end")
    a.flush()
    b.flush()
    assert b"bytes of console output dropped]" in b"".join(slow)
    assert b"".join(slow).endswith(b"end")
    console.detach(a)
    console.write(b"only b")
    b.flush()
    assert b"".join(fast).endswith(b"end") and b"".join(slow).endswith(b"only b")


@pytest.mark.parametrize("value", ["nan", "-1", "1e300", "inf", "soon"])
def test_stop_timeout_must_be_seconds_from_0_to_a_day(tmp_path, value):
    """Before: 1e300 and NaN never escalated to a hard stop."""
    proc = boite("stop", tmp_path, "soft", "--timeout", value)
    assert proc.returncode == 2 and "--timeout" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_control_socket_refuses_a_grace_period_that_is_not_seconds(tmp_path):
    box_dir = make_box(tmp_path, "spin", "mb_spin", disk_size=None)
    try:
        start_detached(box_dir)
        ctl = box_dir / "spin.ctl"
        for bad in (float("nan"), -1, 1e300, True, "30"):
            with pytest.raises(BoxError, match="stop timeout"):
                control_request(ctl, {"cmd": "stop", "mode": "soft", "grace_s": bad})
        assert control_request(ctl, {"cmd": "status"})["status"]["state"] == "running"
    finally:
        stop_hard(box_dir)


def test_soft_stop_of_a_paused_box_resumes_it_and_the_guest_powers_off(tmp_path):
    """Before: a paused guest could not hear Ctrl-Alt-Del; the plug was pulled after the
    timeout and the CLI said "stopped (soft)"."""
    box_dir = make_box(tmp_path, "cad", "mb_cad", disk_size=None)
    start_detached(box_dir)
    control_request(box_dir / "cad.ctl", {"cmd": "pause"})
    stop = boite("stop", box_dir, "soft", "--timeout", "60", "--json")
    assert stop.returncode == 0, stop.stderr
    done = json.loads(stop.stdout)
    assert done["how"] == "soft" and done["method"] == "keyboard", done
    log = (box_dir / "vmware.log").read_text()
    assert "Soft stop of a paused box: resuming it" in log
    assert "Guest powered off, exit status 0." in log
    assert "Powered off (hard stop)." not in log


def test_soft_stop_says_truthfully_that_it_ended_hard_and_counts_down(tmp_path):
    """Before: "stopped (soft)" after pulling the plug. The guest ignores Ctrl-Alt-Del."""
    box_dir = make_box(tmp_path, "spin", "mb_spin", disk_size=None)
    start_detached(box_dir)
    stop = boite("stop", box_dir, "soft", "--timeout", "6")
    assert stop.returncode == 0, stop.stderr
    assert "stopped (hard: the guest did not power off in time" in stop.stdout
    assert "Ctrl-Alt-Del on the keyboard" in stop.stdout
    # Not a terminal: a countdown line every 5 s at most.
    counted = [line for line in stop.stderr.splitlines() if "hard stop in" in line]
    assert counted and "asked the guest to power off (keyboard)" in counted[0], stop.stderr
    log = (box_dir / "vmware.log").read_text()
    assert "did not power off in time" in log and "Powered off (hard stop)." in log


def _spin_vmm(lines: list[str]) -> tuple[Vmm, threading.Thread, dict]:
    def build():
        machine, _, _ = build_guest_machine("spin32", "flat32")
        return machine

    if kvm_available():
        from boite.accel.kvm import KvmAccelerator

        factory = lambda: KvmAccelerator(irqchip=False)  # noqa: E731
    else:
        from boite.accel.emu import EmuAccelerator as factory
    vmm = Vmm(build, factory, log=lines.append, name="order")
    out: dict = {}

    def run() -> None:
        try:
            out["status"] = vmm.run()
        except BaseException as exc:  # noqa: BLE001 - the test looks
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert wait_for(lambda: vmm.state.value == "running")
    return vmm, t, out


def test_soft_stop_tries_its_methods_in_order():
    """VMware's order: the guest tools first (the tools part fills that slot), then the
    ACPI power button, then the keyboard; the first that reaches the guest is used, and
    how it ended is recorded."""
    lines: list[str] = []
    vmm, t, out = _spin_vmm(lines)
    asked: list[str] = []

    def tools_not_running(v) -> bool:
        asked.append("tools?")
        return False

    def acpi(v) -> bool:
        asked.append("acpi")
        return True

    assert [m.name for m in vmm.soft_stop_methods] == ["tools", "acpi", "keyboard"]
    vmm.add_soft_stop_method(SoftStopMethod("tools", "the guest tools", tools_not_running))
    vmm.add_soft_stop_method(SoftStopMethod("acpi", "the ACPI power button", acpi))
    vmm.add_soft_stop_method(
        SoftStopMethod("tools", "the guest tools", tools_not_running), first=True
    )
    assert [m.name for m in vmm.soft_stop_methods] == ["tools", "keyboard", "acpi"]
    done = vmm.stop(soft=True, grace_s=0.2)
    t.join(30)
    # spin32 has no keyboard controller: tools unavailable, keyboard absent, ACPI pressed.
    assert asked == ["tools?", "acpi"] and done == {"how": "soft", "method": "acpi", "grace_s": 0.2}
    assert vmm.stop_outcome["how"] == "hard" and vmm.stop_outcome["method"] == "acpi"
    assert any("through the ACPI power button; hard stop in 0.2 s" in line for line in lines)
    assert any("did not power off in time" in line for line in lines)
    assert out == {"status": 0}


class _FailingFlush:
    """A device whose data cannot reach the disk at power-off (a full file system)."""

    def save_state(self):
        return {}

    def reset(self):
        pass

    def close(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_failed_flush_at_power_off_is_reported(tmp_path):
    """Before: swallowed by `suppress(Exception)`, exit status 0."""
    lines: list[str] = []

    def build():
        machine, _, _ = build_guest_machine("spin32", "flat32")
        machine.add_device("disk", _FailingFlush())
        return machine

    if kvm_available():
        from boite.accel.kvm import KvmAccelerator

        factory = lambda: KvmAccelerator(irqchip=False)  # noqa: E731
    else:
        from boite.accel.emu import EmuAccelerator as factory
    vmm = Vmm(build, factory, log=lines.append, name="full")
    timer = threading.Timer(0.5, vmm.stop)
    timer.start()
    with pytest.raises(DiskError, match="No space left on device"):
        vmm.run()
    assert any("Power-off: closing disk (flushing its data)" in line for line in lines)
    assert vmm.stopped.is_set()


def test_one_logging_path_into_vmware_log_and_verbose(tmp_path):
    """Device warnings (Python logging) and VMM events land in the same vmware.log, in
    VMware's format; `-v` shows them on stderr too."""
    from boite.box.log import VmwareLog
    from boite.events import to_box_log

    log = VmwareLog.open(tmp_path)
    with to_box_log(log):
        logging.getLogger("boite.ata").warning("ide0:0: a warning from a device")
        logging.getLogger("boite.vmm").info("an event of the VMM")
    logging.getLogger("boite.ata").warning("after the box: nowhere")
    log.close()
    text = (tmp_path / "vmware.log").read_text()
    assert " Wa(03) ata ide0:0: a warning from a device" in text
    assert " In(05) vmx an event of the VMM" in text
    assert "nowhere" not in text

    box_dir = make_box(tmp_path, "verbose", "mb_poweroff", disk_size=None)
    proc = boite("-v", "start", box_dir)
    assert proc.returncode == 0, proc.stderr
    assert "boite: Powering on verbose" in proc.stderr
    logged = (box_dir / "vmware.log").read_text()
    assert "Powering on verbose" in logged and "Guest powered off, exit status 0." in logged


def test_ctrl_bracket_in_a_foreground_start_detaches_and_the_box_keeps_running(tmp_path):
    """Before: Ctrl-] soft-stopped the box (and that pulled the plug 30 s later)."""
    import pty

    box_dir = make_box(tmp_path, "fg", "mb_spin", disk_size=None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "start", str(box_dir)],
        stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    try:
        seen = b""
        while b"spinning" not in seen:
            chunk = os.read(master, 1024)
            assert chunk, seen
            seen += chunk
        os.write(master, b"\x1d")
        assert proc.wait(30) == 0
        while b"detached" not in seen:
            chunk = os.read(master, 1024)
            assert chunk, seen
            seen += chunk
        assert wait_for(lambda: (box_dir / "fg.ctl").exists())
        status = control_request(box_dir / "fg.ctl", {"cmd": "status"})["status"]
        assert status["state"] == "running"
        time.sleep(0.2)
        assert control_request(box_dir / "fg.ctl", {"cmd": "status"})["status"]["state"] == (
            "running"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        stop_hard(box_dir)
    assert "Powered off (hard stop)." in (box_dir / "vmware.log").read_text()
