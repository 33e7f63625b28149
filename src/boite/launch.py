"""Running boxes from Python: the library under the `boite` command's run verbs.

    boot_kernel(kernel, ...)        an ephemeral VM, like `qemu -kernel` (returns its status)
    run_box(box, ...)               a box in this process until it powers off
    start(box, accel=, detach=True) a box in a background VMM process (returns its pid)
    stop(box, mode=, timeout=)      ask the running VMM to stop, wait until it has
    pause(box) / resume(box)
    status(box)                     the running VMM's status, or None when it is off
    snapshot(box, name, ...)        through the running VMM, or on the disks when it is off
    suspend(box)

As Firecracker keeps its VM builder apart from its API, this module knows nothing of
argument parsing or terminals: `cli/` parses and prints, and a caller that wants the
guest's console on its own stdin/stdout passes a `console_client` (the CLI's StdioConsole).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from boite.errors import BoiteError, BoxError

LogFn = Callable[[str], None]
_vmm_log = logging.getLogger("boite.vmm")


class ConsoleClient(Protocol):
    """Something joined to the guest's console once the machine is up (`start()`) and let
    go when the VM ends (`stop()`)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


ConsoleClientFactory = Callable[[Any, Any], ConsoleClient]  # (console backend, vmm)


def open_box(box: Any):
    """A Box from a Box, a directory or a .vmx path."""
    from boite.box.box import Box

    return box if isinstance(box, Box) else Box.open(str(box))


# --- building the VM -----------------------------------------------------------------
def machine_builder():
    try:
        from boite.machine.builder import build_machine
    except ImportError as exc:
        raise BoiteError(
            f"this build of boite has no machine builder (boite.machine.builder): {exc}"
        ) from None
    return build_machine


def vmm_for(
    make_machine: Callable[[bool], Any], accel: str, console: Any, log: LogFn, name: str,
    wrap_factory: Callable[[Callable[[], Any]], Callable[[], Any]] | None = None,
    emu_tier: str | None = None, emu_tier_config: str | None = None,
):  # fmt: skip
    """A Vmm whose machine matches its accelerator: KVM brings the in-kernel PIC, IOAPIC
    and PIT, the emulator needs boite's own (`make_machine(emulated_irqchip)`).
    `emu_tier`/`emu_tier_config`: the emulator's tier (--emu-tier, boite.emuTier)."""
    from boite.vmm import Vmm, accelerator_for

    tiers = {"emu_tier": emu_tier, "emu_tier_config": emu_tier_config}
    first = accelerator_for(accel, log=log, **tiers)
    kind = type(first)
    used = [False]

    def factory():
        # The first accelerator is the probed one; a guest reset gets a fresh one.
        if not used[0]:
            used[0] = True
            return first
        if first.name == "emu":
            return kind(tier=emu_tier, tier_config=emu_tier_config)
        return kind()

    emulated_irqchip = first.name != "kvm"
    if wrap_factory is not None:
        factory = wrap_factory(factory)
    return Vmm(lambda: make_machine(emulated_irqchip), factory, console=console, log=log, name=name)


def once_powered_on(vmm, action: Callable[[], None]) -> None:
    """Run `action` after the first power-on (the machine and its UART exist then), after
    whatever hook is already there."""
    previous = vmm.on_power_on
    done = [False]

    def hook(machine) -> None:
        if previous is not None:
            previous(machine)
        if not done[0]:
            done[0] = True
            action()

    vmm.on_power_on = hook


class DeviceHooks:
    """Disks and NICs (the virtio part's `extra_devices` hook): a fresh hook for each
    machine built (a guest reset rebuilds it), the previous one closed first."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self.current: Any = None

    def fresh(self) -> list[Any]:
        self.close()
        self.current = self._make()
        return [self.current] if self.current is not None else []

    def start(self, machine: Any = None) -> None:
        if self.current is not None and hasattr(self.current, "start"):
            self.current.start()

    def close(self) -> None:
        if self.current is not None and hasattr(self.current, "close"):
            self.current.close()
        self.current = None


def _disk_files_hook(specs: list[str]) -> Any:
    if not specs:
        return None
    try:
        from boite.machine.virtio.attach import DiskFiles
    except ImportError:
        raise BoxError("--disk needs the virtio/ATA devices, not in this build") from None
    return DiskFiles(specs)


def _box_devices_hook(box, tools: Any = None) -> Any:
    from boite.machine.virtio.attach import BoxDevices

    return BoxDevices(
        box.config, box.dir, ports=[tools] if tools is not None else [], net_log=_vmm_log.info
    )


def _nics_request(devices: DeviceHooks, request: dict[str, Any]) -> dict[str, Any] | None:
    """Control socket: {"cmd": "nics"} -> each NIC's MAC and host side (TAP name, or
    passt's pid and forwards)."""
    if request.get("cmd") != "nics":
        return None
    attached = getattr(devices.current, "attached", None)
    plans = getattr(getattr(devices.current, "plan", None), "nics", [])
    nics = []
    for plan, net in zip(plans, getattr(attached, "nets", []), strict=False):
        backend = net.tap
        nic: dict[str, Any] = {"key": plan.key, "mac": plan.mac, "connection": plan.connection_type}
        if hasattr(backend, "forwards"):
            nic.update(
                backend="passt",
                pid=backend.proc.pid,
                forwards=list(backend.forwards),
                passt=backend.binary,
                passt_version=backend.version,
            )
        else:
            nic.update(backend="tap", tap=getattr(backend, "name", None))
        nics.append(nic)
    return {"ok": True, "nics": nics}


def install_stop_signals(vmm) -> None:
    """SIGTERM and SIGHUP pull the plug (the box's files are left consistent)."""

    def handler(signum, frame):
        vmm.stop(soft=False)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, handler)


# --- an ephemeral VM -------------------------------------------------------------------
@dataclass
class BootSpec:
    """What `boite boot` runs: a kernel and its surroundings, no box directory."""

    kernel: str
    initrd: str | None = None
    append: str = ""
    memsize_mb: int = 256
    cpus: int = 1
    disks: tuple[str, ...] = ()
    accel: str = "auto"
    kernel_unpack: str = "auto"  # "auto", "true", "false": see loader.choose_unpack
    emu_tier: str | None = None  # the emulator's tier (accel/emu/tiers.py); None: auto

    def check(self) -> None:
        if not Path(self.kernel).is_file():
            raise BoxError(f"kernel {self.kernel}: no such file")
        if self.initrd is not None and not Path(self.initrd).is_file():
            raise BoxError(f"initrd {self.initrd}: no such file")
        if self.memsize_mb < 1 or self.cpus < 1:
            raise BoxError("--memsize and --cpus must be positive")
        for spec in self.disks:
            path = (
                spec.partition(":")[2]
                if spec.startswith(("ide:", "ata:", "virtio:", "vd:"))
                else spec
            )
            if "://" not in path and not Path(path).exists():
                raise BoxError(f"--disk {spec}: no such file")


def boot_kernel(
    spec: BootSpec,
    *,
    console_client: ConsoleClientFactory | None = None,
    log: LogFn | None = None,
) -> int:
    """Boot `spec` in this process until it powers off; the guest's exit status."""
    from boite.events import warnings_to_stderr
    from boite.machine.devices import ConsoleBackend

    spec.check()
    build_machine = machine_builder()
    console = ConsoleBackend()
    devices = DeviceHooks(lambda: _disk_files_hook(list(spec.disks)))

    def make_machine(emulated_irqchip: bool):
        return build_machine(
            spec.memsize_mb, spec.cpus, {1: console}, spec.kernel, spec.initrd, spec.append,
            emulated_irqchip=emulated_irqchip, extra_devices=devices.fresh(),
            kernel_unpack=spec.kernel_unpack,
        )  # fmt: skip

    vmm = vmm_for(make_machine, spec.accel, console, log or _vmm_log.info, Path(spec.kernel).name,
                  emu_tier=spec.emu_tier)  # fmt: skip
    vmm.on_power_on = devices.start
    client = console_client(console, vmm) if console_client is not None else None
    install_stop_signals(vmm)
    if client is not None:
        # Input typed before the UART exists would be lost: attach once the machine is up.
        once_powered_on(vmm, client.start)
    try:
        with warnings_to_stderr():  # no box, no vmware.log: a device's warning is shown
            return vmm.run()
    finally:
        console.flush()
        if client is not None:
            client.stop()
        devices.close()


# --- a box -----------------------------------------------------------------------------
def box_file(box, key: str) -> str | None:
    """A file named by the .vmx (relative to the box directory), checked to exist."""
    value = box.config.get_str(key)
    if not value:
        return None
    path = Path(value)
    path = path if path.is_absolute() else box.dir / path
    if not path.is_file():
        raise BoxError(f"{box.vmx_path}: {key} = {value!r}: no such file ({path})")
    return str(path)


def require_stopped(box) -> None:
    holder = box.lock_holder
    if holder is not None and not holder.is_dead_here():
        if running_control(box) is None and holder.pid != os.getpid():
            # No VMM: another boite command (a snapshot, a clone) works on the files.
            raise BoxError(
                f"{box.name} is busy: another boite command is working on its files "
                f"({holder.describe()}); start it when that has finished"
            )
        raise BoxError(f"{box.name} is already running ({holder.describe()})")


def run_box(
    box: Any,
    accel: str | None = None,
    *,
    console_client: ConsoleClientFactory | None = None,
    ready: Callable[[], None] | None = None,
    emu_tier: str | None = None,
) -> int:
    """Run `box` in this process until it powers off (its lock held, its control socket
    served); the guest's exit status. `ready` is called once the guest runs. `emu_tier`
    (--emu-tier) wins over the box's boite.emuTier."""
    from boite.events import to_box_log
    from boite.machine.builder import machine_from_box
    from boite.machine.devices import ConsoleBackend
    from boite.tools.host import tools_socket_path
    from boite.vmm import ControlServer, control_socket_path

    box = open_box(box)
    box.require_within_limits()
    console = ConsoleBackend()
    with box.acquire_lock(), to_box_log(box.log):
        log = _vmm_log.info  # one path: the `boite` logger, into vmware.log (and -v)
        accel_name = accel or box.config.virtual_exec

        # Without boite.kernel the box boots through its BIOS (SeaBIOS), if anything in
        # its boot order can boot; the BIOS itself would only say "No bootable device".
        box_file(box, "boite.kernel")
        from boite.machine.substitutes import boot_problems, hardware_notes

        for why in boot_problems(box):
            raise BoxError(f"{box.vmx_path}: cannot start: {why}")
        for note in hardware_notes(box.config):  # once per power-on, not per guest reset
            log(f"Hardware: {note}.")
        box_file(box, "boite.initrd")  # a clear error now rather than at power-on

        tools = _guest_tools(box, log)
        devices = DeviceHooks(lambda: _box_devices_hook(box, tools))

        def make_machine(emulated_irqchip: bool):
            return machine_from_box(
                box, console=console, emulated_irqchip=emulated_irqchip,
                extra_devices=devices.fresh(),
            )  # fmt: skip

        wrap, snapshot_handler = _snapshot_hooks(box, log, tools)
        vmm = vmm_for(make_machine, accel_name, console, log, box.name, wrap,
                      emu_tier=emu_tier, emu_tier_config=box.config.emu_tier)  # fmt: skip
        vmm.on_power_on = devices.start  # first: the hooks below chain onto it
        handlers = []
        if snapshot_handler is not None:
            handlers.append(lambda request: snapshot_handler(vmm, box, request))
        handlers.append(lambda request: _reset_request(vmm, request))
        handlers.append(lambda request: _nics_request(devices, request))
        if tools is not None:
            vmm.guest_tools = tools  # the first way of a soft stop or reset
            handlers.append(lambda request: _tools_request(tools, request))
            tools.serve(tools_socket_path(box.dir, box.name))
            tools.start()
        path = control_socket_path(box.dir, box.name)
        server = ControlServer(vmm, path, handlers=handlers)
        server.start()
        box.set_control_socket(str(path))
        install_stop_signals(vmm)
        client = console_client(console, vmm) if console_client is not None else None
        if client is not None:
            once_powered_on(vmm, client.start)
        if ready is not None:
            once_powered_on(vmm, ready)  # `start --detach` returns once the guest runs
        try:
            status = vmm.run()
        except BoiteError as exc:
            _vmm_log.error(str(exc))
            raise
        finally:
            console.flush()  # the last output reaches every viewer before they go
            if client is not None:
                client.stop()
            server.close()
            devices.close()
            if tools is not None:
                tools.close()
        _vmm_log.info(f"Power off complete, exit status {status}.")
        return status


def _guest_tools(box, log: LogFn):
    """The VMM's end of the guest tools channel, unless the box says
    `boite.tools = "FALSE"` (VMware's tools.* keys concern its own tools)."""
    from boite.tools.host import ToolsHost

    if not box.config.get_bool("boite.tools", True):
        return None
    return ToolsHost(log=log)


def _reset_request(vmm, request: dict[str, Any]) -> dict[str, Any] | None:
    """Control socket: {"cmd": "reset", "mode": "soft"|"hard"} -> {"how": ...}: soft asks
    the guest tools to reboot and falls back to a hard reset where they cannot."""
    if request.get("cmd") != "reset":
        return None
    mode = request.get("mode", "soft")
    if mode not in ("soft", "hard"):
        raise BoxError(f"reset mode {mode!r}: expected soft or hard")
    tools = vmm.guest_tools
    # A reset rebuilds the machine (its disks are closed and opened again): not in the
    # middle of a snapshot or revert.
    with vmm.operation.hold(f"reset ({mode})"):
        if mode == "soft" and tools is not None and tools.running and tools.power(reboot=True):
            vmm.log("Reset (soft): the guest tools reboot the guest.")
            return {"ok": True, "how": "tools"}
        if mode == "soft":
            vmm.log("Reset (soft): no guest tools to ask; resetting hard.")
        vmm.request_reset()
        return {"ok": True, "how": "hard"}


def _tools_request(tools, request: dict[str, Any]) -> dict[str, Any] | None:
    """Control socket: {"cmd": "tools"} -> the tools' status; "tools-info" -> the
    guest's addresses; "tools-resync" -> set the guest clock again."""
    cmd = request.get("cmd")
    if cmd == "tools":
        return {"ok": True, "tools": tools.status()}
    if cmd == "tools-info":
        return {"ok": True, "info": tools.info()}
    if cmd == "tools-resync":
        tools.resync()
        return {"ok": True}
    return None


def _snapshot_hooks(box, log, tools=None):
    """Resume from a suspend state or a reverted memory snapshot, and the control socket's
    snapshot/suspend commands, when this build has the snapshot part."""
    try:
        from boite.snapshot import (
            handle_control_request,
            resume_state,
            resumed,
            resuming_accelerator,
        )
    except ImportError:
        return None, None
    path = resume_state(box)
    wrap = None
    if path is not None:
        log(f"Resuming from {path.name}.")

        def wrap(factory):
            def restored() -> None:
                resumed(box)
                if tools is not None:  # the guest's clock stood still while saved
                    tools.resync()

            return resuming_accelerator(factory, path, on_restored=restored)

    return wrap, handle_control_request


def start(box: Any, accel: str | None = None, emu_tier: str | None = None) -> int:
    """Start `box` in a VMM process that outlives the caller; return its pid once the
    guest runs (BoxError with the VMM's reason when it did not start)."""
    box = open_box(box)
    box.require_within_limits()
    require_stopped(box)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the VMM
        os.close(rfd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        status = 1

        def ready() -> None:
            os.write(wfd, b"ok\n")

        try:
            status = run_box(open_box(box.vmx_path), accel, ready=ready, emu_tier=emu_tier)
        except BaseException as exc:  # report to the parent if it still listens
            with contextlib.suppress(OSError):
                os.write(wfd, f"error {exc}\n".encode())
        finally:
            os._exit(status & 0xFF)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ok":
        return pid
    os.waitpid(pid, 0)
    raise BoxError(f"{box.name} did not start: {line[6:] if line.startswith('error ') else line}")


# --- talking to a running box ------------------------------------------------------------
def live_holder(box: Any):
    """Who runs the box, or None; a lock left by a killed process does not count."""
    holder = open_box(box).lock_holder
    if holder is None or holder.is_dead_here():
        return None
    return holder


def running_control(box: Any) -> Path | None:
    """The control socket of the VMM running this box, or None when no VMM runs it (a
    lock held by another boite command's operation on the stopped box, or by a VMM
    still starting, is not a VMM to talk to: `offline_operation` waits for it)."""
    from boite.box import list_running

    box = open_box(box)
    holder = live_holder(box)
    if holder is None:
        return None
    for running in list_running():
        if running.pid == holder.pid and getattr(running, "control", None):
            return Path(running.control)
    return None


def request(box: Any, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One control request to the VMM running `box` (BoxError when it is not running)."""
    from boite.vmm import control_request

    box = open_box(box)
    control = running_control(box)
    if control is None:
        raise BoxError(f"{box.name} is not running")
    return control_request(control, message, timeout=timeout)


def status(box: Any) -> dict[str, Any] | None:
    """The running VMM's status (state, accelerator, pid, ...), None when the box is off."""
    box = open_box(box)
    if running_control(box) is None:
        return None
    return request(box, {"cmd": "status"})["status"]


class _LineReader:
    """JSON lines from a socket, each read with its own timeout (a file object from
    makefile() cannot be read again after one timed out)."""

    MAX_LINE = 1 << 20

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self, timeout: float) -> Any:
        """The next line's JSON value; None at end of stream; TimeoutError meanwhile."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.MAX_LINE:
                raise BoxError("the VMM sent a reply line longer than 1 MiB")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise BoxError(f"the VMM sent a reply that is not JSON: {line[:80]!r}") from None


@dataclass(frozen=True)
class Stopped:
    """How a stop ended: `how` is "soft" (the guest powered off when asked), "hard" (the
    plug was pulled: asked for, no way to ask the guest, or it did not answer in time) or
    "guest" (it powered off by itself meanwhile); `method` the soft-stop method used."""

    how: str
    method: str | None
    detail: str
    problems: tuple[str, ...] = ()  # what the power-off could not do (a failed flush)


def stop(
    box: Any,
    mode: str = "soft",
    timeout: float | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> Stopped:
    """Stop the running box (soft: the guest is asked, hard after `timeout` s; hard: now)
    and wait until its VMM has powered off and let go of the box. `progress(method,
    seconds_left)` is called about every second while a soft stop waits for the guest."""
    from boite.vmm import (
        POWER_OFF_WAIT_S,
        SOFT_STOP_GRACE_S,
        check_grace,
        connect_control,
        control_socket_path,
    )

    box = open_box(box)
    if mode not in ("soft", "hard"):
        raise BoxError(f"stop mode {mode!r}: expected soft or hard")
    grace = check_grace(SOFT_STOP_GRACE_S if timeout is None else timeout)
    holder = box.lock_holder
    if holder is None or holder.is_dead_here():
        raise BoxError(f"{box.name} is not running")
    sock = connect_control(control_socket_path(box.dir, box.name), timeout=10)
    outcome: dict[str, Any] | None = None
    problems: tuple[str, ...] = ()
    with sock:
        request_line = {"cmd": "stop", "mode": mode, "grace_s": grace, "wait": True}
        sock.sendall(json.dumps(request_line).encode() + b"\n")
        lines = _LineReader(sock)
        first = lines.read(timeout=10)
        if not isinstance(first, dict):
            raise BoxError(f"{box.name}: the VMM closed the control socket without a reply")
        if not first.get("ok"):
            raise BoxError(f"{box.name}: {first.get('error', 'stop refused')}")
        method, left = first.get("method"), float(first.get("grace_s") or 0.0)
        # The power-off may first let a running snapshot finish (bounded in the VMM).
        power_off = POWER_OFF_WAIT_S + 15
        asked_until = time.monotonic() + left
        deadline = asked_until + power_off
        while time.monotonic() < deadline:
            if progress is not None and first.get("how") == "soft":
                progress(str(method), max(0.0, asked_until - time.monotonic()))
            try:
                final = lines.read(timeout=1.0)
            except TimeoutError:
                continue
            if isinstance(final, dict):
                outcome = final.get("outcome")
                problems = tuple(str(p) for p in final.get("problems") or ())
            break
    while time.monotonic() < deadline and box.lock_holder is not None:
        time.sleep(0.05)  # the VMM lets go of the box lock last
    if box.lock_holder is not None:
        raise BoxError(
            f"{box.name} still holds its lock after the {mode} stop ({holder.describe()})"
        )
    if outcome is None:  # an older VMM, or it went without saying how
        return Stopped(mode, None, "the VMM did not say how it stopped")
    return Stopped(
        str(outcome.get("how")), outcome.get("method"), str(outcome.get("detail")), problems
    )


def reset(box: Any, mode: str = "soft") -> str:
    """Reset the running box: soft through the guest tools (a clean reboot), hard (or soft
    without tools) by rebuilding the machine. Returns how: "tools" or "hard"."""
    return str(request(box, {"cmd": "reset", "mode": mode})["how"])


PAUSE_WAIT_S = 10.0


def pause(box: Any) -> None:
    """Pause the running box; returns once its vCPUs are parked (`info` says paused), as
    `vmrun pause` does."""
    box = open_box(box)
    request(box, {"cmd": "pause"})
    deadline = time.monotonic() + PAUSE_WAIT_S
    while (state := (status(box) or {}).get("state")) != "paused":
        if state in (None, "stopped", "stopping") or time.monotonic() > deadline:
            raise BoxError(f"{box.name} did not pause (it is {state or 'off'})")
        time.sleep(0.01)


def resume(box: Any) -> None:
    """Let a paused box run again; its guest tools then set the guest clock."""
    request(box, {"cmd": "resume"})
    with contextlib.suppress(BoiteError):
        request(box, {"cmd": "tools-resync"})


# Saving RAM takes seconds per GiB, and the VMM may first finish a running operation.
SAVE_TIMEOUT_S = 720.0
# How long an operation on a stopped box waits for another boite command holding it.
OFFLINE_WAIT_S = 120.0

Notify = Callable[[str], None]


def _vmm_request(
    box: Any, control: Path, message: dict[str, Any], notify: Notify | None
) -> dict[str, Any]:
    """A request that changes the box's files, to its VMM: say when it must first wait
    for an operation already running there (the VMM serializes them)."""
    from boite.vmm import control_request

    busy = control_request(control, {"cmd": "status"}).get("status", {}).get("operation")
    if busy and notify is not None:
        notify(f"{box.name} is busy with {busy}; waiting for it to finish")
    return control_request(control, message, timeout=SAVE_TIMEOUT_S)


def offline_operation(
    box: Any, what: str, operation: Callable[[Any], Any], notify: Notify | None = None
) -> Any:
    """Run `operation(box)` on a stopped box holding its lock (pass lock_held=True on
    down). Another boite command holding it is waited for, up to OFFLINE_WAIT_S; a box
    that was started meanwhile is refused (the caller asks again and reaches its VMM)."""
    from boite.box.lock import BoxLock
    from boite.errors import LockError

    box = open_box(box)
    lock = BoxLock(box.vmx_path)
    deadline = time.monotonic() + OFFLINE_WAIT_S
    told = False
    while True:
        try:
            lock.acquire()
            break
        except LockError as exc:
            if running_control(box) is not None:
                raise BoxError(f"{box.name}: the box was started meanwhile; try again") from None
            if time.monotonic() > deadline:
                raise BoxError(
                    f"{box.name}: {what} gave up after {OFFLINE_WAIT_S:g} s waiting: {exc}"
                ) from None
            if not told and notify is not None:
                notify(f"{box.name} is busy ({exc}); waiting")
                told = True
            time.sleep(0.05)
    try:
        return operation(open_box(box.vmx_path))  # as the previous holder left it
    finally:
        lock.release()


def disk_operation(
    disk: str | Path, what: str, operation: Callable[[], Any], notify: Notify | None = None
) -> Any:
    """Run `operation()` on a disk file (grow, compact) under the operation lock of the
    box it lives in (each .vmx beside it): refused while that box runs (its VMM has the
    disk open), waited for while another boite command works on the box. A disk outside
    any box is the caller's alone."""
    folder = Path(disk).parent
    boxes = sorted(p for p in folder.glob("*.vmx") if p.is_file()) if folder.is_dir() else []
    return _holding(boxes, what, operation, notify)


def _holding(vmxs: list[Path], what: str, operation: Callable[[], Any], notify) -> Any:
    if not vmxs:
        return operation()
    box = open_box(vmxs[0])
    if running_control(box) is not None:
        raise BoxError(
            f"{box.name} is running and has its disks open: stop it before `{what}` "
            f"(boite stop {box.dir})"
        )
    rest = vmxs[1:]
    return offline_operation(
        box, what, lambda _box: _holding(rest, what, operation, notify), notify
    )


@dataclass(frozen=True)
class SnapshotTaken:
    uid: int | None
    name: str
    memory: bool


def snapshot(
    box: Any,
    name: str,
    description: str = "",
    memory: bool | None = None,
    notify: Notify | None = None,
) -> SnapshotTaken:
    """Take a snapshot: through the VMM when the box runs (with RAM unless memory=False),
    of the disks only when it is off (memory=True is refused then)."""
    from boite.snapshot import take_snapshot

    box = open_box(box)
    control = running_control(box)
    if control is not None:
        keep_ram = memory is not False
        reply = _vmm_request(
            box, control,
            {"cmd": "snapshot", "name": name, "description": description, "memory": keep_ram},
            notify,
        )  # fmt: skip
        return SnapshotTaken(reply.get("uid"), name, keep_ram)
    if memory:
        raise BoxError(
            f"{box.vmx_path}: --memory needs a running box (this one is powered off); "
            "start it first, or take a disk snapshot without --memory"
        )
    snap = offline_operation(
        box, "snapshot", lambda b: take_snapshot(b, name, description, lock_held=True), notify
    )
    return SnapshotTaken(snap.uid, snap.display_name, False)


@dataclass(frozen=True)
class Reverted:
    uid: int | None
    name: str
    running: bool  # the box ran: it restarted from the snapshot
    memory: bool  # ... and resumed the snapshot's memory state


def revert(box: Any, name: str, notify: Notify | None = None) -> Reverted:
    """Go back to a snapshot. A running box restarts from it at once (a memory snapshot's
    guest resumes, a disk-only one boots); a stopped one does so at its next start."""
    from boite.snapshot import revert_snapshot

    box = open_box(box)
    control = running_control(box)
    if control is not None:
        reply = _vmm_request(box, control, {"cmd": "revert", "name": name}, notify)
        return Reverted(reply.get("uid"), str(reply.get("name")), True, bool(reply.get("memory")))
    snap = offline_operation(
        box, "revert", lambda b: revert_snapshot(b, name, lock_held=True), notify
    )
    return Reverted(snap.uid, snap.display_name, False, False)


@dataclass(frozen=True)
class Deleted:
    uid: int | None
    name: str


def delete_snapshot(box: Any, name: str, notify: Notify | None = None) -> Deleted:
    """Remove a snapshot, consolidating its delta disks, whether the box runs or not."""
    from boite.snapshot import delete_snapshot as delete

    box = open_box(box)
    control = running_control(box)
    if control is not None:
        reply = _vmm_request(box, control, {"cmd": "delete-snapshot", "name": name}, notify)
        return Deleted(reply.get("uid"), str(reply.get("name")))
    snap = offline_operation(box, "delete-snapshot", lambda b: delete(b, name, lock_held=True),
                             notify)  # fmt: skip
    return Deleted(snap.uid, snap.display_name)


def clone(
    box: Any,
    dest: str | Path,
    *,
    linked: bool = False,
    snapshot: str | None = None,
    notify: Notify | None = None,
) -> Any:
    """`vmrun clone` (boite.clone.clone_box) under the source's operation lock: in its
    VMM when it runs (from a snapshot, whose disks a concurrent delete-snapshot would
    otherwise consolidate under the copy), under the box lock when it is off. Returns the
    new Box."""
    from boite.clone import clone_box

    box = open_box(box)
    dest = Path(dest).absolute()
    control = running_control(box)
    if control is not None:
        message = {"cmd": "clone", "dest": str(dest), "linked": linked, "snapshot": snapshot}
        reply = _vmm_request(box, control, message, notify)
        return open_box(reply["box"])
    return offline_operation(
        box, "clone", lambda b: clone_box(b, dest, linked=linked, snapshot=snapshot), notify
    )


def suspend(box: Any, notify: Notify | None = None) -> str:
    """Save the running box's state to NAME.vmss and power it off; the file's name."""
    box = open_box(box)
    control = running_control(box)
    if control is None:
        raise BoxError(f"{box.vmx_path}: the box is not running; there is nothing to suspend")
    reply = _vmm_request(box, control, {"cmd": "suspend"}, notify)
    return str(reply.get("file", box.name + ".vmss"))


# --- the guest tools -------------------------------------------------------------------
TOOLS_WAIT_S = 300.0  # an emulated guest on a busy host takes minutes to boot


def tools_client(
    box: Any, wait_s: float = TOOLS_WAIT_S, on_wait: Callable[[str], None] | None = None
):
    """A ToolsClient of the running box, once its guest tools have said hello (a box
    that is still booting gets `wait_s` seconds; `on_wait` hears why it waits)."""
    from boite.tools.client import ToolsClient
    from boite.tools.host import tools_socket_path

    box = open_box(box)
    if running_control(box) is None:
        raise BoxError(f"{box.name} is not running")
    client = ToolsClient(tools_socket_path(box.dir, box.name))
    try:
        client.wait_ready(wait_s, on_wait)
    except BoiteError:
        client.close()
        raise
    return client


def exec(
    box: Any,
    argv: list[str],
    *,
    stdin: Any = None,
    stdout: Callable[[bytes], Any] | None = None,
    stderr: Callable[[bytes], Any] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    wait_s: float = TOOLS_WAIT_S,
    on_wait: Callable[[str], None] | None = None,
) -> int:
    """Run `argv` in the running box's guest through its tools; its exit status."""
    with tools_client(box, wait_s, on_wait) as client:
        return client.exec(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd)


def copy_to_guest(
    box: Any, local: str | Path, remote: str, wait_s: float = TOOLS_WAIT_S, on_wait=None
) -> int:
    with tools_client(box, wait_s, on_wait) as client:
        return client.put(local, remote)


def copy_from_guest(
    box: Any, remote: str, local: str | Path, wait_s: float = TOOLS_WAIT_S, on_wait=None
) -> int:
    with tools_client(box, wait_s, on_wait) as client:
        return client.get(remote, local)


def guest_addresses(box: Any, wait_s: float = TOOLS_WAIT_S, on_wait=None) -> list[dict[str, str]]:
    """The guest's IPv4 addresses (loopback left out), as the tools report them."""
    with tools_client(box, wait_s, on_wait) as client:
        ips = client.info()["ips"]
    return [ip for ip in ips if not ip["address"].startswith("127.")]


def tools_status(box: Any) -> dict[str, Any] | None:
    """The guest tools' status in the running box (running, agent, last_seen_s), None
    when the box is off or has no tools."""
    try:
        return request(box, {"cmd": "tools"})["tools"]
    except BoxError:
        return None


# --- what would stop a box from starting -------------------------------------------------
def startup_problems(box: Any) -> list[Any]:
    """Problems `boite check` adds to the box's own rules: a NIC whose host side cannot be
    attached here, a disk boite can only read, vCPUs the accelerator cannot run, and the
    clashes a copied box brings (the uuid.bios or a MAC of a running box)."""
    from boite.box import list_running
    from boite.box.limits import Problem
    from boite.machine.netback import attach_problem

    box = open_box(box)
    problems: list[Problem] = []
    for nic in box.config.nics:
        if not nic.present:
            continue
        kind = (nic.connection_type or "bridged").lower()
        why = attach_problem(kind, box.config.get_str(f"ethernet{nic.index}.vnet") or "")
        if why is not None:
            problems.append(
                Problem(f"ethernet{nic.index}.connectionType", kind, "a NIC that can attach", why)
            )
    for slot in box.config.disks:
        if not slot.file_name or "://" in slot.file_name:
            continue
        where = box.disk_path(slot.file_name)
        why = _read_only_reason(Path(where))
        if why is not None:
            problems.append(Problem(f"{slot.key}.fileName", slot.file_name, "a writable disk", why))
    accel = box.config.virtual_exec
    # Only where the box names the emulator: "automatic" picks per host at start.
    if accel in ("software", "emu"):
        from boite.accel.emu import EmuAccelerator

        runs = EmuAccelerator.max_vcpus
        if box.config.numvcpus > runs:
            problems.append(
                Problem(
                    "numvcpus",
                    str(box.config.numvcpus),
                    f"at most {runs} for {accel}",
                    f"the emulator runs {runs} vCPU(s): the others would stay parked",
                )  # fmt: skip
            )
    mine = str(box.vmx_path.resolve())
    uuid = (box.vmx.get("uuid.bios") or "").replace(" ", "").replace("-", "").lower()
    macs = {n.mac.lower() for n in box.config.nics if n.present and n.mac}
    for running in list_running():
        if running.vmx == mine:
            continue
        try:
            other = open_box(running.vmx)
        except BoiteError:
            continue
        theirs = (other.vmx.get("uuid.bios") or "").replace(" ", "").replace("-", "").lower()
        if uuid and uuid == theirs:
            problems.append(
                Problem(
                    "uuid.bios",
                    box.vmx.get("uuid.bios") or "",
                    "unique among running boxes",
                    f"the running box {running.vmx} has the same uuid.bios (a copied box? "
                    "`boite clone` gives a new one)",
                )  # fmt: skip
            )
        clash = macs & {n.mac.lower() for n in other.config.nics if n.present and n.mac}
        for mac in sorted(clash):
            problems.append(
                Problem(
                    "ethernet MAC",
                    mac,
                    "unique among running boxes",
                    f"the running box {running.vmx} has a NIC with the same MAC",
                )  # fmt: skip
            )
    return problems


def _read_only_reason(path: Path) -> str | None:
    if not path.exists():
        return None  # the box's own check says so
    if not os.access(path, os.W_OK):
        return f"{path} is not writable by this user"
    if path.suffix.lower() == ".vmdk":
        try:
            from boite.disk.vmdk import read_descriptor

            desc, _ = read_descriptor(path)
        except (BoiteError, OSError):
            return None
        if (desc.create_type or "").lower() == "streamoptimized":
            return (
                f"{path} is a streamOptimized VMDK, which boite (like VMware) only reads: "
                "`boite disk convert` it to thin"
            )
    return None
