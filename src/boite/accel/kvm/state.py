"""KVM's vCPU and VM state <-> boite's accelerator-neutral CpuState.

The neutral fields (GPRs, segments, control registers, MSRs, the FXSAVE image) are what
the emulator understands too. What only KVM has (XSAVE beyond the legacy area, the local
APIC page, pending events, the in-kernel PIC/IOAPIC/PIT, the KVM clock) travels in
`extra` as hex blobs, used when the state comes back to KVM and ignored elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from boite.accel.cpustate import GPR_NAMES, SEGMENT_NAMES, CpuState, DescriptorTable, Segment
from boite.accel.kvm import abi

if TYPE_CHECKING:
    from boite.accel.kvm.system import KvmVcpu, KvmVm

# MSRs worth carrying across a snapshot (Intel SDM vol. 4; KVM's paravirtual ones from
# Documentation/virt/kvm/x86/msr.rst). Filtered by what this host's KVM can read.
STATE_MSRS = (
    0x10,  # IA32_TIME_STAMP_COUNTER
    0x174, 0x175, 0x176,  # IA32_SYSENTER_CS/ESP/EIP
    0x1A0,  # IA32_MISC_ENABLE
    0x277,  # IA32_PAT
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, FMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
    0x4B564D00, 0x4B564D01,  # KVM wall clock / system time (new numbers)
    0x4B564D02, 0x4B564D03, 0x4B564D04,  # async PF, steal time, PV EOI
)  # fmt: skip

XSAVE_HEADER = 512  # the legacy FXSAVE area is the first 512 bytes of an XSAVE image
XSTATE_X87_SSE = 0x3


def segment_from_kvm(s: abi.kvm_segment) -> Segment:
    return Segment(
        selector=s.selector, base=s.base, limit=s.limit, type=s.type, present=s.present,
        dpl=s.dpl, db=s.db, s=s.s, l=s.l, g=s.g, avl=s.avl, unusable=s.unusable,
    )  # fmt: skip


def segment_to_kvm(seg: Segment, out: abi.kvm_segment) -> None:
    out.selector, out.base, out.limit, out.type = seg.selector, seg.base, seg.limit, seg.type
    out.present, out.dpl, out.db, out.s = seg.present, seg.dpl, seg.db, seg.s
    out.l, out.g, out.avl, out.unusable = seg.l, seg.g, seg.avl, seg.unusable


def state_to_regs(state: CpuState) -> abi.kvm_regs:
    regs = abi.kvm_regs()
    for name in GPR_NAMES:
        setattr(regs, name, state.gpr.get(name, 0))
    regs.rip = state.rip
    regs.rflags = state.rflags | 0x2  # bit 1 is always set
    return regs


def state_to_sregs(state: CpuState, sregs: abi.kvm_sregs) -> abi.kvm_sregs:
    """Overlay `state` on sregs read from the vCPU (keeps segments the state leaves out)."""
    for name in SEGMENT_NAMES:
        if name in state.segments:
            segment_to_kvm(state.segments[name], getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = state.cr0, state.cr2, state.cr3, state.cr4
    sregs.cr8, sregs.efer, sregs.apic_base = state.cr8, state.efer, state.apic_base
    bitmap = state.extra.get("interrupt_bitmap")
    for i in range(4):
        sregs.interrupt_bitmap[i] = bitmap[i] if bitmap else 0
    return sregs


def read_state(vcpu: KvmVcpu, msr_list: list[int], lapic: bool) -> CpuState:
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    xsave = vcpu.get_xsave()
    events = vcpu.get_vcpu_events()
    state = CpuState(
        gpr={name: getattr(regs, name) for name in GPR_NAMES},
        rip=regs.rip,
        rflags=regs.rflags,
        segments={name: segment_from_kvm(getattr(sregs, name)) for name in SEGMENT_NAMES},
        gdt=DescriptorTable(sregs.gdt.base, sregs.gdt.limit),
        idt=DescriptorTable(sregs.idt.base, sregs.idt.limit),
        cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, cr8=sregs.cr8,
        efer=sregs.efer, apic_base=sregs.apic_base,
        msrs=vcpu.get_msrs(msr_list) if msr_list else {},
        fxsave=xsave[:XSAVE_HEADER],
    )  # fmt: skip
    if events.interrupt.injected:
        state.pending_interrupt = events.interrupt.nr
    mp_state = vcpu.get_mp_state()
    state.halted = mp_state == abi.KVM_MP_STATE_HALTED
    xcrs = vcpu.get_xcrs()
    state.extra = {
        "kvm_xsave": xsave.hex(),
        "kvm_xcrs": {str(xcrs.xcrs[i].xcr): xcrs.xcrs[i].value for i in range(xcrs.nr_xcrs)},
        "kvm_vcpu_events": bytes(events).hex(),
        "kvm_mp_state": mp_state,
        "interrupt_bitmap": list(sregs.interrupt_bitmap),
    }
    if lapic:
        state.extra["kvm_lapic"] = vcpu.get_lapic().hex()
    return state


def write_state(vcpu: KvmVcpu, state: CpuState, lapic: bool) -> None:
    """Load `state` into a stopped vCPU. Order matters: sregs (mode) before regs, the
    LAPIC before events, MSRs last (some depend on CPUID and mode)."""
    vcpu.set_sregs(state_to_sregs(state, vcpu.get_sregs()))
    vcpu.set_regs(state_to_regs(state))
    xsave_hex = state.extra.get("kvm_xsave")
    if xsave_hex:
        xcrs = state.extra.get("kvm_xcrs") or {}
        if xcrs:
            x = abi.kvm_xcrs(nr_xcrs=len(xcrs))
            for i, (index, value) in enumerate(xcrs.items()):
                x.xcrs[i].xcr, x.xcrs[i].value = int(index), value
            vcpu.set_xcrs(x)
        vcpu.set_xsave(bytes.fromhex(xsave_hex))
    elif len(state.fxsave) == 512:
        # Only the legacy x87/SSE image (e.g. from the emulator): an XSAVE image with just
        # those two components present.
        image = bytearray(4096)
        image[:512] = state.fxsave
        image[512:520] = XSTATE_X87_SSE.to_bytes(8, "little")
        vcpu.set_xsave(bytes(image))
    if lapic and state.extra.get("kvm_lapic"):
        vcpu.set_lapic(bytes.fromhex(state.extra["kvm_lapic"]))
    events_hex = state.extra.get("kvm_vcpu_events")
    if events_hex:
        vcpu.set_vcpu_events(abi.kvm_vcpu_events.from_buffer_copy(bytes.fromhex(events_hex)))
    elif state.pending_interrupt is not None:
        ev = abi.kvm_vcpu_events()
        ev.interrupt.injected, ev.interrupt.nr = 1, state.pending_interrupt
        vcpu.set_vcpu_events(ev)
    if state.msrs:
        # KVM_SET_MSRS stops at the first MSR it refuses; a state from elsewhere (the
        # emulator, another host) may carry one, so load them one by one and skip those.
        if vcpu.set_msrs(state.msrs) < len(state.msrs):
            for index, value in state.msrs.items():
                vcpu.set_msrs({index: value})
    if lapic:
        mp = state.extra.get("kvm_mp_state")
        if mp is None:
            mp = abi.KVM_MP_STATE_HALTED if state.halted else abi.KVM_MP_STATE_RUNNABLE
        vcpu.set_mp_state(mp)


def read_vm_state(vm: KvmVm, irqchip: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"kvm_clock_ns": vm.get_clock()}
    if irqchip:
        out["kvm_irqchip"] = [vm.get_irqchip(i).hex() for i in range(3)]
        out["kvm_pit2"] = vm.get_pit2().hex()
    return out


def write_vm_state(vm: KvmVm, data: dict[str, Any], irqchip: bool) -> None:
    if "kvm_clock_ns" in data:
        vm.set_clock(data["kvm_clock_ns"])
    if irqchip:
        for raw in data.get("kvm_irqchip", []):
            vm.set_irqchip(bytes.fromhex(raw))
        if "kvm_pit2" in data:
            vm.set_pit2(bytes.fromhex(data["kvm_pit2"]))


def format_registers(vcpu: KvmVcpu) -> str:
    """A register dump for error messages, like QEMU's `info registers`."""
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except Exception as exc:  # the vCPU may be unusable after a failed entry
        return f"(registers unavailable: {exc})"
    lines = [
        " ".join(f"{n}={getattr(r, n):016x}" for n in ("rax", "rbx", "rcx", "rdx")),
        " ".join(f"{n}={getattr(r, n):016x}" for n in ("rsi", "rdi", "rsp", "rbp")),
        f"rip={r.rip:016x} rflags={r.rflags:08x}",
        " ".join(
            f"{n}={getattr(s, n).selector:04x}@{getattr(s, n).base:x}" for n in SEGMENT_NAMES[:6]
        ),
        f"cr0={s.cr0:08x} cr2={s.cr2:x} cr3={s.cr3:x} cr4={s.cr4:x} efer={s.efer:x} "
        f"gdt={s.gdt.base:x}/{s.gdt.limit:x} idt={s.idt.base:x}/{s.idt.limit:x}",
    ]
    return "\n".join(lines)


def cs_mode(sregs: abi.kvm_sregs) -> str:
    if not sregs.cr0 & 1:
        return "real mode"
    if sregs.efer & 0x400 and sregs.cs.l:
        return "64-bit long mode"
    return "32-bit protected mode" if sregs.cs.db else "16-bit protected mode"


def insn_bytes_from_run(run: abi.kvm_run) -> bytes | None:
    ef = run.exit.emulation_failure
    if ef.ndata >= 1 and ef.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
    return None
