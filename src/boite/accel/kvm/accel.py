"""The KVM accelerator: one thread per vCPU, each looping on KVM_RUN and handing every
port and MMIO exit to the machine's buses.

The exit path is the hot path (bench/kvm.py measures it): the kvm_run page is read
through memoryview casts resolved once per run, so an exit costs a few integer reads and
one bus call, with no per-exit allocation.
"""

from __future__ import annotations

import ctypes
import fcntl
import signal
import threading
from typing import TYPE_CHECKING, Any

from boite.accel.base import Accelerator, RunResult, StopReason
from boite.accel.cpustate import CpuState
from boite.accel.kvm import abi
from boite.accel.kvm.cpuid import vcpu_cpuid
from boite.accel.kvm.state import (
    STATE_MSRS,
    cs_mode,
    format_registers,
    insn_bytes_from_run,
    read_state,
    read_vm_state,
    write_state,
    write_vm_state,
)
from boite.accel.kvm.system import Kvm, KvmVcpu, KvmVm
from boite.errors import AccelError

if TYPE_CHECKING:
    from boite.machine.machine import Machine

# Where KVM keeps the real-mode TSS (3 pages) and the EPT identity-map page on Intel:
# just below the BIOS area at the top of the 4 GiB space, where QEMU puts them too.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

HALT_PROBE_S = 0.5  # how often a VM with the in-kernel APIC is checked for a dead halt
RFLAGS_IF = 1 << 9

# The signal that kicks a vCPU thread out of KVM_RUN (pause, stop, another vCPU failed).
KICK_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2

_INTERNAL_ERRORS = {
    abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    abi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}

_kick_handler_installed = False


def _install_kick_handler() -> bool:
    """A no-op Python handler, so the kick signal interrupts KVM_RUN without killing us.
    Only the main thread may install handlers; elsewhere pauses wait for the next exit."""
    global _kick_handler_installed
    if not _kick_handler_installed:
        if threading.current_thread() is not threading.main_thread():
            return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None, signal.SIG_IGN)
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_handler_installed = True
    return True


# Importing usually happens on the main thread: install the handler then, so VMs run
# from worker threads (tests, the control socket) can still be kicked.
_install_kick_handler()


def kvm_usable(path: str = "/dev/kvm") -> bool:
    """Whether a VM can be created here (for `--accel auto`)."""
    try:
        kvm = Kvm(path)
    except AccelError:
        return False
    try:
        kvm.create_vm().close()
        return True
    except AccelError:
        return False
    finally:
        kvm.close()


def _port_entry(bus: Any, port: int) -> tuple[Any, Any, int]:
    hit = bus.find(port)
    if hit is None:
        return (None, None, 0)  # unclaimed: reads float high, writes vanish (as Bus does)
    base, device = hit
    return (device.bus_read, device.bus_write, port - base)


class _VcpuRunner:
    """Per-vCPU bookkeeping shared between its thread and the threads that kick it."""

    def __init__(self, vcpu: KvmVcpu) -> None:
        self.vcpu = vcpu
        self.thread_id: int | None = None
        self.kick_lock = threading.Lock()
        self.halted = False  # stopped at HLT with no in-kernel APIC to wake it
        self.exits = 0
        # The halt probe: the last probe generation this vCPU answered, and its answer.
        self.probe_seen = 0
        self.dead_halt = False


class KvmAccelerator(Accelerator):
    """Runs a Machine under /dev/kvm.

    irqchip: use KVM's in-kernel PIC/IOAPIC/LAPIC and PIT (machine IRQ lines become
    KVM_IRQ_LINE). Without it, HLT exits to us and ends the run as HALTED, which suits
    bare-metal tests.
    ap_start: "sipi" (application processors wait for INIT/SIPI from the BSP, as on a PC)
    or "entry" (every vCPU starts at boot_state[0], for bare-metal SMP tests).
    """

    name = "kvm"

    def __init__(
        self, *, irqchip: bool = True, ap_start: str = "sipi", device: str = "/dev/kvm"
    ) -> None:
        if ap_start not in ("sipi", "entry"):
            raise AccelError(f"ap_start must be 'sipi' or 'entry', not {ap_start!r}")
        self.irqchip = irqchip
        self.ap_start = ap_start
        self.device = device
        self.machine: Machine | None = None
        self.kvm: Kvm | None = None
        self.vm: KvmVm | None = None
        self.runners: list[_VcpuRunner] = []
        self.msr_list: list[int] = []
        self._stopping = False
        self._pause_requested = False
        self._result: RunResult | BaseException | None = None
        self._done = threading.Event()
        self._result_lock = threading.Lock()
        self._device_lock: threading.Lock | None = None
        self._running = False
        self._can_signal = False
        self._probe_generation = 0
        self.exits = 0

    # --- setup ---------------------------------------------------------------------
    def create(self, machine: Machine, config: Any = None) -> None:
        self.machine = machine
        self.kvm = Kvm(self.device)
        try:
            self._create_vm(machine)
        except BaseException:
            self.close()
            raise

    def _create_vm(self, machine: Machine) -> None:
        assert self.kvm is not None
        kvm = self.kvm
        if not kvm.check_extension(abi.KVM_CAP_IMMEDIATE_EXIT):
            raise AccelError(f"{self.device}: KVM lacks KVM_CAP_IMMEDIATE_EXIT (kernel < 4.11?)")
        max_vcpus = kvm.check_extension(abi.KVM_CAP_MAX_VCPUS) or kvm.check_extension(
            abi.KVM_CAP_NR_VCPUS
        )
        if machine.num_vcpus < 1 or machine.num_vcpus > max_vcpus:
            raise AccelError(f"{machine.num_vcpus} vCPUs requested; this KVM allows 1..{max_vcpus}")
        self.vm = vm = kvm.create_vm()
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        if self.irqchip:
            vm.create_irqchip()
            vm.create_pit2()
            machine.irqs.attach(vm.irq_line)
        for region in machine.memory.regions:
            if region.gpa < TSS_ADDR + 3 * 4096 and IDENTITY_MAP_ADDR < region.end:
                raise AccelError(
                    f"guest RAM {region.gpa:#x}+{region.size:#x} overlaps KVM's TSS/identity "
                    f"map at {IDENTITY_MAP_ADDR:#x}"
                )
            anchor = ctypes.c_char.from_buffer(region.mm)
            host_addr = ctypes.addressof(anchor)
            del anchor  # the address stays valid while the mmap lives; don't pin the export
            vm.set_memory_region(region.gpa, region.size, host_addr)
        supported = kvm.supported_cpuid()
        for i in range(machine.num_vcpus):
            vcpu = vm.create_vcpu(i)
            vcpu.set_cpuid(vcpu_cpuid(supported, i, machine.num_vcpus, self.irqchip))
            self.runners.append(_VcpuRunner(vcpu))
        self.msr_list = self._readable_msrs(kvm.msr_index_list())
        self._device_lock = threading.Lock() if machine.num_vcpus > 1 else None
        self.load_boot_state()

    def _readable_msrs(self, host_list: list[int]) -> list[int]:
        """KVM_GET_MSRS stops at the first MSR it cannot read; keep those that read."""
        vcpu = self.runners[0].vcpu
        known = set(host_list)
        return [m for m in STATE_MSRS if m in known and vcpu.get_msrs([m])]

    def load_boot_state(self) -> None:
        """Put every vCPU where the machine's boot loader wants it."""
        assert self.machine is not None
        states = self.machine.boot_state
        for i, runner in enumerate(self.runners):
            runner.halted = False
            if i < len(states):
                write_state(runner.vcpu, states[i], self.irqchip)
            elif states and self.ap_start == "entry":
                write_state(runner.vcpu, states[0], self.irqchip)
            elif i > 0 and not self.irqchip:
                runner.halted = True  # no LAPIC, so no SIPI will ever start it
            elif i > 0:
                runner.vcpu.set_mp_state(abi.KVM_MP_STATE_UNINITIALIZED)

    def reset(self) -> None:
        """Back to the boot state (the VMM resets devices and reloads RAM as it needs)."""
        self._require_stopped("reset")
        self.load_boot_state()

    # --- running -------------------------------------------------------------------
    def run(self) -> RunResult:
        if self.vm is None or self.machine is None:
            raise AccelError("KvmAccelerator.run() before create()")
        self._can_signal = _install_kick_handler()
        runnable = [r for r in self.runners if not r.halted]
        if not runnable:
            return RunResult(StopReason.HALTED, detail="every vCPU is halted")
        with self._result_lock:
            if self._pause_requested and not self._running:
                # pause() came while no run was in progress: honour it now.
                self._pause_requested = False
                return RunResult(StopReason.PAUSED)
            self._stopping = False
            self._result = None
            self._done.clear()
            self._running = True
        for r in self.runners:
            r.vcpu.run.immediate_exit = 0
        # Every vCPU gets its own thread; the calling thread only waits. Process-directed
        # signals (Ctrl-C, SIGTERM) then reach a thread that runs Python handlers promptly,
        # instead of a main thread sitting inside KVM_RUN.
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(r,), name=f"kvm-vcpu{r.vcpu.index}",
                             daemon=True)
            for r in runnable
        ]  # fmt: skip
        if self.irqchip and self._can_signal:
            # With the in-kernel APIC, HLT never reaches us: watch for a machine whose
            # every vCPU halted with interrupts off (Linux's halt without ACPI).
            threads.append(threading.Thread(target=self._halt_watch, args=(runnable,),
                                            name="kvm-halt-watch", daemon=True))  # fmt: skip
        try:
            for t in threads:
                t.start()
            # Wait in slices so the main thread still sees SIGINT and friends.
            while not self._done.wait(0.25):
                pass
        finally:
            self._stop_all()
            self._done.set()  # also ends the halt watch when we leave by an exception
            for t in threads:
                if t.ident is not None:  # a signal can land before every thread started
                    t.join()
            with self._result_lock:
                self._running = False
        result = self._result
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result

    def pause(self) -> None:
        with self._result_lock:
            if not self._running:
                self._pause_requested = True  # the next run() returns PAUSED at once
                return
        self._finish(RunResult(StopReason.PAUSED))

    def _finish(self, result: RunResult | BaseException) -> None:
        """First stop reason wins; every vCPU is then kicked out of KVM_RUN."""
        with self._result_lock:
            if self._result is None:
                self._result = result
        self._stop_all()
        self._done.set()

    def _halt_watch(self, runnable: list[_VcpuRunner]) -> None:
        """Every HALT_PROBE_S, kick each vCPU (signal only: a probe must never look like
        a stop); each answers from its own thread whether it sits in HLT with IF=0."""
        while not self._done.wait(HALT_PROBE_S):
            self._probe_generation += 1
            generation = self._probe_generation
            for r in runnable:
                with r.kick_lock:
                    if r.thread_id is not None:
                        signal.pthread_kill(r.thread_id, KICK_SIGNAL)
            if self._done.wait(0.05):
                return
            if all(r.probe_seen == generation and r.dead_halt for r in runnable):
                self._finish(
                    RunResult(StopReason.HALTED, detail="every vCPU halted with interrupts off")
                )
                return

    @staticmethod
    def _halted_for_good(vcpu: KvmVcpu) -> bool:
        mp = vcpu.get_mp_state()
        if mp in (abi.KVM_MP_STATE_UNINITIALIZED, abi.KVM_MP_STATE_INIT_RECEIVED):
            return True  # an AP nobody started
        return mp == abi.KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF

    def _stop_all(self) -> None:
        self._stopping = True
        for r in self.runners:
            r.vcpu.run.immediate_exit = 1
            with r.kick_lock:
                if r.thread_id is not None and self._can_signal:
                    signal.pthread_kill(r.thread_id, KICK_SIGNAL)

    def _vcpu_thread(self, runner: _VcpuRunner) -> None:
        with runner.kick_lock:
            runner.thread_id = threading.get_ident()
        try:
            result: RunResult | BaseException | None = self._loop(runner)
        except BaseException as exc:  # device bug or guest error: end the whole run
            result = exc
        finally:
            with runner.kick_lock:
                runner.thread_id = None
        if result is None:  # this vCPU halted; the run ends when all have
            if all(r.halted for r in self.runners):
                self._finish(RunResult(StopReason.HALTED, detail="every vCPU halted"))
            return
        self._finish(result)

    def _loop(self, runner: _VcpuRunner) -> RunResult | None:
        """The KVM_RUN loop of one vCPU. Returns a stop reason, or None when it halted."""
        machine = self.machine
        assert machine is not None
        vcpu = runner.vcpu
        fd = vcpu.fd
        run_ioctl = fcntl.ioctl
        KVM_RUN = abi.KVM_RUN
        pio = machine.pio
        # Port -> (bus_read, bus_write, offset in the device's range), refreshed whenever
        # the bus changes: one dict lookup per exit instead of a bisect through the bus.
        pio_cache: dict[int, tuple[Any, Any, int]] = {}
        pio_version = pio.version
        masks = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
        mmio_read, mmio_write = machine.mmio.read, machine.mmio.write
        lock = self._device_lock
        b = memoryview(vcpu.run_mmap)
        h, w, q = b.cast("H"), b.cast("I"), b.cast("Q")
        # Data of an I/O exit by access size: the view of that width and the offset shift.
        views, shifts = (None, b, h, None, w), (0, 0, 1, 0, 2)
        # kvm_run offsets (checked against the kernel headers in the ABI test).
        EXIT_REASON = abi.RUN_OFF_EXIT_REASON // 4
        X = abi.RUN_OFF_EXIT  # start of the exit union: io / mmio
        IO_DIR, IO_SIZE, IO_PORT, IO_COUNT, IO_OFF = (
            X,
            X + 1,
            (X + 2) // 2,
            (X + 4) // 4,
            (X + 8) // 8,
        )
        MMIO_ADDR, MMIO_DATA, MMIO_LEN, MMIO_WRITE = X // 8, (X + 8) // 8, (X + 16) // 4, X + 20
        EXIT_IO, EXIT_MMIO, EXIT_INTR = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_INTR
        exits = 0
        try:
            while True:
                if self._stopping:
                    return RunResult(StopReason.PAUSED)
                try:
                    run_ioctl(fd, KVM_RUN, 0)
                except InterruptedError:
                    # Kicked: a stop (checked at the top), a halt probe, or a stray signal.
                    if self._probe_generation != runner.probe_seen and not self._stopping:
                        runner.dead_halt = self._halted_for_good(vcpu)
                        runner.probe_seen = self._probe_generation
                    continue
                except BlockingIOError:
                    continue  # an AP left its wait-for-SIPI state: KVM wants a re-run
                exits += 1
                reason = w[EXIT_REASON]
                if reason == EXIT_IO:
                    size = b[IO_SIZE]
                    port = h[IO_PORT]
                    count = w[IO_COUNT]
                    off = q[IO_OFF]
                    if lock is not None:
                        lock.acquire()
                    try:
                        view, shift = views[size], shifts[size]
                        if pio.version != pio_version:
                            pio_cache.clear()
                            pio_version = pio.version
                        port_entry = pio_cache.get(port)
                        if port_entry is None:
                            port_entry = pio_cache[port] = _port_entry(pio, port)
                        dev_read, dev_write, port_off = port_entry
                        if b[IO_DIR]:  # out
                            if dev_write is None:
                                pio.unclaimed += 1
                            elif count == 1:
                                dev_write(port_off, size, view[off >> shift])
                            else:  # string I/O (rep outs): count values back to back
                                for i in range(count):
                                    dev_write(port_off, size, view[(off >> shift) + i])
                            if machine.exit_status is not None or machine.reset_requested:
                                return self._machine_stop()
                        elif dev_read is None:
                            pio.unclaimed += 1
                            for i in range(count):
                                view[(off >> shift) + i] = masks[size]
                        elif count == 1:
                            view[off >> shift] = dev_read(port_off, size) & masks[size]
                        else:
                            for i in range(count):
                                view[(off >> shift) + i] = dev_read(port_off, size) & masks[size]
                    finally:
                        if lock is not None:
                            lock.release()
                elif reason == EXIT_MMIO:
                    addr, length = q[MMIO_ADDR], w[MMIO_LEN]
                    if length not in (1, 2, 4, 8):
                        return self._guest_error(
                            vcpu, f"MMIO access of {length} bytes at {addr:#x}"
                        )
                    if lock is not None:
                        lock.acquire()
                    try:
                        if b[MMIO_WRITE]:
                            mmio_write(addr, length, q[MMIO_DATA] & ((1 << (8 * length)) - 1))
                            if machine.exit_status is not None or machine.reset_requested:
                                return self._machine_stop()
                        else:
                            q[MMIO_DATA] = mmio_read(addr, length)
                    finally:
                        if lock is not None:
                            lock.release()
                elif reason == EXIT_INTR:
                    continue
                else:
                    stop = self._other_exit(runner, reason)
                    if stop is not None or runner.halted:
                        return stop
        finally:
            runner.exits += exits
            self.exits += exits
            for view in (h, w, q, b):
                view.release()

    def _machine_stop(self) -> RunResult:
        machine = self.machine
        assert machine is not None
        if machine.exit_status is not None:
            return RunResult(StopReason.SHUTDOWN, exit_status=machine.exit_status)
        return RunResult(StopReason.RESET)

    def _other_exit(self, runner: _VcpuRunner, reason: int) -> RunResult | None:
        """The rare exits: HLT, shutdown, failures, system events."""
        vcpu = runner.vcpu
        run = vcpu.run
        if reason == abi.KVM_EXIT_HLT:
            runner.halted = True
            return None
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return self._guest_error(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            return self._guest_error(
                vcpu,
                f"VM entry failed: hardware reason {fe.hardware_entry_failure_reason:#x} "
                f"on host CPU {fe.cpu}",
            )
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            what = _INTERNAL_ERRORS.get(ie.suberror, f"suberror {ie.suberror}")
            detail = f"KVM internal error: {what}"
            insn = (
                insn_bytes_from_run(run)
                if ie.suberror == abi.KVM_INTERNAL_ERROR_EMULATION
                else None
            )
            if insn:
                detail += f"; instruction bytes {insn.hex(' ')}"
            elif ie.ndata:
                detail += "; data " + " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            return self._guest_error(vcpu, detail)
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            ev = run.exit.system_event
            if ev.type == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                return RunResult(
                    StopReason.SHUTDOWN, exit_status=0, detail="system event: shutdown"
                )
            if ev.type == abi.KVM_SYSTEM_EVENT_RESET:
                return RunResult(StopReason.RESET, detail="system event: reset")
            return self._guest_error(vcpu, f"system event type {ev.type} (crash)")
        name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
        return self._guest_error(vcpu, f"unexpected KVM exit {name}")

    def _guest_error(self, vcpu: KvmVcpu, what: str) -> RunResult:
        try:
            mode = cs_mode(vcpu.get_sregs())
        except AccelError:
            mode = "unknown mode"
        detail = f"vCPU {vcpu.index} ({mode}): {what}\n{format_registers(vcpu)}"
        return RunResult(StopReason.ERROR, exit_status=1, detail=detail)

    # --- state ---------------------------------------------------------------------
    def _require_stopped(self, what: str) -> None:
        if self.vm is None:
            raise AccelError(f"KVM {what} before create()")
        if self._running:
            raise AccelError(f"KVM {what} while vCPUs run: pause first")

    def save_cpu_state(self) -> list[dict[str, Any]]:
        self._require_stopped("save_cpu_state")
        assert self.vm is not None
        out = []
        for r in self.runners:
            state = read_state(r.vcpu, self.msr_list, self.irqchip)
            state.extra["kvm_halted_no_lapic"] = r.halted
            out.append(state)
        out[0].extra["kvm_vm"] = read_vm_state(self.vm, self.irqchip)
        return [s.to_dict() for s in out]

    def load_cpu_state(self, state: list[dict[str, Any]]) -> None:
        self._require_stopped("load_cpu_state")
        assert self.vm is not None
        if len(state) != len(self.runners):
            raise AccelError(f"CPU state has {len(state)} vCPUs, this VM has {len(self.runners)}")
        states = [CpuState.from_dict(d) for d in state]
        vm_state = states[0].extra.get("kvm_vm")
        if vm_state:
            write_vm_state(self.vm, vm_state, self.irqchip)
        for r, s in zip(self.runners, states, strict=True):
            write_state(r.vcpu, s, self.irqchip)
            r.halted = bool(s.extra.get("kvm_halted_no_lapic", False)) or (
                s.halted and not self.irqchip
            )

    def registers(self, index: int = 0) -> str:
        """A register dump of one vCPU (stopped), for logs and errors."""
        self._require_stopped("registers")
        return format_registers(self.runners[index].vcpu)

    def close(self) -> None:
        if self._running:
            self._stop_all()
        for r in self.runners:
            r.vcpu.close()
        self.runners.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
