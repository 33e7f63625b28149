"""EmuAccelerator: runs a Machine's CPU in software (boite.accel.emu.cpu.Cpu).

Devices stay in the machine: port I/O goes to machine.pio, any physical address outside
RAM to machine.mmio, interrupts come from `machine.interrupt_controller` (`pending()` /
`acknowledge() -> vector`, the 8259 pair), and `machine.timers` (`next_deadline_ns()` /
`advance(now_ns)`: PIT, RTC) are advanced between blocks and while the CPU sleeps in HLT.

`BOITE_EMU=interp` (or `EmuAccelerator(translate=False)`) selects the plain interpreter.
Which tier runs hot blocks (the Python tiers or the native one) is chosen by tiers.py.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

from boite.accel.base import Accelerator, RunResult, StopReason
from boite.accel.cpustate import GPR_NAMES, CpuState, DescriptorTable, Segment
from boite.accel.emu.arch import CS, DS, ES, FS, GS, IF, SS, CpuFault, TripleFault
from boite.accel.emu.cpu import HOT_BLOCK, Cpu
from boite.accel.emu.cpumodel import MSR_EFER
from boite.accel.emu.fpu import MXCSR_MASK
from boite.accel.emu.native import NativeTier
from boite.accel.emu.smp import Smp, cold_stop
from boite.accel.emu.tiers import TierChoice, choose_tier
from boite.accel.kvm.abi import KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED
from boite.errors import AccelError, GuestError

# Emulator register order (EAX ECX EDX EBX ESP EBP ESI EDI) in CpuState names.
_GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
_SEG = {"es": ES, "cs": CS, "ss": SS, "ds": DS, "fs": FS, "gs": GS}
CHUNK = 20_000  # instructions between timer checks, at least
# A chunk doubles (up to CHUNK_MAX) while one takes under CHUNK_NS / 2 and halves above
# CHUNK_NS: the timers are checked about every CHUNK_NS whatever the tier runs (native
# code runs 20,000 instructions in some 40 us; every return costs a native exit).
CHUNK_MAX = 1 << 21
CHUNK_NS = 500_000
GC_THRESHOLD = (100_000, 50, 1000)
# Young collections scan every young object (~0.2 us each) and, while the emulator
# translates, free next to nothing: its young objects are long-lived blocks and closures
# (the kit Linux boot's collections freed 0-20 of 100,000). After such a collection the
# young threshold goes up to GC_YOUNG_MAX; one that frees garbage (a machine left behind,
# a guest's churn) brings it back, so cyclic garbage still goes within ~GC_YOUNG_MAX
# allocations.
GC_YOUNG_MAX = 1_000_000
GC_FREED_LOW = 0.01  # of the young threshold: "next to nothing"


def _gc_adapt(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks hook: the young threshold follows what young collections free."""
    if phase != "stop" or info["generation"] != 0:
        return
    t0, t1, t2 = gc.get_threshold()
    if t0 < GC_THRESHOLD[0] or not gc.isenabled():
        return  # someone else's setting (a test, an embedder): left alone
    want = GC_YOUNG_MAX if info["collected"] < t0 * GC_FREED_LOW else GC_THRESHOLD[0]
    if want != t0:
        gc.set_threshold(want, t1, t2)


def _attr_of(s: Segment) -> int:
    return (
        (s.type & 0xF)
        | (s.s << 4)
        | (s.dpl << 5)
        | (s.present << 7)
        | (s.avl << 12)
        | (s.l << 13)
        | (s.db << 14)
        | (s.g << 15)
    )


def _segment_of(sel: int, base: int, limit: int, attr: int) -> Segment:
    return Segment(
        selector=sel,
        base=base,
        limit=limit,
        type=attr & 0xF,
        present=(attr >> 7) & 1,
        dpl=(attr >> 5) & 3,
        db=(attr >> 14) & 1,
        s=(attr >> 4) & 1,
        l=(attr >> 13) & 1,
        g=(attr >> 15) & 1,
        avl=(attr >> 12) & 1,
        unusable=0 if attr & 0x80 else 1,
    )


def cpu_to_state(cpu: Cpu) -> CpuState:
    st = CpuState()
    st.gpr = dict.fromkeys(GPR_NAMES, 0)
    for i, n in enumerate(_GPR):
        st.gpr[n] = cpu.r[i]
    st.rip = cpu.eip
    st.rflags = cpu.get_flags()
    st.segments = {
        n: _segment_of(cpu.sel[i], cpu.sbase[i], cpu.slimit[i], cpu.sattr[i])
        for n, i in _SEG.items()
    }
    st.segments["tr"] = Segment(
        selector=cpu.tr_sel, base=cpu.tr_base, limit=cpu.tr_limit, type=cpu.tr_type, s=0
    )
    st.segments["ldt"] = Segment(
        selector=cpu.ldt_sel, base=cpu.ldt_base, limit=cpu.ldt_limit, type=2, s=0
    )
    st.gdt = DescriptorTable(cpu.gdt_base, cpu.gdt_limit)
    st.idt = DescriptorTable(cpu.idt_base, cpu.idt_limit)
    st.cr0, st.cr2, st.cr3, st.cr4 = cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4
    st.efer = cpu.efer
    st.msrs = dict(cpu.msrs)
    st.msrs[0x10] = cpu.rdtsc()
    st.halted = cpu.halted
    st.fxsave = bytes(cpu.fpu.fxsave_image())  # x87, MXCSR and XMM: KVM's format too
    st.extra = {
        "emu": {
            "cpl": cpu.cpl,
            "dr": list(cpu.dr),
            "inhibit_irq": cpu.inhibit_irq,
            "ferr": cpu.fpu.ferr,  # the legacy x87 error path's pins
            "ignne": cpu.fpu.ignne,
        }
    }
    return st


def state_to_cpu(st: CpuState, cpu: Cpu) -> None:
    for i, n in enumerate(_GPR):
        cpu.r[i] = st.gpr.get(n, 0) & 0xFFFFFFFF
    cpu.eip = st.rip & 0xFFFFFFFF
    cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4 = st.cr0 & 0xFFFFFFFF, st.cr2, st.cr3, st.cr4
    for n, i in _SEG.items():
        s = st.segments.get(n)
        if s is None:
            s = Segment(selector=0, base=0, limit=0xFFFF, type=0xB if n == "cs" else 3)
        cpu.set_seg_raw(i, s.selector, s.base & 0xFFFFFFFF, s.limit, _attr_of(s))
    tr = st.segments.get("tr")
    if tr is not None:
        cpu.tr_sel, cpu.tr_base, cpu.tr_limit, cpu.tr_type = tr.selector, tr.base, tr.limit, tr.type
    ldt = st.segments.get("ldt")
    if ldt is not None:
        cpu.ldt_sel, cpu.ldt_base, cpu.ldt_limit = ldt.selector, ldt.base, ldt.limit
    cpu.gdt_base, cpu.gdt_limit = st.gdt.base, st.gdt.limit
    cpu.idt_base, cpu.idt_limit = st.idt.base, st.idt.limit
    cpu.set_flags(st.rflags, 0x3F7FD7)
    emu = st.extra.get("emu", {})
    if "cpl" in emu:
        cpu.cpl = emu["cpl"]
    else:
        cpu.cpl = (st.segments["cs"].selector & 3) if "cs" in st.segments and cpu.cr0 & 1 else 0
    cpu.dr = list(emu.get("dr", cpu.dr))
    cpu.debug_setup()
    cpu.inhibit_irq = bool(emu.get("inhibit_irq", False))
    if len(st.fxsave) >= 512:
        img = bytearray(st.fxsave[:512])
        img[24:28] = (int.from_bytes(img[24:28], "little") & MXCSR_MASK).to_bytes(4, "little")
        cpu.fpu.fxrstor_image(bytes(img))
    else:  # a state saved before the FPU existed (or by a CPU without one)
        cpu.fpu.reset()
    cpu.fpu.ferr = bool(emu.get("ferr", False))
    cpu.fpu.ignne = bool(emu.get("ignne", False))
    # MSRs the model lacks (from a KVM state) are left out; EFER keeps the bits it has.
    cpu.msrs = {k: v for k, v in st.msrs.items() if k in cpu.msr_spec}
    cpu.efer = st.efer & cpu.msr_spec[MSR_EFER].writable if MSR_EFER in cpu.msr_spec else 0
    if 0x10 in st.msrs:
        cpu.wrmsr(0x10, st.msrs[0x10])
    cpu.halted = st.halted
    cpu.paging_changed()
    cpu.tlb_switch()
    cpu.flush_blocks()


class EmuAccelerator(Accelerator):
    """Full emulation of a machine's IA-32 vCPUs: one runs alone as it always did; with
    several, each has a local APIC and they take turns on this thread (accel/emu/smp.py).
    `ap_start`: "sipi" (application processors wait for INIT/SIPI, as on a PC) or
    "entry" (they start at vCPU 0's boot state, as KvmAccelerator's option)."""

    name = "emu"

    max_vcpus = 255  # xAPIC ids are 8 bits, 0xFF being broadcast

    def __init__(
        self,
        translate: bool | None = None,
        hot_block: int | None = None,
        ap_start: str = "sipi",
        native: bool | None = None,
        tier: str | None = None,
        tier_config: str | None = None,
    ) -> None:
        if ap_start not in ("sipi", "entry"):
            raise AccelError(f"ap_start must be 'sipi' or 'entry', not {ap_start!r}")
        self.ap_start = ap_start
        if translate is None:
            translate = os.environ.get("BOITE_EMU", "translate") != "interp"
        self.translate = translate
        # The native tier (hot blocks as x86-64 code) or the Python tiers: `tier` (or the
        # older `native`) is an explicit choice, `tier_config` the box's boite.emuTier;
        # tiers.py weighs them with BOITE_EMU_TIER and what the host allows.
        if tier is None and native is not None:
            tier = "native" if native else "python"
        self.tier_choice: TierChoice = choose_tier(tier, tier_config, translate=translate)
        self.native = self.tier_choice.tier == "native"
        self._closed_counts = (0, 0, 0)  # instructions, native blocks and instructions
        # Runs of a block before it is compiled; tests set it low to put all code through
        # the block compiler (BOITE_EMU_HOT reaches `boite` subprocesses too).
        if hot_block is None:
            env = os.environ.get("BOITE_EMU_HOT", "")
            hot_block = int(env) if env.isdigit() and int(env) > 0 else HOT_BLOCK
        self.hot_block = hot_block
        self.machine: Any = None
        self.cpu: Cpu | None = None  # the running vCPU (vCPU 0 between runs)
        self.cpus: list[Cpu] = []
        self.smp: Smp | None = None
        self._pause = threading.Event()
        self._wake = threading.Event()
        self.pic: Any = None
        self.timers: list[Any] = []

    # -- set-up ------------------------------------------------------------------------
    def create(self, machine: Any, config: Any = None) -> None:
        # The emulator keeps many long-lived closures and blocks: at CPython's default
        # threshold the collector rescans them thousands of times a boot (a quarter of
        # the kit Linux's CPU time to init on the native tier). Rarer collections.
        t0, t1, t2 = gc.get_threshold()
        gc.set_threshold(max(t0, GC_THRESHOLD[0]), max(t1, GC_THRESHOLD[1]),
                         max(t2, GC_THRESHOLD[2]))  # fmt: skip
        if _gc_adapt not in gc.callbacks:
            gc.callbacks.append(_gc_adapt)
        if machine.memory.region_at(0) is None:
            raise AccelError("emu: the machine has no RAM at physical address 0")
        self.machine = machine
        if machine.num_vcpus > self.max_vcpus:
            raise AccelError(f"emu: {machine.num_vcpus} vCPUs, at most {self.max_vcpus}")
        pio, mmio = _StoppingBus(machine.pio, self), _StoppingBus(machine.mmio, self)
        self.cpus = [Cpu(machine.memory, pio, mmio) for _ in range(machine.num_vcpus)]
        for c in self.cpus:
            c.translate_blocks = self.translate
            c.hot_block = self.hot_block
            c.decoder.c = c
            if self.native:
                c.native = NativeTier(c)
        cpu = self.cpu = self.cpus[0]
        # The machine says which device is the INTR source and which are timers.
        self.timers = list(machine.timers)
        dev = machine.interrupt_controller
        if dev is not None:
            self.pic = dev
            prev = dev.on_intr

            def on_intr(level: bool, prev=prev) -> None:
                if prev is not None:
                    prev(level)
                if level and self.cpus:
                    self.cpus[0].kick()  # the 8259's INTR reaches the BSP
                    self._wake.set()

            dev.on_intr = on_intr
            self._intr_hooked = True
        irqs = getattr(machine, "irqs", None)
        if irqs is not None:  # FERR# of the x87's legacy error path is ISA IRQ 13
            cpu.ferr_irq = irqs.line(13).set
        pic = self.pic
        if pic is not None:
            hooked = getattr(self, "_intr_hooked", False)

            def irq_check() -> int | None:
                if pic.pending():
                    return pic.acknowledge()
                if hooked:
                    cpu.intr = False  # until the controller raises INTR again
                return None

            cpu.irq_check = irq_check
        else:
            cpu.intr = False

            def no_irq() -> None:
                cpu.intr = False  # set only by note_dma_write: back to the fast path
                return None

            cpu.irq_check = no_irq
        # Device DMA into guest RAM must drop the translations of the code it replaced.
        for c in self.cpus:
            machine.memory.add_write_observer(c.note_dma_write)
        if len(self.cpus) > 1:
            self.smp = Smp(self, machine, self.cpus, self.ap_start)
            self.timers += self.smp.timers()
            self.smp.start(machine.boot_state, state_to_cpu)
        elif machine.boot_state:
            state_to_cpu(machine.boot_state[0], cpu)
        else:
            cpu.reset()

    # -- running -----------------------------------------------------------------------
    def _advance_timers(self) -> int | None:
        """Advance timers to now (each raises its IRQ for edges that passed); returns the
        nearest next deadline (monotonic ns) or None."""
        nearest = None
        now = time.monotonic_ns()
        for t in self.timers:
            t.advance(now)
            d = t.next_deadline_ns()
            if d is not None and (nearest is None or d < nearest):
                nearest = d
        return nearest

    def _stop_reason(self) -> RunResult | None:
        m = self.machine
        if m.exit_status is not None:
            return RunResult(StopReason.SHUTDOWN, m.exit_status)
        if m.reset_requested:
            return RunResult(StopReason.RESET)
        if self._pause.is_set():
            self._pause.clear()
            return RunResult(StopReason.PAUSED)
        return None

    def run(self) -> RunResult:
        cpu = self.cpu
        if cpu is None:
            raise AccelError("emu: run() before create()")
        try:
            return self._run_one(cpu) if self.smp is None else self._run_smp(self.smp)
        except TripleFault:
            self.machine.request_reset()
            return RunResult(StopReason.RESET, detail="triple fault")
        except GuestError as e:
            return RunResult(StopReason.ERROR, detail=str(e))
        except CpuFault as f:  # a fault escaped delivery: an emulator bug, reported
            return RunResult(StopReason.ERROR, detail=f"unhandled fault {f.vector}")
        finally:
            self.cpu = self.cpus[0] if self.cpus else None

    def _sleep(self, nearest: int | None) -> None:
        """Nothing to run: wait for a device's interrupt or the nearest timer deadline."""
        wait = 0.01
        if nearest is not None:
            wait = min(wait, max(0.0, (nearest - time.monotonic_ns()) / 1e9))
        self._wake.wait(wait)
        self._wake.clear()
        self._advance_timers()

    def _run_one(self, cpu: Cpu) -> RunResult:
        """The one vCPU of a machine: no APIC, nothing between blocks but the timers."""
        cpu.stop = False
        chunk = CHUNK
        while True:
            res = self._stop_reason()
            if res is not None:
                return res
            t0 = time.monotonic_ns()
            # A chunk also ends once smp.COLD_BLOCKS new blocks were translated in it (a test
            # between blocks): code that runs for the first time, translated as it goes,
            # held a chunk for up to a few hundred ms, and the PIT's ticks coalesced
            # (about half of the kit Linux boot's 100 Hz ticks were lost: its clock ran
            # slow, and its clocksource watchdog found the TSC unstable against the PIT).
            # That many translations take a few ms; asking the clock between blocks
            # instead cost ~0.2 us a block (1.3 M blocks in the Debian 686 boot).
            cpu.run(chunk, cold_stop(cpu))
            dt = time.monotonic_ns() - t0
            if dt < CHUNK_NS // 2:
                chunk = min(chunk * 2, CHUNK_MAX)
            elif dt > CHUNK_NS:
                chunk = max(chunk // 2, CHUNK)
            cpu.stop = False
            nearest = self._advance_timers()
            if cpu.halted:
                res = self._stop_reason()
                if res is not None:
                    return res
                if not cpu.fl & IF:
                    # Only NMI/INIT (none without an APIC) wake a CPU halted with IF=0.
                    return RunResult(StopReason.HALTED, detail=f"HLT at {cpu.eip:#x}, IF=0")
                if cpu.fl & IF and self.pic is not None and self.pic.pending():
                    continue
                self._sleep(nearest)

    def _run_smp(self, smp: Smp) -> RunResult:
        """The vCPUs in turn (smp.py); sleeps while none has work."""
        while True:
            res = self._stop_reason()
            if res is not None:
                return res
            ran = smp.run_round()
            nearest = self._advance_timers()
            if ran:
                continue
            res = self._stop_reason()
            if res is not None:
                return res
            if not any(smp.runnable(i) for i in range(len(self.cpus))):
                if smp.all_stuck():
                    c = self.cpus[0]
                    return RunResult(StopReason.HALTED, detail=f"HLT at {c.eip:#x}, IF=0")
                self._sleep(nearest)

    def pause(self) -> None:
        self._pause.set()
        self._wake.set()
        if self.cpu is not None:
            self.cpu.stop = True
            if self.cpu.native is not None:
                self.cpu.native.st.intr = 1  # translated code leaves at its next chain

    def save_cpu_state(self) -> list[dict[str, Any]]:
        """One state per vCPU of the machine: the emulated CPU's, then the parked ones
        (marked waiting for INIT/SIPI, which is how KVM takes them up)."""
        if self.cpu is None:
            raise AccelError("emu: save_cpu_state() before create()")
        if self.smp is not None:
            return [
                (_parked_vcpu_state() if self.smp.waiting[i] else cpu_to_state(c)).to_dict()
                for i, c in enumerate(self.cpus)
            ]
        states = [cpu_to_state(self.cpu).to_dict()]
        vcpus = self.machine.num_vcpus if self.machine is not None else 1
        return states + [_parked_vcpu_state().to_dict() for _ in range(vcpus - 1)]

    def load_cpu_state(self, state: list[dict[str, Any]]) -> None:
        if self.cpu is None:
            raise AccelError("emu: load_cpu_state() before create()")
        if not state:
            raise AccelError("emu: empty CPU state list")
        if self.smp is not None:
            if len(state) != len(self.cpus):
                raise AccelError(f"emu: {len(state)} vCPU states for {len(self.cpus)} vCPUs")
            for i, (raw, c) in enumerate(zip(state, self.cpus, strict=True)):
                parked = _is_parked(raw)
                self.smp.waiting[i] = parked
                if parked:
                    c.reset()
                else:
                    state_to_cpu(CpuState.from_dict(raw), c)
            return
        for n, other in enumerate(state[1:], 1):
            if not _is_parked(other):
                raise AccelError(
                    f"emu: vCPU {n} was running in this state, and the emulator runs only "
                    "vCPU 0 (resume it with the KVM accelerator)"
                )
        state_to_cpu(CpuState.from_dict(state[0]), self.cpu)

    def tier_stats(self) -> dict[str, Any]:
        """Which tier runs hot code, why, and how much of the guest's code it ran so far
        (the VMM's status, `boite info`, vmware.log at power-off)."""
        insns, blocks, native = self._closed_counts
        for c in self.cpus:
            insns += c.icount
            if c.native is not None:
                blocks += c.native.blocks
                native += c.native.insns
        return {"tier": self.tier_choice.tier, "why": self.tier_choice.why,
                "instructions": insns, "native_blocks": blocks, "native_instructions": native}  # fmt: skip

    def close(self) -> None:
        st = self.tier_stats()  # kept: the VMM reports them after closing
        self._closed_counts = (st["instructions"], st["native_blocks"], st["native_instructions"])
        for c in self.cpus:
            if self.machine is not None:
                self.machine.memory.remove_write_observer(c.note_dma_write)
            c.close()
        self.cpus = []
        self.cpu = None


def _is_parked(state: dict[str, Any]) -> bool:
    """A saved vCPU that waits for INIT/SIPI (the emulator's mark or KVM's MP state)."""
    extra = state.get("extra") or {}
    return bool(extra.get("emu", {}).get("parked")) or extra.get("kvm_mp_state") in (
        KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED,
    )  # fmt: skip


def _parked_vcpu_state() -> CpuState:
    """An application processor that was never started: the power-on register state,
    waiting for INIT and a start-up IPI."""
    st = CpuState(apic_base=0xFEE00800)  # not the bootstrap processor
    st.segments = {name: Segment() for name in ("ds", "es", "fs", "gs", "ss")}
    st.segments["cs"] = Segment(selector=0xF000, base=0xFFFF0000, type=0xB)
    st.gpr["rdx"] = 0x600
    st.extra = {"emu": {"parked": True}, "kvm_mp_state": KVM_MP_STATE_UNINITIALIZED}
    return st


class _StoppingBus:
    """A bus wrapper that makes the CPU leave its run loop after an access that powered
    the machine off, asked for a reset, or raised an interrupt line."""

    def __init__(self, bus: Any, accel: EmuAccelerator) -> None:
        self.bus = bus
        self.accel = accel

    def read(self, addr: int, size: int) -> int:
        return self.bus.read(addr, size)

    def read_string(self, addr: int, size: int, count: int) -> bytes | None:
        return self.bus.read_string(addr, size, count)

    def write_string(self, addr: int, size: int, data: bytes) -> bool:
        done = self.bus.write_string(addr, size, data)
        self._stop_if_down()
        return done

    def write(self, addr: int, size: int, value: int) -> None:
        self.bus.write(addr, size, value)
        self._stop_if_down()

    def _stop_if_down(self) -> None:
        m = self.accel.machine
        if m.exit_status is not None or m.reset_requested:
            cpu = self.accel.cpu
            if cpu is not None:
                cpu.stop = True
