"""Firmware: the ACPI tables (checked by linking them as SeaBIOS does and by iasl), the
SMBIOS entry point, fw_cfg's file directory and DMA interface, and SeaBIOS itself
booting on the emulator and printing to COM1 through sercon."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from boite.errors import ConfigError
from boite.machine.builder import build_machine
from boite.machine.firmware.acpi import RSDP_FILE, TABLES_FILE, build_acpi, link
from boite.machine.firmware.pc import BootDevice, order_boot_devices, parse_boot_order
from boite.machine.firmware.seabios import bios_path
from boite.machine.firmware.smbios import build_smbios

TABLES_AT, RSDP_AT = 0x3FF_F000, 0xF_5000


def linked(cpus: int = 2) -> tuple[dict[str, bytes], dict[str, int]]:
    acpi = build_acpi(cpus, 0x600, 0x400_0000)  # 64 MiB of RAM below the PCI hole
    files = link(
        {TABLES_FILE: acpi.tables, RSDP_FILE: acpi.rsdp},
        acpi.loader,
        {TABLES_FILE: TABLES_AT, RSDP_FILE: RSDP_AT},
    )
    return files, acpi.offsets


def test_acpi_tables_link_into_a_consistent_tree() -> None:
    files, offsets = linked(cpus=3)
    rsdp, tables = files[RSDP_FILE], files[TABLES_FILE]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp) & 0xFF == 0
    rsdt = struct.unpack_from("<I", rsdp, 16)[0] - TABLES_AT
    assert tables[rsdt : rsdt + 4] == b"RSDT"

    def at(addr: int) -> bytes:
        off = addr - TABLES_AT
        length = struct.unpack_from("<I", tables, off + 4)[0]
        body = tables[off : off + length]
        if body[:4] != b"FACS":
            assert sum(body) & 0xFF == 0, body[:4]
        return body

    entries = struct.unpack_from("<2I", tables, rsdt + 36)
    fadt, madt = at(entries[0]), at(entries[1])
    assert fadt[:4] == b"FACP" and madt[:4] == b"APIC"
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert at(facs_addr)[:4] == b"FACS" and facs_addr % 64 == 0
    assert at(dsdt_addr)[:4] == b"DSDT"
    assert struct.unpack_from("<I4xI", fadt, 56) == (0x600, 0x604)  # PM1a EVT, CNT
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608  # PM timer
    lapics = [i for i in range(44, len(madt)) if madt[i] == 0 and madt[i + 1] == 8]
    assert len(lapics) >= 3


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_every_table(tmp_path: Path) -> None:
    files, offsets = linked(cpus=2)
    tables = files[TABLES_FILE]
    text = {}
    for sig in ("DSDT", "FACP", "APIC", "RSDT"):
        off = offsets[sig]
        length = struct.unpack_from("<I", tables, off + 4)[0]
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(tables[off : off + length])
        run = subprocess.run(
            ["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
        text[sig] = path.with_suffix(".dsl").read_text()
        assert "Invalid" not in text[sig] and "Error" not in text[sig], text[sig]
    assert 'EisaId ("PNP0A03")' in text["DSDT"] and "Name (\\_S5, Package (0x04)" in text["DSDT"]
    assert 'EisaId ("PNP0303")' in text["DSDT"]
    kbd = re.sub(r"\s+", " ", text["DSDT"].split("Device (KBD)")[1])
    assert "IO (Decode16, 0x0060, // Range Minimum 0x0060," in kbd
    assert "IO (Decode16, 0x0064, // Range Minimum 0x0064," in kbd
    assert "IRQNoFlags () {1}" in kbd, kbd
    # PCI0's windows as iasl reads them back (QEMU's i440FX board declares the same).
    crs = re.sub(r"\s+", " ", text["DSDT"])
    assert "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, " \
        "// Granularity 0x0000, // Range Minimum 0x00FF," in crs, text["DSDT"]  # fmt: skip
    assert "IO (Decode16, 0x0CF8, // Range Minimum 0x0CF8, // Range Maximum 0x01, " \
        "// Alignment 0x08, // Length" in crs  # fmt: skip
    windows = re.findall(
        r"(WordIO|DWordMemory) \(ResourceProducer, [A-Za-z, ]*MinFixed, MaxFixed[A-Za-z, ]* 0x0+, "
        r"// Granularity (0x[0-9A-F]+), // Range Minimum (0x[0-9A-F]+), // Range Maximum "
        r"0x0+, // Translation Offset (0x[0-9A-F]+), // Length", crs,
    )  # fmt: skip
    assert [(k, int(lo, 16), int(hi, 16), int(n, 16)) for k, lo, hi, n in windows] == [
        ("WordIO", 0, 0xCF7, 0xCF8), ("WordIO", 0xD00, 0xFFFF, 0xF300),
        ("DWordMemory", 0xA0000, 0xBFFFF, 0x20000),
        ("DWordMemory", 0x400_0000, 0xFEBF_FFFF, 0xFEC0_0000 - 0x400_0000),
    ]  # fmt: skip
    assert "PM1A Event Block Address : 00000600" in text["FACP"]
    assert "SCI Interrupt : 0009" in text["FACP"]
    assert "Control Method Power Button (V1) : 0" in text["FACP"]  # a fixed power button
    assert text["APIC"].count("[Processor Local APIC]") == 2
    assert text["APIC"].count("[Interrupt Source Override]") == 5


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_compiles_the_disassembled_dsdt_back_to_the_same_aml(tmp_path: Path) -> None:
    """Every byte of boite's AML is one iasl reads and writes the same way: disassembled,
    then compiled again without iasl's optimizations (-oa, which would shorten
    `\\_SB` to `_SB_`), the definition block is identical. The one warning is PCI0's
    _HID with _ADR, which QEMU's DSDT has too."""
    files, offsets = linked(cpus=2)
    tables, off = files[TABLES_FILE], offsets["DSDT"]
    dsdt = tables[off : off + struct.unpack_from("<I", tables, off + 4)[0]]
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    subprocess.run(["iasl", "-d", "dsdt.dat"], check=True, capture_output=True, cwd=tmp_path)
    run = subprocess.run(
        ["iasl", "-oa", "-p", "again", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0 and "0 Errors" in run.stdout, run.stdout + run.stderr
    again = (tmp_path / "again.aml").read_bytes()
    assert again[:4] == b"DSDT" and again[36:] == dsdt[36:]


def test_smbios_entry_point_checksums_and_uuid() -> None:
    uuid = bytes.fromhex("564d1234567890abcdef0123456789ab")
    tables, anchor = build_smbios(uuid, "VMware-56 4d")
    assert anchor[:4] == b"_SM_" and len(anchor) == 31 and sum(anchor) & 0xFF == 0
    assert anchor[16:21] == b"_DMI_" and sum(anchor[16:]) & 0xFF == 0
    assert struct.unpack_from("<H", anchor, 22)[0] == len(tables)
    assert tables[0] == 1  # type 1 first; its UUID's first three fields little-endian
    assert tables[8:24] == bytes.fromhex("34124d567856ab90cdef0123456789ab")


def test_fw_cfg_file_directory_and_dma_through_the_ports() -> None:
    m = build_machine(16)
    try:
        fw = m.devices["fw_cfg"]
        fw.add_file("etc/boite-test", b"hello fw_cfg")
        m.pio.write(0x510, 2, 0x19)
        count = struct.unpack(">I", bytes(m.pio.read(0x511, 1) for _ in range(4)))[0]
        entries = [bytes(m.pio.read(0x511, 1) for _ in range(64)) for _ in range(count)]
        names = {e[8:].rstrip(b"\0").decode(): struct.unpack_from(">IH", e) for e in entries}
        size, select = names["etc/boite-test"]
        assert size == 12
        # a DMA read: select + read 5 bytes, then a skip and a read past the end
        req, buf = 0x8000, 0x9000
        m.memory.write(req, struct.pack(">IIQ", (select << 16) | 0x08 | 0x02, 5, buf))
        m.pio.write(0x514, 4, 0)
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        assert m.memory.read(req, 4) == bytes(4) and m.memory.read(buf, 5) == b"hello"
        m.memory.write(req, struct.pack(">IIQ", 0x04, 1, 0))
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        m.memory.write(req, struct.pack(">IIQ", 0x02, 10, buf))
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        assert m.memory.read(buf, 10) == b"fw_cfg\0\0\0\0"
        # hostile: a buffer outside RAM sets the error bit; a write is refused
        m.memory.write(req, struct.pack(">IIQ", 0x02, 16, 0xF000_0000))
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        assert m.memory.read(req, 4) == struct.pack(">I", 1)
        m.memory.write(req, struct.pack(">IIQ", 0x10, 4, buf))
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        assert m.memory.read(req, 4) == struct.pack(">I", 1)
        m.pio.write(0x518, 4, 0x00F0_FFFF)  # the request itself outside RAM: ignored
        # the architecture's items (0x8000...) are not the generic ones
        m.pio.write(0x510, 2, 0x8000)
        assert m.pio.read(0x511, 1) == 0
    finally:
        m.memory.close()


def test_boot_order_follows_bios_keys() -> None:
    devs = [
        BootDevice("ide0:0", "hdd", "/pci@i0cf8/ide@1,1/drive@0/disk@0"),
        BootDevice("scsi0:0", "hdd", "/pci@i0cf8/scsi@4/disk@0,0"),
        BootDevice("ide1:0", "cdrom", "/pci@i0cf8/ide@1,1/drive@1/disk@0"),
    ]
    keys = [d.key for d in order_boot_devices(devs, parse_boot_order("hdd,cdrom"), ["scsi0:0"])]
    assert keys == ["scsi0:0", "ide0:0", "ide1:0"]
    keys = [d.key for d in order_boot_devices(devs, parse_boot_order("CDROM, hdd"))]
    assert keys == ["ide1:0", "ide0:0", "scsi0:0"]
    with pytest.raises(ConfigError, match="'usb' is not one of"):
        parse_boot_order("usb,hdd")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios package is not installed")
def test_seabios_boots_on_the_emulator_and_prints_to_com1() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from boite.accel.emu.accel import EmuAccelerator
    from guests.runner import CollectedOutput

    out = CollectedOutput()
    m = build_machine(32, serial_backends=[out], firmware=True)
    accel = EmuAccelerator()
    try:
        accel.create(m)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                if b"No bootable device" in out.output:
                    accel.pause()
                    return

        threading.Thread(target=watch, daemon=True).start()
        result = accel.run()
        done.set()
        text = bytes(out.output).decode("latin-1")
        assert "SeaBIOS (version" in text, (result, m.devices["debugcon"].text[-3000:])
        assert "No bootable device" in text
        log = m.devices["debugcon"].text
        assert "Running on QEMU (i440fx)" in log and "Using pmtimer, ioport 0x608" in log
        assert "table(50434146)" in log  # SeaBIOS found our FADT through the RSDT
    finally:
        accel.close()
        m.memory.close()


def test_fw_cfg_dma_of_a_huge_length_is_an_error_not_an_allocation() -> None:
    m = build_machine(16)
    try:
        fw = m.devices["fw_cfg"]
        select = fw.add_file("etc/x", b"abc")
        req = 0x8000
        m.memory.write(req, struct.pack(">IIQ", (select << 16) | 0x0A, 0xFFFF_FFF0, 0x9000))
        m.pio.write(0x518, 4, int.from_bytes(req.to_bytes(4, "big"), "little"))
        assert m.memory.read(req, 4) == struct.pack(">I", 1)
    finally:
        m.memory.close()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios package is not installed")
def test_a_firmware_machine_state_survives_json_and_loads_into_a_fresh_one(tmp_path: Path) -> None:
    """What a snapshot keeps of the new devices (PCI functions, PM block, IDE/ATAPI,
    virtio-pci, fw_cfg) is plain data and loads back into an identically built machine."""
    from boite.accel.emu.accel import EmuAccelerator
    from boite.box.checkpoint import _json_bytes, _json_load
    from boite.disk import open_disk
    from boite.machine.virtio.attach import DevicePlan, DiskPlan, attach_devices

    iso = tmp_path / "x.iso"
    iso.write_bytes(bytes(64 * 2048))
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    plan = DevicePlan(disks=[DiskPlan("ide1:0", "atapi", iso, 1, 0),
                             DiskPlan("scsi0:0", "virtio-blk", disk)])  # fmt: skip

    def build():
        attached = []

        def hook(machine):
            attached.append(attach_devices(machine, plan, open_disk=open_disk, with_rng=False))

        return build_machine(32, firmware=True, extra_devices=[hook]), attached

    m, att = build()
    accel = EmuAccelerator()
    try:
        accel.create(m)
        threading.Timer(8, accel.pause).start()
        accel.run()  # SeaBIOS programs PCI, the PM block, the PIRQs, finds the drives
        state = _json_load(_json_bytes(m.save_device_state()), "test", 1 << 26)  # as .vmsn
        assert state["piix4-pm"]["config"] and state["piix-ide"]["extra"]["busmaster"]
        m2, att2 = build()
        try:
            m2.load_device_state(state)
            again = m2.save_device_state()
            for name in ("pci-host", "piix3-isa", "piix-ide", "virtio-blk-scsi0:0", "fw_cfg",
                         "ata1"):  # fmt: skip
                assert again[name] == state[name], name
            pm, pm2 = dict(state["piix4-pm"]["extra"]), dict(again["piix4-pm"]["extra"])
            assert pm.pop("timer") <= pm2.pop("timer") and pm == pm2  # the PM timer runs on
            assert state["piix4-pm"]["config"] == again["piix4-pm"]["config"]
            bar = m2.devices["virtio-blk-scsi0:0"].bar_address(4)
            assert bar is None or m2.mmio.find(bar) is not None  # BARs mapped as saved
        finally:
            for a in att2:
                a.close()
            m2.memory.close()
    finally:
        accel.close()
        for a in att:
            a.close()
        m.memory.close()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios package is not installed")
def test_seabios_under_kvm_finds_every_vcpu() -> None:
    """Under KVM the in-kernel local APICs answer SeaBIOS's INIT/SIPI: it counts the
    box's vCPUs (CMOS 0x5f says how many to wait for). Runs on kvm_pvm too: SeaBIOS needs
    none of what keeps Linux from booting there."""
    from conftest import kvm_available

    if not kvm_available():
        pytest.skip("needs /dev/kvm")
    from boite.accel.kvm import KvmAccelerator

    m = build_machine(32, 2, firmware=True, emulated_irqchip=False)
    accel = KvmAccelerator(irqchip=True)
    try:
        accel.create(m)
        debug = m.devices["debugcon"]

        def watch() -> None:
            for _ in range(600):
                if "No bootable device" in debug.text:
                    break
                threading.Event().wait(0.1)
            accel.pause()

        threading.Thread(target=watch, daemon=True).start()
        accel.run()
        assert "Found 2 cpu(s)" in debug.text, debug.text[-3000:]
        assert "table(50434146)" in debug.text
    finally:
        accel.close()
        m.memory.close()
