"""A hostile guest: random bytes as code on a full PC (PIC, PIT, RTC, UART, ...), with
random registers and an IDT/IVT whose handlers land in the random code, so faults keep
feeding it. Whatever it does (port I/O, control registers, far jumps, task switches,
paging with garbage tables), the emulator must end the run with a RunResult, or run
until paused; a Python exception escaping it is a hypervisor crash."""

from __future__ import annotations

import random
import threading

import pytest

from boite.accel.base import StopReason
from boite.accel.emu import EmuAccelerator
from boite.machine.builder import build_machine
from guests import boot
from guests.runner import CollectedOutput

pytestmark = pytest.mark.emu_tiers  # both tiers (tests/conftest.py)

LOAD = 0x100000
IDT = 0x3000
REAL_CODE = 0x7000
RUN_S = 0.25  # each program runs this long (or less) before it is paused


def _machine(seed: int, mode: str):
    rnd = random.Random(seed)
    m = build_machine(16, 1, console=CollectedOutput())
    code = bytes(rnd.randrange(256) for _ in range(8192))
    if mode == "real":
        m.memory.write(REAL_CODE, code[:0x1000])
        m.memory.write(0, bytes(rnd.randrange(256) for _ in range(1024)))  # the IVT
        st = boot.real_mode(REAL_CODE)
    else:
        m.memory.write(LOAD, code)
        st = boot.flat32(m.memory, LOAD)
        for v in range(256):  # ring-0 interrupt gates into the random code
            h = LOAD + rnd.randrange(len(code))
            gate = (h & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((h >> 16) << 48)
            m.memory.write_u64(IDT + 8 * v, gate)
        st.idt.base, st.idt.limit = IDT, 256 * 8 - 1
    for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"):
        st.gpr[r] = rnd.randrange(1 << 32) if mode != "real" else rnd.randrange(1 << 16)
    m.boot_state = [st]
    return m


@pytest.mark.parametrize("translate", [True, False], ids=["translated", "interpreted"])
@pytest.mark.parametrize("mode", ["protected", "real"])
@pytest.mark.parametrize("seed", range(6))
def test_random_code_never_crashes_the_emulator(seed: int, mode: str, translate: bool) -> None:
    m = _machine(seed * 7919 + (mode == "real"), mode)
    acc = EmuAccelerator(translate=translate, hot_block=2)  # compile what repeats
    acc.create(m)
    timer = threading.Timer(RUN_S, acc.pause)
    timer.start()
    try:
        res = acc.run()  # an escaping exception fails the test
        ran = acc.cpu.icount if acc.cpu is not None else 0
    finally:
        timer.cancel()
        acc.close()
    assert ran > 0, res
    if res.reason is StopReason.ERROR:
        # Only guest states the emulator declines, named as such (PAE paging).
        assert "not emulated" in (res.detail or ""), res.detail
