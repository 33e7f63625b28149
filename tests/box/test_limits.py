"""Every hardware maximum at the limit (accepted) and one past it (refused, named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from boite.box.config import BoxConfig
from boite.box.limits import MAX_DISK_BYTES, check_limits, require_within_limits
from boite.box.vmxdict import VmxDict
from boite.errors import LimitError


def config(**settings: str) -> BoxConfig:
    vmx = VmxDict.new()
    vmx.source = "test.vmx"
    vmx["memsize"] = "256"
    vmx["numvcpus"] = "1"
    for key, value in settings.items():
        vmx[key.replace("__", ".").replace("_C_", ":")] = value
    return BoxConfig(vmx)


def with_keys(keys: dict[str, str]) -> BoxConfig:
    c = config()
    for k, v in keys.items():
        c.vmx[k] = v
    return c


def present(*names: str) -> dict[str, str]:
    return {f"{n}.present": "TRUE" for n in names}


def disks(bus: str, controllers: int, units: list[int]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for c in range(controllers):
        keys[f"{bus}{c}.present"] = "TRUE"
        for u in units:
            keys[f"{bus}{c}:{u}.present"] = "TRUE"
            keys[f"{bus}{c}:{u}.fileName"] = f"d{c}-{u}.vmdk"
    return keys


scsi_units = [u for u in range(16) if u != 7]

# (name, keys at the limit, keys one past the limit, key the problem must name)
CASES = [
    ("vcpus", {"numvcpus": "32"}, {"numvcpus": "33"}, "numvcpus"),
    ("vcpus-min", {"numvcpus": "1"}, {"numvcpus": "0"}, "numvcpus"),
    (
        "cores-per-socket",
        {"numvcpus": "32", "cpuid.coresPerSocket": "16"},
        {"numvcpus": "32", "cpuid.coresPerSocket": "12"},
        "cpuid.coresPerSocket",
    ),
    ("memory", {"memsize": "131072"}, {"memsize": "131076"}, "memsize"),
    ("memory-step", {"memsize": "260"}, {"memsize": "261"}, "memsize"),
    ("memory-min", {"memsize": "4"}, {"memsize": "0"}, "memsize"),
    (
        "nics",
        present(*(f"ethernet{i}" for i in range(10))),
        present(*(f"ethernet{i}" for i in range(11))),
        "ethernetN.present",
    ),
    ("nic-index", present("ethernet9"), present("ethernet10"), "ethernet10.present"),
    ("ide", disks("ide", 2, [0, 1]), disks("ide", 2, [0, 1, 2]), "ide0:2.present"),
    ("ide-controllers", disks("ide", 2, [0]), disks("ide", 3, [0]), "ide2:0.present"),
    ("scsi", disks("scsi", 4, scsi_units), disks("scsi", 4, scsi_units + [16]), "scsi0:16.present"),
    ("scsi-unit-7", disks("scsi", 1, [6, 8]), disks("scsi", 1, [7]), "scsi0:7.present"),
    ("scsi-controllers", disks("scsi", 4, [0]), disks("scsi", 5, [0]), "scsi4.present"),
    (
        "sata",
        disks("sata", 4, list(range(30))),
        disks("sata", 4, list(range(31))),
        "sata0:30.present",
    ),
    ("sata-controllers", disks("sata", 4, [0]), disks("sata", 5, [0]), "sata4:0.present"),
    (
        "nvme",
        disks("nvme", 4, list(range(15))),
        disks("nvme", 4, list(range(16))),
        "nvme3:15.present",
    ),
    ("nvme-controllers", disks("nvme", 4, [0]), disks("nvme", 5, [0]), "nvme4.present"),
    (
        "usb-each-kind",
        present("usb", "ehci", "usb_xhci"),
        present("usb", "ehci", "usb_xhci", "usb_xhci1"),
        "usb_xhciN.present",
    ),
    (
        "serial",
        present(*(f"serial{i}" for i in range(4))),
        present(*(f"serial{i}" for i in range(5))),
        "serialN.present",
    ),
    ("serial-index", present("serial3"), present("serial4"), "serial4.present"),
    (
        "parallel",
        present(*(f"parallel{i}" for i in range(3))),
        present(*(f"parallel{i}" for i in range(4))),
        "parallelN.present",
    ),
    (
        "floppy",
        present(*(f"floppy{i}" for i in range(2))),
        present(*(f"floppy{i}" for i in range(3))),
        "floppyN.present",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_limit_accepted_at_the_limit_and_refused_one_past(case):
    _name, at_limit, past, key = case
    assert check_limits(with_keys(at_limit)) == []
    problems = check_limits(with_keys(past))
    assert key in [p.key for p in problems], problems
    with pytest.raises(LimitError):
        require_within_limits(with_keys(past))


def test_disk_size_limit_at_and_past_8_tib():
    c = config()
    assert check_limits(c, {"scsi0:0": MAX_DISK_BYTES}) == []
    problems = check_limits(c, {"scsi0:0": MAX_DISK_BYTES + 512})
    assert [(p.key, p.limit) for p in problems] == [("scsi0:0", "8 TiB")]


def test_absent_devices_do_not_count():
    keys = {f"ethernet{i}.present": "FALSE" for i in range(40)}
    keys |= {f"scsi{c}:{u}.present": "FALSE" for c in range(8) for u in range(20)}
    assert check_limits(with_keys(keys)) == []


def test_fifty_usb_controllers_are_refused_in_words_a_person_understands():
    keys = {"usb.present": "TRUE", "ehci.present": "TRUE", "usb_xhci.present": "TRUE"}
    keys |= {f"usb{i}.present": "TRUE" for i in range(1, 48)}
    # USB devices on a controller (usb:N) are not controllers and must not count.
    keys |= {f"usb:{i}.present": "TRUE" for i in range(4)}
    problems = check_limits(with_keys(keys))
    assert len(problems) == 1
    message = problems[0].message
    assert "50 USB controllers" in message
    assert "at most one USB controller of each kind" in message
    assert "usb.present" in message and "ehci.present" in message and "usb_xhci.present" in message
    with pytest.raises(LimitError, match="50 USB controllers"):
        require_within_limits(with_keys(keys))


def test_every_problem_is_listed_at_once():
    keys = {"numvcpus": "64", "memsize": "999999", "cpuid.coresPerSocket": "5"}
    keys |= present(*(f"ethernet{i}" for i in range(12)), "serial7", "usb", "usb1")
    keys |= disks("scsi", 1, [7])
    problems = check_limits(with_keys(keys))
    named = {p.key for p in problems}
    assert {
        "numvcpus",
        "memsize",
        "cpuid.coresPerSocket",
        "ethernetN.present",
        "serial7.present",
        "usbN.present",
        "scsi0:7.present",
    } <= named
    for p in problems:
        assert p.value and p.limit and p.message


def test_unreadable_values_are_problems_not_crashes():
    problems = check_limits(config(memsize="lots", numvcpus="two"))
    assert {"memsize", "numvcpus"} <= {p.key for p in problems}
    assert any("'lots'" in p.message for p in problems)


def test_values_outside_their_choices_are_problems():
    c = config(
        firmware="coreboot",
        monitor__virtual_exec="quantum",
        uuid__bios="not a uuid",
        log__keepOld="-1",
    )
    problems = check_limits(c)
    assert {p.key for p in problems} == {
        "firmware",
        "monitor.virtual_exec",
        "uuid.bios",
        "log.keepOld",
    }
    assert any("hardware, software, automatic" in p.message for p in problems)


def test_fifty_lines_of_the_same_usb_key_are_named():
    c = config()
    c.vmx["usb.present"] = "TRUE"
    text = c.vmx.to_bytes() + b'usb.present = "TRUE"\n' * 49
    c = BoxConfig(VmxDict.parse(text, "fifty.vmx"))
    problems = check_limits(c)
    assert [(p.key, p.value) for p in problems] == [("usb.present", "50 lines")]
    assert "one USB 1.1 (UHCI) controller" in problems[0].message


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parent / "data").glob("*.vmx")),
    ids=lambda p: p.name,
)
def test_realistic_vmware_files_are_within_the_limits(path):
    assert check_limits(BoxConfig(VmxDict.load(path))) == []
