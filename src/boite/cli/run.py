"""Verbs that run guests: boot (ephemeral, like `qemu -kernel`), start, stop, console."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boite.errors import BoiteError, BoxError

DETACH_KEY = 0x1D  # Ctrl-]
DETACH_NAME = "Ctrl-]"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "boot",
        help="boot a kernel in an ephemeral VM, console on stdin/stdout",
        description="Boot KERNEL (multiboot, bzImage or PVH vmlinux) in a VM that lives only "
        "as long as this command, like `qemu-system-x86_64 -kernel`. The exit status is the "
        "guest's isa-debug-exit status ((value << 1) | 1), 0 after a clean power-off. "
        f"{DETACH_NAME} on a terminal ends the VM.",
    )
    p.add_argument("kernel", help="kernel file")
    p.add_argument("--initrd", help="initial ramdisk (or multiboot module)")
    p.add_argument("--append", default="", metavar="CMDLINE", help="kernel command line")
    _accel_option(p, default="auto")
    p.add_argument("--memsize", type=int, default=256, metavar="MB", help="guest RAM (MiB)")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs")
    p.add_argument(
        "--disk", action="append", default=[], metavar="FILE", help="a disk (repeatable)"
    )
    p.add_argument(
        "--kernel-unpack", action=argparse.BooleanOptionalAction, default=None,
        help="decompress a 32-bit bzImage on the host and enter it at startup_32 (default: "
        "under the emulator, whose own run of the kernel's decompressor takes minutes)",
    )  # fmt: skip
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("start", help="power on a box")
    p.add_argument("box", help="box directory or .vmx file")
    _accel_option(p, default=None)
    p.add_argument(
        "--detach", action="store_true", help="run in the background (see `boite console`)"
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="power off a running box")
    p.add_argument("box", help="box directory or .vmx file")
    p.add_argument(
        "mode", nargs="?", choices=("soft", "hard"), default="soft",
        help="soft: ask the guest (Ctrl-Alt-Del), hard after a grace period; hard: pull the plug",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S",
        help="soft stop: seconds the guest gets before the plug is pulled (default 30)",
    )  # fmt: skip
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "console", help=f"attach to a running box's serial console ({DETACH_NAME} detaches)"
    )
    p.add_argument("box", help="box directory or .vmx file")
    p.set_defaults(func=cmd_console)


def _accel_option(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--accel", choices=("kvm", "emu", "auto"), default=default,
        help="kvm (hardware), emu (full emulation) or auto (KVM on real VT-x/AMD-V, else emu)"
        + ("" if default else "; default: the box's monitor.virtual_exec"),
    )  # fmt: skip


# --- the terminal ------------------------------------------------------------------
class StdioConsole:
    """Joins a console backend (attach/detach/send) to this process's stdin and stdout.

    A terminal on stdin is put in raw mode (restored on stop) so every key reaches the
    guest, except the detach key. stdin at EOF, closed or not a terminal is fine: input
    simply ends, output keeps flowing.
    """

    def __init__(self, backend: Any, on_detach_key: Callable[[], None] | None = None) -> None:
        self.backend = backend
        self.on_detach_key = on_detach_key
        self._saved_tty: list[Any] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(OSError, termios.error):
            if os.isatty(0):
                self._saved_tty = termios.tcgetattr(0)
                _raw_keep_output(0)
        self.backend.attach(_write_all_stdout)
        self._thread = threading.Thread(target=self._pump_input, name="stdin", daemon=True)
        self._thread.start()

    def _pump_input(self) -> None:
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                return  # stdin closed
            if not data:
                return
            if self._saved_tty is not None and DETACH_KEY in data:
                before = data[: data.index(DETACH_KEY)]
                if before:
                    self.backend.send(before)
                if self.on_detach_key is not None:
                    self.on_detach_key()
                return
            self.backend.send(data)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.backend.detach()
        if self._saved_tty is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None


def _raw_keep_output(fd: int) -> None:
    """Raw input (every key to the guest), but output post-processing kept as QEMU's stdio
    does, so a bare "\n" from a guest still starts a new line on the terminal."""
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[1] |= termios.OPOST | termios.ONLCR
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _write_all_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


# --- building the VM -----------------------------------------------------------------
def _machine_builder():
    try:
        from boite.machine.builder import build_machine
    except ImportError as exc:
        raise BoiteError(
            f"this build of boite has no machine builder (boite.machine.builder): {exc}"
        ) from None
    return build_machine


def _vmm_for(
    make_machine: Callable[[bool], Any], accel: str, console: Any, log, name: str,
    wrap_factory: Callable[[Callable[[], Any]], Callable[[], Any]] | None = None,
):  # fmt: skip
    """A Vmm whose machine matches its accelerator: KVM brings the in-kernel PIC, IOAPIC
    and PIT, the emulator needs boite's own (`make_machine(emulated_irqchip)`)."""
    from boite.vmm import Vmm, accelerator_for

    first = accelerator_for(accel, log=log)
    kind = type(first)
    used = [False]

    def factory():
        # The first accelerator is the probed one; a guest reset gets a fresh one.
        if not used[0]:
            used[0] = True
            return first
        return kind()

    emulated_irqchip = first.name != "kvm"
    if wrap_factory is not None:
        factory = wrap_factory(factory)
    return Vmm(lambda: make_machine(emulated_irqchip), factory, console=console, log=log, name=name)


def _once_powered_on(vmm, action: Callable[[], None]) -> None:
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


def _attach_stdio_on_power_on(vmm, stdio: StdioConsole) -> None:
    """Input typed before the UART exists would be lost: attach once the machine is up."""
    _once_powered_on(vmm, stdio.start)


class _DeviceHooks:
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


# NIC kinds boite backs with a host TAP device; others (VMware's "nat") have no host side here.
TAP_CONNECTIONS = ("bridged", "hostonly", "custom")


def _box_devices_hook(box) -> Any:
    from boite.machine.virtio.attach import BoxDevices

    devices = BoxDevices(box.config, box.dir)
    for nic in list(devices.plan.nics):
        if nic.connection_type not in TAP_CONNECTIONS:
            devices.plan.nics.remove(nic)
            box.log.info(
                f"{nic.key}: connectionType {nic.connection_type!r} has no host side in boite "
                f"(it backs {', '.join(TAP_CONNECTIONS)} with a TAP device); NIC left out"
            )
    return devices


def _install_stop_signals(vmm) -> None:
    def handler(signum, frame):
        vmm.stop(soft=False)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, handler)


def cmd_boot(args: argparse.Namespace) -> int:
    from boite.machine.devices import ConsoleBackend

    kernel = Path(args.kernel)
    if not kernel.is_file():
        raise BoxError(f"kernel {kernel}: no such file")
    if args.initrd is not None and not Path(args.initrd).is_file():
        raise BoxError(f"initrd {args.initrd}: no such file")
    if args.memsize < 1 or args.cpus < 1:
        raise BoxError("--memsize and --cpus must be positive")
    for spec in args.disk:
        path = (
            spec.partition(":")[2] if spec.startswith(("ide:", "ata:", "virtio:", "vd:")) else spec
        )
        if "://" not in path and not Path(path).exists():
            raise BoxError(f"--disk {spec}: no such file")
    build_machine = _machine_builder()
    console = ConsoleBackend()

    devices = _DeviceHooks(lambda: _disk_files_hook(args.disk))

    def make_machine(emulated_irqchip: bool):
        return build_machine(
            args.memsize, args.cpus, {1: console}, str(kernel), args.initrd, args.append,
            emulated_irqchip=emulated_irqchip, extra_devices=devices.fresh(),
            kernel_unpack=_unpack_setting(args.kernel_unpack),
        )  # fmt: skip

    def log(message: str) -> None:
        if os.environ.get("BOITE_VERBOSE"):
            print(f"boite: {message}", file=sys.stderr, flush=True)

    vmm = _vmm_for(make_machine, args.accel, console, log, kernel.name)
    vmm.on_power_on = devices.start
    stdio = StdioConsole(console, on_detach_key=lambda: vmm.stop(soft=False))
    _install_stop_signals(vmm)
    _attach_stdio_on_power_on(vmm, stdio)
    try:
        return vmm.run()
    finally:
        stdio.stop()
        devices.close()


def _unpack_setting(flag: bool | None) -> str:
    return "auto" if flag is None else "true" if flag else "false"


def _open_box(path: str):
    from boite.box.box import Box

    return Box.open(path)


def _box_file(box, key: str) -> str | None:
    value = box.config.get_str(key)
    if not value:
        return None
    path = Path(value)
    path = path if path.is_absolute() else box.dir / path
    if not path.is_file():
        raise BoxError(f"{box.vmx_path}: {key} = {value!r}: no such file ({path})")
    return str(path)


def cmd_start(args: argparse.Namespace) -> int:
    from boite.box.paths import external_paths

    box = _open_box(args.box)
    for p in external_paths(box):  # named at every start (docs/security.md)
        if p.allowed:
            print(f"boite: note: {p}", file=sys.stderr)
    box.require_within_limits()
    holder = box.lock_holder
    if holder is not None and not holder.is_dead_here():
        raise BoxError(f"{box.name} is already running ({holder.describe()})")
    if args.detach:
        return _start_detached(args, box)
    return _run_box(box, args.accel, attach_stdio=True)


def _run_box(box, accel: str | None, attach_stdio: bool, ready: Callable[[], None] | None = None):
    from boite.machine.builder import machine_from_box
    from boite.machine.devices import ConsoleBackend
    from boite.vmm import ControlServer, control_socket_path

    console = ConsoleBackend()
    with box.acquire_lock():
        log = box.log.info
        accel_name = accel or box.config.virtual_exec

        kernel = _box_file(box, "boite.kernel")
        if kernel is None:
            raise BoxError(
                f"{box.vmx_path}: no boite.kernel: boite starts boxes by direct kernel boot "
                '(set boite.kernel = "FILE", optionally boite.initrd and boite.cmdline)'
            )
        _box_file(box, "boite.initrd")  # a clear error now rather than at power-on

        devices = _DeviceHooks(lambda: _box_devices_hook(box))

        def make_machine(emulated_irqchip: bool):
            return machine_from_box(
                box, console=console, emulated_irqchip=emulated_irqchip,
                extra_devices=devices.fresh(),
            )  # fmt: skip

        wrap, snapshot_handler = _snapshot_hooks(box, log)
        vmm = _vmm_for(make_machine, accel_name, console, log, box.name, wrap)
        vmm.on_power_on = devices.start  # first: the hooks below chain onto it
        handlers = []
        if snapshot_handler is not None:
            handlers.append(lambda request: snapshot_handler(vmm, box, request))
        path = control_socket_path(box.dir, box.name)
        server = ControlServer(vmm, path, handlers=handlers)
        server.start()
        box.set_control_socket(str(path))
        _install_stop_signals(vmm)
        stdio = None
        if attach_stdio:
            stdio = StdioConsole(console, on_detach_key=lambda: vmm.stop(soft=True))
            _attach_stdio_on_power_on(vmm, stdio)
        if ready is not None:
            _once_powered_on(vmm, ready)  # `start --detach` returns once the guest runs
        try:
            status = vmm.run()
        except BoiteError as exc:
            box.log.error(str(exc))
            raise
        finally:
            if stdio is not None:
                stdio.stop()
            server.close()
            devices.close()
        box.log.info(f"Power off complete, exit status {status}.")
        return status


def _snapshot_hooks(box, log):
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
            return resuming_accelerator(factory, path, on_restored=lambda: resumed(box))

    return wrap, handle_control_request


def _start_detached(args: argparse.Namespace, box) -> int:
    """Fork a VMM that outlives this command; return once its control socket is up."""
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
            status = _run_box(_open_box(str(box.vmx_path)), args.accel, False, ready)
        except BaseException as exc:  # report to the parent if it still listens
            with contextlib.suppress(OSError):
                os.write(wfd, f"error {exc}\n".encode())
        finally:
            os._exit(status & 0xFF)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ok":
        print(f"{box.name} started (pid {pid}); `boite console {args.box}` attaches.")
        return 0
    os.waitpid(pid, 0)
    raise BoxError(f"{box.name} did not start: {line[6:] if line.startswith('error ') else line}")


def cmd_stop(args: argparse.Namespace) -> int:
    from boite.vmm import SOFT_STOP_GRACE_S, control_request, control_socket_path

    box = _open_box(args.box)
    holder = box.lock_holder
    if holder is None:
        raise BoxError(f"{box.name} is not running")
    grace = SOFT_STOP_GRACE_S if args.timeout is None else max(0.0, args.timeout)
    request = {"cmd": "stop", "mode": args.mode, "grace_s": grace}
    control_request(control_socket_path(box.dir, box.name), request)
    deadline = time.time() + (grace if args.mode == "soft" else 0) + 15
    while time.time() < deadline:
        if box.lock_holder is None:
            print(f"{box.name} stopped ({args.mode}).")
            return 0
        time.sleep(0.05)
    raise BoxError(
        f"{box.name} still holds its lock after the {args.mode} stop ({holder.describe()})"
    )


def cmd_console(args: argparse.Namespace) -> int:
    import json

    from boite.vmm import connect_control, control_socket_path

    box = _open_box(args.box)
    sock = connect_control(control_socket_path(box.dir, box.name), timeout=10)
    with sock:
        sock.sendall(json.dumps({"cmd": "console"}).encode() + b"\n")
        reader = sock.makefile("rb", buffering=0)
        reply = b""
        while not reply.endswith(b"\n"):
            byte = reader.read(1)
            if not byte:
                raise BoxError(f"{box.name}: the VMM closed the console")
            reply += byte
        if not json.loads(reply).get("ok"):
            raise BoxError(f"{box.name}: console refused: {reply.decode(errors='replace')}")
        sock.settimeout(None)
        print(f"[attached to {box.name}'s console; {DETACH_NAME} detaches]", file=sys.stderr)
        saved = None
        with contextlib.suppress(OSError, termios.error):
            if os.isatty(0):
                saved = termios.tcgetattr(0)
                _raw_keep_output(0)
        done = threading.Event()

        def pump_in() -> None:
            try:
                while True:
                    data = os.read(0, 4096)
                    if not data:
                        return  # stdin ended: keep showing output until the VM goes
                    if DETACH_KEY in data:
                        data = data[: data.index(DETACH_KEY)]
                        if data:
                            sock.sendall(data)
                        done.set()
                        with contextlib.suppress(OSError):
                            sock.shutdown(2)
                        return
                    sock.sendall(data)
            except OSError:
                return

        threading.Thread(target=pump_in, daemon=True).start()
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                _write_all_stdout(data)
        except OSError:
            pass
        finally:
            if saved is not None:
                with contextlib.suppress(OSError, termios.error):
                    termios.tcsetattr(0, termios.TCSADRAIN, saved)
        print(
            f"\r\n[detached from {box.name}]" if done.is_set() else f"\r\n[{box.name} stopped]",
            file=sys.stderr,
        )
    return 0


def run_box(box, accel: str | None = None) -> int:
    """Start `box` in the foreground with its console on this terminal (for `boite demo`)."""
    box.require_within_limits()
    return _run_box(box, accel, attach_stdio=True)
