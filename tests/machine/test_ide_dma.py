"""The PIIX IDE function's bus-master DMA, driven through PCI configuration, the ATA
ports and the BAR4 registers as Linux's ata_piix does; checked against the disk file."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from boite.disk import open_disk
from boite.machine.builder import build_machine
from boite.machine.machine import Machine
from boite.machine.virtio.attach import DevicePlan, DiskPlan, attach_devices

BM = 0xC000
PRD, BUF = 0x10000, 0x20000


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Machine, Path, list[bool]]]:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(range(256)) * 2 * 2048)  # 1 MiB, each sector 0..255 twice
    plan = DevicePlan(disks=[DiskPlan("ide0:0", "ata", disk, 0, 0)])
    attached = []
    m = build_machine(
        16, extra_devices=[lambda mm: attached.append(
            attach_devices(mm, plan, open_disk=open_disk, with_rng=False))],
    )  # fmt: skip
    irq14: list[bool] = []
    m.irqs.attach(lambda gsi, level: irq14.append(level) if gsi == 14 else None)
    m.pio.write(0xCF8, 4, 0x8000_0000 | (1 << 11) | (1 << 8) | 0x20)  # 00:01.1 BAR4
    m.pio.write(0xCFC, 4, BM)
    m.pio.write(0xCF8, 4, 0x8000_0000 | (1 << 11) | (1 << 8) | 0x04)
    m.pio.write(0xCFC, 2, 0x5)  # I/O space + bus master
    yield m, disk, irq14
    for a in attached:
        a.close()
    m.memory.close()


def dma(m: Machine, cmd: int, lba: int, count: int, to_memory: bool, prd: bytes) -> int:
    m.memory.write(PRD, prd)
    m.pio.write(BM + 4, 4, PRD)
    m.pio.write(BM, 1, 0x08 if to_memory else 0)
    m.pio.write(0x1F6, 1, 0xE0 | (lba >> 24))
    m.pio.write(0x1F2, 1, count)
    m.pio.write(0x1F3, 1, lba & 0xFF)
    m.pio.write(0x1F4, 1, (lba >> 8) & 0xFF)
    m.pio.write(0x1F5, 1, (lba >> 16) & 0xFF)
    m.pio.write(0x1F7, 1, cmd)
    m.pio.write(BM, 1, (0x08 if to_memory else 0) | 1)  # start
    status = m.pio.read(BM + 2, 1)
    m.pio.write(BM, 1, 0)  # stop, as a driver does after the interrupt
    return status


def test_identify_offers_dma_and_set_features_selects_udma(rig) -> None:
    m, _, _ = rig
    m.pio.write(0x1F6, 1, 0xE0)
    m.pio.write(0x1F7, 1, 0xEC)
    words = struct.unpack("<256H", b"".join(
        m.pio.read(0x1F0, 2).to_bytes(2, "little") for _ in range(256)))  # fmt: skip
    assert words[49] & 0x0100 and words[88] & 0x3F == 0x3F
    m.pio.write(0x1F1, 1, 0x03)
    m.pio.write(0x1F2, 1, 0x45)  # UDMA 5
    m.pio.write(0x1F7, 1, 0xEF)
    assert not m.pio.read(0x1F7, 1) & 0x01


def test_read_and_write_dma_through_a_prd_table(rig) -> None:
    m, disk, irq14 = rig
    # two PRD entries: 512 bytes then 1024 (end of table): 3 sectors from LBA 7
    prd = struct.pack("<IHH", BUF, 512, 0) + struct.pack("<IHH", BUF + 0x1000, 1024, 0x8000)
    status = dma(m, 0xC8, 7, 3, True, prd)
    assert status & 0x04 and not status & 0x03  # interrupt, no error, not active
    assert irq14 and irq14[-1] is True
    data = disk.read_bytes()
    assert m.memory.read(BUF, 512) == data[7 * 512 : 8 * 512]
    assert m.memory.read(BUF + 0x1000, 1024) == data[8 * 512 : 10 * 512]
    assert m.pio.read(0x1F7, 1) & 0x89 == 0  # not busy, no DRQ, no error
    m.pio.write(BM + 2, 1, 0x04)  # clear the interrupt bit
    m.memory.write(BUF, b"\xab" * 512)
    status = dma(m, 0xCA, 100, 1, False, struct.pack("<IHH", BUF, 512, 0x8000))
    assert status & 0x04 and not status & 0x02
    assert disk.read_bytes()[100 * 512 : 101 * 512] == b"\xab" * 512


def test_bad_prd_tables_fail_the_command_not_the_host(rig) -> None:
    m, _, _ = rig
    status = dma(m, 0xC8, 0, 1, True, struct.pack("<IHH", 0xF000_0000, 512, 0x8000))
    assert status & 0x02 and m.pio.read(0x1F7, 1) & 0x01  # BM error, ATA error
    m.pio.write(BM + 2, 1, 0x06)
    status = dma(m, 0xC8, 0, 4, True, struct.pack("<IHH", BUF, 512, 0x8000))  # too short
    assert status & 0x02
    m.pio.write(BM + 2, 1, 0x06)
    status = dma(m, 0xCA, 0, 1, True, struct.pack("<IHH", BUF, 512, 0x8000))  # wrong way
    assert status & 0x02
    m.pio.write(BM + 2, 1, 0x06)
    status = dma(m, 0xC8, 0, 1, True, struct.pack("<IHH", BUF, 4096, 0x8000))  # longer table
    assert status & 0x01 and not status & 0x02  # still active: the table was larger


def test_idetim_says_both_channels_decode_and_keeps_what_drivers_write(rig) -> None:
    """ata_piix skips a channel whose IDETIM decode bit (0x41/0x43 bit 7) is clear; SeaBIOS
    and the drivers write timings there and read them back."""
    m, _, _ = rig

    def cfg(offset: int, size: int, value: int | None = None) -> int:
        m.pio.write(0xCF8, 4, 0x8000_0000 | (1 << 11) | (1 << 8) | (offset & 0xFC))
        if value is not None:
            m.pio.write(0xCFC + (offset & 3), size, value)
        return m.pio.read(0xCFC + (offset & 3), size)

    assert cfg(0x09, 1) == 0x80  # compatibility mode on both channels, bus mastering
    assert cfg(0x10, 4) == 0 and cfg(0x14, 4) == 0  # BARs 0-3: the legacy ports instead
    assert cfg(0x41, 1) & 0x80 and cfg(0x43, 1) & 0x80
    assert cfg(0x40, 2, 0xA307) == 0xA307 and cfg(0x42, 2, 0x8000) == 0x8000
    assert cfg(0x44, 1, 0x33) == 0x33 and cfg(0x48, 1, 0xFF) == 0x0F
    assert cfg(0x4A, 2, 0x1212) == 0x1212
    assert cfg(0x08, 1, 0xFF) == 0  # the revision stays read-only
