"""Checks a vCPU state read from a checkpoint before any accelerator loads it.

The neutral fields (registers, segments, tables, control registers, MSRs, FXSAVE) must
fit their architectural widths; `extra` may hold only what boite's accelerators write:
the emulator's `emu` record and KVM's blobs, each of the exact size its ioctl takes
(`accel/kvm/abi.py`). Anything else is a CheckpointError naming the vCPU and the field.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from boite.accel.cpustate import GPR_NAMES, SEGMENT_NAMES, CpuState
from boite.accel.kvm import abi
from boite.errors import CheckpointError
from boite.machine.state import (
    U16,
    U32,
    U64,
    Bits,
    Check,
    Choice,
    Data,
    Flag,
    Int,
    Items,
    Nested,
    StateRecord,
    checked,
)

MAX_MSRS = 1024  # KVM's own list is a few hundred
FXSAVE_SIZE = 512
# EFLAGS bits that exist (SDM vol. 1, 3.4.3): CF, 1, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL,
# NT, RF, VM, AC, VIF, VIP, ID.
RFLAGS_BITS = 0x3F7FD7
# EFER: SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE.
EFER_BITS = 0xFD01
U4, U2, BIT = Int(0, 15), Int(0, 3), Int(0, 1)


def maybe(check: Check) -> Any:
    """A key that may be absent (a state from the other accelerator lacks it)."""
    return checked(check, default=None)


@dataclass(frozen=True)
class EmuCpuExtra(StateRecord):
    """`extra["emu"]`: what the emulator keeps beyond the neutral fields."""

    cpl: int | None = maybe(U2)
    dr: tuple[int, ...] | None = maybe(Items(U32, max_len=8, exact=8))
    inhibit_irq: bool | None = maybe(Flag())
    parked: bool | None = maybe(Flag())
    ferr: bool | None = maybe(Flag())  # the x87's FERR#/IGNNE# pins (branch cpu-fpu)
    ignne: bool | None = maybe(Flag())


def _blob(struct: type[ctypes.Structure]) -> Data:
    size = ctypes.sizeof(struct)
    return Data(max_len=size, exact=size)


class _Xcrs(Check):
    """KVM's XCRs as JSON gives them back: {"index": value}, at most kvm_xcrs holds."""

    def check(self, value: Any, path: str) -> dict[str, int]:
        if not isinstance(value, dict) or len(value) > 16:
            raise self.fail(path, "not a dictionary of at most 16 XCRs")
        for key, v in value.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < 1 << 32):
                raise self.fail(path, f"XCR index {key!r} is not a u32")
            U64.check(v, f"{path}.{key}")
        return value


@dataclass(frozen=True)
class KvmVmExtra(StateRecord):
    """`extra["kvm_vm"]` (vCPU 0 only): the VM-wide state KVM keeps in the kernel."""

    kvm_clock_ns: int | None = maybe(U64)
    kvm_irqchip: tuple[bytes, ...] | None = maybe(Items(_blob(abi.kvm_irqchip), max_len=3))
    kvm_pit2: bytes | None = maybe(_blob(abi.kvm_pit_state2))

    def validate(self) -> None:
        for i, raw in enumerate(self.kvm_irqchip or ()):
            if int.from_bytes(raw[:4], "little") != i:  # chip_id: master, slave, IOAPIC
                raise self.invalid(f"kvm_irqchip[{i}]", f"chip_id is not {i}")


@dataclass(frozen=True)
class CpuExtra(StateRecord):
    """A vCPU's `extra`: every key an accelerator of boite's writes, and no other."""

    emu: EmuCpuExtra | None = maybe(Nested(EmuCpuExtra))
    kvm_xsave: bytes | None = maybe(_blob(abi.kvm_xsave))
    kvm_xcrs: dict[str, int] | None = maybe(_Xcrs())
    kvm_vcpu_events: bytes | None = maybe(_blob(abi.kvm_vcpu_events))
    kvm_mp_state: int | None = maybe(Choice(*range(abi.KVM_MP_STATE_SIPI_RECEIVED + 1)))
    interrupt_bitmap: tuple[int, ...] | None = maybe(Items(U64, max_len=4, exact=4))
    kvm_lapic: bytes | None = maybe(_blob(abi.kvm_lapic_state))
    kvm_halted_no_lapic: bool | None = maybe(Flag())
    kvm_vm: KvmVmExtra | None = maybe(Nested(KvmVmExtra))


_SEGMENT_FIELDS: tuple[tuple[str, Check], ...] = (
    ("selector", U16), ("base", U64), ("limit", U32), ("type", U4), ("present", BIT),
    ("dpl", U2), ("db", BIT), ("s", BIT), ("l", BIT), ("g", BIT), ("avl", BIT),
    ("unusable", BIT),
)  # fmt: skip


CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


def _check_modes(st: CpuState) -> None:
    """The control register combinations no CPU can be in (what KVM_SET_SREGS refuses, so
    a restore does not fail half way on the ioctl): SDM vol. 3, 2.5 and 9.8.5."""
    if st.cr0 & CR0_PG and not st.cr0 & CR0_PE:
        raise CheckpointError(f"cr0: {st.cr0:#x} has paging on in real mode")
    if st.cr0 & CR0_NW and not st.cr0 & CR0_CD:
        raise CheckpointError(f"cr0: {st.cr0:#x} has NW set without CD")
    long_mode = bool(st.efer & EFER_LME and st.cr0 & CR0_PG)
    if long_mode and not st.cr4 & CR4_PAE:
        raise CheckpointError(f"cr4: {st.cr4:#x}: long mode (EFER.LME with paging) needs PAE")
    if bool(st.efer & EFER_LMA) != long_mode:
        raise CheckpointError(
            f"efer: {st.efer:#x}: LMA must be set exactly when LME and CR0.PG are"
        )


def check_cpu_state(st: CpuState, n: int) -> None:
    """Raise CheckpointError (naming `vCPU n` and the field) for a state no vCPU can hold."""
    where = f"vCPU {n}"
    try:
        if set(st.gpr) != set(GPR_NAMES):
            raise CheckpointError(f"gpr: registers {sorted(st.gpr)}, expected {GPR_NAMES}")
        for name in GPR_NAMES:
            U64.check(st.gpr[name], name)
        U64.check(st.rip, "rip")
        Bits(RFLAGS_BITS | 0x2).check(st.rflags, "rflags")
        for name, seg in st.segments.items():
            if name not in SEGMENT_NAMES:
                raise CheckpointError(f"segments: unknown segment register {name!r}")
            for field, check in _SEGMENT_FIELDS:
                check.check(getattr(seg, field), f"{name}.{field}")
        for name, table in (("gdt", st.gdt), ("idt", st.idt)):
            U64.check(table.base, f"{name}.base")
            U16.check(table.limit, f"{name}.limit")
        U32.check(st.cr0, "cr0")
        U64.check(st.cr2, "cr2")
        U64.check(st.cr3, "cr3")
        U32.check(st.cr4, "cr4")
        U4.check(st.cr8, "cr8")
        Bits(EFER_BITS).check(st.efer, "efer")
        _check_modes(st)
        U64.check(st.apic_base, "apic_base")
        if len(st.msrs) > MAX_MSRS:
            raise CheckpointError(f"msrs: {len(st.msrs)} MSRs, at most {MAX_MSRS}")
        for index, value in st.msrs.items():
            U32.check(index, "msrs")
            U64.check(value, f"msrs[{index:#x}]")
        if len(st.fxsave) not in (0, FXSAVE_SIZE):
            raise CheckpointError(f"fxsave: {len(st.fxsave)} bytes, expected 0 or {FXSAVE_SIZE}")
        if st.pending_interrupt is not None:
            Int(0, 255).check(st.pending_interrupt, "pending_interrupt")
        CpuExtra.from_dict(st.extra, "extra", versioned=False)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
