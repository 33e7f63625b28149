"""The box: a VM as a directory in VMware Workstation's layout (.vmx, .vmsd, .nvram,
vmware.log, .lck), the VMware dictionary syntax, typed config and hardware maximums."""

from boite.box.box import Box, HeldLock, find_vmx
from boite.box.config import BoxConfig
from boite.box.limits import Problem, check_limits
from boite.box.lock import RunningBox, list_running
from boite.box.nvram import Nvram
from boite.box.vmxdict import VmxDict

__all__ = [
    "Box",
    "BoxConfig",
    "HeldLock",
    "Nvram",
    "Problem",
    "RunningBox",
    "VmxDict",
    "check_limits",
    "find_vmx",
    "list_running",
]
