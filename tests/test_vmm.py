"""The VMM's run loop, lifecycle and control socket, driving real KVM guests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from boite.accel.kvm import KvmAccelerator
from boite.errors import AccelError, BoxError, GuestError
from boite.vmm import (
    ControlServer,
    Vmm,
    accelerator_for,
    control_request,
    kvm_is_software_nested,
)
from conftest import requires_kvm
from guests.runner import build_guest_machine

pytestmark = requires_kvm


def guest(name: str, mode: str = "flat32", **kw):
    outputs: list[bytes] = []

    def build():
        machine, com1, _ = build_guest_machine(name, mode, **kw)
        outputs.append(com1.output)  # the live buffer; read after the run
        return machine

    return build, outputs


def test_run_returns_the_debug_exit_status_and_logs():
    build, outputs = guest("prot32")
    lines: list[str] = []
    vmm = Vmm(build, lambda: KvmAccelerator(irqchip=False), log=lines.append, name="t")
    assert vmm.run() == (0x21 << 1) | 1
    assert bytes(outputs[0]) == b"protected mode: sum 1..1000 = 500500\n"
    assert vmm.status()["state"] == "stopped"
    assert any("Powering on t" in line for line in lines)
    assert any("exit status 67" in line for line in lines)
    with pytest.raises(BoxError, match="already run"):
        vmm.run()


def test_triple_fault_raises_guest_error_with_registers():
    build, _ = guest("triple32")
    vmm = Vmm(build, lambda: KvmAccelerator(irqchip=False), name="tf")
    with pytest.raises(GuestError) as info:
        vmm.run()
    assert "triple fault" in str(info.value) and "rip=" in str(info.value)


def test_accelerator_choice():
    assert accelerator_for("kvm").name == "kvm"
    # auto: KVM where it can boot an OS; this project's kvm_pvm hosts cannot, so emulate.

    assert accelerator_for("auto").name == ("emu" if kvm_is_software_nested() else "kvm")
    assert accelerator_for("hardware").name == "kvm"
    with pytest.raises(AccelError, match="expected kvm, emu or auto"):
        accelerator_for("qemu")


def _run_in_thread(vmm: Vmm):
    box: dict = {}

    def target():
        try:
            box["status"] = vmm.run()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    deadline = time.time() + 10
    while vmm.state.value == "created" and time.time() < deadline:
        time.sleep(0.01)
    return t, box


def _wait_state(path: Path, state: str) -> dict:
    deadline = time.time() + 10
    while time.time() < deadline:
        status = control_request(path, {"cmd": "status"})["status"]
        if status["state"] == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"never reached {state}: {status}")


def test_control_socket_status_pause_resume_stop(tmp_path):
    build, _ = guest("spin32")
    lines: list[str] = []
    vmm = Vmm(build, KvmAccelerator, log=lines.append, name="spinner")
    # A long directory name: the socket path is over the 107-byte sun_path limit.
    box_dir = tmp_path / ("d" * 90)
    box_dir.mkdir()
    path = box_dir / "spinner.ctl"
    server = ControlServer(vmm, path)
    server.start()
    try:
        t, result = _run_in_thread(vmm)
        status = _wait_state(path, "running")
        assert status["accelerator"] == "kvm" and status["vcpus"] == 1
        control_request(path, {"cmd": "pause"})
        _wait_state(path, "paused")
        with pytest.raises(BoxError, match="not running"):
            control_request(path, {"cmd": "pause"})
        control_request(path, {"cmd": "resume"})
        _wait_state(path, "running")
        with pytest.raises(BoxError, match="unknown command"):
            control_request(path, {"cmd": "fly"})
        control_request(path, {"cmd": "stop", "mode": "hard"})
        t.join(10)
        assert not t.is_alive()
        assert result == {"status": 0}
    finally:
        server.close()
    assert not path.exists()
    assert "Paused." in lines and "Resumed." in lines
    assert any("hard stop" in line for line in lines)


def test_soft_stop_without_a_keyboard_falls_back_to_hard(tmp_path):
    build, _ = guest("spin32")
    lines: list[str] = []
    vmm = Vmm(build, KvmAccelerator, log=lines.append)
    t, result = _run_in_thread(vmm)
    deadline = time.monotonic() + 10
    while vmm.state.value != "running" and time.monotonic() < deadline:
        time.sleep(0.005)
    done = vmm.stop(soft=True)
    t.join(10)
    assert result == {"status": 0}
    assert done["how"] == "hard" and vmm.stop_outcome["how"] == "hard"
    # Truthful: neither an ACPI button nor a keyboard to ask through, so a hard stop.
    assert any("no way to ask this guest" in line for line in lines)


def test_control_socket_of_a_box_that_is_not_running(tmp_path):
    with pytest.raises(BoxError, match="is the box running"):
        control_request(tmp_path / "nobox.ctl", {"cmd": "status"})


def test_guest_reset_rebuilds_the_machine():
    """0xcf9 resets: each one powers a fresh machine and accelerator on, and the guest
    boots again from its kernel."""
    from boite.machine.builder import build_machine
    from guests.build import assemble
    from guests.runner import CollectedOutput

    console = CollectedOutput()
    kernel = str(assemble("mb_reset"))
    lines: list[str] = []
    vmm = Vmm(
        lambda: build_machine(16, 1, {1: console}, kernel, emulated_irqchip=False),
        KvmAccelerator, log=lines.append,
    )  # fmt: skip
    t, result = _run_in_thread(vmm)
    deadline = time.time() + 20
    while vmm.resets < 3 and time.time() < deadline:
        time.sleep(0.02)
    vmm.stop()
    t.join(10)
    assert result == {"status": 0}
    assert vmm.resets >= 3
    assert bytes(console.output).count(b"boot\n") >= 3
    assert sum("Guest reset" in line for line in lines) == vmm.resets
