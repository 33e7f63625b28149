"""Bare-metal guest programs (tests/guests/*.asm) under the real /dev/kvm."""

from __future__ import annotations

import threading
import time

import pytest

from boite.accel.base import StopReason
from boite.accel.cpustate import CpuState
from boite.accel.kvm import KvmAccelerator, abi, kvm_usable
from boite.accel.kvm.cpuid import LEAF1_ECX_HYPERVISOR, vcpu_cpuid
from boite.accel.kvm.system import Kvm
from conftest import requires_kvm, requires_real_vtx
from guests.runner import MMIO_TEST_BASE, build_guest_machine, run_guest

pytestmark = requires_kvm


def bare(**kw):
    """Bare-metal tests run without the in-kernel irqchip unless they need it, so a
    halting vCPU exits to us instead of sleeping in the kernel."""
    return lambda: KvmAccelerator(irqchip=kw.get("irqchip", False), ap_start="entry")


def test_kvm_is_usable_here():
    assert kvm_usable()


def test_real_mode_guest():
    run = run_guest("real16", "real", bare())
    assert run.result.reason is StopReason.SHUTDOWN, run.result.detail
    assert run.output == b"real mode: hello from 16-bit code r\n"
    assert run.result.exit_status == (0x11 << 1) | 1


def test_flat_32bit_protected_mode_guest():
    run = run_guest("prot32", "flat32", bare())
    assert run.output == b"protected mode: sum 1..1000 = 500500\n"
    assert run.result.exit_status == (0x21 << 1) | 1


def test_64bit_long_mode_guest():
    run = run_guest("long64", "long64", bare())
    assert run.output.endswith(b"= 0x123456789abcdf00\n"), run.output
    assert run.result.exit_status == (0x31 << 1) | 1


def test_uart_input_is_echoed():
    run = run_guest("echo32", "flat32", bare(), input=b"hello, guest\n")
    assert run.output == b"echo> hello, guest\n"
    assert run.result.exit_status == (0x22 << 1) | 1


def test_mmio_device_sees_every_access_with_its_size():
    run = run_guest("mmio32", "flat32", bare())
    assert run.result.exit_status == (0x23 << 1) | 1, run.output
    assert run.output == b"mmio: device answered\n"
    assert run.mmio_device.accesses == [
        ("write", 0x0, 4, 0x12345),
        ("read", 0x4, 4, 0x12345 * 3 + 1),
        ("write", 0x8, 4, 0x12345 * 3 + 1),
        ("write", 0x10, 1, 0xAB),
    ]
    assert MMIO_TEST_BASE == 0xD000_0000


@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "in-kernel-irqchip"])
def test_two_vcpus_each_report_in(irqchip):
    run = run_guest("smp32", "flat32", bare(irqchip=irqchip), vcpus=2)
    assert run.result.exit_status == (0x24 << 1) | 1, run.result.detail
    lines = sorted(run.output.decode().splitlines())
    assert lines == ["cpu 0 reporting", "cpu 1 reporting"]


def test_triple_fault_is_a_guest_error_with_registers():
    run = run_guest("triple32", "flat32", bare())
    assert run.result.reason is StopReason.ERROR
    assert "triple fault" in run.result.detail
    assert "rip=0000000000100" in run.result.detail  # inside the guest at 1 MiB
    assert "32-bit protected mode" in run.result.detail


def test_emulation_failure_is_a_guest_error_with_registers():
    run = run_guest("mmiofetch32", "flat32", bare())
    assert run.result.reason is StopReason.ERROR
    assert "emulation failure" in run.result.detail
    assert "rip=00000000d0000000" in run.result.detail


def test_hlt_with_interrupts_off_stops_the_run():
    run = run_guest("halt32", "flat32", bare())
    assert run.result.reason is StopReason.HALTED
    assert run.output == b"z"


@requires_real_vtx
def test_pit_timer_interrupts_reach_the_guest_idt():
    run = run_guest("pit32", "flat32", bare(irqchip=True))
    assert run.result.exit_status == (0x25 << 1) | 1, run.result.detail
    assert run.output == b"pit: 10 ticks\n"


@requires_real_vtx
def test_guest_turns_on_32bit_paging():
    run = run_guest("paging32", "flat32", bare())
    assert run.result.exit_status == (0x26 << 1) | 1, run.result.detail
    assert run.output == b"paging: alias ok\n"


def test_application_processors_start_through_init_sipi():
    accel = lambda: KvmAccelerator(irqchip=True, ap_start="sipi")  # noqa: E731
    run = run_guest("sipi32", "flat32", accel, vcpus=3)
    assert run.result.exit_status == (0x29 << 1) | 1, run.result.detail
    assert run.output == b"ap up\nap up\nbsp: all aps up\n"


class CounterPort:
    """Port 0x510: records the guest's counter; can ask the accelerator to pause."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.pause_at: int | None = None
        self.accel: KvmAccelerator | None = None

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)
        if value == self.pause_at and self.accel is not None:
            self.accel.pause()


def _counting_machine(limit: int):
    machine, com1, _ = build_guest_machine("count32", "flat32", LIMIT=limit)
    port = CounterPort()
    machine.pio.register(0x510, 4, port)
    return machine, port


@pytest.mark.parametrize("fxsave_only", [False, True], ids=["kvm-blobs", "neutral-fields-only"])
def test_paused_state_resumes_in_a_new_vm(fxsave_only):
    """Pause mid-count, save the CPU state, load it into a fresh VM with a copy of RAM:
    the count carries on from the saved value (what a memory snapshot needs)."""
    machine, port = _counting_machine(5000)
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    port.accel = accel
    port.pause_at = 1234
    result = accel.run()
    assert result.reason is StopReason.PAUSED
    assert port.values == list(range(1, 1235))
    saved = accel.save_cpu_state()
    ram = machine.memory.read(0, machine.memory.size)
    accel.close()
    state = CpuState.from_dict(saved[0])
    assert state.gpr["rbx"] == 1234
    assert state.segments["cs"].selector == 0x08 and state.cr0 & 1
    assert len(state.fxsave) == 512 and state.extra["kvm_lapic"]
    assert "kvm_vm" in state.extra and state.extra["kvm_vm"]["kvm_clock_ns"] > 0
    if fxsave_only:
        # What the emulator would hand over: no KVM blobs at all.
        state.extra = {}
        saved = [state.to_dict()]

    machine2, port2 = _counting_machine(5000)
    machine2.memory.write(0, ram)
    accel2 = KvmAccelerator(irqchip=True)
    accel2.create(machine2)
    try:
        accel2.load_cpu_state(saved)
        result = accel2.run()
    finally:
        accel2.close()
    assert result.reason is StopReason.SHUTDOWN
    assert result.exit_status == (0x28 << 1) | 1
    assert port2.values == list(range(1235, 5001))


def test_state_round_trips_through_the_neutral_format():
    machine, port = _counting_machine(100)
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    try:
        first = accel.save_cpu_state()
        accel.load_cpu_state(first)
        second = accel.save_cpu_state()
    finally:
        accel.close()
    for key in ("gpr", "rip", "rflags", "segments", "gdt", "idt", "cr0", "cr3", "cr4", "efer"):
        assert first[0][key] == second[0][key], key
    assert first[0]["fxsave"] == second[0]["fxsave"]
    assert first[0]["extra"]["kvm_lapic"] == second[0]["extra"]["kvm_lapic"]
    assert set(first[0]["msrs"]) == set(second[0]["msrs"])


def test_pause_and_resume_a_guest_that_never_exits():
    machine, _, _ = build_guest_machine("spin32", "flat32")
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    counters = []
    try:
        for _ in range(3):
            timer = threading.Timer(0.2, accel.pause)
            timer.start()
            result = accel.run()
            timer.join()
            assert result.reason is StopReason.PAUSED
            counters.append(CpuState.from_dict(accel.save_cpu_state()[0]).gpr["rax"])
    finally:
        accel.close()
    # the guest's counter only moves forward: each run resumed where the last one paused
    assert counters == sorted(counters) and counters[-1] > 0


def test_state_calls_are_refused_while_running():
    machine, _, _ = build_guest_machine("spin32", "flat32")
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    errors = []

    def try_save():
        while not accel._running:  # wait until the run is really in progress
            time.sleep(0.01)
        try:
            accel.save_cpu_state()
        except Exception as exc:
            errors.append(exc)
        accel.pause()

    try:
        timer = threading.Timer(0.1, try_save)
        timer.start()
        assert accel.run().reason is StopReason.PAUSED
        timer.join()
    finally:
        accel.close()
    assert len(errors) == 1 and "pause first" in str(errors[0])


def test_cpuid_tells_each_vcpu_its_apic_id_and_the_hypervisor():
    kvm = Kvm()
    try:
        supported = kvm.supported_cpuid()
    finally:
        kvm.close()
    for index in range(4):
        table = vcpu_cpuid(supported, index, 4, lapic=True)
        leaf1 = next(e for e in table if e.function == 1)
        assert leaf1.ecx & LEAF1_ECX_HYPERVISOR
        assert leaf1.ebx >> 24 == index
        assert (leaf1.ebx >> 16) & 0xFF == 4
        topo = {e.index: e for e in table if e.function == 0xB}
        if topo:
            assert topo[1].ebx == 4 and topo[1].edx == index and (topo[1].ecx >> 8) == 2
    no_apic = next(e for e in vcpu_cpuid(supported, 0, 1, lapic=False) if e.function == 1)
    assert not no_apic.edx & (1 << 9)


def test_irq_lines_drive_the_in_kernel_irqchip():
    """A device raising GSI 4 shows up in the in-kernel IOAPIC's state (IRR bit)."""
    machine, _, _ = build_guest_machine("spin32", "flat32")
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    try:
        assert accel.vm is not None
        line = machine.irqs.line(4)
        before = accel.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER)
        line.raise_()
        after = accel.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER)
        line.lower()
    finally:
        accel.close()
    # kvm_pic_state: last_irr is byte 0 of the chip union, irr byte 1 (after the 8-byte header)
    assert not before[8 + 1] & 0x10
    assert after[8 + 1] & 0x10


def test_too_many_vcpus_is_a_clear_error():
    from boite.errors import AccelError

    machine, _, _ = build_guest_machine("spin32", "flat32", vcpus=100000)
    with pytest.raises(AccelError, match="vCPUs requested"):
        KvmAccelerator().create(machine)


class WordCounter:
    """Port 0x520 reads 1, 2, 3, ... (16-bit); port 0x524 records what is written."""

    def __init__(self) -> None:
        self.next = 1
        self.written: list[tuple[int, int]] = []

    def bus_read(self, offset: int, size: int) -> int:
        value, self.next = self.next, self.next + 1
        return value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.written.append((size, value))


def test_string_io_moves_every_element():
    machine, com1, _ = build_guest_machine("strio32", "flat32")
    ports = WordCounter()
    machine.pio.register(0x520, 8, ports)
    accel = KvmAccelerator(irqchip=False)
    accel.create(machine)
    try:
        result = accel.run()
    finally:
        accel.close()
    assert result.exit_status == (0x2A << 1) | 1, result.detail
    assert bytes(com1.output) == b"string io ok\n"
    assert ports.next == 9  # eight word reads
    assert ports.written == [
        (4, (2 << 16) | 1),
        (4, (4 << 16) | 3),
        (4, (6 << 16) | 5),
        (4, (8 << 16) | 7),
    ]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_dead_halt_under_the_in_kernel_apic_ends_the_run(vcpus):
    """cli; hlt on every vCPU sleeps inside KVM; the halt probe must notice."""
    run = run_guest(
        "halt_irqchip32", "flat32", lambda: KvmAccelerator(irqchip=True, ap_start="entry"),
        vcpus=vcpus,
    )  # fmt: skip
    assert run.result.reason is StopReason.HALTED, run.result
    assert run.output == b"h"


def test_an_idle_guest_with_interrupts_on_is_not_taken_for_dead():
    """spin32 never halts: the guest keeps running through several halt probes, and
    only a pause stops it."""
    machine, _, _ = build_guest_machine("spin32", "flat32")
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)

    def pause_after_three_probes() -> None:
        deadline = time.monotonic() + 60
        while accel._probe_generation < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        accel.pause()

    try:
        watcher = threading.Thread(target=pause_after_three_probes)
        watcher.start()
        result = accel.run()
        watcher.join()
    finally:
        accel.close()
    assert result.reason is StopReason.PAUSED
    assert accel._probe_generation >= 3


def test_a_state_with_an_msr_kvm_refuses_still_loads_the_others():
    machine, _, _ = build_guest_machine("spin32", "flat32")
    accel = KvmAccelerator(irqchip=True)
    accel.create(machine)
    try:
        state = CpuState.from_dict(accel.save_cpu_state()[0])
        state.extra = {}  # as the emulator would hand it over
        state.msrs = {0x12345678: 1, 0x174: 0x10, 0x176: 0xCAFE}  # bogus, SYSENTER_CS/EIP
        accel.load_cpu_state([state.to_dict()])
        back = CpuState.from_dict(accel.save_cpu_state()[0])
    finally:
        accel.close()
    assert back.msrs[0x174] == 0x10 and back.msrs[0x176] == 0xCAFE
