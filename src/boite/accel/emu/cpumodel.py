"""The CPU model the emulator presents: its CPUID leaves and its model-specific registers.

The model is an Intel Pentium M "Dothan" (family 6, model 13, stepping 8): a real 32-bit
CPU of the Core family with PAE, the XD (NX) bit, SYSENTER, PAT and MTRRs, whose feature
set is a superset of everything this emulator does. CPUID reports only the subset that
is implemented (`FEATURES`): a feature bit is on exactly when the emulator does what
the SDM says that bit promises, so a guest never takes a path that ends in a #UD or a
GuestError. The x87/MMX/SSE bits come on with accel/emu/fpu.py and sse.py, APIC with the
local APIC; each is one name in `FEATURES` (the x87/SIMD ones from fpu.FPU_FEATURES).
Beyond a Dothan's leaves, CPUID.15H/16H give the TSC's and the crystal's clocks (see
MAX_BASIC_LEAF), with the empty leaves between.

MSRs follow the same rule: an index the model has is read back exactly as written
(within its writable bits); writing a reserved bit, or any access to an index the model
lacks, is #GP(0) as the SDM says. MTRRs start as firmware leaves them on a machine that
never changed them (all disabled, default type uncached is the power-on state; SeaBIOS
or the kernel programs them), PAT at its power-on value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from boite.accel.emu.fpu import FPU_FEATURES

# CPUID.1:EDX bit for each feature name (Intel SDM vol. 2A, table 3-11).
EDX1_BITS = {
    "fpu": 0, "vme": 1, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6, "mce": 7,
    "cx8": 8, "apic": 9, "sep": 11, "mtrr": 12, "pge": 13, "mca": 14, "cmov": 15,
    "pat": 16, "pse36": 17, "clfsh": 19, "mmx": 23, "fxsr": 24, "sse": 25, "sse2": 26,
}  # fmt: skip
ECX1_BITS = {"sse3": 0, "rdrand": 30}
EDX_EXT1_BITS = {"nx": 20}

# What this emulator implements (the model's own list is larger: see the module docstring).
FEATURES: frozenset[str] = (
    frozenset(
        {"de", "pse", "tsc", "msr", "pae", "mce", "cx8", "sep", "mtrr", "pge", "mca", "cmov",
         "pat", "rdrand", "nx"}
    )
    | FPU_FEATURES  # x87, MMX, FXSR, SSE, SSE2, CLFLUSH: accel/emu/fpu.py says which
)  # fmt: skip

FAMILY, MODEL, STEPPING = 6, 13, 8
BRAND = b"Intel(R) Pentium(R) M processor 1.73GHz"
# CPUID.2 cache and TLB descriptors of a Dothan: 0x02 (ITLB 4M), 0x7D (L2 2 MiB 8-way
# 64-byte lines), 0xB0 (ITLB 4K), 0xB3 (DTLB 4K), 0x2C (L1D 32 KiB 8-way), 0x30 (L1I
# 32 KiB 8-way); AL = 1 (one CPUID.2 call gives them all).
LEAF2 = (0x02B3B001, 0x000000F0, 0x00000000, 0x2C307D00)  # EAX EBX ECX EDX

# Leaves 3-0x14 are all zeros (no such cache, topology, feature or monitoring leaf:
# the SDM's "not present" for each). 0x15 and 0x16 give the clocks, so that an OS takes
# the TSC's frequency from the CPU, as on processors since Skylake, instead of measuring
# it against the PIT: Linux's measurement (a 10 ms loop of port 0x61 reads and RDTSC
# whose slowest iteration must take under 10x the fastest) fails whenever the host takes
# the vCPU away for tens of microseconds (a host timer tick in a nested VM takes ~40 us,
# an iteration here ~3.5 us), and Linux then marks the TSC unstable and measures its
# delay loop against the timer tick for ~0.2 s. (bench/RESULTS.md, 2026-12-07 timing.)
MAX_BASIC_LEAF = 0x16
# The core crystal clock of CPUID.15H: the local APIC timer's clock (lapic.BUS_HZ),
# since an OS may take the APIC timer to run at this rate (Linux does).
CRYSTAL_HZ = 1_000_000_000
MAX_EXT_LEAF = 0x80000004
MAXPHYADDR = 36  # PAE entries: bits 36-62 reserved (no CPUID.80000008 on this model)

# MSR indices.
MSR_TSC = 0x10
MSR_PLATFORM_ID = 0x17
MSR_APIC_BASE = 0x1B
MSR_EBL_CR_POWERON = 0x2A
MSR_BIOS_SIGN_ID = 0x8B
MSR_MTRRCAP = 0xFE
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_MISC_ENABLE = 0x1A0
MSR_MTRR_PHYSBASE0 = 0x200
MSR_MTRR_FIX64K = 0x250
MSR_MTRR_FIX16K = (0x258, 0x259)
MSR_MTRR_FIX4K = tuple(range(0x268, 0x270))
MSR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_EFER = 0xC0000080
MSR_MCG_CAP, MSR_MCG_STATUS = 0x179, 0x17A
# The P6 family's two performance counters and their event selects (SDM vol. 3B,
# 20.6.8 "Performance Monitoring (P6 Family Processor)"): 40-bit counters; WRMSR writes
# bits 31:0 and sign-extends bit 31 into 39:32.
MSR_P6_PERFCTR = (0xC1, 0xC2)
MSR_P6_EVNTSEL = (0x186, 0x187)

EFER_NXE = 1 << 11
VARIABLE_MTRRS = 8
PAT_POWER_ON = 0x0007040600070406
# MISC_ENABLE of a Dothan with SpeedStep off: fast strings (0), automatic thermal control
# (3), performance monitoring available (7), branch trace / PEBS unavailable (11, 12).
MISC_ENABLE_POWER_ON = (1 << 0) | (1 << 3) | (1 << 7) | (1 << 11) | (1 << 12)
MEMORY_TYPES = frozenset((0, 1, 4, 5, 6))  # UC WC WT WP WB
PAT_TYPES = MEMORY_TYPES | {7}  # and UC-
PHYS_MASK = (1 << MAXPHYADDR) - 1


@dataclass(frozen=True, slots=True)
class MsrSpec:
    """One model-specific register: its power-on value, which bits software may change
    (a reserved bit set by WRMSR is #GP(0)), and whether WRMSR is allowed at all."""

    name: str
    reset: int
    writable: int
    read_only: bool = False


def _mtrr_specs() -> dict[int, MsrSpec]:
    specs = {
        # VCNT = 8 variable ranges, FIX (fixed ranges) and WC supported.
        MSR_MTRRCAP: MsrSpec("MTRRcap", VARIABLE_MTRRS | (1 << 8) | (1 << 10), 0, True),
        MSR_MTRR_DEF_TYPE: MsrSpec("MTRRdefType", 0, 0xCFF),
        MSR_MTRR_FIX64K: MsrSpec("MTRRfix64K_00000", 0, (1 << 64) - 1),
    }
    for i in MSR_MTRR_FIX16K:
        specs[i] = MsrSpec(f"MTRRfix16K_{i:x}", 0, (1 << 64) - 1)
    for i in MSR_MTRR_FIX4K:
        specs[i] = MsrSpec(f"MTRRfix4K_{i:x}", 0, (1 << 64) - 1)
    for n in range(VARIABLE_MTRRS):
        base = MSR_MTRR_PHYSBASE0 + 2 * n
        specs[base] = MsrSpec(f"MTRRphysBase{n}", 0, (PHYS_MASK & ~0xFFF) | 0xFF)
        specs[base + 1] = MsrSpec(f"MTRRphysMask{n}", 0, (PHYS_MASK & ~0xFFF) | 0x800)
    return specs


def msr_specs(features: frozenset[str]) -> dict[int, MsrSpec]:
    """The MSRs a CPU with `features` has (TSC is handled by the CPU: it counts)."""
    specs: dict[int, MsrSpec] = {
        # Platform ID bits 52:50 = 0 (what microcode loaders match against).
        MSR_PLATFORM_ID: MsrSpec("IA32_PLATFORM_ID", 0, 0, True),
        MSR_EBL_CR_POWERON: MsrSpec("EBL_CR_POWERON", 0, 0),
        # Microcode revision: WRMSR 0 then CPUID.1 makes the CPU latch it in EDX:EAX.
        MSR_BIOS_SIGN_ID: MsrSpec("IA32_BIOS_SIGN_ID", 0, (1 << 64) - 1),
        MSR_MISC_ENABLE: MsrSpec("IA32_MISC_ENABLE", MISC_ENABLE_POWER_ON, 1 << 22),
    }
    # Performance monitoring (MISC_ENABLE bit 7 says it is there; Linux's P6 PMU driver
    # probes these for a family 6 model 13 CPU). The counters keep what is written and do
    # not count: no event is emulated, so an enabled counter never overflows.
    for n, idx in enumerate(MSR_P6_PERFCTR):
        specs[idx] = MsrSpec(f"PerfCtr{n}", 0, (1 << 40) - 1)
    for n, idx in enumerate(MSR_P6_EVNTSEL):
        # Bit 21 is reserved, and so are 63:32.
        specs[idx] = MsrSpec(f"PerfEvtSel{n}", 0, 0xFFFFFFFF & ~(1 << 21))
    if "sep" in features:
        specs[MSR_SYSENTER_CS] = MsrSpec("IA32_SYSENTER_CS", 0, 0xFFFF)
        specs[MSR_SYSENTER_ESP] = MsrSpec("IA32_SYSENTER_ESP", 0, 0xFFFFFFFF)
        specs[MSR_SYSENTER_EIP] = MsrSpec("IA32_SYSENTER_EIP", 0, 0xFFFFFFFF)
    if "pat" in features:
        specs[MSR_PAT] = MsrSpec("IA32_PAT", PAT_POWER_ON, 0x0707070707070707)
    if "mtrr" in features:
        specs.update(_mtrr_specs())
    if "mca" in features:
        # The machine-check architecture without error-reporting banks (MCG_CAP count
        # 0, no MCG_CTL): the emulator has no hardware errors to report, and #MC is
        # never raised (CR4.MCE, "mce", only enables it). Linux's MCE code then runs
        # instead of logging "mce: Unable to init MCE device (rc: -5)".
        specs[MSR_MCG_CAP] = MsrSpec("IA32_MCG_CAP", 0, 0, True)
        specs[MSR_MCG_STATUS] = MsrSpec("IA32_MCG_STATUS", 0, 0x7)  # RIPV EIPV MCIP
    if "nx" in features:
        specs[MSR_EFER] = MsrSpec("IA32_EFER", 0, EFER_NXE)
    if "apic" in features:
        # BSP flag (8) read-only; global enable (11) and the base (12-35) writable.
        specs[MSR_APIC_BASE] = MsrSpec(
            "IA32_APIC_BASE", 0xFEE00000 | (1 << 11) | (1 << 8), (PHYS_MASK & ~0xFFF) | (1 << 11)
        )
    return specs


def msr_value_ok(idx: int, value: int) -> bool:
    """Checks beyond the writable mask: memory-type fields must name a real type."""
    if idx == MSR_PAT:
        return all((value >> (8 * i)) & 7 in PAT_TYPES for i in range(8))
    if idx == MSR_MTRR_DEF_TYPE:
        return value & 0xFF in MEMORY_TYPES
    if idx == MSR_MTRR_FIX64K or idx in MSR_MTRR_FIX16K or idx in MSR_MTRR_FIX4K:
        return all((value >> (8 * i)) & 0xFF in MEMORY_TYPES for i in range(8))
    if MSR_MTRR_PHYSBASE0 <= idx < MSR_MTRR_PHYSBASE0 + 2 * VARIABLE_MTRRS and not idx & 1:
        return value & 0xFF in MEMORY_TYPES
    return True


def _bits(names: frozenset[str], table: dict[str, int]) -> int:
    v = 0
    for name, bit in table.items():
        if name in names:
            v |= 1 << bit
    return v


def _clock_leaf(leaf: int, tsc_hz: int) -> tuple[int, int, int, int]:
    """CPUID.15H (TSC = crystal * EBX / EAX, ECX = crystal Hz) and 16H (base and maximum
    frequency, bus/reference frequency, MHz)."""
    if leaf == 0x15:
        g = math.gcd(tsc_hz, CRYSTAL_HZ)
        return CRYSTAL_HZ // g, tsc_hz // g, CRYSTAL_HZ, 0
    mhz = min(tsc_hz // 1_000_000, 0xFFFF)
    return mhz, mhz, min(CRYSTAL_HZ // 1_000_000, 0xFFFF), 0


def cpuid_leaf(
    features: frozenset[str], leaf: int, apic_id: int = 0, tsc_hz: int = 1_000_000_000
) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) of CPUID leaf `leaf` for a CPU with `features` whose TSC
    counts `tsc_hz` per second. A leaf above the maximum returns the highest basic
    leaf's values, as Intel CPUs do."""
    if leaf >= 0x80000000:
        if leaf > MAX_EXT_LEAF:
            leaf = MAX_BASIC_LEAF
        elif leaf == 0x80000000:
            return MAX_EXT_LEAF, 0, 0, 0
        elif leaf == 0x80000001:
            return 0, 0, 0, _bits(features, EDX_EXT1_BITS)
        else:
            part = BRAND.ljust(48, b"\0")[(leaf - 0x80000002) * 16 :][:16]
            a, b, c, d = (int.from_bytes(part[i : i + 4], "little") for i in range(0, 16, 4))
            return a, b, c, d
    if leaf > MAX_BASIC_LEAF:
        leaf = MAX_BASIC_LEAF
    if leaf == 0:
        return MAX_BASIC_LEAF, 0x756E6547, 0x6C65746E, 0x49656E69  # "GenuineIntel"
    if leaf == 1:
        eax = (FAMILY << 8) | (MODEL << 4) | STEPPING
        # EBX: CLFLUSH line size (in 8-byte units) where CLFLUSH exists, initial APIC id.
        ebx = (8 << 8 if "clfsh" in features else 0) | (apic_id << 24)
        return eax, ebx, _bits(features, ECX1_BITS), _bits(features, EDX1_BITS)
    if leaf == 2:
        return LEAF2
    if leaf >= 0x15:
        return _clock_leaf(leaf, tsc_hz)
    return 0, 0, 0, 0
