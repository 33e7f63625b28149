"""The VMM: a machine, an accelerator, the run loop and the lifecycle around them.

    Vmm(build, accel)        build() makes a fresh Machine (again at each guest reset)
      .run()                 runs until power-off, hard stop or a guest error
      .pause() / .resume()   from any thread (the control socket, a signal handler)
      .stop(soft=...)        soft: ask the guest (the `soft_stop_methods`, in order), then
                             pull the plug after a grace period; hard: pull the plug now
      .operation             the box-wide operation lock (OperationLock)
      .rebuild(restore)      power the machine off and on again in place (a revert)
      .status()              plain data for `boite list` / the control socket

A running box is driven from other processes through a unix socket in its directory
(`NAME.ctl`) speaking JSON lines; see ControlServer.

Every operation that changes the box's files while it runs (snapshot, revert,
delete-snapshot, suspend, and the power-off itself) holds `Vmm.operation`: requests over
the control socket run one at a time, never interleaved. VMM events go to the `boite.vmm`
logger (see boite.events: one path to vmware.log and `-v`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import importlib
import json
import logging
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boite.accel.base import Accelerator, RunResult, StopReason
from boite.errors import AccelError, BoiteError, BoxError, DiskError, GuestError
from boite.machine.machine import Machine

LogFn = Callable[[str], None]
_logger = logging.getLogger("boite.vmm")

# Ctrl-Alt-Del as scan code set 1 (what the i8042 hands the guest after translation):
# Ctrl, Alt, E0-prefixed Delete made, then broken in reverse order.
CTRL_ALT_DEL = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
SOFT_STOP_GRACE_S = 30.0
MAX_STOP_GRACE_S = 86400.0  # a day: longer is a typo, not a wish
OPERATION_WAIT_S = 120.0  # how long a request waits for the box's running operation
# How long a power-off waits for a running operation (a RAM snapshot writes ~1 GiB/s);
# after it the plug is pulled anyway and the operation's journal undoes it.
POWER_OFF_WAIT_S = 120.0


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


def accelerator_for(
    name: str, *, log: LogFn | None = None, emu_tier: str | None = None,
    emu_tier_config: str | None = None,
) -> Accelerator:  # fmt: skip
    """`kvm`, `emu`, or `auto` (KVM when /dev/kvm can make a VM here, else the emulator).
    Also takes the box's `monitor.virtual_exec` values hardware/software/automatic.
    `emu_tier` (--emu-tier) and `emu_tier_config` (the box's boite.emuTier) go to the
    emulator, which picks its tier with them (accel/emu/tiers.py)."""
    emu_args = {"tier": emu_tier, "tier_config": emu_tier_config}
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
            return _emulator(**emu_args)
        if kvm_usable():
            return KvmAccelerator()
        if name == "kvm":
            raise AccelError("KVM is not usable here (/dev/kvm missing or not accessible)")
        if log:
            log("KVM is not usable here; using the emulator.")
    return _emulator(**emu_args)


def _tier_stats(accel: Accelerator) -> dict[str, Any] | None:
    """The emulator's tier and its counts (accel/emu/tiers.py); None for KVM."""
    stats = getattr(accel, "tier_stats", None)
    return stats() if callable(stats) else None


def kvm_is_software_nested() -> bool:
    """True on hosts whose /dev/kvm is the kvm_pvm module rather than VT-x/AMD-V."""
    return os.path.exists("/sys/module/kvm_pvm")


def _emulator(tier: str | None = None, tier_config: str | None = None) -> Accelerator:
    try:
        module = importlib.import_module("boite.accel.emu")
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise AccelError(f"the emulator (boite.accel.emu) cannot be loaded: {exc}") from None
    for attr in ("EmuAccelerator", "EmulatorAccelerator", "Emulator"):
        cls = getattr(module, attr, None)
        if isinstance(cls, type) and issubclass(cls, Accelerator):
            return cls(tier=tier, tier_config=tier_config)
    raise AccelError(
        "the emulator accelerator (boite.accel.emu) is not available in this build: "
        "use --accel kvm on a host with /dev/kvm"
    )


class OperationLock:
    """The box-wide lock of operations that change a box's files (snapshot, revert,
    delete-snapshot, suspend, power-off). One holder at a time; a second caller waits up
    to `wait_s` and is then refused with a message naming what runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.current: str | None = None
        self.since: float | None = None

    @contextlib.contextmanager
    def hold(self, what: str, wait_s: float = OPERATION_WAIT_S) -> Iterator[None]:
        if not self._lock.acquire(timeout=max(0.0, wait_s)):
            running = self.current or "another operation"
            age = time.time() - self.since if self.since else 0.0
            raise BoxError(
                f"{self.name} is busy: {running} has been running for {age:.0f} s "
                f"(waited {wait_s:g} s); try again when it has finished"
            )
        self.current, self.since = what, time.time()
        try:
            yield
        finally:
            self.current, self.since = None, None
            self._lock.release()

    def describe(self) -> str | None:
        return self.current


@dataclass
class SoftStopMethod:
    """One way to ask a guest to power off. `request(vmm)` returns True when the request
    reached something that acts on it (an agent answered, the button exists), False when
    this way is not available for this machine; then the next method is tried."""

    name: str  # short, for --json and the control socket: "tools", "acpi", "keyboard"
    what: str  # for people: "the guest tools", "the ACPI power button"
    request: Callable[[Vmm], bool]


def _guest_tools(vmm: Vmm) -> bool:
    """The guest tools (boite.tools' host end, `vmm.guest_tools`): an agent that answers
    powers the guest off from inside, as VMware Tools do."""
    tools = vmm.guest_tools
    if tools is None or not getattr(tools, "running", False):
        return False
    return bool(tools.power())


def _acpi_power_button(vmm: Vmm) -> bool:
    """The platform's ACPI power button (`Machine.press_power_button()`, or a device
    with that method): True when the guest's OS listens to it (it enabled the power
    button event); its OSPM then shuts down."""
    machine = vmm.machine
    press = getattr(machine, "press_power_button", None)
    if not callable(press):
        device = vmm.find_device("press_power_button")
        press = device.press_power_button if device is not None else None
    return bool(press()) if callable(press) else False


def _ctrl_alt_del(vmm: Vmm) -> bool:
    """Ctrl-Alt-Del through the i8042 (the guest kit's init and the test guests power off
    on it); needs a keyboard controller and a guest with a keyboard driver."""
    keyboard = vmm.find_device("inject_scancodes")
    if keyboard is None:
        return False
    keyboard.inject_scancodes(CTRL_ALT_DEL)
    return True


def default_soft_stop_methods() -> list[SoftStopMethod]:
    """VMware's order: the guest tools (when the box has them: `Vmm.guest_tools`), else
    the ACPI power button, else Ctrl-Alt-Del on the keyboard; when none is there or the
    guest does not power off in time, the plug is pulled. Another way goes in with
    `Vmm.add_soft_stop_method(method, first=...)`."""
    return [
        SoftStopMethod("tools", "the guest tools", _guest_tools),
        SoftStopMethod("acpi", "the ACPI power button", _acpi_power_button),
        SoftStopMethod("keyboard", "Ctrl-Alt-Del on the keyboard", _ctrl_alt_del),
    ]


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
        # One path for events: the `boite.vmm` logger (vmware.log and -v hang off it);
        # a caller's function instead, for tests and embedders that collect lines.
        self.log: LogFn = log or _logger.info
        self.console = console
        self.name = name
        # Called after each power-on, once the machine (and its console's UART) exist.
        self.on_power_on = on_power_on
        self.machine: Machine | None = None
        self.state = VmState.CREATED
        self.exit_status: int | None = None
        self.started_at: float | None = None
        self.resets = 0
        self.operation = OperationLock(name)
        # The guest tools' host end (boite.tools), when the box has them: the first way
        # of a soft stop.
        self.guest_tools: Any = None
        self.soft_stop_methods: list[SoftStopMethod] = default_soft_stop_methods()
        # How the last stop went, for the control socket's `stop` reply and vmware.log.
        self.stop_outcome: dict[str, Any] | None = None
        self.power_off_problems: list[str] = []
        self.stopped = threading.Event()  # set once the machine is powered off
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._pause_requested = False
        self._stop_requested = False
        self._soft_method: SoftStopMethod | None = None
        self._soft_deadline: float | None = None
        self._watchdog: threading.Timer | None = None
        self._rebuild: _Rebuild | None = None
        self._reset_requested = False

    def add_soft_stop_method(self, method: SoftStopMethod, *, first: bool = False) -> None:
        """Add a way to ask the guest to power off; `first` puts it before the others
        (the guest tools go first, as in VMware)."""
        self.soft_stop_methods = [m for m in self.soft_stop_methods if m.name != method.name]
        if first:
            self.soft_stop_methods.insert(0, method)
        else:
            self.soft_stop_methods.append(method)

    def find_device(self, method: str) -> Any:
        """The first device of the running machine that has a callable `method`."""
        machine = self.machine
        if machine is None:
            return None
        for dev in machine.devices.values():
            if callable(getattr(dev, method, None)):
                return dev
        return None

    # --- lifecycle -----------------------------------------------------------------
    def _power_on(self, restore: Callable[[Machine, Accelerator], None] | None = None) -> None:
        self.machine = self._build()
        self.accel.create(self.machine, None)
        if restore is not None:
            restore(self.machine, self.accel)
        self.log(
            f"Powering on {self.name}: {self.machine.num_vcpus} vCPU(s), "
            f"{self.machine.memory.size >> 20} MiB, accelerator {self.accel.name}."
        )
        if self.machine.kernel_note:
            self.log(f"Kernel: {self.machine.kernel_note}.")
        tier = _tier_stats(self.accel)
        if tier is not None:
            self.log(f"Emulator tier: {tier['tier']} ({tier['why']}).")
        runs = getattr(self.accel, "max_vcpus", None)
        if runs is not None and self.machine.num_vcpus > runs:
            self.log(
                f"The {self.accel.name} accelerator runs {runs} vCPU(s): the other "
                f"{self.machine.num_vcpus - runs} stay parked, as before a start-up IPI."
            )
        self.state = VmState.RUNNING
        if self.on_power_on is not None:
            self.on_power_on(self.machine)

    def _power_off_hardware(self) -> list[str]:
        """Close the accelerator, the devices (disks flush here) and guest RAM. Returns
        what failed, each as one line: a failed flush means lost guest writes, which the
        caller reports rather than swallows."""
        problems: list[str] = []
        try:
            self.accel.close()
        except Exception as exc:  # noqa: BLE001 - reported below, the rest still closes
            problems.append(f"closing the {self.accel.name} accelerator: {exc}")
        tier = _tier_stats(self.accel)
        if tier is not None and tier["instructions"]:
            self.log(
                f"Emulator tier {tier['tier']}: {tier['instructions']} guest instructions, "
                f"{tier['native_instructions']} of them as native code "
                f"({tier['native_blocks']} blocks translated)."
            )
        if self.machine is not None:
            for name, dev in self.machine.devices.items():
                close = getattr(dev, "close", None)
                if callable(close):
                    try:
                        close()
                    except Exception as exc:  # noqa: BLE001 - as above
                        problems.append(f"closing {name} (flushing its data): {exc}")
            try:
                self.machine.memory.close()
            except BufferError:
                # Something still reads guest RAM (an operation that outlived its wait):
                # leave the mapping to the process's exit rather than crash here. No data
                # is lost by it (the operation's journal undoes what it did not finish).
                self.log("Power-off: guest RAM is still read by an operation; left mapped.")
            self.machine = None
        return problems

    def run(self) -> int:
        """Run until the guest powers off, a stop, or a guest error (raised as GuestError).
        Returns the exit status: the guest's debug-exit status, 0 after a clean power-off.
        Raises DiskError when powering off failed to flush (guest writes may be lost)."""
        if self.state is not VmState.CREATED:
            raise BoxError(f"{self.name} has already run; make a new Vmm")
        self.started_at = time.time()
        self._loop_thread = threading.current_thread()
        problems: list[str] = []
        try:
            self._power_on()
            status = self._loop()
        finally:
            self._cancel_watchdog()
            problems = self._power_off_waiting_for_operation()
            self.state = VmState.STOPPED
            self.stopped.set()
        if problems:
            raise DiskError(
                f"{self.name}: powering off failed: {'; '.join(problems)} "
                "(the guest's last writes may not be on disk)"
            )
        return status

    def _power_off_waiting_for_operation(self) -> list[str]:
        """A stop during a snapshot or suspend lets it finish on the paused machine (it
        reads guest RAM and the vCPUs) before the hardware goes away."""
        self.state = VmState.STOPPING
        busy = self.operation.describe()
        if busy:
            self.log(f"Power-off waits for the running operation ({busy}) to finish.")
        try:
            with self.operation.hold("power-off", wait_s=POWER_OFF_WAIT_S):
                problems = self._power_off_hardware()
        except BoxError:
            problems = self._power_off_hardware()
        self.power_off_problems = problems
        for problem in problems:
            _logger.error("Power-off: %s", problem)
            if self.log is not _logger.info:
                self.log(f"Power-off: {problem}")
        return problems

    def _loop(self) -> int:
        while True:
            if self._stop_requested:  # a stop that raced with a reset or a resume
                return self._stopped_hard("Powered off (hard stop).")
            result: RunResult = self.accel.run()
            reason = result.reason
            if reason is StopReason.PAUSED:
                if self._reset_requested and not self._stop_requested:
                    self._reset_requested = False
                    self.resets += 1
                    self.log("Reset (hard) requested: the machine is rebuilt.")
                    self._reset()
                    continue
                if self._stop_requested:
                    return self._stopped_hard("Powered off (hard stop).")
                if self._pause_requested:
                    self.state = VmState.PAUSED
                    self.log("Paused.")
                    self._resume.wait()
                    self._resume.clear()
                    if self._stop_requested:
                        return self._stopped_hard("Powered off while paused.")
                    rebuild, self._rebuild = self._rebuild, None
                    if rebuild is not None:
                        self._pause_requested = False
                        self._run_rebuild(rebuild)
                        continue
                    self.state = VmState.RUNNING
                    self.log("Resumed.")
                continue
            if reason is StopReason.SHUTDOWN:
                self.exit_status = result.exit_status
                route = getattr(self.machine, "poweroff_route", "") or result.detail or ""
                self.log(f"Guest powered off, exit status {result.exit_status}.")
                if route:
                    self.log(f"The guest powered off through {route}.")
                self._record_guest_power_off(route)
                return result.exit_status
            if reason is StopReason.HALTED:
                self.exit_status = 0
                self.log(f"Every vCPU halted with interrupts off: {result.detail}")
                self._record_guest_power_off("every vCPU halting with interrupts off")
                return 0
            if reason is StopReason.RESET:
                self.resets += 1
                self.log(f"Guest reset ({result.detail or 'reset requested'}).")
                self._reset()
                continue
            # StopReason.ERROR
            self.log(f"Guest error: {result.detail}")
            raise GuestError(f"{self.name}: {result.detail}")

    def _stopped_hard(self, message: str) -> int:
        self.log(message)
        if self.stop_outcome is None:
            self.stop_outcome = {"how": "hard", "method": None, "detail": "hard stop requested"}
        self.exit_status = 0 if self.exit_status is None else self.exit_status
        return self.exit_status

    def _record_guest_power_off(self, route: str = "") -> None:
        """`route`: how the guest went down (the machine's `poweroff_route`), said too."""
        method = self._soft_method
        how = f" ({route})" if route else ""
        if method is not None:
            detail = f"the guest powered off when asked through {method.what}{how}"
            self.log(f"Soft stop: {detail}.")
            self.stop_outcome = {"how": "soft", "method": method.name, "detail": detail}
        elif self.stop_outcome is None:
            self.stop_outcome = {"how": "guest", "method": None,
                                 "detail": f"the guest powered off{how}"}  # fmt: skip

    def _reset(self, restore: Callable[[Machine, Accelerator], None] | None = None) -> None:
        """A reset rebuilds the machine from its description, as a PC's firmware reloads;
        with `restore`, the new machine starts from saved state instead of booting."""
        problems = self._power_off_hardware()
        for problem in problems:
            self.log(f"Reset: {problem}")
        if problems:
            raise DiskError(f"{self.name}: the reset could not flush: {'; '.join(problems)}")
        if self._accel_factory is not None:
            self.accel = self._accel_factory()
        else:
            self.accel = type(self.accel)()
        self._power_on(restore)

    def rebuild(
        self, restore: Callable[[Machine, Accelerator], None] | None, timeout: float = 300.0
    ) -> None:
        """Power the (paused) machine off and on again from the box's current description,
        in the run loop's thread: a revert while running. `restore` puts a memory
        snapshot's state in (the guest resumes); without it the guest boots again.
        Call with the machine paused by the caller; returns once it runs again."""
        if self.state is not VmState.PAUSED:
            raise BoxError(f"{self.name} is {self.state.value}, not paused")
        job = _Rebuild(restore)
        self._rebuild = job
        self._resume.set()
        if not job.done.wait(timeout):
            raise BoxError(f"{self.name}: the machine did not restart within {timeout:g} s")
        if job.error is not None:
            raise job.error

    def _run_rebuild(self, job: _Rebuild) -> None:
        try:
            self._reset(job.restore)
        except BaseException as exc:
            job.error = (
                exc
                if isinstance(exc, BoiteError)
                else BoxError(f"{self.name}: restarting the machine failed: {exc}")
            )
            job.done.set()
            raise
        self.log("Running again after a revert.")
        job.done.set()

    def pause(self) -> None:
        if self.state is not VmState.RUNNING:
            raise BoxError(f"{self.name} is {self.state.value}, not running")
        self._pause_requested = True
        self.accel.pause()

    def request_reset(self) -> None:
        """A hard reset from outside (`boite reset BOX hard`): the machine is rebuilt, as
        after the guest's own reset."""
        if self.state is not VmState.RUNNING:
            raise BoxError(f"{self.name} is {self.state.value}, not running")
        self._reset_requested = True
        self.accel.pause()

    def resume(self, wait_s: float = 10.0) -> None:
        """Let the paused run loop go on, and return once it has left PAUSED: a caller
        that then releases the operation lock must not let the next operation see the
        old PAUSED state while the vCPUs start again (a snapshot would save a running
        CPU)."""
        if self.state is not VmState.PAUSED:
            raise BoxError(f"{self.name} is {self.state.value}, not paused")
        self._pause_requested = False
        self._resume.set()
        if threading.current_thread() is getattr(self, "_loop_thread", None):
            return
        deadline = time.monotonic() + wait_s
        while self.state is VmState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.001)

    def stop(self, soft: bool = False, grace_s: float = SOFT_STOP_GRACE_S) -> dict[str, Any]:
        """hard: pull the plug now. soft: ask the guest through the first of
        `soft_stop_methods` it has, and pull the plug if it is not off after `grace_s`;
        with no method, stop hard at once. Returns what was done: {"how": "soft" or
        "hard", "method", "grace_s"}; `stop_outcome` says how it ended."""
        grace_s = check_grace(grace_s)
        if self.state in (VmState.STOPPED, VmState.STOPPING):
            return {"how": "hard", "method": None, "grace_s": 0.0, "already": True}
        if soft and self._soft_method is not None:  # asked already: the first clock runs
            left = max(0.0, (self._soft_deadline or time.time()) - time.time())
            return {"how": "soft", "method": self._soft_method.name, "grace_s": left}
        if soft and self.state is VmState.PAUSED and self._rebuild is None:
            # A paused guest cannot hear the request: let it run to act on it.
            self.log("Soft stop of a paused box: resuming it so the guest can power off.")
            self.resume()
            deadline = time.monotonic() + 5
            while self.state is VmState.PAUSED and time.monotonic() < deadline:
                time.sleep(0.002)
        if soft and self.state is VmState.RUNNING:
            for method in self.soft_stop_methods:
                try:
                    reached = method.request(self)
                except Exception as exc:  # noqa: BLE001 - one broken way must not stop the next
                    self.log(f"Soft stop through {method.what} failed: {exc}")
                    continue
                if reached:
                    self._soft_method = method
                    self._soft_deadline = time.time() + grace_s
                    self.log(
                        f"Soft stop: asked the guest to power off through {method.what}; "
                        f"hard stop in {grace_s:g} s if it has not."
                    )
                    self._watchdog = threading.Timer(grace_s, self._soft_stop_timed_out)
                    self._watchdog.daemon = True
                    self._watchdog.start()
                    return {"how": "soft", "method": method.name, "grace_s": grace_s}
            ways = ", ".join(m.what for m in self.soft_stop_methods) or "none configured"
            detail = f"no way to ask this guest to power off (tried: {ways}); stopped hard"
            self.log(f"Soft stop: {detail}.")
            self.stop_outcome = {"how": "hard", "method": None, "detail": detail}
        elif soft:
            detail = f"the box was {self.state.value}, not running; stopped hard"
            self.log(f"Soft stop: {detail}.")
            self.stop_outcome = {"how": "hard", "method": None, "detail": detail}
        self._stop_hard()
        return {"how": "hard", "method": None, "grace_s": 0.0}

    def _soft_stop_timed_out(self) -> None:
        method = self._soft_method
        what = method.what if method is not None else "the guest"
        detail = f"the guest did not power off in time when asked through {what}; stopped hard"
        self.log(f"Soft stop: {detail}.")
        self.stop_outcome = {
            "how": "hard", "method": method.name if method else None, "detail": detail,
        }  # fmt: skip
        self._soft_method = None
        self._stop_hard()

    def _stop_hard(self) -> None:
        if self.state in (VmState.STOPPED,):
            return
        if self.state is not VmState.STOPPING:
            self.state = VmState.STOPPING
        self._stop_requested = True
        self._resume.set()
        with contextlib.suppress(Exception):  # an accelerator already closed has stopped
            self.accel.pause()

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
            "emu_tier": _tier_stats(self.accel),
            "pid": os.getpid(),
            "vcpus": machine.num_vcpus if machine else None,
            "memory_mib": machine.memory.size >> 20 if machine else None,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0,
            "resets": self.resets,
            "exit_status": self.exit_status,
            "operation": self.operation.describe(),
            "soft_stop": self._soft_method.name if self._soft_method else None,
        }


class _Rebuild:
    def __init__(self, restore: Callable[[Machine, Accelerator], None] | None) -> None:
        self.restore = restore
        self.done = threading.Event()
        self.error: BaseException | None = None


def check_grace(value: Any) -> float:
    """A soft stop's grace period in seconds: a finite number from 0 to a day."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BoxError(f"stop timeout {value!r}: expected a number of seconds")
    if math.isnan(value) or value < 0 or value > MAX_STOP_GRACE_S:
        raise BoxError(
            f"stop timeout {value!r}: expected seconds from 0 to {MAX_STOP_GRACE_S:g} (a day)"
        )
    return float(value)


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
    {"cmd": "stop", "mode": "soft"|"hard", "grace_s": 30} -> {"ok": true, "how", "method",
                                            "grace_s"}; with "wait": true a second line
                                            follows once powered off: {"ok": true,
                                            "done": true, "outcome": {"how", "method",
                                            "detail"}}
    {"cmd": "pause"} / {"cmd": "resume"}  -> {"ok": true}
    other commands (snapshot, suspend)     -> whichever handler knows them
    {"cmd": "console"}                   -> {"ok": true}, then the connection carries the
                                            raw COM1 byte stream both ways until closed
    Errors: {"ok": false, "error": "..."}.

    Bounded: a request line is at most MAX_REQUEST_BYTES, at most MAX_CLIENTS connections
    are served at once (the rest wait in the listen backlog), a silent connection is closed
    after IDLE_TIMEOUT_S (so idle clients cannot hold every slot), and running out of file descriptors (EMFILE) only slows the
    accept loop down.
    """

    MAX_REQUEST_BYTES = 64 * 1024
    MAX_CLIENTS = 64
    BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
    IDLE_TIMEOUT_S = 15.0  # a client that connects and says nothing (ours speak at once)
    REPLY_DRAIN_S = 5.0  # how long close() lets handlers finish their last reply

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
        self._slots = threading.BoundedSemaphore(self.MAX_CLIENTS)
        self._active: set[threading.Thread] = set()
        self._consoles: set[socket.socket] = set()
        self._active_lock = threading.Lock()

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
        sock.listen(self.BACKLOG)
        sock.settimeout(0.5)  # so the loop notices close() while it waits for a slot
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
        with self._active_lock:
            consoles = list(self._consoles)
        for conn in consoles:  # the machine is off: viewers see the end of the stream
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        # A `stop --wait` reply goes out after the power-off: let it reach the client.
        deadline = time.monotonic() + self.REPLY_DRAIN_S
        with self._active_lock:
            active = list(self._active)
        for thread in active:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._closing:
            if not self._slots.acquire(timeout=0.5):
                continue  # every slot busy: the backlog holds newcomers
            sock = self._sock
            if sock is None:
                self._slots.release()
                return
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError as exc:
                self._slots.release()
                if self._closing:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory for now: wait, keep serving.
                    if backoff == 0.0:
                        self.log(f"Control socket: cannot accept ({exc.strerror}); retrying.")
                    backoff = min(1.0, backoff * 2 or 0.01)
                    time.sleep(backoff)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    continue
                self.log(f"Control socket: accept failed ({exc}); no more requests served.")
                return
            backoff = 0.0
            thread = threading.Thread(target=self._serve_slot, args=(conn,), daemon=True)
            with self._active_lock:
                self._active.add(thread)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: refuse this one, keep serving
                with self._active_lock:
                    self._active.discard(thread)
                conn.close()
                self._slots.release()

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            with self._active_lock:
                self._active.discard(threading.current_thread())
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.IDLE_TIMEOUT_S)
            reader = conn.makefile("rb")
            while True:
                try:
                    line = reader.readline(self.MAX_REQUEST_BYTES + 1)
                except OSError:  # idle too long, or the client went
                    return
                if not line:
                    return
                if len(line) > self.MAX_REQUEST_BYTES:
                    with contextlib.suppress(OSError):
                        self._reply(conn, {"ok": False, "error": (
                            f"request longer than {self.MAX_REQUEST_BYTES} bytes"
                        )})  # fmt: skip
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    cmd = request.get("cmd")
                    if cmd == "console":
                        self._reply(conn, {"ok": True})
                        conn.settimeout(None)
                        self._console(conn, reader)
                        return
                    if cmd == "stop" and request.get("wait"):
                        self._stop_and_report(conn, request)
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

    def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        mode = request.get("mode", "soft")
        if mode not in ("soft", "hard"):
            raise ValueError(f"stop mode {mode!r}: expected soft or hard")
        grace = check_grace(request.get("grace_s", SOFT_STOP_GRACE_S))
        self.log(f"Stop ({mode}) requested through the control socket.")
        vmm = self.vmm
        if mode == "soft":
            # Not in the middle of a snapshot or revert: after it, the guest runs again.
            with vmm.operation.hold(f"soft stop of {vmm.name}"):
                done = vmm.stop(soft=True, grace_s=grace)
        else:
            done = vmm.stop(soft=False)  # never waits: a hard stop always works
        return {"ok": True, **done}

    def _stop_and_report(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """`stop` with "wait": the first reply says what was done, the second how it
        ended once the machine is off (the CLI counts down in between)."""
        try:
            first = self._stop(request)
        except (ValueError, BoiteError) as exc:
            self._reply(conn, {"ok": False, "error": str(exc)})
            return
        with contextlib.suppress(OSError):
            self._reply(conn, first)
        conn.settimeout(None)
        self.vmm.stopped.wait()
        outcome = self.vmm.stop_outcome or {"how": "hard", "method": None, "detail": ""}
        reply: dict[str, Any] = {"ok": True, "done": True, "outcome": outcome}
        if self.vmm.power_off_problems:
            reply["problems"] = self.vmm.power_off_problems
        with contextlib.suppress(OSError):
            self._reply(conn, reply)

    def _handle(self, cmd: Any, request: dict[str, Any]) -> dict[str, Any]:
        vmm = self.vmm
        if cmd == "status":
            return {"ok": True, "status": vmm.status()}
        if cmd == "stop":
            return self._stop(request)
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
        # The viewer's own bounded buffer (ConsoleClient) is where a slow viewer's output
        # waits and is dropped; a large socket buffer would only hide that for a while.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

        def writer(data: bytes) -> None:
            conn.sendall(data)

        client = console.attach(writer)
        self.log("Console attached.")  # after: a viewer sees everything from here on
        with self._active_lock:
            self._consoles.add(conn)
        try:
            while True:
                data = reader.read1(4096)
                if not data:
                    break
                console.send(data)
        except OSError:
            pass
        finally:
            with self._active_lock:
                self._consoles.discard(conn)
            console.detach(client)
            self.log("Console detached.")


MAX_REPLY = 16 << 20  # a reply is a JSON line; nothing the VMM sends comes near this


def control_request(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running box's control socket and return the reply."""
    sock = connect_control(path, timeout)
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = sock.makefile("rb").readline(MAX_REPLY)
    if len(reply) >= MAX_REPLY:
        raise BoxError(f"{path}: the VMM's reply is longer than {MAX_REPLY} bytes")
    if not reply:
        raise BoxError(f"{path}: the VMM closed the control socket without a reply")
    data = json.loads(reply)
    if not data.get("ok"):
        raise BoxError(f"{path}: {data.get('error', 'request refused')}")
    return data


def connect_control(path: Path, timeout: float | None = 10.0) -> socket.socket:
    # A shipped box could hold NAME.ctl as a link to another service's socket: talk only
    # to a socket file that is there itself, made by this user (as the VMM makes it).
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BoxError(
            f"cannot reach the VMM at {path}: no control socket (is the box running?)"
        ) from None
    except OSError as exc:
        raise BoxError(f"cannot reach the VMM at {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket of this user"
        raise BoxError(f"{path}: the control socket is {kind}; refusing to connect")
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
