"""Several vCPUs on the emulator's one host thread, with their local APICs.

A machine with `numvcpus` > 1 gets one `Cpu` per vCPU, all on the same guest memory, and
one `LocalApic` each (machine/devices/lapic.py) joined by an `ApicBus` whose page sits at
0xFEE00000; the IOAPIC delivers its messages to that bus and the 8259 reaches vCPU 0
through LINT0 in virtual-wire (ExtINT) mode. A machine with one vCPU keeps the plain
single-CPU loop: no APIC, no extra work per block.

Fairness: the vCPUs run in turn, each for a slice of at most `SLICE` instructions (the
slice ends early on HLT, on an IPI that starts or stops a CPU, or on a device access that
powered the machine off) and then a random 0-7 more single instructions, so that a
switch can fall anywhere inside a loop, not always at the end of a translated block
(a loop that releases a lock and takes it back within one block would otherwise starve
the other CPUs). A CPU halted with nothing to take, or one waiting for a
start-up IPI, is skipped until an interrupt (or INIT/SIPI) arrives; when every CPU is
idle the loop sleeps until the nearest timer deadline or a device's interrupt. "Arrives"
includes a vector that was already in the IRR but held back by the ISR or the TPR: the
EOI or TPR write that lets it through wakes the CPU again (lapic.py), or a CPU that had
looked in the meantime would sleep on with it pending. Every APIC's timer advances
between slices, whichever vCPU ran.

Atomics: only one vCPU runs at a time and a slice ends only between instructions, so no
instruction of one vCPU is interleaved with another's: LOCK-prefixed read-modify-writes
(and XCHG) are atomic by construction, and a spinlock taken by one vCPU is seen by the
next. What one vCPU caches must still stay true for the others: the translated blocks
are per CPU, but the guard on the pages they come from is shared (`Cpu.share_code_guard`),
so a store by any CPU to a page that holds any CPU's translated code drops that code in
all of them. TLBs stay per CPU, as on hardware (the guest shoots them down with IPIs).

The APICs' registers are saved as the machine device "lapic" (`LapicsState`); a vCPU
still waiting for its start-up IPI is saved as `parked` in its CPU state.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.accel.emu.arch import CS, IF, NMI, CpuFault
from boite.accel.emu.cpu import Cpu
from boite.accel.emu.cpumodel import FEATURES, msr_specs
from boite.errors import CheckpointError
from boite.machine.device import Device
from boite.machine.devices.lapic import LAPIC_BASE, LAPIC_SIZE, ApicBus, LapicState, LocalApic
from boite.machine.state import Items, Nested, StateRecord, checked

SLICE = 20_000  # instructions a vCPU runs before the next one's turn
TAIL = 8  # and then up to TAIL - 1 more, one at a time (see run_round)
# A slice (as the single vCPU's chunk) also ends once this many new blocks were
# translated in it: code run for the first time would otherwise hold it for up to a few
# hundred ms, and the timers' ticks would coalesce meanwhile.
COLD_BLOCKS = 64


def _grown(blocks: dict[int, Any], size: int) -> bool:
    return len(blocks) >= size


def cold_stop(cpu: Cpu) -> Callable[[], bool]:
    """Cpu.run's should_stop: true once COLD_BLOCKS blocks were added to cpu's cache."""
    return functools.partial(_grown, cpu.blocks, len(cpu.blocks) + COLD_BLOCKS)


_INIT, _NMI = -1, -2


@dataclass(frozen=True)
class LapicsState(StateRecord):
    """The machine's APICs, one `LapicState` (lapic.py) per vCPU."""

    VERSION = 1
    apics: tuple[LapicState, ...] = checked(Items(Nested(LapicState), max_len=255))


class Lapics(Device):
    """The machine device "lapic": the APIC page (banked by the running vCPU) and the
    APICs' saved state. EOIs for level-triggered vectors reach the IOAPIC after the
    register write, outside the bus lock (a device thread delivering through the IOAPIC
    takes the two locks the other way round)."""

    name = "lapic"

    def __init__(self, bus: ApicBus, ioapic: Any) -> None:
        self.bus = bus
        self.ioapic = ioapic
        self.eois: list[int] = []
        bus.on_ioapic_eoi = self.eois.append

    def reset(self) -> None:
        with self.bus.lock:
            for apic in self.bus.apics:
                apic.reset()

    def bus_read(self, offset: int, size: int) -> int:
        return self.bus.bus_read(offset, size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.bus.bus_write(offset, size, value)
        while self.eois:
            vector = self.eois.pop(0)
            if self.ioapic is not None:
                self.ioapic.eoi(vector)

    def save_state(self) -> dict[str, Any]:
        with self.bus.lock:
            records = tuple(LapicState.from_dict(a.save_state()) for a in self.bus.apics)
        return LapicsState(records).to_dict()

    def check_state(self, state: Any) -> LapicsState:
        rec = LapicsState.from_dict(state)
        if len(rec.apics) != len(self.bus.apics):
            raise CheckpointError(
                f"apics: {len(rec.apics)} saved, this machine has {len(self.bus.apics)} vCPUs"
            )
        return rec

    def apply_state(self, record: LapicsState) -> None:
        with self.bus.lock:
            for apic, rec in zip(self.bus.apics, record.apics, strict=True):
                apic.apply_state(rec)


class Smp:
    """The vCPUs of one machine and the turns they run in (see the module's docstring)."""

    def __init__(self, accel: Any, machine: Any, cpus: list[Cpu], ap_start: str) -> None:
        self.accel = accel
        self.machine = machine
        self.cpus = cpus
        n = len(cpus)
        self.bus = ApicBus(n, time.monotonic_ns)
        ioapic = machine.devices.get("ioapic")
        self.lapics = Lapics(self.bus, ioapic)
        machine.attach("lapic", self.lapics, mmio=[(LAPIC_BASE, LAPIC_SIZE)])
        if ioapic is not None:
            ioapic.deliver = self.bus.from_ioapic
        self.bus.on_wake = self._wake_cpu
        # Deferred INIT / start-up / NMI: applied between slices, never inside another
        # CPU's instruction (the sender's ICR write ends its slice).
        self.ipis: list[tuple[int, int]] = []
        self.waiting = [False] * n  # wait-for-SIPI
        features = FEATURES | {"apic"}
        for i, cpu in enumerate(cpus):
            cpu.apic_id = i
            cpu.logical_cpus = n
            cpu.features = features
            cpu.msr_spec = msr_specs(features)
            apic = self.bus.apics[i]
            apic.on_init = lambda i=i: self._ipi(i, _INIT)
            apic.on_sipi = lambda v, i=i: self._ipi(i, v)
            apic.on_nmi = lambda i=i: self._ipi(i, _NMI)
            cpu.irq_check = self._irq_check_for(i)
        cpus[0].share_code_guard(cpus)
        self.ap_start = ap_start
        self.rng = random.Random(0)  # slice tails: fixed seed, the same turns every run

    def start(self, boot_state: list[Any], load: Any) -> None:
        """Put every vCPU where the machine's loader wants it: the ones it names at their
        state, the others at power-on, waiting for INIT/SIPI (or at vCPU 0's state with
        ap_start="entry")."""
        for i, cpu in enumerate(self.cpus):
            if i < len(boot_state):
                load(boot_state[i], cpu)
            elif boot_state and self.ap_start == "entry":
                load(boot_state[0], cpu)
            else:
                cpu.reset()
                self.waiting[i] = i > 0

    def _ipi(self, i: int, what: int) -> None:
        self.ipis.append((i, what))
        cur = self.cpus[self.bus.current]
        cur.stop = True

    def _wake_cpu(self, apic: LocalApic) -> None:
        # kick: translated native code (GIL released) leaves at its next chain, for an
        # interrupt from a device thread to the vCPU that is running.
        self.cpus[apic.apic_id].kick()
        self.accel._wake.set()

    def _irq_check_for(self, i: int):
        bus = self.bus
        apic = bus.apics[i]
        cpu = self.cpus[i]
        accel = self.accel

        def irq_check() -> int | None:
            with bus.lock:
                if apic.pending():
                    return apic.acknowledge()
                pic = accel.pic
                # The 8259's INTR: through LINT0 in ExtINT mode, or to the BSP while its
                # APIC is off (APs never see it before their APIC is set up).
                if pic is not None and apic.extint() and (i == 0 or apic.enabled):
                    if pic.pending():
                        return pic.acknowledge()
                cpu.intr = False  # until an APIC or the 8259 raises it again
                return None

        return irq_check

    def apply_ipis(self) -> None:
        while self.ipis:
            i, what = self.ipis.pop(0)
            cpu = self.cpus[i]
            if what == _INIT:
                cpu.reset()  # INIT: power-on registers, then wait for a start-up IPI
                with self.bus.lock:
                    self.bus.apics[i].reset()
                self.waiting[i] = True
            elif what == _NMI:
                cpu.halted = False
                try:
                    cpu.interrupt(NMI, None, False, cpu.eip)
                except CpuFault as f:
                    cpu.exception(f.vector, f.error)
            elif self.waiting[i]:  # start-up: real mode at vector * 0x1000
                cpu.set_seg_raw(CS, what << 8, what << 12, 0xFFFF, 0x9B)
                cpu.eip = 0
                cpu.halted = False
                cpu.flush_blocks()
                self.waiting[i] = False

    def runnable(self, i: int) -> bool:
        cpu = self.cpus[i]
        return not self.waiting[i] and not (cpu.halted and not (cpu.intr and cpu.fl & IF))

    def run_round(self) -> int:
        """Each runnable vCPU runs one slice; returns the instructions run in all."""
        total = 0
        m = self.machine
        for i, cpu in enumerate(self.cpus):
            if not self.runnable(i):
                continue
            self.bus.current = i
            self.accel.cpu = cpu
            cpu.stop = False
            total += cpu.run(SLICE, cold_stop(cpu))
            if not (cpu.halted or cpu.stop) and (k := self.rng.randrange(TAIL)):
                # Translated code stops only at a block's end, and a loop that drops a
                # lock and takes it again in one block (SeaBIOS's AP hand-over) would
                # then hold it at every switch: end the slice a few single instructions on.
                cpu.translate_blocks = False
                try:
                    total += cpu.run(k)
                finally:
                    cpu.translate_blocks = self.accel.translate
            cpu.stop = False
            if self.ipis:
                self.apply_ipis()
            if m.exit_status is not None or m.reset_requested:
                break
        self.accel.cpu = self.cpus[0]
        return total

    def timers(self) -> list[Any]:
        return [_ApicTimers(self.bus)]

    def all_stuck(self) -> bool:
        """Every CPU halted with interrupts off or waiting for a start-up IPI: only an
        NMI or INIT could go on, and no running CPU is left to send one."""
        return all(self.waiting[i] or (c.halted and not c.fl & IF) for i, c in enumerate(self.cpus))


class _ApicTimers:
    """The APICs' timers as one timer for the run loop, under the bus lock."""

    def __init__(self, bus: ApicBus) -> None:
        self.bus = bus

    def next_deadline_ns(self) -> int | None:
        with self.bus.lock:
            ds = [d for a in self.bus.apics if (d := a.next_deadline_ns()) is not None]
        return min(ds) if ds else None

    def advance(self, now_ns: int) -> None:
        with self.bus.lock:
            for a in self.bus.apics:
                a.advance(now_ns)
