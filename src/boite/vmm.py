"""The VMM: a machine, an accelerator, the run loop and the lifecycle around them.

    Vmm(build, accel)        build() makes a fresh Machine (again at each guest reset)
      .run()                 runs until power-off, hard stop or a guest error
      .pause() / .resume()   from any thread (the control socket, a signal handler)
      .stop(soft=...)        soft: Ctrl-Alt-Del to the guest, then pull the plug after
                             a grace period; hard: pull the plug now
      .status()              plain data for `boite list` / the control socket

A running box is driven from other processes through a unix socket in its directory
(`NAME.ctl`) speaking JSON lines; see ControlServer.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boite.accel.base import Accelerator, RunResult, StopReason
from boite.errors import AccelError, BoiteError, BoxError, GuestError
from boite.machine.machine import Machine

LogFn = Callable[[str], None]

# Ctrl-Alt-Del as scan code set 1 (what the i8042 hands the guest after translation):
# Ctrl, Alt, E0-prefixed Delete made, then broken in reverse order.
CTRL_ALT_DEL = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
SOFT_STOP_GRACE_S = 30.0


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


def accelerator_for(name: str, *, log: LogFn | None = None) -> Accelerator:
    """`kvm`, `emu`, or `auto` (KVM when /dev/kvm can make a VM here, else the emulator).
    Also takes the box's `monitor.virtual_exec` values hardware/software/automatic."""
    name = {"hardware": "kvm", "software": "emu", "automatic": "auto"}.get(name, name)
    if name not in ("kvm", "emu", "auto"):
        raise AccelError(f"accelerator {name!r}: expected kvm, emu or auto")
    if name in ("kvm", "auto"):
        from boite.accel.kvm import KvmAccelerator, kvm_usable

        if name == "auto" and kvm_is_software_nested():
            # kvm_pvm runs straight-line guest code but fails interrupt delivery and mode
            # changes (Linux does not boot under it, with QEMU either): emulate instead.
            if log:
                log("KVM here is the kvm_pvm software module, which cannot boot an OS; "
                    "using the emulator.")  # fmt: skip
            return _emulator()
        if kvm_usable():
            return KvmAccelerator()
        if name == "kvm":
            raise AccelError("KVM is not usable here (/dev/kvm missing or not accessible)")
        if log:
            log("KVM is not usable here; using the emulator.")
    return _emulator()


def kvm_is_software_nested() -> bool:
    """True on hosts whose /dev/kvm is the kvm_pvm module rather than VT-x/AMD-V."""
    return os.path.exists("/sys/module/kvm_pvm")


def _emulator() -> Accelerator:
    try:
        module = importlib.import_module("boite.accel.emu")
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise AccelError(f"the emulator (boite.accel.emu) cannot be loaded: {exc}") from None
    for attr in ("EmuAccelerator", "EmulatorAccelerator", "Emulator"):
        cls = getattr(module, attr, None)
        if isinstance(cls, type) and issubclass(cls, Accelerator):
            return cls()
    raise AccelError(
        "the emulator accelerator (boite.accel.emu) is not available in this build: "
        "use --accel kvm on a host with /dev/kvm"
    )


class Vmm:
    def __init__(
        self,
        build: Callable[[], Machine],
        accel: Accelerator | Callable[[], Accelerator],
        *,
        log: LogFn | None = None,
        console: Any = None,
        name: str = "vm",
        on_power_on: Callable[[Machine], None] | None = None,
    ) -> None:
        self._build = build
        self._accel_factory = (
            accel if callable(accel) and not isinstance(accel, Accelerator) else None
        )
        self.accel: Accelerator = accel if isinstance(accel, Accelerator) else accel()  # type: ignore[operator]
        self.log: LogFn = log or (lambda message: None)
        self.console = console
        self.name = name
        # Called after each power-on, once the machine (and its console's UART) exist.
        self.on_power_on = on_power_on
        self.machine: Machine | None = None
        self.state = VmState.CREATED
        self.exit_status: int | None = None
        self.started_at: float | None = None
        self.resets = 0
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._pause_requested = False
        self._stop_requested = False
        self._soft_deadline: float | None = None
        self._watchdog: threading.Timer | None = None

    # --- lifecycle -----------------------------------------------------------------
    def _power_on(self) -> None:
        self.machine = self._build()
        self.accel.create(self.machine, None)
        self.log(
            f"Powering on {self.name}: {self.machine.num_vcpus} vCPU(s), "
            f"{self.machine.memory.size >> 20} MiB, accelerator {self.accel.name}."
        )
        if self.machine.kernel_note:
            self.log(f"Kernel: {self.machine.kernel_note}.")
        runs = getattr(self.accel, "max_vcpus", None)
        if runs is not None and self.machine.num_vcpus > runs:
            self.log(
                f"The {self.accel.name} accelerator runs {runs} vCPU(s): the other "
                f"{self.machine.num_vcpus - runs} stay parked, as before a start-up IPI."
            )
        self.state = VmState.RUNNING
        if self.on_power_on is not None:
            self.on_power_on(self.machine)

    def _power_off_hardware(self) -> None:
        with contextlib.suppress(Exception):
            self.accel.close()
        if self.machine is not None:
            for dev in self.machine.devices.values():
                close = getattr(dev, "close", None)
                if callable(close):
                    with contextlib.suppress(Exception):
                        close()
            self.machine.memory.close()
            self.machine = None

    def run(self) -> int:
        """Run until the guest powers off, a stop, or a guest error (raised as GuestError).
        Returns the exit status: the guest's debug-exit status, 0 after a clean power-off."""
        if self.state is not VmState.CREATED:
            raise BoxError(f"{self.name} has already run; make a new Vmm")
        self.started_at = time.time()
        try:
            self._power_on()
            return self._loop()
        finally:
            self.state = VmState.STOPPED
            self._cancel_watchdog()
            self._power_off_hardware()

    def _loop(self) -> int:
        while True:
            if self._stop_requested:  # a stop that raced with a reset or a resume
                self.log("Powered off (hard stop).")
                self.exit_status = 0 if self.exit_status is None else self.exit_status
                return self.exit_status
            result: RunResult = self.accel.run()
            reason = result.reason
            if reason is StopReason.PAUSED:
                if self._stop_requested:
                    self.log("Powered off (hard stop).")
                    self.exit_status = 0 if self.exit_status is None else self.exit_status
                    return self.exit_status
                if self._pause_requested:
                    self.state = VmState.PAUSED
                    self.log("Paused.")
                    self._resume.wait()
                    self._resume.clear()
                    if self._stop_requested:
                        continue_status = 0 if self.exit_status is None else self.exit_status
                        self.log("Powered off while paused.")
                        return continue_status
                    self.state = VmState.RUNNING
                    self.log("Resumed.")
                continue
            if reason is StopReason.SHUTDOWN:
                self.exit_status = result.exit_status
                self.log(f"Guest powered off, exit status {result.exit_status}.")
                return result.exit_status
            if reason is StopReason.HALTED:
                self.exit_status = 0
                self.log(f"Every vCPU halted with interrupts off: {result.detail}")
                return 0
            if reason is StopReason.RESET:
                self.resets += 1
                self.log(f"Guest reset ({result.detail or 'reset requested'}).")
                self._reset()
                continue
            # StopReason.ERROR
            self.log(f"Guest error: {result.detail}")
            raise GuestError(f"{self.name}: {result.detail}")

    def _reset(self) -> None:
        """A reset rebuilds the machine from its description, as a PC's firmware reloads."""
        self._power_off_hardware()
        if self._accel_factory is not None:
            self.accel = self._accel_factory()
        else:
            self.accel = type(self.accel)()
        self._power_on()

    def pause(self) -> None:
        if self.state is not VmState.RUNNING:
            raise BoxError(f"{self.name} is {self.state.value}, not running")
        self._pause_requested = True
        self.accel.pause()

    def resume(self) -> None:
        if self.state is not VmState.PAUSED:
            raise BoxError(f"{self.name} is {self.state.value}, not paused")
        self._pause_requested = False
        self._resume.set()

    def stop(self, soft: bool = False, grace_s: float = SOFT_STOP_GRACE_S) -> None:
        """hard: pull the plug now. soft: press Ctrl-Alt-Del on the keyboard (the guest
        kit's init powers off on it) and pull the plug if the guest is not off in time."""
        if self.state in (VmState.STOPPED, VmState.STOPPING):
            return
        keyboard = self._keyboard()
        if soft and keyboard is not None and self.state is VmState.RUNNING:
            self.log(f"Soft stop: Ctrl-Alt-Del sent to the guest; hard stop in {grace_s:g} s.")
            keyboard.inject_scancodes(CTRL_ALT_DEL)
            self._soft_deadline = time.time() + grace_s
            self._watchdog = threading.Timer(grace_s, self.stop, kwargs={"soft": False})
            self._watchdog.daemon = True
            self._watchdog.start()
            return
        if soft:
            self.log("Soft stop: the machine has no keyboard controller; stopping hard.")
        self.state = VmState.STOPPING
        self._stop_requested = True
        self._resume.set()
        self.accel.pause()

    def _keyboard(self) -> Any:
        if self.machine is None:
            return None
        for dev in self.machine.devices.values():
            if callable(getattr(dev, "inject_scancodes", None)):
                return dev
        return None

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def status(self) -> dict[str, Any]:
        machine = self.machine
        return {
            "name": self.name,
            "state": self.state.value,
            "accelerator": self.accel.name,
            "pid": os.getpid(),
            "vcpus": machine.num_vcpus if machine else None,
            "memory_mib": machine.memory.size >> 20 if machine else None,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0,
            "resets": self.resets,
            "exit_status": self.exit_status,
        }


# --- the control socket ------------------------------------------------------------
def control_socket_path(box_dir: Path, name: str) -> Path:
    return box_dir / f"{name}.ctl"


def _short_path(path: Path) -> tuple[str, int | None]:
    """Unix socket paths are limited to 107 bytes; reach long ones through the directory's
    /proc/self/fd entry. Returns the path to use and a directory fd to close after."""
    if len(os.fsencode(str(path))) < 100:
        return str(path), None
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{dfd}/{path.name}", dfd


class ControlServer:
    """JSON lines on a unix socket: one request per line, one reply per line.

    {"cmd": "status"}                    -> {"ok": true, "status": {...}}
    {"cmd": "stop", "mode": "soft"|"hard", "grace_s": 30} -> {"ok": true}
    {"cmd": "pause"} / {"cmd": "resume"}  -> {"ok": true}
    other commands (snapshot, suspend)     -> whichever handler knows them
    {"cmd": "console"}                   -> {"ok": true}, then the connection carries the
                                            raw COM1 byte stream both ways until closed
    Errors: {"ok": false, "error": "..."}.
    """

    def __init__(
        self,
        vmm: Vmm,
        path: Path,
        log: LogFn | None = None,
        handlers: list[Callable[[dict[str, Any]], dict[str, Any] | None]] | None = None,
    ) -> None:
        self.vmm = vmm
        self.path = path
        self.log = log or vmm.log
        # Commands of other parts (snapshot, suspend): each handler returns a reply, or
        # None for a command it does not know.
        self.handlers = list(handlers or [])
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a leftover of a dead VMM (the box lock says we own the box)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_path, dfd = _short_path(self.path)
        try:
            sock.bind(bind_path)
        finally:
            if dfd is not None:
                os.close(dfd)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        self.log(f"Control socket {self.path.name} ready.")

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            for line in reader:
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    cmd = request.get("cmd")
                    if cmd == "console":
                        self._reply(conn, {"ok": True})
                        self._console(conn, reader)
                        return
                    reply = self._handle(cmd, request)
                except (ValueError, BoiteError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # a bug must not cost the box its control socket
                    self.log(f"Control request {line[:200]!r} failed: {exc!r}")
                    reply = {"ok": False, "error": f"internal error: {exc!r}"}
                try:
                    self._reply(conn, reply)
                except OSError:
                    return

    @staticmethod
    def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def _handle(self, cmd: Any, request: dict[str, Any]) -> dict[str, Any]:
        vmm = self.vmm
        if cmd == "status":
            return {"ok": True, "status": vmm.status()}
        if cmd == "stop":
            mode = request.get("mode", "soft")
            if mode not in ("soft", "hard"):
                raise ValueError(f"stop mode {mode!r}: expected soft or hard")
            grace = request.get("grace_s", SOFT_STOP_GRACE_S)
            if not isinstance(grace, int | float) or grace < 0:
                raise ValueError(f"grace_s {grace!r}: expected a number of seconds >= 0")
            self.log(f"Stop ({mode}) requested through the control socket.")
            vmm.stop(soft=mode == "soft", grace_s=float(grace))
            return {"ok": True}
        if cmd == "pause":
            vmm.pause()
            return {"ok": True}
        if cmd == "resume":
            vmm.resume()
            return {"ok": True}
        for handler in self.handlers:
            reply = handler(request)
            if reply is not None:
                return reply
        raise ValueError(f"unknown command {cmd!r}: expected status, stop, pause, resume, console")

    def _console(self, conn: socket.socket, reader: Any) -> None:
        console = self.vmm.console
        if console is None:
            return
        self.log("Console attached.")

        def writer(data: bytes) -> None:
            conn.sendall(data)

        console.attach(writer)
        try:
            while True:
                data = reader.read1(4096)
                if not data:
                    break
                console.send(data)
        except OSError:
            pass
        finally:
            console.detach()
            self.log("Console detached.")


def control_request(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running box's control socket and return the reply."""
    sock = connect_control(path, timeout)
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    if not reply:
        raise BoxError(f"{path}: the VMM closed the control socket without a reply")
    data = json.loads(reply)
    if not data.get("ok"):
        raise BoxError(f"{path}: {data.get('error', 'request refused')}")
    return data


def connect_control(path: Path, timeout: float | None = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    target, dfd = _short_path(path) if path.parent.exists() else (str(path), None)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise BoxError(
            f"cannot reach the VMM at {path}: {exc.strerror or exc} (is the box running?)"
        ) from None
    finally:
        if dfd is not None:
            os.close(dfd)
    return sock
