"""The CPUID a vCPU sees: KVM's supported leaves, adjusted for this VM's shape.

KVM_GET_SUPPORTED_CPUID says what the host and KVM can virtualize; it does not know
which vCPU asks, how many there are, or that a guest should be told it is virtual. Bits
and leaves from the Intel SDM vol. 2A, CPUID instruction.
"""

from __future__ import annotations

from boite.accel.kvm import abi

LEAF1_ECX_X2APIC = 1 << 21
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_APIC = 1 << 9
LEAF1_EDX_HTT = 1 << 28


def _copy(e: abi.kvm_cpuid_entry2) -> abi.kvm_cpuid_entry2:
    return abi.kvm_cpuid_entry2.from_buffer_copy(e)


def vcpu_cpuid(
    supported: list[abi.kvm_cpuid_entry2], index: int, num_vcpus: int, lapic: bool
) -> list[abi.kvm_cpuid_entry2]:
    """The CPUID table for vCPU `index` of `num_vcpus` (one core each, one socket)."""
    # Bits of the x2APIC id that number the cores of the package.
    core_bits = max(0, (num_vcpus - 1).bit_length())
    out = []
    for src in supported:
        e = _copy(src)
        if e.function == 1:
            e.ecx |= LEAF1_ECX_HYPERVISOR
            # Initial APIC id, and the number of logical processors in the package.
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(num_vcpus, 255) << 16)
            if num_vcpus > 1:
                e.edx |= LEAF1_EDX_HTT
            else:
                e.edx &= ~LEAF1_EDX_HTT
            if not lapic:
                # No in-kernel local APIC: don't advertise one the guest cannot program.
                e.edx &= ~LEAF1_EDX_APIC
                e.ecx &= ~(LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE)
        elif e.function == 4:
            if e.eax & 0x1F == 0:
                out.append(e)
                continue
            # Cores per package - 1 in 31:26; each cache is private to one core.
            e.eax = (e.eax & 0x00003FFF) | ((num_vcpus - 1) << 26)
        elif e.function in (0xB, 0x1F):
            continue  # rebuilt below, one entry per topology level
        out.append(e)
    for leaf in sorted({e.function for e in supported if e.function in (0xB, 0x1F)}):
        # Extended topology: level 0 = SMT (1 thread per core), level 1 = core.
        for sub in range(3):
            e = abi.kvm_cpuid_entry2(
                function=leaf, index=sub, flags=abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, edx=index
            )
            if sub == 0:
                e.ebx, e.ecx = 1, 1 << 8
            elif sub == 1:
                e.eax, e.ebx, e.ecx = core_bits, num_vcpus, (2 << 8) | 1
            else:
                e.ecx = sub
            out.append(e)
    return out
