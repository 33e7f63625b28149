"""A box's .vmx mapped to devices: scsi/sata/nvme -> virtio-blk, ide -> ATA, ethernet -> net."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_virtio_blk import RawFileImage, make_pattern

from boite.box.config import BoxConfig
from boite.box.vmxdict import VmxDict
from boite.disk import create_disk
from boite.errors import ConfigError
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from boite.machine.virtio.attach import attach_devices, plan_devices
from boite.machine.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from boite.machine.virtio.fuzz import SocketWire
from boite.machine.virtio.guestdriver import BlkDriver, GuestAllocator

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "21"
memsize = "64"
uuid.bios = "56 4d 12 34 56 78 9a bc-de f0 12 34 56 ab cd ef"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "box.vmdk"
sata0.present = "TRUE"
sata0:1.present = "TRUE"
sata0:1.fileName = "data.vmdk"
sata0:2.present = "TRUE"
sata0:2.deviceType = "cdrom-image"
sata0:2.fileName = "install.iso"
nvme0.present = "TRUE"
nvme0:0.present = "FALSE"
nvme0:0.fileName = "absent.vmdk"
ide0:0.present = "TRUE"
ide0:0.fileName = "legacy.vmdk"
ide1:1.present = "TRUE"
ide1:1.fileName = "/abs/other.vmdk"
ethernet0.present = "TRUE"
ethernet0.connectionType = "hostonly"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:ab:cd:ef"
ethernet0.vnet = "vmnet1"
ethernet1.present = "FALSE"
ethernet1.generatedAddress = "00:0c:29:ab:cd:f9"
"""


def config(text: str = VMX) -> BoxConfig:
    return BoxConfig(VmxDict.parse(text, source="box.vmx"))


def test_plan_maps_buses_to_device_kinds(tmp_path: Path) -> None:
    plan = plan_devices(config(), tmp_path)
    kinds = {d.key: (d.device, d.path) for d in plan.disks}
    assert kinds == {
        "ide0:0": ("ata", tmp_path / "legacy.vmdk"),
        "ide1:1": ("ata", Path("/abs/other.vmdk")),
        "scsi0:0": ("virtio-blk", tmp_path / "box.vmdk"),
        "sata0:1": ("virtio-blk", tmp_path / "data.vmdk"),
    }
    ata = {d.key: (d.channel, d.unit) for d in plan.disks if d.device == "ata"}
    assert ata == {"ide0:0": (0, 0), "ide1:1": (1, 1)}
    assert [(n.key, n.mac, n.connection_type, n.tap_name) for n in plan.nics] == [
        ("ethernet0", "00:0c:29:ab:cd:ef", "hostonly", "vmnet1")
    ]


def test_plan_rejects_impossible_ide_slots_and_missing_macs(tmp_path: Path) -> None:
    bad = VMX + 'ide2:0.present = "TRUE"\nide2:0.fileName = "x.vmdk"\n'
    with pytest.raises(ConfigError, match="ide2:0"):
        plan_devices(config(bad), tmp_path)
    nomac = VMX.replace('ethernet0.generatedAddress = "00:0c:29:ab:cd:ef"\n', "")
    with pytest.raises(ConfigError, match="ethernet0 has no MAC"):
        plan_devices(config(nomac), tmp_path)


def test_attach_builds_working_devices(tmp_path: Path) -> None:
    text = VMX.replace("/abs/other.vmdk", str(tmp_path / "other.vmdk"))
    for i, name in enumerate(("box.vmdk", "data.vmdk", "legacy.vmdk", "other.vmdk")):
        (tmp_path / name).write_bytes(make_pattern(1 << 20, seed=i))
    plan = plan_devices(config(text), tmp_path)
    machine = Machine(GuestMemory.with_ram(16 << 20))
    wires: list[SocketWire] = []

    def open_tap(name: str) -> SocketWire:
        assert name == "vmnet1"
        wires.append(SocketWire())
        return wires[-1]

    out = attach_devices(
        machine,
        plan,
        open_disk=lambda p: RawFileImage(Path(p)),
        open_tap=open_tap,
        with_console=True,
    )
    try:
        assert out.cmdline == [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6",
            "virtio_mmio.device=4K@0xd0002000:7",
            "virtio_mmio.device=4K@0xd0003000:9",
            "virtio_mmio.device=4K@0xd0004000:10",
        ]
        names = set(machine.devices)
        assert {"ata0", "ata1", "virtio-blk-scsi0:0", "virtio-net-ethernet0", "virtio-rng"} <= names
        # The second virtio-blk window is sata0:1's disk.
        drv = BlkDriver(machine.mmio, 0xD000_1000, machine.memory, GuestAllocator(0x10000, 0x80000))
        drv.setup()
        assert drv.request(VIRTIO_BLK_T_IN, 0, 0x100000, 4096)[0] == VIRTIO_BLK_S_OK
        assert machine.memory.read(0x100000, 4096) == (tmp_path / "data.vmdk").read_bytes()[:4096]
        # ATA: the primary master answers on 0x1f0 with IRQ 14, the secondary slave on 0x170.
        assert out.ata is not None
        assert out.ata.channels[0].irq.gsi == 14 and out.ata.channels[1].irq.gsi == 15
        machine.pio.write(0x176, 1, 0xB0)  # select the slave on the secondary channel
        assert machine.pio.read(0x177, 1) == 0x50
        # The NIC's config space carries the box's MAC.
        mac = bytes(machine.mmio.read(0xD000_2100 + i, 1) for i in range(6))
        assert mac == bytes.fromhex("000c29abcdef")
        # The device state of the whole machine is plain data.
        assert machine.save_device_state()
    finally:
        out.close()
        for w in wires:
            w.close()


def test_box_devices_hook_in_build_machine(tmp_path: Path) -> None:
    from boite.machine.builder import build_machine
    from boite.machine.virtio.attach import BoxDevices

    text = VMX.replace("/abs/other.vmdk", str(tmp_path / "other.vmdk"))
    text = text.replace('ethernet0.present = "TRUE"', 'ethernet0.present = "FALSE"')
    for name in ("box.vmdk", "data.vmdk", "legacy.vmdk", "other.vmdk"):
        create_disk(tmp_path / name, 4 << 20, "thin")
    devices = BoxDevices(config(text), tmp_path)  # boite.disk.open_disk: real VMDKs
    seen: list[str] = []

    def spy(machine) -> str:
        # A later hook sees what ours put in (and could read the fragments it returned).
        seen.extend(sorted(machine.devices))
        return ""

    machine = build_machine(32, extra_devices=[devices, spy])
    try:
        assert devices.attached is not None
        assert devices.attached.cmdline == [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6",
            "virtio_mmio.device=4K@0xd0002000:7",
        ]
        assert {"ata0", "ata1", "virtio-blk-scsi0:0", "virtio-blk-sata0:1", "virtio-rng"} <= set(
            seen
        )
        # The ATA channel answers next to the platform devices the builder put in.
        machine.pio.write(0x1F6, 1, 0xA0)
        assert machine.pio.read(0x1F7, 1) == 0x50
        assert machine.mmio.read(0xD000_0000, 4) == 0x74726976
    finally:
        devices.close()
        machine.memory.close()


def test_disk_files_for_boite_boot(tmp_path: Path) -> None:
    from boite.machine.virtio.attach import DiskFiles, plan_disk_files

    plan = plan_disk_files(["a.vmdk", "ide:b.vmdk", "virtio:c.img", "ata:d.vmdk"])
    assert [(d.key, d.device, str(d.path)) for d in plan.disks] == [
        ("vda", "virtio-blk", "a.vmdk"),
        ("ide0:0", "ata", "b.vmdk"),
        ("vdb", "virtio-blk", "c.img"),
        ("ide0:1", "ata", "d.vmdk"),
    ]
    with pytest.raises(ConfigError, match="four slots"):
        plan_disk_files([f"ide:{i}" for i in range(5)])
    for name in ("a.vmdk", "b.vmdk"):
        create_disk(tmp_path / name, 1 << 20, "thin")
    hook = DiskFiles([str(tmp_path / "a.vmdk"), f"ide:{tmp_path / 'b.vmdk'}"], with_rng=False)
    machine = Machine(GuestMemory.with_ram(16 << 20))
    try:
        assert hook(machine) == "virtio_mmio.device=4K@0xd0000000:5"
        assert "ata0" in machine.devices
    finally:
        hook.close()


def test_virtio_console_as_the_box_console() -> None:
    from boite.machine.devices import ConsoleBackend
    from boite.machine.virtio import mmio as r
    from boite.machine.virtio.attach import DevicePlan
    from boite.machine.virtio.guestdriver import ALL_RING_FEATURES, Buffer, VirtioMmioDriver

    console = ConsoleBackend()
    machine = Machine(GuestMemory.with_ram(16 << 20))
    out = attach_devices(
        machine, DevicePlan(), open_disk=RawFileImage, console=console, with_console=True
    )
    try:
        assert out.cmdline == [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6",
        ]
        drv = VirtioMmioDriver(
            machine.mmio, 0xD000_0000, machine.memory, GuestAllocator(0x10000, 0x80000)
        )
        drv.init(ALL_RING_FEATURES | 0xFFFFFFFF, expect_id=r.VIRTIO_ID_CONSOLE)
        rxq, txq = drv.queues
        machine.memory.write(0x100000, b"login: ")
        txq.add([Buffer(0x100000, 7)])
        txq.kick()
        assert console.buffered() == b"login: "  # nobody attached yet: kept for later
        got: list[bytes] = []
        console.attach(got.append)
        assert got == [b"login: "]
        rxq.add([Buffer(0x200000, 64, writable=True)])
        rxq.kick()
        console.send(b"root\n")  # typed at the attached console
        assert rxq.reap()[0][1] == 5 and machine.memory.read(0x200000, 5) == b"root\n"
    finally:
        out.close()
