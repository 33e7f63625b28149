"""The bare-metal guest programs of tests/guests (the ones KVM runs) under the emulator,
through both the block translator and the plain interpreter: same output, same status."""

from __future__ import annotations

import pytest

from boite.accel.base import StopReason
from boite.accel.emu import EmuAccelerator
from guests.runner import run_guest

pytestmark = pytest.mark.emu_tiers  # both tiers (tests/conftest.py)

MODES = pytest.mark.parametrize("translate", [True, False], ids=["translated", "interpreted"])


def emu(translate: bool):
    return lambda: EmuAccelerator(translate=translate, hot_block=2)


@MODES
@pytest.mark.parametrize(
    ("name", "mode", "kw", "output", "status"),
    [
        ("real16", "real", {}, b"real mode: hello from 16-bit code r\n", 0x11),
        ("prot32", "flat32", {}, b"protected mode: sum 1..1000 = 500500\n", 0x21),
        ("echo32", "flat32", {"input": b"hello, guest\n"}, b"echo> hello, guest\n", 0x22),
        ("mmio32", "flat32", {}, b"mmio: device answered\n", 0x23),
        ("paging32", "flat32", {}, b"paging: alias ok\n", 0x26),
    ],
)
def test_guest_matches_kvm_expectations(translate, name, mode, kw, output, status):
    run = run_guest(name, mode, emu(translate), **kw)
    assert run.result.reason is StopReason.SHUTDOWN, run.result.detail
    assert run.output == output
    assert run.result.exit_status == (status << 1) | 1


@MODES
def test_mmio_accesses_keep_their_size(translate):
    run = run_guest("mmio32", "flat32", emu(translate))
    assert run.mmio_device.accesses == [
        ("write", 0x0, 4, 0x12345),
        ("read", 0x4, 4, 0x12345 * 3 + 1),
        ("write", 0x8, 4, 0x12345 * 3 + 1),
        ("write", 0x10, 1, 0xAB),
    ]


@MODES
def test_hlt_with_interrupts_off_stops(translate):
    run = run_guest("halt32", "flat32", emu(translate))
    assert run.result.reason is StopReason.HALTED
    assert "IF=0" in run.result.detail


@MODES
def test_triple_fault_resets_the_machine(translate):
    """On hardware a triple fault is a shutdown cycle that the board turns into a reset."""
    run = run_guest("triple32", "flat32", emu(translate))
    assert run.result.reason is StopReason.RESET
    assert run.machine.reset_requested


def test_pio_loop_counts_the_same_in_both_paths():
    a = run_guest("pio_loop32", "flat32", emu(True))
    b = run_guest("pio_loop32", "flat32", emu(False))

    def iterations(out: bytes) -> bytes:
        return next(w for w in out.split() if w.startswith(b"iterations="))

    assert iterations(a.output) == iterations(b.output) == b"iterations=0x000186a0"
