"""What a box asks for that boite does not emulate, and what the guest gets instead;
and whether a box has any way to boot.

`hardware_notes(config)` lists one `HardwareNote` per device of a VMware-written `.vmx`
that boite replaces or leaves out: SCSI/SATA/NVMe controllers (their disks become
virtio-blk), NICs other than virtio (virtio-net), sound, USB, floppy, SVGA, CD-ROMs
off the IDE bus. The VMM writes each note to `vmware.log` once at power-on and
`boite check` prints them; none of them stops a box.

`boot_problems(box)` says why a box cannot boot: no `boite.kernel`, and no disk or CD in
the BIOS boot order with a boot record (an MBR's 0x55AA signature; an ISO's El Torito
boot record volume descriptor at sector 17).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boite.errors import BoiteError

PARA_VIRTUAL_DISK = "virtio-blk disks"
NIC_DEVICES = ("virtio", "virtio-net")
EL_TORITO = b"\x00CD001\x01EL TORITO SPECIFICATION"


@dataclass(frozen=True)
class HardwareNote:
    key: str  # "scsi0", "ethernet0", "sound"
    found: str  # what the .vmx asks for
    instead: str  # what the guest gets

    def __str__(self) -> str:
        return f"{self.key} ({self.found}) is not emulated; the guest gets {self.instead}"


def hardware_notes(config: Any) -> list[HardwareNote]:
    notes: list[HardwareNote] = []
    for ctl in config.controllers():
        if ctl.bus == "ide" or not ctl.present:
            continue
        found = ctl.virtual_dev or {"sata": "ahci", "nvme": "nvme", "scsi": "lsilogic"}[ctl.bus]
        notes.append(
            HardwareNote(f"{ctl.bus}{ctl.index}", found, f"its disks as {PARA_VIRTUAL_DISK}")
        )
    for slot in config.disk_slots():
        if slot.present and slot.is_cdrom and slot.bus != "ide":
            notes.append(HardwareNote(slot.key, f"{slot.bus} CD-ROM",
                                      "no CD-ROM there (boite's CD-ROM drives are IDE/ATAPI: "
                                      "put it on ide0 or ide1)"))  # fmt: skip
    for nic in config.nics:
        if nic.present and (nic.virtual_dev or "e1000").lower() not in NIC_DEVICES:
            notes.append(HardwareNote(f"ethernet{nic.index}", nic.virtual_dev or "e1000",
                                      "a virtio-net adapter with the same MAC"))  # fmt: skip
    for key, found, instead in (
        ("sound", "sound card", "no sound device"),
        ("usb", "USB controller", "no USB controller"),
        ("ehci", "USB 2 controller", "no USB controller"),
        ("usb_xhci", "USB 3 controller", "no USB controller"),
        ("floppy0", "floppy drive", "no floppy drive"),
        ("svga", "SVGA adapter", "no display adapter: BIOS and bootloader text goes to COM1 "
                                 "(SeaBIOS sercon)"),
    ):  # fmt: skip
        if config.get_bool(f"{key}.present", False):
            notes.append(HardwareNote(key, found, instead))
    return notes


def _has_boot_record(path: Path | str, cdrom: bool) -> str | None:
    """None when the image can boot, else why not."""
    from boite.disk import open_disk

    try:
        with open_disk(str(path), read_only=True) as image:
            if cdrom:
                if image.size < 18 * 2048:
                    return "too small for an ISO 9660 image"
                return (
                    None
                    if image.read(17 * 2048, len(EL_TORITO)) == EL_TORITO
                    else ("no El Torito boot record")
                )
            if image.size < 512:
                return "smaller than one sector"
            return None if image.read(510, 2) == b"\x55\xaa" else "no MBR boot signature"
    except (OSError, BoiteError) as e:
        return f"unreadable: {e}"


def boot_problems(box: Any) -> list[str]:
    """Why `box` cannot boot (empty when it can)."""
    config = box.config
    if config.get_str("boite.kernel"):
        return []
    from boite.machine.firmware.pc import parse_boot_order

    try:
        order = parse_boot_order(config.get_str("bios.bootOrder"))
    except BoiteError as e:
        return [str(e)]
    kinds = set(order or ("cdrom", "hdd"))
    if order and not kinds & {"cdrom", "hdd"}:
        return [f"bios.bootOrder = {config.get_str('bios.bootOrder')!r} names no disk or CD-ROM"]
    why: list[str] = []
    for slot in config.disk_slots():
        if not slot.present or not slot.file_name:
            continue
        if slot.is_cdrom:
            if "cdrom" not in kinds or slot.bus != "ide":
                continue
            if (slot.device_type or "").lower() != "cdrom-image":
                continue
            if not config.get_bool(f"{slot.key}.startConnected", True):
                continue
        elif "hdd" not in kinds:
            continue
        reason = _has_boot_record(box.disk_path(slot.file_name), slot.is_cdrom)
        if reason is None:
            return []
        why.append(f"{slot.key}: {reason}")
    detail = "; ".join(why) if why else "no disk or CD-ROM image is attached"
    return [f"no boite.kernel, and nothing the BIOS can boot ({detail})"]
