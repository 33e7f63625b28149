"""The KVM ABI for x86-64: ioctl numbers and ctypes structs, written from the KVM API
documentation (Documentation/virt/kvm/api.rst). tests/accel/test_kvm_abi.py checks every
number and size here against the installed kernel headers.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64, s32, s64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_int32, C.c_int64

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


class _Struct(C.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- structs ---------------------------------------------------------------------------
class kvm_regs(_Struct):
    _fields_ = [
        (n, u64)
        for n in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16),
        ("type", u8), ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]  # fmt: skip


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [
        *((n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        *((n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]  # fmt: skip


class kvm_fpu(_Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32), ("pad2", u32),
    ]  # fmt: skip


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only; the entries follow it (see msrs_buffer)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]


def msrs_buffer(n: int) -> C.Structure:
    class _Msrs(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    buf = _Msrs()
    buf.nmsrs = n
    return buf


def msr_list_buffer(n: int) -> C.Structure:
    class _MsrList(_Struct):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    buf = _MsrList()
    buf.nmsrs = n
    return buf


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]  # fmt: skip


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid_buffer(n: int) -> C.Structure:
    class _Cpuid2(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    buf = _Cpuid2()
    buf.nent = n
    return buf


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", C.c_char * 1024)]


class kvm_xsave(_Struct):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", C.c_char * 512)]


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2


class kvm_pit_channel_state(_Struct):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
        ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8),
        ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", s64),
    ]  # fmt: skip


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_clock_data(_Struct):
    _fields_ = [
        ("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
        ("pad", u32 * 4),
    ]  # fmt: skip


class _ev_exception(_Struct):
    _fields_ = [
        ("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
        ("error_code", u32),
    ]  # fmt: skip


class _ev_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _ev_exception), ("interrupt", _ev_interrupt), ("nmi", _ev_nmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _ev_smi), ("triple_fault_pending", u8),
        ("reserved", u8 * 26), ("exception_has_payload", u8), ("exception_payload", u64),
    ]  # fmt: skip


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]  # irq is a union with s32 status


class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
        ("userspace_addr", u64),
    ]  # fmt: skip


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED = 0, 1, 2
KVM_MP_STATE_HALTED, KVM_MP_STATE_SIPI_RECEIVED = 3, 4


# --- kvm_run: the page shared with the kernel ------------------------------------------
class _run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]  # fmt: skip


class _run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8),
                ("insn_bytes", u8 * 15)]  # fmt: skip


class _run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_exit(C.Union):
    _fields_ = [
        ("io", _run_io), ("mmio", _run_mmio), ("fail_entry", _run_fail_entry),
        ("internal", _run_internal), ("emulation_failure", _run_emulation_failure),
        ("system_event", _run_system_event), ("ex", _run_ex),
        ("hardware_exit_reason", u64), ("padding", C.c_char * 256),
    ]  # fmt: skip


class kvm_run(_Struct):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _run_exit),
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", C.c_char * 2048),
    ]  # fmt: skip


# Offsets the hot exit path reads straight from the mmap (checked against the headers).
RUN_OFF_IMMEDIATE_EXIT = kvm_run.immediate_exit.offset
RUN_OFF_EXIT_REASON = kvm_run.exit_reason.offset
RUN_OFF_EXIT = kvm_run.exit.offset

KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_IO, KVM_EXIT_HYPERCALL = 0, 1, 2, 3
KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_IRQ_WINDOW_OPEN = 4, 5, 6, 7
KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTR = 8, 9, 10
KVM_EXIT_NMI, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT = 16, 17, 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX = 1, 2
KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 3, 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

EXIT_REASON_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 16: "NMI",
    17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT",
}  # fmt: skip

# --- capabilities ----------------------------------------------------------------------
KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_PIT2 = 33
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_XSAVE2 = 208

# --- ioctls ----------------------------------------------------------------------------
# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, kvm_irqchip)
KVM_IRQ_LINE_STATUS = _iowr(0x67, kvm_irq_level)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_SET_CLOCK = _iow(0x7B, kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, kvm_pit_state2)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, kvm_xcrs)
KVM_GET_TSC_KHZ = _io(0xA3)

# Every ioctl number, by its header name (the header test compares each one).
IOCTLS = {
    name: value
    for name, value in globals().items()
    if name.startswith(("KVM_GET_", "KVM_SET_", "KVM_CREATE_"))
    or name in ("KVM_RUN", "KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS", "KVM_CHECK_EXTENSION")
}
STRUCTS = {
    "kvm_regs": kvm_regs, "kvm_sregs": kvm_sregs, "kvm_segment": kvm_segment,
    "kvm_dtable": kvm_dtable, "kvm_fpu": kvm_fpu, "kvm_msr_entry": kvm_msr_entry,
    "kvm_msrs": kvm_msrs, "kvm_cpuid_entry2": kvm_cpuid_entry2, "kvm_cpuid2": kvm_cpuid2,
    "kvm_lapic_state": kvm_lapic_state, "kvm_xsave": kvm_xsave, "kvm_xcrs": kvm_xcrs,
    "kvm_irqchip": kvm_irqchip, "kvm_pit_channel_state": kvm_pit_channel_state,
    "kvm_pit_state2": kvm_pit_state2, "kvm_pit_config": kvm_pit_config,
    "kvm_clock_data": kvm_clock_data, "kvm_vcpu_events": kvm_vcpu_events,
    "kvm_irq_level": kvm_irq_level,
    "kvm_userspace_memory_region": kvm_userspace_memory_region, "kvm_mp_state": kvm_mp_state,
    "kvm_run": kvm_run,
}  # fmt: skip
