"""Fill fw_cfg for a PC that boots through SeaBIOS.

Files: `etc/e820` (the RAM ranges; SeaBIOS reserves its own areas), `bootorder`,
`etc/sercon-port` (SeaBIOS mirrors its text screen, and so the bootloader's, to that
UART), `etc/smbios/smbios-tables` + `etc/smbios/smbios-anchor`, `etc/acpi/tables`,
`etc/acpi/rsdp`, `etc/table-loader`, `etc/boot-fail-wait` (milliseconds before SeaBIOS
retries a failed boot).

Boot order: bootable devices register a `BootDevice` on the machine with the
OpenFirmware path SeaBIOS matches (`/pci@i0cf8/ide@1,1/drive@1/disk@0`: IDE channel 1,
unit 0; `/pci@i0cf8/scsi@4/disk@0,0`: the virtio-blk function in slot 4). VMware's
`bios.bootOrder` ("cdrom,hdd,floppy,ethernet" in any order; boite knows cdrom and hdd)
orders the kinds, and `bios.hddOrder` ("scsi0:0,ide0:0") the disks within "hdd";
devices not named come after, in attach order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from boite.errors import ConfigError
from boite.machine.firmware.acpi import LOADER_FILE, RSDP_FILE, TABLES_FILE, build_acpi
from boite.machine.firmware.smbios import build_smbios

E820_RAM = 1
BOOT_KINDS = ("cdrom", "hdd", "floppy", "ethernet")


@dataclass(frozen=True)
class BootDevice:
    key: str  # the .vmx name: "ide1:0", "scsi0:0"
    kind: str  # "hdd" or "cdrom"
    of_path: str  # OpenFirmware path for SeaBIOS's bootorder


def parse_boot_order(value: str | None, where: str = "bios.bootOrder") -> list[str]:
    if not value:
        return []
    kinds = [k.strip().lower() for k in value.split(",") if k.strip()]
    for k in kinds:
        if k not in BOOT_KINDS:
            raise ConfigError(f"{where} = {value!r}: {k!r} is not one of {', '.join(BOOT_KINDS)}")
    return kinds


def order_boot_devices(
    devices: Sequence[BootDevice], boot_order: Sequence[str], hdd_order: Sequence[str] = ()
) -> list[BootDevice]:
    """The devices in the order the BIOS should try them."""
    hdd_rank = {k.strip().lower(): i for i, k in enumerate(hdd_order)}
    kinds = list(boot_order) or ["cdrom", "hdd"]  # VMware's default tries a CD first
    kinds += [k for k in ("cdrom", "hdd") if k not in kinds]
    out: list[BootDevice] = []
    for kind in kinds:
        group = [d for d in devices if d.kind == kind]
        if kind == "hdd":
            group.sort(key=lambda d: hdd_rank.get(d.key.lower(), len(hdd_rank)))
        out.extend(group)
    return out


def e820_file(ram_ranges: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<QQI", base, size, E820_RAM) for base, size in ram_ranges)


def fill_fw_cfg(
    fw_cfg: object,
    *,
    ram_ranges: Sequence[tuple[int, int]],
    num_cpus: int,
    pm_base: int,
    boot: Sequence[BootDevice],
    uuid: bytes,
    serial: str = "",
    sercon_port: int | None = 0x3F8,
) -> None:
    """`ram_ranges` are (base, size); the 32-bit PCI window the DSDT declares starts at
    the end of the RAM below 4 GiB, as on QEMU's PC."""
    add = fw_cfg.add_file  # type: ignore[attr-defined]
    add("etc/e820", e820_file(ram_ranges))
    if boot:
        add("bootorder", "".join(d.of_path + "\n" for d in boot).encode() + b"\0")
    if sercon_port is not None:
        add("etc/sercon-port", struct.pack("<H", sercon_port))
    add("etc/boot-fail-wait", struct.pack("<I", 5000))  # ms
    tables, anchor = build_smbios(uuid, serial)
    add("etc/smbios/smbios-tables", tables)
    add("etc/smbios/smbios-anchor", anchor)
    low_ram_top = max((b + n for b, n in ram_ranges if b + n <= 1 << 32), default=0)
    acpi = build_acpi(num_cpus, pm_base, max(low_ram_top, 1 << 20))
    add(TABLES_FILE, acpi.tables)
    add(RSDP_FILE, acpi.rsdp)
    add(LOADER_FILE, acpi.loader)
