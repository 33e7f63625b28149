"""Hardware-assisted execution through /dev/kvm (Intel VT-x / AMD-V), in pure Python."""

from boite.accel.kvm.accel import KvmAccelerator, kvm_usable

__all__ = ["KvmAccelerator", "kvm_usable"]
