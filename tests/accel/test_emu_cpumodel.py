"""The emulated CPU's model: CPUID reports exactly what is implemented, MSRs read back
what was written and #GP as the SDM says, and the PAE checks QEMU TCG does not make (the
PDPTEs loaded with CR3). Behaviour QEMU does share is compared against it in
tcg_guests/pae.asm and sysenter.asm."""

from __future__ import annotations

import pytest

from boite.accel.emu.cpu import GP, Cpu, CpuFault
from boite.accel.emu.cpumodel import (
    BRAND,
    CRYSTAL_HZ,
    EDX1_BITS,
    FEATURES,
    LEAF2,
    MAX_BASIC_LEAF,
    MSR_EFER,
    MSR_MTRR_DEF_TYPE,
    MSR_PAT,
    PAT_POWER_ON,
    cpuid_leaf,
    msr_specs,
)
from boite.machine.devices.lapic import BUS_HZ
from boite.machine.memory import GuestMemory


@pytest.fixture
def cpu():
    mem = GuestMemory.with_ram(4 << 20)
    c = Cpu(mem)
    yield c
    c.close()


def test_cpuid_reports_exactly_the_implemented_features() -> None:
    _, _, _, edx = cpuid_leaf(FEATURES, 1)
    for name, bit in EDX1_BITS.items():
        assert bool(edx >> bit & 1) == (name in FEATURES), name
    _, _, _, ext = cpuid_leaf(FEATURES, 0x80000001)
    assert ext >> 20 & 1 == ("nx" in FEATURES)
    brand = b"".join(
        b"".join(v.to_bytes(4, "little") for v in cpuid_leaf(FEATURES, leaf))
        for leaf in (0x80000002, 0x80000003, 0x80000004)
    )
    assert brand.rstrip(b"\0") == BRAND
    eax, *_ = cpuid_leaf(FEATURES, 1)
    assert (eax >> 8 & 0xF, eax >> 4 & 0xF) == (6, 13)
    # Above the highest leaf: the highest basic leaf's values, as Intel CPUs answer.
    assert cpuid_leaf(FEATURES, 0)[0] == MAX_BASIC_LEAF == 0x16
    assert cpuid_leaf(FEATURES, 0x40) == cpuid_leaf(FEATURES, MAX_BASIC_LEAF)
    assert cpuid_leaf(FEATURES, 0x80000008) == cpuid_leaf(FEATURES, MAX_BASIC_LEAF)


def test_cpuid_gives_the_tsc_and_crystal_clocks() -> None:
    """CPUID.15H/16H (what an OS reads instead of measuring the TSC against the PIT):
    TSC = crystal * EBX / EAX is the rate RDTSC counts at, the crystal is the local APIC
    timer's clock, and the leaves between 2 and 15H are empty (nothing the model has)."""
    for tsc_hz in (1_000_000_000, 2_400_000_000, 1_193_182):
        eax, ebx, ecx, edx = cpuid_leaf(FEATURES, 0x15, tsc_hz=tsc_hz)
        assert ecx == CRYSTAL_HZ == BUS_HZ and edx == 0
        assert ecx * ebx // eax == tsc_hz and ecx * ebx % eax == 0
        base, top, bus, _ = cpuid_leaf(FEATURES, 0x16, tsc_hz=tsc_hz)
        assert base == top == tsc_hz // 1_000_000 and bus == BUS_HZ // 1_000_000
    for leaf in range(3, 0x15):
        assert cpuid_leaf(FEATURES, leaf) == (0, 0, 0, 0), hex(leaf)
    assert cpuid_leaf(FEATURES, 2) == LEAF2


def test_cpuid_instruction_reports_the_cpus_tsc_rate() -> None:
    mem = GuestMemory.with_ram(4 << 20)
    c = Cpu(mem, tsc_hz=3_000_000_000)
    try:
        c.r[0] = 0x15
        c.cpuid()
        eax, ebx, ecx = c.r[0], c.r[3], c.r[1]
        assert ecx * ebx // eax == 3_000_000_000
    finally:
        c.close()


def test_every_msr_reads_back_what_was_written_and_refuses_reserved_bits(cpu) -> None:
    for idx, spec in msr_specs(cpu.features).items():
        assert cpu.rdmsr(idx) == spec.reset, spec.name
        if spec.read_only:
            with pytest.raises(CpuFault) as e:
                cpu.wrmsr(idx, spec.reset)
            assert e.value.vector == GP
            continue
        if idx not in (MSR_PAT, MSR_MTRR_DEF_TYPE, MSR_EFER) and not 0x200 <= idx < 0x270:
            cpu.wrmsr(idx, spec.writable)
            assert cpu.rdmsr(idx) == spec.writable, spec.name
        reserved = ~spec.writable & ((1 << 64) - 1)
        if reserved:
            before = cpu.rdmsr(idx)
            with pytest.raises(CpuFault) as e:
                cpu.wrmsr(idx, reserved & -reserved)  # the lowest reserved bit
            assert e.value.vector == GP and cpu.rdmsr(idx) == before, spec.name


def test_unknown_msrs_and_bad_memory_types_are_gp(cpu) -> None:
    for idx in (0x1B, 0x400, 0xC0000081, 0x12345678):  # no APIC, no MC bank, no SYSCALL
        with pytest.raises(CpuFault):
            cpu.rdmsr(idx)
        with pytest.raises(CpuFault):
            cpu.wrmsr(idx, 0)
    with pytest.raises(CpuFault):
        cpu.wrmsr(MSR_PAT, (PAT_POWER_ON & ~0xFF) | 2)  # type 2 is reserved
    assert cpu.rdmsr(MSR_PAT) == PAT_POWER_ON
    with pytest.raises(CpuFault):
        cpu.wrmsr(MSR_MTRR_DEF_TYPE, 3)  # type 3 is reserved
    cpu.wrmsr(MSR_MTRR_DEF_TYPE, 0xC06)
    assert cpu.rdmsr(MSR_MTRR_DEF_TYPE) == 0xC06


def test_pdptes_with_reserved_bits_fault_on_load(cpu) -> None:
    """MOV to CR3 under PAE paging (and turning PAE paging on) loads the four PDPTEs; a
    present one with a reserved bit is #GP(0) and nothing changes (Intel SDM 4.4.1)."""
    mem = cpu.memory
    good, bad = 0x10000, 0x11000
    mem.write_u64(good, 0x20000 | 1)
    mem.write_u64(bad, 0x20000 | 1 | 2)  # R/W is reserved in a PAE PDPTE
    mem.write_u64(bad + 8, 0)
    cpu.set_cr(4, 0x20)
    cpu.set_cr(3, bad)
    with pytest.raises(CpuFault) as e:
        cpu.set_cr(0, cpu.cr0 | 0x80000001)  # PG on, with the bad PDPT in CR3
    assert e.value.vector == GP and not cpu.paging
    cpu.set_cr(3, good)
    cpu.set_cr(0, cpu.cr0 | 0x80000001)
    assert cpu.pae
    with pytest.raises(CpuFault):
        cpu.set_cr(3, bad)
    assert cpu.cr3 == good
    mem.write_u64(bad, 0x20000 | 1 | (1 << 40))  # above MAXPHYADDR (36)
    with pytest.raises(CpuFault):
        cpu.set_cr(3, bad)
    mem.write_u64(bad, 0x20000 | 2)  # not present: nothing is checked
    cpu.set_cr(3, bad)
    assert cpu.cr3 == bad


def test_p6_performance_counters_sign_extend_bit_31(cpu) -> None:
    """Linux's P6 PMU driver (Pentium M: family 6, model 13) writes 0xabcd to PerfCtr0
    and reads it back (check_hw_exists): a #GP made it log 'Failed to access perfctr
    msr (MSR 186 ...)' and run without the PMU. WRMSR writes bits 31:0 and sign-extends
    them to the counter's 40 bits (SDM vol. 3B, P6 family performance monitoring)."""
    cpu.wrmsr(0xC1, 0xABCD)
    assert cpu.rdmsr(0xC1) == 0xABCD
    cpu.wrmsr(0xC2, 0x80000001)
    assert cpu.rdmsr(0xC2) == 0xFF80000001
    cpu.wrmsr(0x186, 0x530079)  # CPU_CLK_UNHALTED, USR|OS|EN
    assert cpu.rdmsr(0x186) == 0x530079
    with pytest.raises(CpuFault):
        cpu.wrmsr(0x187, 1 << 21)  # reserved


def test_machine_check_architecture_without_banks(cpu) -> None:
    """CPUID's MCE and MCA bits with MCG_CAP reporting no banks: Linux's MCE code runs
    (it logged 'mce: Unable to init MCE device (rc: -5)' without them)."""
    edx = cpuid_leaf(FEATURES, 1)[3]
    assert edx >> 7 & 1 and edx >> 14 & 1
    assert cpu.rdmsr(0x179) == 0  # MCG_CAP: no banks, no MCG_CTL
    with pytest.raises(CpuFault):
        cpu.wrmsr(0x179, 0)  # read-only
    cpu.wrmsr(0x17A, 0)  # MCG_STATUS
    assert cpu.rdmsr(0x17A) == 0
    with pytest.raises(CpuFault):
        cpu.rdmsr(0x17B)  # MCG_CTL: only with MCG_CAP.MCG_CTL_P


def test_rdpmc_reads_the_p6_counters_in_ring_0_or_with_cr4_pce(cpu) -> None:
    """Linux's P6 PMU driver reads its counters with RDPMC (x86_perf_event_update); it
    runs on every power-off (perf_reboot stops the events), where a #UD killed Debian's
    `poweroff`. Counter 0 or 1 by ECX, 40 bits in EDX:EAX; other ECX values #GP, and so
    does ring 3 unless CR4.PCE is set."""

    def rdpmc(ecx: int) -> tuple[int, int]:
        cpu.memory.write(0x1000, b"\x0f\x33\xf4")
        cpu.flush_blocks()
        cpu.eip, cpu.r[1] = 0x1000, ecx
        fn, _ = cpu.decoder.decode_one(cpu.eip)
        fn()
        assert cpu.eip == 0x1002
        return cpu.r[2], cpu.r[0]

    cpu.wrmsr(0xC1, 0xABCD)
    cpu.wrmsr(0xC2, 0x80000001)  # sign-extended to 40 bits
    assert rdpmc(0) == (0, 0xABCD)
    assert rdpmc(1) == (0xFF, 0x80000001)
    with pytest.raises(CpuFault) as fault:
        rdpmc(2)
    assert fault.value.vector == GP
    cpu.cpl = 3
    with pytest.raises(CpuFault):
        rdpmc(0)
    cpu.cr4 |= 0x100  # PCE
    assert rdpmc(0) == (0, 0xABCD)
