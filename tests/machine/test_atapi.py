"""The ATAPI CD-ROM through the IDE channel's ports, as SeaBIOS and Linux's sr drive it:
signature, IDENTIFY PACKET DEVICE, PACKET with the byte count limit, sense data."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from boite.disk.raw import RawImage
from boite.machine.devices.ata import AtaChannel
from boite.machine.devices.atapi import AtapiDrive
from boite.machine.irq import IrqLine


class Port:
    def __init__(self, iso: Path | None) -> None:
        drive = AtapiDrive(RawImage(iso, read_only=True) if iso else None)
        self.ch = AtaChannel(IrqLine(15), drive, None, cmd_base=0x170, ctl_port=0x376)

    def inb(self, reg: int) -> int:
        return self.ch.bus_read(reg, 1)

    def outb(self, reg: int, v: int) -> None:
        self.ch.bus_write(reg, 1, v)

    def packet(self, cdb: bytes, limit: int = 0xFFFE) -> tuple[bytes, int]:
        """Send a packet command; returns (data, final status)."""
        self.outb(6, 0xA0)
        self.outb(1, 0)
        self.outb(4, limit & 0xFF)
        self.outb(5, limit >> 8)
        self.outb(7, 0xA0)
        assert self.inb(7) & 0x08 and self.inb(2) == 0x01  # DRQ, CoD: send the packet
        cdb = cdb.ljust(12, b"\0")
        for i in range(0, 12, 2):
            self.ch.bus_write(0, 2, struct.unpack_from("<H", cdb, i)[0])
        data = bytearray()
        while True:
            st = self.inb(7)
            if not st & 0x08:
                return bytes(data), st
            assert self.inb(2) == 0x02  # IO: data for the host
            n = self.inb(4) | self.inb(5) << 8
            assert n <= limit
            data += self.ch.read_string(0, 2, n // 2)


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    path = tmp_path / "x.iso"
    data = bytearray(40 * 2048)
    for s in range(40):
        data[s * 2048 : s * 2048 + 4] = struct.pack(">I", s)
    path.write_bytes(data)
    return path


def test_signature_identify_and_inquiry(iso: Path) -> None:
    p = Port(iso)
    assert (p.inb(4), p.inb(5)) == (0x14, 0xEB)  # "I am ATAPI"
    p.outb(7, 0xEC)  # IDENTIFY DEVICE is refused, signature kept
    assert p.inb(7) & 0x01 and (p.inb(4), p.inb(5)) == (0x14, 0xEB)
    p.outb(7, 0xA1)
    assert p.inb(7) & 0x08
    ident = p.ch.read_string(0, 2, 256)
    assert struct.unpack_from("<H", ident)[0] >> 14 == 2 and (ident[1] & 0x1F) == 5  # CD-ROM
    data, st = p.packet(bytes([0x12, 0, 0, 0, 36]))
    assert not st & 0x01 and data[0] == 0x05 and data[8:16] == b"BOITE   "


def test_read_capacity_read10_in_pieces_and_toc(iso: Path) -> None:
    p = Port(iso)
    data, _ = p.packet(bytes([0x25]))
    assert struct.unpack(">II", data) == (39, 2048)
    data, st = p.packet(bytes([0x28, 0, 0, 0, 0, 5, 0, 0, 3]), limit=2048)  # 3 sectors from 5
    assert not st & 0x01 and len(data) == 3 * 2048
    assert [struct.unpack_from(">I", data, i * 2048)[0] for i in range(3)] == [5, 6, 7]
    data, _ = p.packet(bytes([0x43, 0, 0, 0, 0, 0, 0, 0, 20]))
    assert data[2:4] == b"\x01\x01" and struct.unpack_from(">I", data, 16)[0] == 40  # lead-out


def test_errors_leave_sense_data(iso: Path) -> None:
    p = Port(iso)
    _, st = p.packet(bytes([0xFF]))
    assert st & 0x01 and p.inb(1) >> 4 == 0x05  # ILLEGAL REQUEST
    data, _ = p.packet(bytes([0x03, 0, 0, 0, 18]))
    assert data[2] == 0x05 and data[12] == 0x20  # invalid command operation code
    _, st = p.packet(bytes([0x28, 0, 0, 0, 0, 39, 0, 0, 2]))  # past the end
    assert st & 0x01
    _, st = p.packet(bytes([0xA8, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]))  # 4 G sectors
    assert st & 0x01


def test_an_empty_drive_is_not_ready() -> None:
    p = Port(None)
    _, st = p.packet(bytes([0x00]))
    assert st & 0x01 and p.inb(1) >> 4 == 0x02
    data, _ = p.packet(bytes([0x03, 0, 0, 0, 18]))
    assert data[12] == 0x3A  # medium not present
