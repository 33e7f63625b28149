"""Thin objects over the three kinds of KVM file descriptor: /dev/kvm, a VM, a vCPU.

Each method is one ioctl. Errors become AccelError naming the ioctl and errno, so a
failing host (no /dev/kvm, a capability missing) says what went wrong.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from typing import Any

from boite.accel.kvm import abi
from boite.errors import AccelError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

_IOCTL_NAMES = {v: k for k, v in abi.IOCTLS.items()}


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl with a ctypes struct (passed by reference), an int, or nothing; retries EINTR."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            name = _IOCTL_NAMES.get(request, hex(request))
            raise AccelError(f"KVM ioctl {name} failed: {os.strerror(err)} (errno {err})")


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise AccelError(
                f"cannot open {path}: {exc.strerror} (is KVM available here?)"
            ) from None
        version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise AccelError(f"{path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        n = 64
        while True:
            buf = abi.cpuid_buffer(n)
            ret = _libc.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
            if ret >= 0:
                return [abi.kvm_cpuid_entry2.from_buffer_copy(e) for e in buf.entries[: buf.nent]]
            err = ctypes.get_errno()
            if err != errno.E2BIG or n > 4096:
                raise AccelError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(err)}")
            n *= 2

    def msr_index_list(self) -> list[int]:
        probe = abi.msr_list_buffer(0)
        _libc.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, ctypes.addressof(probe))  # E2BIG
        buf = abi.msr_list_buffer(probe.nmsrs)
        ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> KvmVm:
        return KvmVm(self, ioctl(self.fd, abi.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.slots: list[abi.kvm_userspace_memory_region] = []

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def set_memory_region(self, gpa: int, size: int, host_addr: int, flags: int = 0) -> int:
        region = abi.kvm_userspace_memory_region(
            slot=len(self.slots), flags=flags, guest_phys_addr=gpa, memory_size=size,
            userspace_addr=host_addr,
        )  # fmt: skip
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self.slots.append(region)
        return region.slot

    def create_irqchip(self) -> None:
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self) -> None:
        ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, gsi: int, level: bool) -> None:
        ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq=gsi, level=int(level)))

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip)
        return bytes(chip)

    def set_irqchip(self, raw: bytes) -> None:
        ioctl(self.fd, abi.KVM_SET_IRQCHIP, abi.kvm_irqchip.from_buffer_copy(raw))

    def get_pit2(self) -> bytes:
        pit = abi.kvm_pit_state2()
        ioctl(self.fd, abi.KVM_GET_PIT2, pit)
        return bytes(pit)

    def set_pit2(self, raw: bytes) -> None:
        ioctl(self.fd, abi.KVM_SET_PIT2, abi.kvm_pit_state2.from_buffer_copy(raw))

    def get_clock(self) -> int:
        clock = abi.kvm_clock_data()
        ioctl(self.fd, abi.KVM_GET_CLOCK, clock)
        return clock.clock

    def set_clock(self, ns: int) -> None:
        ioctl(self.fd, abi.KVM_SET_CLOCK, abi.kvm_clock_data(clock=ns))

    def create_vcpu(self, index: int) -> KvmVcpu:
        return KvmVcpu(self, index, ioctl(self.fd, abi.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVcpu:
    """One vCPU: its fd and the kvm_run page shared with the kernel."""

    def __init__(self, vm: KvmVm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        self.run = abi.kvm_run.from_buffer(self.run_mmap)

    def kvm_run(self) -> None:
        """One KVM_RUN; raises InterruptedError when a signal or immediate_exit stops it."""
        fcntl.ioctl(self.fd, abi.KVM_RUN, 0)

    def _get(self, request: int, t: type) -> Any:
        s = t()
        ioctl(self.fd, request, s)
        return s

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_xsave(self) -> bytes:
        return bytes(self._get(abi.KVM_GET_XSAVE, abi.kvm_xsave))

    def set_xsave(self, raw: bytes) -> None:
        ioctl(self.fd, abi.KVM_SET_XSAVE, abi.kvm_xsave.from_buffer_copy(raw.ljust(4096, b"\0")))

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> bytes:
        return bytes(self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state))

    def set_lapic(self, raw: bytes) -> None:
        ioctl(self.fd, abi.KVM_SET_LAPIC, abi.kvm_lapic_state.from_buffer_copy(raw))

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=state))

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf = abi.cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs; KVM stops at the first one it cannot read, so callers pass a vetted list."""
        buf = abi.msrs_buffer(len(indices))
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        buf = abi.msrs_buffer(len(values))
        for i, (index, data) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return ioctl(self.fd, abi.KVM_SET_MSRS, buf)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            self.run_mmap.close()
            os.close(self.fd)
            self.fd = -1
