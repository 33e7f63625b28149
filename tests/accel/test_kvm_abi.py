"""Our ctypes structs and ioctl numbers against the kernel's own headers (linux-libc-dev).

A tiny C program compiled with gcc prints sizeof, offsetof and every ioctl value from
<linux/kvm.h>; each must equal what boite.accel.kvm.abi computes by itself.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from boite.accel.kvm import abi

HEADER = Path("/usr/include/linux/kvm.h")

# (struct, member) pairs whose offsets the exit path and the state code rely on.
OFFSETS = [
    ("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "cr8"),
    ("kvm_run", "io"), ("kvm_run", "mmio"), ("kvm_run", "internal"),
    ("kvm_run", "system_event"), ("kvm_run", "fail_entry"), ("kvm_run", "kvm_valid_regs"),
    ("kvm_run", "s"), ("kvm_sregs", "gdt"), ("kvm_sregs", "cr0"), ("kvm_sregs", "efer"),
    ("kvm_sregs", "interrupt_bitmap"), ("kvm_fpu", "last_ip"), ("kvm_fpu", "xmm"),
    ("kvm_fpu", "mxcsr"), ("kvm_vcpu_events", "sipi_vector"), ("kvm_vcpu_events", "smi"),
    ("kvm_vcpu_events", "exception_payload"), ("kvm_pit_channel_state", "count_load_time"),
    ("kvm_pit_state2", "flags"), ("kvm_clock_data", "realtime"),
    ("kvm_segment", "selector"), ("kvm_segment", "unusable"), ("kvm_xcrs", "padding"),
    ("kvm_irqchip", "chip"),
]  # fmt: skip
# Members inside kvm_run's exit union (the header names them without the union's name).
RUN_UNION = [
    "io.direction", "io.size", "io.port", "io.count", "io.data_offset", "mmio.phys_addr",
    "mmio.data", "mmio.len", "mmio.is_write", "internal.suberror", "internal.data",
    "emulation_failure.insn_size", "emulation_failure.insn_bytes", "system_event.type",
    "system_event.data", "fail_entry.hardware_entry_failure_reason",
]  # fmt: skip
UNION_MEMBERS = {name for name, _ in abi._run_exit._fields_}


def our_offset(struct: str, path: str) -> int:
    """Offset of a dotted member path, looking through kvm_run's unnamed exit union."""
    t = abi.STRUCTS[struct]
    offset = 0
    for part in path.split("."):
        if t is abi.kvm_run and part in UNION_MEMBERS:
            offset += abi.RUN_OFF_EXIT
            t = abi._run_exit
        field = getattr(t, part)
        offset += field.offset
        t = dict(t._fields_)[part]
    return offset


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    if not HEADER.exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and linux-libc-dev's /usr/include/linux/kvm.h")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for name in abi.STRUCTS:
        lines.append(f'printf("sizeof.{name} %lu\\n", (unsigned long)sizeof(struct {name}));')
    for struct, member in OFFSETS:
        lines.append(
            f'printf("offset.{struct}.{member} %lu\\n", (unsigned long)offsetof(struct {struct}, {member}));'
        )
    for path in RUN_UNION:
        lines.append(
            f'printf("offset.kvm_run.{path} %lu\\n", (unsigned long)offsetof(struct kvm_run, {path}));'
        )
    for name in abi.IOCTLS:
        lines.append(f'printf("ioctl.{name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("kvmabi")
    (d / "abi.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes_match_the_kernel_headers(header_values):
    mismatches = {
        name: (ctypes.sizeof(t), header_values[f"sizeof.{name}"])
        for name, t in abi.STRUCTS.items()
        if ctypes.sizeof(t) != header_values[f"sizeof.{name}"]
    }
    assert not mismatches, f"ours vs kernel: {mismatches}"
    assert len(abi.STRUCTS) >= 20


def test_member_offsets_match_the_kernel_headers(header_values):
    for struct, member in OFFSETS:
        assert our_offset(struct, member) == header_values[f"offset.{struct}.{member}"], member
    for path in RUN_UNION:
        assert our_offset("kvm_run", path) == header_values[f"offset.kvm_run.{path}"], path


def test_ioctl_numbers_match_the_kernel_headers(header_values):
    wrong = {
        name: (hex(value), hex(header_values[f"ioctl.{name}"]))
        for name, value in abi.IOCTLS.items()
        if value != header_values[f"ioctl.{name}"]
    }
    assert not wrong, f"ours vs kernel: {wrong}"
    assert {"KVM_RUN", "KVM_CREATE_PIT2", "KVM_GET_XSAVE", "KVM_SET_VCPU_EVENTS"} <= set(abi.IOCTLS)
