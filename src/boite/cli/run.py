"""Verbs that run guests: boot (ephemeral, like `qemu -kernel`), start, stop, console."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

from boite.errors import BoxError

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
    _emu_tier_option(p)
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
    _emu_tier_option(p)
    p.add_argument(
        "--detach", action="store_true", help="run in the background (see `boite console`)"
    )
    p.add_argument("--json", action="store_true", help="with --detach: the VMM's pid as JSON")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="power off a running box")
    p.add_argument("box", help="box directory or .vmx file")
    p.add_argument(
        "mode", nargs="?", choices=("soft", "hard"), default="soft",
        help="soft: ask the guest (through the guest tools, else the ACPI power button, else "
        "Ctrl-Alt-Del), hard after a grace period; hard: pull the plug",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=_seconds, default=None, metavar="S",
        help="soft stop: seconds the guest gets before the plug is pulled (default 30, at "
        "most 86400)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print how the box stopped as JSON")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "console", help=f"attach to a running box's serial console ({DETACH_NAME} detaches)"
    )
    p.add_argument("box", help="box directory or .vmx file")
    p.set_defaults(func=cmd_console)


def _seconds(text: str) -> float:
    """A soft stop's timeout: a finite number of seconds from 0 to a day."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0 or value > 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds from 0 to 86400 (a day)")
    return value


def _accel_option(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--accel", choices=("kvm", "emu", "auto"), default=default,
        help="kvm (hardware), emu (full emulation) or auto (KVM on real VT-x/AMD-V, else emu)"
        + ("" if default else "; default: the box's monitor.virtual_exec"),
    )  # fmt: skip


def _emu_tier_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--emu-tier", choices=("auto", "python", "native"), default=None,
        help="the emulator's tier for guest code: native (x86-64 host code, x86-64 Linux hosts), "
        "python (the Python tiers, for debugging) or auto; default: BOITE_EMU_TIER, else the "
        "box's boite.emuTier, else auto",
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
        self._client: Any = None

    def start(self) -> None:
        with contextlib.suppress(OSError, termios.error):
            if os.isatty(0):
                self._saved_tty = termios.tcgetattr(0)
                _raw_keep_output(0)
        self._client = self.backend.attach(_write_all_stdout)
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
        client, self._client = self._client, None
        if client is not None:
            flush = getattr(client, "flush", None)
            if callable(flush):
                flush()  # the guest's last words reach the terminal
            with contextlib.suppress(Exception):
                self.backend.detach(client)
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


# --- the verbs: parse, call boite.launch, print ------------------------------------------
def _stdio_client(stop_on_detach: bool):
    """The console on this terminal; the detach key stops the VM (soft for a box)."""

    def make(console, vmm) -> StdioConsole:
        return StdioConsole(console, on_detach_key=lambda: vmm.stop(soft=stop_on_detach))

    return make


def cmd_boot(args: argparse.Namespace) -> int:
    from boite import launch

    spec = launch.BootSpec(
        kernel=args.kernel, initrd=args.initrd, append=args.append,
        memsize_mb=args.memsize, cpus=args.cpus, disks=tuple(args.disk), accel=args.accel,
        kernel_unpack=_unpack_setting(args.kernel_unpack), emu_tier=args.emu_tier,
    )  # fmt: skip
    # Events go the one logging path: stderr with -v (or BOITE_VERBOSE=1), warnings always.
    return launch.boot_kernel(spec, console_client=_stdio_client(False))


def _unpack_setting(flag: bool | None) -> str:
    return "auto" if flag is None else "true" if flag else "false"


def cmd_start(args: argparse.Namespace) -> int:
    from boite import launch
    from boite.box.paths import external_paths

    box = launch.open_box(args.box)
    for p in external_paths(box):  # named at every start (docs/security.md)
        if p.allowed:
            print(f"boite: note: {p}", file=sys.stderr)
    box.require_within_limits()
    launch.require_stopped(box)
    if args.detach:
        pid = launch.start(box, args.accel, args.emu_tier)
        if args.json:
            print(json.dumps({"ok": True, "box": box.name, "pid": pid}))
        else:
            print(f"{box.name} started (pid {pid}); `boite console {args.box}` attaches.")
        return 0
    return run_box(box, args.accel, args.emu_tier)


def cmd_stop(args: argparse.Namespace) -> int:
    import json

    from boite import launch

    box = launch.open_box(args.box)
    countdown = _Countdown(box.name) if not args.json else None
    try:
        stopped = launch.stop(
            box, args.mode, args.timeout, progress=countdown.show if countdown else None
        )
    finally:
        if countdown is not None:
            countdown.end()
    if stopped.problems:  # a failed flush: the guest's last writes may be lost
        from boite.errors import DiskError

        raise DiskError(f"{box.name} stopped, but powering off failed: "
                        + "; ".join(stopped.problems))  # fmt: skip
    if args.json:
        print(json.dumps({"ok": True, "box": box.name, "mode": args.mode, "how": stopped.how,
                          "method": stopped.method, "detail": stopped.detail}))  # fmt: skip
    elif stopped.how == "soft":
        print(f"{box.name} stopped (soft: {stopped.detail}).")
    elif stopped.how == "guest":
        print(f"{box.name} stopped (the guest powered off by itself).")
    else:
        why = "" if args.mode == "hard" else f": {stopped.detail}"
        print(f"{box.name} stopped (hard{why}).")
    return 0


class _Countdown:
    """`waiting for the guest (acpi): 27 s before a hard stop`, redrawn in place on a
    terminal, a line every 5 s elsewhere."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tty = sys.stderr.isatty()
        self.last: int | None = None
        self.shown = False

    def show(self, method: str, left: float) -> None:
        seconds = int(left + 0.999)
        if seconds == self.last or (not self.tty and self.last is not None and
                                     self.last - seconds < 5):  # fmt: skip
            return
        self.last = seconds
        text = f"{self.name}: asked the guest to power off ({method}); hard stop in {seconds} s"
        print(f"\r{text}\033[K" if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)  # fmt: skip
        self.shown = True

    def end(self) -> None:
        if self.shown and self.tty:
            print(file=sys.stderr, flush=True)


def cmd_console(args: argparse.Namespace) -> int:
    import json

    from boite.launch import open_box
    from boite.vmm import connect_control, control_socket_path

    box = open_box(args.box)
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


def run_box(box, accel: str | None = None, emu_tier: str | None = None) -> int:
    """Start `box` in the foreground with its console on this terminal (`start`, `boite
    demo`); the guest's exit status. On a terminal, Ctrl-] detaches: this command returns
    and the box keeps running in the background (`boite console` attaches again), as
    `start --detach` would have left it."""
    from boite import launch

    if not os.isatty(0):  # no detach key without a terminal: run right here
        return launch.run_box(box, accel, console_client=_stdio_client(False), emu_tier=emu_tier)
    # The VMM runs in a child that can outlive this process: on Ctrl-] it leaves the
    # terminal (a session of its own, stdio on /dev/null) and tells us to return.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os._exit(_foreground_vmm(box, accel, wfd, emu_tier) & 0xFF)
    os.close(wfd)
    return _wait_foreground_vmm(pid, rfd)


def _foreground_vmm(box, accel: str | None, wfd: int, emu_tier: str | None = None) -> int:
    from boite import launch
    from boite.errors import BoiteError

    detached = threading.Event()

    def make(console, vmm) -> StdioConsole:
        stdio = StdioConsole(console)

        def detach() -> None:
            stdio.stop()  # the terminal back to how it was
            print(f"\r\n[detached from {box.name}; it keeps running: `boite console` attaches "
                  "again, `boite stop` stops it]", file=sys.stderr, flush=True)  # fmt: skip
            detached.set()
            with contextlib.suppress(OSError):
                os.setsid()  # no controlling terminal: a closed terminal cannot hang it up
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            with contextlib.suppress(OSError):
                os.write(wfd, b"d")

        stdio.on_detach_key = detach
        return stdio

    try:
        return launch.run_box(box, accel, console_client=make, emu_tier=emu_tier)
    except BoiteError as exc:
        if not detached.is_set():
            print(f"boite: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - the child must exit through os._exit
        if not detached.is_set():
            print(f"boite: error: {exc!r}", file=sys.stderr, flush=True)
        return 1


def _wait_foreground_vmm(pid: int, rfd: int) -> int:
    """Wait for the foreground VMM child: its exit status, or 0 once it detached. Signals
    that would end this command reach the VMM as a hard stop, as before the fork."""
    import signal

    def forward(signum, frame) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child has the terminal's Ctrl-C
    with os.fdopen(rfd, "rb") as pipe:
        while True:
            try:
                said = pipe.read(1)
                break
            except InterruptedError:
                continue
    if said == b"d":
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
