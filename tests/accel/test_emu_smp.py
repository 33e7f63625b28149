"""Several vCPUs under the emulator: each with a local APIC, in turn on one thread."""

from __future__ import annotations

import threading
import time

import pytest

from boite.accel.emu import EmuAccelerator
from boite.errors import CheckpointError
from boite.machine.builder import build_machine
from guests import boot
from guests.build import assemble
from guests.runner import CollectedOutput, build_guest_machine, run_guest

pytestmark = pytest.mark.emu_tiers  # both tiers (tests/conftest.py)

LOAD = 0x100000


def test_two_vcpus_each_report_in():
    run = run_guest("smp32", "flat32", lambda: EmuAccelerator(ap_start="entry"), vcpus=2)
    assert run.result.exit_status == (0x24 << 1) | 1, run.result.detail
    lines = sorted(run.output.decode().splitlines())
    assert lines == ["cpu 0 reporting", "cpu 1 reporting"]


def test_application_processors_start_through_init_sipi():
    run = run_guest("sipi32", "flat32", EmuAccelerator, vcpus=3)
    assert run.result.exit_status == (0x29 << 1) | 1, run.result.detail
    assert run.output == b"ap up\nap up\nbsp: all aps up\n"


def test_apic_timer_ticks_and_a_fixed_ipi_wakes_a_halted_vcpu():
    run = run_guest("apic32", "flat32", lambda: EmuAccelerator(ap_start="entry"), vcpus=2)
    assert run.result.exit_status == (0x2A << 1) | 1, run.result.detail
    assert run.output == b"apic: 5 ticks, ipi taken\n"


def test_a_code_write_by_one_vcpu_drops_anothers_translated_code():
    run = run_guest("smc_smp32", "flat32", lambda: EmuAccelerator(ap_start="entry"), vcpus=2)
    assert run.result.exit_status == (0x2B << 1) | 1, run.result.detail


def test_pc_interrupts_reach_the_apics_through_the_8259_and_the_ioapic():
    """The PC machine's PIT through the 8259 and LINT0 (virtual wire), then through the
    IOAPIC to a logical and to a physical destination (the second vCPU)."""
    out = CollectedOutput()
    m = build_machine(16, 2, console=out)
    image = assemble("ioapic32").read_bytes()
    m.memory.write(LOAD, image)
    off = image.index((0x1BADB002).to_bytes(4, "little"))
    m.boot_state = [boot.flat32(m.memory, int.from_bytes(image[off + 28 : off + 32], "little"))]
    acc = EmuAccelerator(ap_start="entry")
    acc.create(m)
    try:
        res = acc.run()
    finally:
        acc.close()
    assert res.exit_status == (0x2D << 1) | 1, res
    assert bytes(out.output) == b"ioapic: extint, logical, physical\n"


def test_apic_state_is_a_checked_device_record():
    """The APICs are saved as the machine device "lapic": one LapicState per vCPU, loaded
    back exactly; a record for another number of vCPUs is refused before anything changes."""
    machine, _, _ = build_guest_machine("apic32", "flat32", vcpus=2)
    acc = EmuAccelerator(ap_start="entry")
    acc.create(machine)
    try:
        assert acc.run().exit_status == (0x2A << 1) | 1
        saved = machine.save_device_state()
        assert [a["svr"] for a in saved["lapic"]["apics"]] == [0x1FF, 0x1FF]
        assert saved["lapic"]["apics"][0]["lvt"][0] == 0x10000  # the timer, masked at the end
        machine.devices["lapic"].reset()
        machine.load_device_state(saved)
        again = machine.save_device_state()["lapic"]["apics"]
        for before, after in zip(saved["lapic"]["apics"], again, strict=True):
            before.pop("timer_elapsed_ns"), after.pop("timer_elapsed_ns")  # the clock moves
            assert after == before
        three = machine.save_device_state()
        three["lapic"]["apics"].append(three["lapic"]["apics"][0])
        with pytest.raises(CheckpointError, match="3 saved, this machine has 2 vCPUs"):
            machine.load_device_state(three)
    finally:
        acc.close()
        machine.memory.close()


def test_seabios_counts_both_vcpus():
    """SeaBIOS (the firmware machine) sends INIT/SIPI through the emulated APIC and waits
    until each AP has counted itself in under its spinlock (CMOS 0x5f says how many)."""
    pytest.importorskip("boite.machine.firmware", reason="needs the firmware machine (platform)")
    m = build_machine(32, 2, firmware=True)
    acc = EmuAccelerator()
    acc.create(m)
    debug = m.devices["debugcon"]

    def watch() -> None:
        for _ in range(1200):
            # The whole line: the firmware writes it a byte at a time.
            if "max supported 2 cpu(s)\n" in debug.text or "No bootable device" in debug.text:
                break
            time.sleep(0.1)
        acc.pause()

    threading.Thread(target=watch, daemon=True).start()
    try:
        acc.run()
    finally:
        acc.close()
        m.memory.close()
    assert "Found 2 cpu(s) max supported 2 cpu(s)" in debug.text, debug.text[-2000:]
