"""`boite boot`, `start`, `stop`, `console` as a person or CI runs them: real processes,
real KVM, multiboot guests from tests/guests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import requires_kvm, requires_real_vtx
from guests.build import assemble

pytestmark = [requires_kvm]
pytest.importorskip("boite.machine.builder", reason="needs the machine builder (branch machine)")


def boite(*args: str, stdin=subprocess.DEVNULL, input: bytes | None = None, timeout=120, **kw):
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        stdin=None if input is not None else stdin,
        input=input,
        capture_output=True,
        timeout=timeout,
        **kw,
    )


def test_boot_with_stdin_from_devnull_returns_the_debug_exit_status():
    proc = boite("boot", assemble("mb_echo"), "--accel", "kvm", "--memsize", "16")
    assert proc.returncode == (0x2B << 1) | 1, proc.stderr
    assert proc.stdout == b"multiboot: hello\nmultiboot: bye\n"


@pytest.mark.parametrize("accel", ["emu", "auto"])
def test_boot_under_the_other_accelerator_choices(accel):
    if accel == "emu":
        pytest.importorskip("boite.accel.emu", reason="needs the emulator (branch emu)")
    proc = boite("boot", assemble("mb_echo"), "--accel", accel, "--memsize", "16", input=b"x\n")
    assert proc.returncode == (0x2B << 1) | 1, proc.stderr
    assert proc.stdout == b"multiboot: hello\nx\nmultiboot: bye\n"


def test_paging_guest_under_the_emulator():
    """Where kvm_pvm cannot go (the guest turning on paging), the emulator runs it."""
    pytest.importorskip("boite.accel.emu", reason="needs the emulator (branch emu)")
    proc = boite("boot", assemble("paging32"), "--accel", "emu", "--memsize", "16")
    assert proc.returncode == (0x26 << 1) | 1, proc.stderr
    assert proc.stdout == b"paging: alias ok\n"


@requires_real_vtx
@pytest.mark.parametrize(
    "guest, status, line",
    [("pit32", 0x25, b"pit: 10 ticks\n"), ("paging32", 0x26, b"paging: alias ok\n")],
)
def test_interrupt_and_paging_guests_boot_under_kvm(guest, status, line):
    proc = boite("boot", assemble(guest), "--accel", "kvm", "--memsize", "16")
    assert proc.returncode == (status << 1) | 1, proc.stderr
    assert proc.stdout == line


def test_boot_with_stdin_closed():
    proc = boite(
        "boot", assemble("mb_echo"), "--accel", "kvm", "--memsize", "16",
        stdin=None, preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert proc.returncode == (0x2B << 1) | 1, proc.stderr
    assert b"multiboot: bye" in proc.stdout


def test_boot_passes_piped_stdin_to_com1():
    proc = boite("boot", assemble("mb_echo"), "--memsize", "16", input=b"typed line\n")
    assert proc.returncode == (0x2B << 1) | 1, proc.stderr
    assert proc.stdout == b"multiboot: hello\ntyped line\nmultiboot: bye\n"


def test_clean_power_off_is_status_0():
    proc = boite("boot", assemble("mb_poweroff"), "--accel", "kvm", "--memsize", "16")
    assert proc.returncode == 0, proc.stderr


def test_halt_with_interrupts_off_is_a_power_off():
    proc = boite("boot", assemble("mb_halt"), "--accel", "kvm", "--memsize", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"."


def test_emulation_failure_is_a_guest_error_with_registers():
    proc = boite("boot", assemble("mb_fetchfail"), "--accel", "kvm", "--memsize", "16")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "boite: error:" in err and "emulation failure" in err
    assert "rip=00000000d0000000" in err and "cr0=" in err
    assert "Traceback" not in err


def test_boot_errors_are_clear(tmp_path):
    proc = boite("boot", tmp_path / "nope", "--accel", "kvm")
    assert proc.returncode == 1 and b"no such file" in proc.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 4096)
    proc = boite("boot", junk, "--accel", "kvm", "--memsize", "16")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert b"junk.bin" in proc.stderr


def _make_box(tmp_path, name: str, guest: str):
    from boite.box.box import Box

    box = Box.create(tmp_path / name, memsize_mb=16, disk_size=None)
    box.vmx["boite.kernel"] = str(assemble(guest))
    box.save()
    return box


@pytest.fixture
def spin_box(tmp_path):
    box = _make_box(tmp_path, "spinbox", "mb_spin")
    yield box.dir
    # never leave a VMM behind, whatever the test did
    subprocess.run(
        [sys.executable, "-m", "boite", "stop", str(box.dir), "hard"], capture_output=True
    )


def _wait_for(predicate, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_start_detached_console_and_stop(spin_box):
    proc = boite("start", spin_box, "--detach", "--accel", "kvm")
    assert proc.returncode == 0, proc.stderr
    assert b"started" in proc.stdout
    ctl = spin_box / "spinbox.ctl"
    assert ctl.exists()

    again = boite("start", spin_box, "--accel", "kvm")
    assert again.returncode == 1 and b"already running" in again.stderr

    listed = boite("list")
    assert listed.returncode == 0 and b"spinbox" in listed.stdout

    # console with stdin at EOF: shows the buffered output, then follows until the VM goes
    console = subprocess.Popen(
        [sys.executable, "-m", "boite", "console", str(spin_box)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    log = spin_box / "vmware.log"
    assert _wait_for(lambda: "Console attached." in log.read_text())
    stop = boite("stop", spin_box, "hard")
    assert stop.returncode == 0, stop.stderr
    out, err = console.communicate(timeout=30)
    assert b"spinning\n" in out
    assert b"stopped" in err
    assert not ctl.exists()
    text = log.read_text()
    for line in ("Powering on spinbox", "Stop (hard) requested", "Power off complete"):
        assert line in text, text
    assert " In(05) vmx " in text  # VMware's log line format, from the box API


def test_soft_stop_falls_back_to_hard_after_the_grace_period(spin_box):
    assert boite("start", spin_box, "--detach", "--accel", "kvm").returncode == 0
    stop = boite("stop", spin_box, "soft", "--timeout", "0.5")
    assert stop.returncode == 0, stop.stderr
    text = (spin_box / "vmware.log").read_text()
    assert "through Ctrl-Alt-Del on the keyboard; hard stop in 0.5 s" in text
    assert "did not power off in time" in text and "Powered off (hard stop)." in text


def test_stop_and_console_of_a_box_that_is_not_running(spin_box):
    proc = boite("stop", spin_box)
    assert proc.returncode == 1 and b"not running" in proc.stderr
    proc = boite("console", spin_box)
    assert proc.returncode == 1 and b"is the box running" in proc.stderr


def test_check_says_a_box_without_kernel_or_boot_medium_cannot_boot(tmp_path):
    from boite.box.box import Box

    box = Box.create(tmp_path / "nokernel", memsize_mb=16, disk_size=None)
    proc = boite("check", box.dir)
    assert proc.returncode == 1 and b"nothing the BIOS can boot" in proc.stdout


def _state(ctl) -> str | None:
    from boite.vmm import control_request

    try:
        return control_request(ctl, {"cmd": "status"})["status"]["state"]
    except Exception:  # noqa: BLE001 - not up yet
        return None


def test_foreground_start_and_a_soft_stop_the_guest_honours(tmp_path):
    """`boite start` in the foreground (console on stdio); `boite stop BOX soft` from
    another process presses Ctrl-Alt-Del; the guest powers off by itself, status 0."""
    box = _make_box(tmp_path, "cadbox", "mb_cad")
    vmm = subprocess.Popen(
        [sys.executable, "-m", "boite", "start", str(box.dir), "--accel", "kvm"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert _wait_for(lambda: (box.dir / "cadbox.ctl").exists())
        # The control socket is up before the guest runs, and a soft stop before then is
        # a hard one (no guest to ask): a loaded host got there first.
        assert _wait_for(lambda: _state(box.dir / "cadbox.ctl") == "running")
        stop = boite("stop", box.dir, "soft", "--timeout", "60")
        assert stop.returncode == 0, stop.stderr
        out, err = vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert vmm.returncode == 0, err
    assert out == b"waiting for ctrl-alt-del\nctrl-alt-del: powering off\n"
    text = (box.dir / "vmware.log").read_text()
    assert "Guest powered off, exit status 0." in text
    assert "Powered off (hard stop)." not in text


def test_snapshot_and_suspend_through_the_control_socket(tmp_path):
    """The control socket hands snapshot/suspend to the snapshot part; a suspended box
    resumes from its state at the next start."""
    pytest.importorskip("boite.snapshot", reason="needs the snapshot part")
    from boite.vmm import control_request

    box = _make_box(tmp_path, "snapbox", "mb_spin")
    ctl = box.dir / "snapbox.ctl"
    try:
        assert boite("start", box.dir, "--detach", "--accel", "kvm").returncode == 0
        reply = control_request(ctl, {"cmd": "snapshot", "name": "first", "memory": True})
        assert reply["ok"] and reply["name"] == "first"
        assert control_request(ctl, {"cmd": "status"})["status"]["state"] == "running"
        assert list(box.dir.glob("*.vmsn")), sorted(p.name for p in box.dir.iterdir())
        assert control_request(ctl, {"cmd": "suspend"})["ok"]
        assert _wait_for(lambda: not ctl.exists())
        assert list(box.dir.glob("*.vmss"))
        assert boite("start", box.dir, "--detach", "--accel", "kvm").returncode == 0
        assert _wait_for(lambda: "Resuming from" in (box.dir / "vmware.log").read_text())
        assert control_request(ctl, {"cmd": "status"})["status"]["state"] == "running"
        assert not list(box.dir.glob("*.vmss"))  # a suspend state is used up
    finally:
        boite("stop", box.dir, "hard")


@pytest.mark.parametrize("sig, status", [(2, 130), (15, 0)], ids=["SIGINT", "SIGTERM"])
def test_boot_stops_on_ctrl_c_and_sigterm(sig, status):
    """A guest that never exits: Ctrl-C interrupts (status 130), SIGTERM is a hard stop."""
    # A shell that starts a job in the background ignores SIGINT for it, and an ignored
    # signal is inherited: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "boot", str(assemble("mb_spin")), "--accel", "kvm",
         "--memsize", "16"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"spinning\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert b"Traceback" not in err


def test_console_types_into_the_guest_and_ctrl_bracket_detaches(tmp_path):
    box = _make_box(tmp_path, "echobox", "mb_echoloop")
    try:
        assert boite("start", box.dir, "--detach", "--accel", "kvm").returncode == 0
        console = subprocess.Popen(
            [sys.executable, "-m", "boite", "console", str(box.dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert console.stdin is not None and console.stdout is not None
        assert console.stdout.readline() == b"echo ready\n"  # replayed from the buffer
        console.stdin.write(b"typed through the socket\n")
        console.stdin.flush()
        assert console.stdout.readline() == b"typed through the socket\n"
        console.stdin.write(b"\x1d")  # Ctrl-]
        console.stdin.flush()
        _, err = console.communicate(timeout=30)
        assert console.returncode == 0 and b"detached" in err
        # the box keeps running after a detach
        from boite.vmm import control_request

        status = control_request(box.dir / "echobox.ctl", {"cmd": "status"})["status"]
        assert status["state"] == "running"
    finally:
        boite("stop", box.dir, "hard")


def test_two_consoles_at_once_and_one_detaching_leaves_the_other(tmp_path):
    """`boite console` serves several clients: both see the guest's output and what
    either types; Ctrl-] in one leaves the other and the box running."""
    box = _make_box(tmp_path, "twobox", "mb_echoloop")

    def console():
        return subprocess.Popen(
            [sys.executable, "-m", "boite", "console", str(box.dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def say(c, line: bytes) -> None:
        c.stdin.write(line)
        c.stdin.flush()

    try:
        assert boite("start", box.dir, "--detach", "--accel", "kvm").returncode == 0
        a = console()
        assert a.stdout.readline() == b"echo ready\n"  # replayed from the buffer
        b = console()  # sees what comes from now on
        log = box.dir / "vmware.log"
        assert _wait_for(lambda: log.read_text().count("Console attached.") == 2)
        say(a, b"typed in a\n")
        assert a.stdout.readline() == b"typed in a\n"
        assert b.stdout.readline() == b"typed in a\n"
        say(b, b"typed in b\n")
        assert a.stdout.readline() == b"typed in b\n"
        assert b.stdout.readline() == b"typed in b\n"
        say(a, b"\x1d")  # Ctrl-] detaches a alone
        _, err = a.communicate(timeout=30)
        assert a.returncode == 0 and b"detached" in err
        say(b, b"b still here\n")
        assert b.stdout.readline() == b"b still here\n"
        say(b, b"\x1d")
        _, err = b.communicate(timeout=30)
        assert b.returncode == 0 and b"detached" in err
        from boite.vmm import control_request

        status = control_request(box.dir / "twobox.ctl", {"cmd": "status"})["status"]
        assert status["state"] == "running"
    finally:
        boite("stop", box.dir, "hard")


def test_boot_disk_appears_as_virtio_blk_to_the_guest(tmp_path):
    pytest.importorskip("boite.machine.virtio.attach", reason="needs the virtio part")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    guest = assemble("mb_virtio_probe")
    proc = boite("boot", guest, "--accel", "kvm", "--memsize", "16", "--disk", disk)
    assert proc.returncode == (0x2C << 1) | 1, proc.stderr
    assert proc.stdout.startswith(b"virtio 0 id 2\n")  # virtio-blk in the first window
    proc = boite("boot", guest, "--accel", "kvm", "--disk", tmp_path / "missing.raw")
    assert proc.returncode == 1 and b"no such file" in proc.stderr


def test_boot_on_a_terminal_is_raw_and_ctrl_bracket_ends_the_vm():
    """On a TTY: keys go to the guest unprocessed, output lines still end in CR LF, the
    detach key ends the VM, and the terminal's settings come back afterwards."""
    import pty
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "boite", "boot", str(assemble("mb_spin")), "--accel", "kvm",
         "--memsize", "16"],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen = b""
        while b"spinning\r\n" not in seen:  # ONLCR kept: the guest's bare LF ends a line
            chunk = os.read(master, 1024)
            assert chunk, seen
            seen += chunk
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO
        os.write(master, b"\x1d")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


@pytest.mark.timeout(300)
def test_soft_stop_presses_the_acpi_power_button_of_a_guest_that_listens(tmp_path):
    """A guest that enabled the ACPI power button event gets a button press from `boite
    stop BOX soft` (not Ctrl-Alt-Del) and powers off through S5 on its own."""
    box = _make_box(tmp_path, "acpibox", "mb_acpi_button")
    vmm = subprocess.Popen(
        [sys.executable, "-m", "boite", "start", str(box.dir), "--accel", "emu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert _wait_for(lambda: (box.dir / "acpibox.ctl").exists(), 60)
        time.sleep(2)  # let the guest enable the event
        stop = boite("stop", box.dir, "soft", "--timeout", "120")
        assert stop.returncode == 0, stop.stderr
        out, err = vmm.communicate(timeout=120)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert vmm.returncode == 0, err
    assert out == b"waiting for the power button\npower button: entering S5\n"
    text = (box.dir / "vmware.log").read_text()
    assert "power off through the ACPI power button" in text
    assert "The guest powered off through ACPI S5 via PM1a_CNT." in text
    assert "Ctrl-Alt-Del" not in text and "Powered off (hard stop)." not in text
