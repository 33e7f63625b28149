"""From a box's .vmx to devices: which disk becomes virtio-blk, which becomes ATA, which NIC
becomes virtio-net, and the kernel parameters that announce them.

`scsiN:M`, `sataN:M` and `nvmeN:M` disks are para-virtual (virtio-blk): the guest needs a
virtio driver, which is the point. `ideN:M` disks are the fully emulated ATA controller,
channel N (0 primary, 1 secondary), unit M (0 master, 1 slave). `ethernetN` becomes
virtio-net on a TAP named by `ethernetN.vnet` (or one the kernel names), with the box's
MAC. The builder calls `plan_devices()` then `attach_devices()` through its extra-device
hook; the returned strings go on the kernel command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from boite.disk.base import BlockImage
from boite.errors import ConfigError
from boite.machine.devices.ata import AtaController, AtaDrive
from boite.machine.devices.atapi import AtapiDrive
from boite.machine.devices.ide import IDE_FUNCTION, IDE_SLOT, PiixIde
from boite.machine.firmware.pc import BootDevice
from boite.machine.virtio.blk import VirtioBlk
from boite.machine.virtio.console import VirtioConsole
from boite.machine.virtio.mmio import MMIO_SIZE, VirtioBackend, VirtioMmio
from boite.machine.virtio.net import VirtioNet, parse_mac
from boite.machine.virtio.pci import VirtioPci
from boite.machine.virtio.rng import VirtioRng

log = logging.getLogger("boite.virtio")

VIRTIO_MMIO_BASE = 0xD000_0000
# ISA IRQs nobody else uses on our PC (0 timer, 1 kbd, 3/4 COM, 8 RTC, 12 mouse, 14/15 IDE),
# then IOAPIC pins 16-23 (present under KVM's irqchip and the emulated IOAPIC).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, *range(16, 24))
PARA_VIRTUAL_BUSES = ("scsi", "sata", "nvme")


@dataclass(frozen=True)
class DiskPlan:
    key: str  # "scsi0:0"
    device: str  # "virtio-blk", "ata" or "atapi" (a CD-ROM)
    path: Path | str | None  # a file, a URL such as nbd://HOST:PORT/EXPORT; None: no medium
    channel: int = 0  # ATA only
    unit: int = 0  # ATA only


@dataclass(frozen=True)
class NicPlan:
    key: str  # "ethernet0"
    mac: str
    connection_type: str
    tap_name: str
    forwards: tuple[str, ...] = ()  # nat: "tcp:HOSTPORT:GUESTPORT" (ethernetN.boite.forward)


@dataclass
class DevicePlan:
    disks: list[DiskPlan] = field(default_factory=list)
    nics: list[NicPlan] = field(default_factory=list)


class _Disk(Protocol):
    bus: str
    controller: int
    unit: int
    file_name: str | None


class _Nic(Protocol):
    index: int
    present: bool
    connection_type: str | None

    @property
    def mac(self) -> str | None: ...


class _Config(Protocol):
    """What we read of boite.box.BoxConfig."""

    source: str

    @property
    def disks(self) -> Sequence[_Disk]: ...

    def disk_slots(self, bus: str | None = None) -> Sequence[Any]: ...

    def get_bool(self, key: str, default: bool = False) -> bool: ...

    @property
    def nics(self) -> Sequence[_Nic]: ...

    def get_str(self, key: str, default: str | None = None) -> str | None: ...


def plan_devices(config: _Config, box_dir: Path) -> DevicePlan:
    """Decide the device for every present disk and NIC of the box (no files opened)."""
    plan = DevicePlan()
    seen_ata: set[tuple[int, int]] = set()
    for d in config.disks:
        key = f"{d.bus}{d.controller}:{d.unit}"
        if not d.file_name:
            continue
        path: Path | str
        if "://" in d.file_name:  # remote storage (nbd://...) is opened by its URL
            path = d.file_name
        else:
            path = Path(d.file_name)
            if not path.is_absolute():
                path = box_dir / path
        if d.bus == "ide":
            if d.controller > 1 or d.unit > 1:
                raise ConfigError(
                    f"{config.source}: {key}: an IDE disk must be on ide0/ide1, unit 0 or 1 "
                    f"(found controller {d.controller}, unit {d.unit})"
                )
            seen_ata.add((d.controller, d.unit))
            plan.disks.append(DiskPlan(key, "ata", path, d.controller, d.unit))
        elif d.bus in PARA_VIRTUAL_BUSES:
            plan.disks.append(DiskPlan(key, "virtio-blk", path))
        else:
            raise ConfigError(f"{config.source}: {key}: unknown disk bus {d.bus!r}")
    for slot in config.disk_slots("ide"):
        if slot.present and slot.is_cdrom:
            if (slot.controller, slot.unit) in seen_ata or slot.controller > 1 or slot.unit > 1:
                raise ConfigError(
                    f"{config.source}: {slot.key}: the CD-ROM's IDE slot is taken or does not "
                    "exist (ide0/ide1, unit 0 or 1)"
                )
            seen_ata.add((slot.controller, slot.unit))
            plan.disks.append(_cdrom_plan(config, slot, box_dir))
    for n in config.nics:
        if not n.present:
            continue
        key = f"ethernet{n.index}"
        mac = n.mac
        if not mac:
            raise ConfigError(
                f"{config.source}: {key} has no MAC address (generatedAddress or address)"
            )
        parse_mac(mac)
        tap = config.get_str(f"{key}.vnet") or ""
        from boite.errors import NetError
        from boite.machine.netback.passt import parse_forwards

        try:
            forwards = parse_forwards(config.get_str(f"{key}.boite.forward") or "")
        except NetError as exc:
            raise ConfigError(f"{config.source}: {key}.boite.forward: {exc}") from None
        kind = (n.connection_type or "bridged").lower()
        plan.nics.append(NicPlan(key, mac.lower(), kind, tap, forwards))
    return plan


def _cdrom_plan(config: _Config, slot: Any, box_dir: Path) -> DiskPlan:
    """`ideN:M.deviceType = "cdrom-image"` with `fileName` (an ISO) and `startConnected`
    (default TRUE; FALSE: an empty drive). `cdrom-raw` (a host drive) is refused unless
    it starts disconnected: boite does not pass host CD drives through."""
    key = slot.key
    kind = (slot.device_type or "").lower()
    connected = config.get_bool(f"{key}.startConnected", True)
    if kind == "cdrom-raw" or kind == "atapi-cdrom":
        if connected:
            raise ConfigError(
                f'{config.source}: {key}.deviceType = "{slot.device_type}": boite does not pass '
                f'host CD drives through; use deviceType = "cdrom-image" with fileName = an '
                f'ISO, or startConnected = "FALSE" for an empty drive'
            )
        return DiskPlan(key, "atapi", None, slot.controller, slot.unit)
    if kind != "cdrom-image":
        raise ConfigError(f"{config.source}: {key}.deviceType = {slot.device_type!r}: unknown")
    if not connected:
        return DiskPlan(key, "atapi", None, slot.controller, slot.unit)
    if not slot.file_name:
        raise ConfigError(f'{config.source}: {key}: a "cdrom-image" needs fileName = an ISO')
    path = Path(slot.file_name)
    return DiskPlan(
        key, "atapi", path if path.is_absolute() else box_dir / path, slot.controller, slot.unit
    )


@dataclass
class AttachedDevices:
    """What attach_devices() put in the machine, for the VMM to start and close."""

    cmdline: list[str] = field(default_factory=list)
    virtio: list[VirtioMmio] = field(default_factory=list)
    ata: AtaController | None = None
    ide: PiixIde | None = None
    images: list[BlockImage] = field(default_factory=list)
    nets: list[VirtioNet] = field(default_factory=list)
    console: VirtioConsole | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def start(self) -> None:
        for net in self.nets:
            net.start()

    def close(self) -> None:
        for net in self.nets:
            net.close()
        for close in reversed(self.closers):
            try:
                close()
            except OSError as e:
                log.warning("closing a device: %s", e)
        for image in self.images:
            image.close()


def attach_devices(
    machine: Any,
    plan: DevicePlan,
    *,
    open_disk: Callable[[str], BlockImage],
    open_tap: Callable[[str], Any] | None = None,
    net_log: Callable[[str], None] | None = None,
    console: Any = None,
    with_console: bool = False,
    with_rng: bool = True,
    ports: Sequence[Any] = (),
    base: int = VIRTIO_MMIO_BASE,
    irqs: Sequence[int] = VIRTIO_IRQS,
) -> AttachedDevices:
    """Create the planned devices on `machine` (a boite.machine.machine.Machine).

    `open_disk(path)` opens a disk chain (boite.disk.open_disk); `open_tap(name)` opens the
    host side of a NIC (default: the machine.netback backend for its connectionType: passt
    for nat, a TAP for the others; `net_log` takes their messages). `with_console` adds virtio-console (hvc0)
    writing to `console`: a callable taking bytes, or a SerialBackend such as the box's
    ConsoleBackend, which then also feeds its input to hvc0 (the guest needs
    `console=hvc0`). `ports` are the host users of named virtio-console ports (the guest
    tools' ToolsHost), all on one multiport device. Virtio devices take consecutive 4 KiB windows from `base` and the
    next free IRQ of `irqs`.
    """
    out = AttachedDevices()
    slots = iter(enumerate(irqs))

    pci_transport = machine.virtio_transport == "pci"

    def add_virtio(name: str, backend: VirtioBackend, boot_key: str | None = None) -> Any:
        if pci_transport:
            # Firmware boot: virtio-pci, which the BIOS and stock kernels find by
            # enumeration (no kernel command line to announce virtio-mmio devices).
            slot = machine.pci.free_slot()
            pdev = VirtioPci(backend, machine.memory, name=name)
            machine.attach(name, pdev, pci=(slot, 0))
            out.virtio.append(pdev.core)
            if boot_key is not None:
                machine.boot_devices.append(BootDevice(boot_key, "hdd", VirtioPci.boot_path(slot)))
            return pdev
        try:
            i, gsi = next(slots)
        except StopIteration:
            raise ConfigError(
                f"too many virtio devices: {len(irqs)} interrupt lines for virtio"
            ) from None
        addr = base + i * MMIO_SIZE
        dev = VirtioMmio(backend, machine.memory, machine.irqs.line(gsi), base=addr, name=name)
        machine.attach(name, dev, mmio=[(addr, MMIO_SIZE)], irq=gsi)
        out.virtio.append(dev)
        out.cmdline.append(dev.cmdline())
        return dev

    try:
        ata_drives: dict[tuple[int, int], Any] = {}
        for d in plan.disks:
            serial = d.key.replace(":", "-").upper()
            if d.device == "atapi":
                iso = open_cdrom(d.path) if d.path is not None else None
                if iso is not None:
                    out.images.append(iso)
                ata_drives[(d.channel, d.unit)] = AtapiDrive(iso, serial=f"BOITE-{serial}")
                continue
            image = open_disk(str(d.path))
            out.images.append(image)
            if d.device == "ata":
                ata_drives[(d.channel, d.unit)] = AtaDrive(image, serial=f"BOITE-{serial}")
            else:
                add_virtio(f"virtio-blk-{d.key}", VirtioBlk(image, serial=f"BOITE-{serial}"), d.key)
        if ata_drives:
            ctl = AtaController(machine.irqs.line, ata_drives)
            if machine.pci is not None:
                # The PIIX IDE function owns the channels' legacy ports.
                out.ide = ide = PiixIde(ctl.channels, machine.memory)
                machine.attach("piix-ide", ide, pci=(IDE_SLOT, IDE_FUNCTION),
                               ports=ide.legacy_ranges(), irq=(14, 15))  # fmt: skip
                for i, ch in enumerate(ctl.channels):
                    if ch is not None:
                        machine.add_device(f"ata{i}", ch)
            else:
                for i, ch in enumerate(ctl.channels):
                    if ch is not None:
                        machine.attach(f"ata{i}", ch, ports=ch.port_ranges(), irq=ch.irq.gsi)
            for (channel, unit), drive in sorted(ata_drives.items()):
                kind = "cdrom" if isinstance(drive, AtapiDrive) else "hdd"
                key = next(d.key for d in plan.disks if (d.channel, d.unit) == (channel, unit)
                           and d.device in ("ata", "atapi"))  # fmt: skip
                machine.boot_devices.append(BootDevice(key, kind, PiixIde.boot_path(channel, unit)))
            out.ata = ctl
        for n in plan.nics:
            if open_tap is not None:
                backend = open_tap(n.tap_name)
            else:
                from boite.machine.netback import open_backend

                backend = open_backend(
                    n.connection_type, tap_name=n.tap_name, mac=n.mac, forwards=n.forwards,
                    log=net_log,
                )  # fmt: skip
            if hasattr(backend, "close"):
                out.closers.append(backend.close)
            net = VirtioNet(backend, n.mac)
            add_virtio(f"virtio-net-{n.key}", net)
            out.nets.append(net)
        if with_console:
            if console is not None and hasattr(console, "connect"):
                # A SerialBackend (the box's ConsoleBackend): hvc0 becomes the console,
                # its output to the backend and the backend's input to hvc0.
                out.console = VirtioConsole(console.write)
                console.connect(out.console.feed)
            else:
                out.console = VirtioConsole(console)
            add_virtio("virtio-console", out.console)
        if with_rng:
            add_virtio("virtio-rng", VirtioRng())
        if ports:
            from boite.machine.virtio.ports import VirtioPorts

            add_virtio("virtio-ports", VirtioPorts(list(ports)))
    except BaseException:
        out.close()
        raise
    return out


class BoxDevices:
    """A box's disks and NICs as one `extra_devices` hook for machine.builder.

    >>> devices = BoxDevices(box.config, box.dir, open_disk=boite.disk.open_disk)
    >>> machine = build_machine(box=box, extra_devices=[devices])
    >>> devices.start()   # RX threads; devices.close() at power-off

    Called by the builder with the machine, it attaches everything and returns the kernel
    command line fragment that announces the virtio devices.
    """

    def __init__(self, config: _Config, box_dir: Path, **options: Any) -> None:
        self.plan = plan_devices(config, Path(box_dir))
        self.options = options
        if "open_disk" not in options:
            from boite.disk import open_disk

            self.options["open_disk"] = open_disk
        self.attached: AttachedDevices | None = None

    def __call__(self, machine: Any) -> str | None:
        self.attached = attach_devices(machine, self.plan, **self.options)
        return " ".join(self.attached.cmdline) or None

    def start(self) -> None:
        if self.attached is not None:
            self.attached.start()

    def close(self) -> None:
        if self.attached is not None:
            self.attached.close()
            self.attached = None


def open_cdrom(path: Path | str) -> BlockImage:
    """An ISO image, read-only (a missing or unreadable file is a ConfigError)."""
    from boite.disk.raw import RawImage

    try:
        return RawImage(Path(path), read_only=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the CD-ROM image: {e.strerror}") from None


def plan_disk_files(specs: Sequence[str]) -> DevicePlan:
    """Disks named on a command line (`boite boot --disk`): `FILE` is virtio-blk (vda,
    vdb, ...), `ide:FILE` is ATA (primary master, primary slave, secondary master, ...)."""
    plan = DevicePlan()
    vd = ide = 0
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        if sep and kind in ("ide", "ata"):
            if ide >= 4:
                raise ConfigError(f"--disk {spec}: the ATA controller has four slots")
            channel, unit = divmod(ide, 2)
            plan.disks.append(DiskPlan(f"ide{channel}:{unit}", "ata", Path(rest), channel, unit))
            ide += 1
        else:
            path = rest if sep and kind in ("virtio", "vd") else spec
            where = path if "://" in path else Path(path)  # URLs (nbd://) stay as given
            plan.disks.append(DiskPlan(f"vd{chr(ord('a') + vd)}", "virtio-blk", where))
            vd += 1
    return plan


class DiskFiles(BoxDevices):
    """`extra_devices` hook for disks given as files (`boite boot --disk FILE`)."""

    def __init__(self, specs: Sequence[str], **options: Any) -> None:
        self.plan = plan_disk_files(specs)
        self.options = options
        if "open_disk" not in options:
            from boite.disk import open_disk

            self.options["open_disk"] = open_disk
        self.attached = None
