"""One CPU-state format for both accelerators (snapshots move between KVM and the emulator).

Field names follow the architecture (and KVM's kvm_regs/kvm_sregs) so a dict converts to
ioctl structs and to the emulator's registers without a translation table of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip

SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Segment:
    """A segment register with its hidden part, as kvm_segment holds it."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3  # data read/write, accessed
    present: int = 1
    dpl: int = 0
    db: int = 0  # default operand size (D/B)
    s: int = 1  # code/data (1) or system (0)
    l: int = 0  # noqa: E741 - the architecture's name for the 64-bit flag
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class CpuState:
    gpr: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPR_NAMES, 0))
    rip: int = 0xFFF0
    rflags: int = 0x2
    segments: dict[str, Segment] = field(default_factory=dict)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900
    msrs: dict[int, int] = field(default_factory=dict)
    # FPU/SSE state as an FXSAVE image (512 bytes) or empty when the CPU has none.
    fxsave: bytes = b""
    halted: bool = False
    # Interrupt shadow / pending event, as KVM's vcpu_events carries them.
    pending_interrupt: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # accelerator-specific, best effort

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fxsave"] = self.fxsave.hex()
        d["msrs"] = {str(k): v for k, v in self.msrs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuState:
        return cls(
            gpr=dict(d["gpr"]),
            rip=d["rip"],
            rflags=d["rflags"],
            segments={k: Segment(**v) for k, v in d["segments"].items()},
            gdt=DescriptorTable(**d["gdt"]),
            idt=DescriptorTable(**d["idt"]),
            cr0=d["cr0"], cr2=d["cr2"], cr3=d["cr3"], cr4=d["cr4"], cr8=d.get("cr8", 0),
            efer=d["efer"],
            apic_base=d.get("apic_base", 0xFEE00900),
            msrs={int(k): v for k, v in d.get("msrs", {}).items()},
            fxsave=bytes.fromhex(d.get("fxsave", "")),
            halted=d.get("halted", False),
            pending_interrupt=d.get("pending_interrupt"),
            extra=dict(d.get("extra", {})),
        )  # fmt: skip
