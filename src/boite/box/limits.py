"""Virtual hardware maximums, and the check that lists every way a box breaks them.

The numbers are VMware Workstation's (a box must stay openable by VMware), each with the
document it comes from. `check_limits()` never stops at the first problem: `boite check`
shows them all, and `create`/`start` refuse a box with any.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from boite.box.config import BoxConfig
from boite.errors import ConfigError, LimitError

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

# "Configuration Maximums, VMware Workstation Pro 17": up to 32 virtual processors.
MAX_VCPUS = 32
# Same document: up to 128 GB of memory per virtual machine.
MAX_MEMSIZE_MB = 128 * 1024
# The Workstation UI and `vmware-vmx` accept memsize only in steps of 4 MB
# ("Memory for this virtual machine must be a multiple of 4 MB").
MEMSIZE_STEP_MB = 4
MIN_MEMSIZE_MB = 4
# Configuration Maximums: 10 virtual network adapters (ethernet0 .. ethernet9).
MAX_NICS = 10
# Configuration Maximums / "Virtual Machine Hardware": 2 IDE channels x (master, slave).
IDE_CONTROLLERS, IDE_UNITS = 2, 2
# 4 SCSI controllers x 15 devices: units 0..15, unit 7 is the controller's own ID.
SCSI_CONTROLLERS, SCSI_UNITS, SCSI_RESERVED_UNIT = 4, 16, 7
# 4 SATA (AHCI) controllers x 30 devices each.
SATA_CONTROLLERS, SATA_UNITS = 4, 30
# 4 NVMe controllers x 15 namespaces each.
NVME_CONTROLLERS, NVME_UNITS = 4, 15
# One controller of each USB kind: usb (UHCI, USB 1.1), ehci (USB 2.0), usb_xhci (USB 3.x).
USB_KINDS = {"usb": "USB 1.1 (UHCI)", "ehci": "USB 2.0 (EHCI)", "usb_xhci": "USB 3.x (xHCI)"}
# Configuration Maximums: 4 serial ports, 3 parallel ports, 2 floppy drives.
MAX_SERIAL, MAX_PARALLEL, MAX_FLOPPY = 4, 3, 2
# Configuration Maximums: virtual disk capacity up to 8 TB (VMware counts in TiB).
MAX_DISK_BYTES = 8 * TIB

BUS_LIMITS = {
    # bus: (controllers, units per controller, reserved unit or None)
    "ide": (IDE_CONTROLLERS, IDE_UNITS, None),
    "scsi": (SCSI_CONTROLLERS, SCSI_UNITS, SCSI_RESERVED_UNIT),
    "sata": (SATA_CONTROLLERS, SATA_UNITS, None),
    "nvme": (NVME_CONTROLLERS, NVME_UNITS, None),
}


@dataclass(frozen=True)
class Problem:
    """One broken rule: the key, the value found, the limit, and a sentence for a person."""

    key: str
    value: str
    limit: str
    message: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.message} (limit: {self.limit})"


def check_limits(
    config: BoxConfig, disk_capacities: Mapping[str, int] | None = None
) -> list[Problem]:
    """Every way `config` breaks a hardware maximum. `disk_capacities` maps a disk slot key
    (`scsi0:0`) to its size in bytes, when the caller could open the disks."""
    problems: list[Problem] = []
    for check in (_cpus, _memory, _disk_buses, _nics, _usb, _ports, _readable, _repeated):
        _collect(problems, check, config)
    for key, size in (disk_capacities or {}).items():
        problems += check_disk_size(key, size)
    return problems


def require_within_limits(config: BoxConfig, what: str = "this box") -> None:
    """Raise one LimitError listing every problem, if there is any."""
    problems = check_limits(config)
    if problems:
        lines = "\n  ".join(str(p) for p in problems)
        raise LimitError(f"{config.source}: {what} breaks the hardware limits:\n  {lines}")


def check_disk_size(key: str, size: int) -> list[Problem]:
    if size > MAX_DISK_BYTES:
        return [
            Problem(
                key,
                str(size),
                "8 TiB",
                f"the disk holds {size / TIB:.2f} TiB; a virtual disk holds at most 8 TiB",
            )
        ]
    return []


def _collect(problems: list[Problem], check: Callable, config: BoxConfig) -> None:
    try:
        problems += check(config)
    except ConfigError as exc:
        # An unreadable value is a problem too; report it and keep checking the rest.
        problems.append(Problem("(config)", "", "a readable value", str(exc)))


def _cpus(config: BoxConfig) -> list[Problem]:
    out: list[Problem] = []
    vcpus = _guard(out, "numvcpus", config, lambda: config.numvcpus)
    cores = _guard(out, "cpuid.coresPerSocket", config, lambda: config.cores_per_socket)
    if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
        out.append(
            Problem(
                "numvcpus",
                str(vcpus),
                f"1..{MAX_VCPUS}",
                f"a virtual machine has 1 to {MAX_VCPUS} virtual processors",
            )
        )
    if cores is not None and cores < 1:
        out.append(
            Problem("cpuid.coresPerSocket", str(cores), ">= 1", "a socket has at least one core")
        )
    elif vcpus is not None and cores is not None and vcpus >= 1 and vcpus % cores:
        out.append(
            Problem(
                "cpuid.coresPerSocket",
                str(cores),
                f"a divisor of numvcpus ({vcpus})",
                f"{vcpus} vCPUs cannot be split into sockets of {cores} cores",
            )
        )
    return out


def _memory(config: BoxConfig) -> list[Problem]:
    out: list[Problem] = []
    mem = _guard(out, "memsize", config, lambda: config.memsize)
    if mem is None:
        return out
    if not MIN_MEMSIZE_MB <= mem <= MAX_MEMSIZE_MB:
        out.append(
            Problem(
                "memsize",
                str(mem),
                f"{MIN_MEMSIZE_MB}..{MAX_MEMSIZE_MB} MB",
                f"guest memory is {MIN_MEMSIZE_MB} MB to {MAX_MEMSIZE_MB} MB (128 GB)",
            )
        )
    if mem % MEMSIZE_STEP_MB:
        out.append(
            Problem(
                "memsize",
                str(mem),
                f"a multiple of {MEMSIZE_STEP_MB} MB",
                f"guest memory comes in steps of {MEMSIZE_STEP_MB} MB; "
                f"try {mem - mem % MEMSIZE_STEP_MB or MEMSIZE_STEP_MB}",
            )
        )
    return out


def _disk_buses(config: BoxConfig) -> list[Problem]:
    out: list[Problem] = []
    for bus, (controllers, units, reserved) in BUS_LIMITS.items():
        for ctl in config.controllers(bus):
            if ctl.present and ctl.index >= controllers:
                out.append(
                    Problem(
                        f"{ctl.key}.present",
                        "TRUE",
                        f"{bus}0..{bus}{controllers - 1}",
                        f"a virtual machine has at most {controllers} {bus.upper()} controllers",
                    )
                )
        unit_limit = f"{bus}0:0..{bus}{controllers - 1}:{units - 1}"
        if reserved is not None:
            unit_limit += f", not unit {reserved}"
        for slot in config.disk_slots(bus):
            if not slot.present:
                continue
            key = f"{slot.key}.present"
            if slot.controller >= controllers:
                out.append(
                    Problem(
                        key,
                        "TRUE",
                        unit_limit,
                        f"there is no {bus.upper()} controller {slot.controller}; "
                        f"a virtual machine has {controllers}",
                    )
                )
            elif slot.unit >= units:
                out.append(
                    Problem(
                        key,
                        "TRUE",
                        unit_limit,
                        f"a {bus.upper()} controller has units 0 to {units - 1}",
                    )
                )
            elif slot.unit == reserved:
                out.append(
                    Problem(
                        key,
                        "TRUE",
                        unit_limit,
                        f"{bus.upper()} unit {reserved} is the controller itself; use another",
                    )
                )
    return out


def _nics(config: BoxConfig) -> list[Problem]:
    present = [n for n in config.nics if n.present]
    return _count_and_index(present, "ethernet", MAX_NICS, "network adapters")


def _ports(config: BoxConfig) -> list[Problem]:
    out: list[Problem] = []
    for kind, limit, words in (
        ("serial", MAX_SERIAL, "serial ports"),
        ("parallel", MAX_PARALLEL, "parallel ports"),
        ("floppy", MAX_FLOPPY, "floppy drives"),
    ):
        present = [
            _Indexed(i) for i in _numbered(config, kind) if config.get_bool(f"{kind}{i}.present")
        ]
        out += _count_and_index(present, kind, limit, words)
    return out


@dataclass(frozen=True)
class _Indexed:
    index: int


def _numbered(config: BoxConfig, kind: str) -> list[int]:
    pattern = re.compile(rf"{kind}(\d+)\.present", re.I)
    return sorted({int(m.group(1)) for k in config.vmx if (m := pattern.fullmatch(k))})


def _count_and_index(present: list, kind: str, limit: int, words: str) -> list[Problem]:
    if len(present) > limit:
        names = ", ".join(f"{kind}{p.index}" for p in present)
        return [
            Problem(
                f"{kind}N.present",
                f"{len(present)} present",
                str(limit),
                f"{len(present)} {words} are present ({names}); "
                f"a virtual machine has at most {limit}",
            )
        ]
    return [
        Problem(
            f"{kind}{p.index}.present",
            "TRUE",
            f"{kind}0..{kind}{limit - 1}",
            f"{words} are numbered {kind}0 to {kind}{limit - 1}",
        )
        for p in present
        if p.index >= limit
    ]


_USB_KEY = re.compile(r"(usb_xhci|usb|ehci)(\d*)\.present", re.I)


def _usb(config: BoxConfig) -> list[Problem]:
    """`usb:N.*` are devices plugged into a controller; `usb`, `ehci`, `usb_xhci` (and any
    numbered copies a person may write, like `usb7.present`) are controllers."""
    found: dict[str, list[str]] = {kind: [] for kind in USB_KINDS}
    for key in config.vmx:
        m = _USB_KEY.fullmatch(key)
        if m and config.get_bool(key):
            found[m.group(1).lower()].append(key)
    total = sum(len(keys) for keys in found.values())
    out: list[Problem] = []
    for kind, keys in found.items():
        if len(keys) > 1:
            shown = ", ".join(keys[:3]) + (f", ... {keys[-1]}" if len(keys) > 3 else "")
            out.append(
                Problem(
                    f"{kind}N.present",
                    f"{len(keys)} present",
                    f"1 {kind} controller",
                    f"{total} USB controllers are switched on, {len(keys)} of them "
                    f"{USB_KINDS[kind]} ({shown}). A virtual machine has at most one USB "
                    "controller of each kind: usb.present (USB 1.1), ehci.present (USB 2.0) "
                    "and usb_xhci.present (USB 3.x). Keep one and remove the others.",
                )
            )
    return out


def _readable(config: BoxConfig) -> list[Problem]:
    """Keys with a fixed set of values or a format: each unreadable one is a problem."""
    out: list[Problem] = []
    readers: dict[str, Callable[[], object]] = {
        "firmware": lambda: config.firmware,
        "monitor.virtual_exec": lambda: config.virtual_exec,
        "uuid.bios": lambda: config.uuid_bios,
        "uuid.location": lambda: config.uuid_location,
        "log.keepOld": lambda: config.log_keep_old,
    }
    for key, read in readers.items():
        try:
            read()
        except ConfigError as exc:
            out.append(Problem(key, str(config.vmx.get(key)), "a valid value", str(exc)))
    return out


def _repeated(config: BoxConfig) -> list[Problem]:
    """A key on several lines: VMware uses the last one, which is rarely what was meant
    (fifty `usb.present` lines are still one controller)."""
    out: list[Problem] = []
    for key, count in config.vmx.duplicates().items():
        m = _USB_KEY.fullmatch(key)
        hint = (
            f"; a virtual machine has one {USB_KINDS[m.group(1).lower()]} controller however "
            "often it is switched on"
            if m
            else ""
        )
        out.append(
            Problem(
                key,
                f"{count} lines",
                "one line",
                f"{key} is set on {count} lines and only the last one counts{hint}",
            )
        )
    return out


def _guard(out: list[Problem], key: str, config: BoxConfig, read: Callable[[], int]) -> int | None:
    try:
        return read()
    except ConfigError as exc:
        out.append(Problem(key, str(config.vmx.get(key)), "a whole number", str(exc)))
        return None
