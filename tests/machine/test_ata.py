"""The emulated ATA controller driven register by register, as Linux's libata drives it."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from test_virtio_blk import IrqRecorder, RawFileImage, make_pattern

from boite.machine.bus import Bus
from boite.machine.devices import ata
from boite.machine.devices.ata import AtaChannel, AtaController, AtaDrive
from boite.machine.irq import IrqLine, IrqRouter


class AtaPio:
    """A guest-side PIO driver: what ata_sff / pata_legacy do through the ports."""

    def __init__(self, pio: Bus, cmd: int = 0x1F0, ctl: int = 0x3F6, width: int = 2) -> None:
        self.pio, self.cmd, self.ctl, self.width = pio, cmd, ctl, width

    def inb(self, off: int) -> int:
        return self.pio.read(self.cmd + off, 1)

    def outb(self, off: int, v: int) -> None:
        self.pio.write(self.cmd + off, 1, v)

    def alt(self) -> int:
        return self.pio.read(self.ctl, 1)

    def select(self, unit: int, lba: bool = True) -> None:
        self.outb(6, 0xA0 | (ata.DEV_LBA if lba else 0) | (unit << 4))

    def softreset(self) -> None:
        self.pio.write(self.ctl, 1, ata.CTL_NIEN | ata.CTL_SRST)
        assert self.alt() & ata.ST_BSY
        self.pio.write(self.ctl, 1, ata.CTL_NIEN)

    def read_block(self, nbytes: int) -> bytes:
        w = self.width
        return b"".join(
            self.pio.read(self.cmd, w).to_bytes(w, "little") for _ in range(nbytes // w)
        )

    def write_block(self, data: bytes) -> None:
        w = self.width
        for i in range(0, len(data), w):
            self.pio.write(self.cmd, w, int.from_bytes(data[i : i + w], "little"))

    def taskfile(self, lba: int, count: int, ext: bool, unit: int = 0) -> None:
        if ext:
            self.outb(2, count >> 8 & 0xFF)
            self.outb(3, lba >> 24 & 0xFF)
            self.outb(4, lba >> 32 & 0xFF)
            self.outb(5, lba >> 40 & 0xFF)
            self.outb(2, count & 0xFF)
            self.outb(3, lba & 0xFF)
            self.outb(4, lba >> 8 & 0xFF)
            self.outb(5, lba >> 16 & 0xFF)
            self.outb(6, 0xE0 | unit << 4)
        else:
            self.outb(2, count & 0xFF)
            self.outb(3, lba & 0xFF)
            self.outb(4, lba >> 8 & 0xFF)
            self.outb(5, lba >> 16 & 0xFF)
            self.outb(6, 0xE0 | unit << 4 | lba >> 24 & 0x0F)

    def command(self, cmd: int) -> int:
        self.outb(7, cmd)
        return self.inb(7)

    def identify(self, unit: int = 0) -> list[int]:
        self.select(unit)
        st = self.command(ata.CMD_IDENTIFY)
        assert st & ata.ST_DRQ, hex(st)
        return list(struct.unpack("<256H", self.read_block(512)))

    def read(self, lba: int, count: int, ext: bool = False, multi: int = 0) -> bytes:
        self.taskfile(lba, count, ext)
        if multi:
            cmd = ata.CMD_READ_MULTIPLE_EXT if ext else ata.CMD_READ_MULTIPLE
        else:
            cmd = ata.CMD_READ_SECTORS_EXT if ext else ata.CMD_READ_SECTORS
        self.outb(7, cmd)
        out = bytearray()
        per = multi or 1
        while len(out) < count * 512:
            st = self.inb(7)  # acknowledges the block's interrupt
            assert st & ata.ST_DRQ and not st & ata.ST_ERR, hex(st)
            n = min(per, count - len(out) // 512)
            out += self.read_block(n * 512)
        assert not self.alt() & (ata.ST_DRQ | ata.ST_BSY)
        return bytes(out)

    def write(self, lba: int, data: bytes, ext: bool = False, multi: int = 0) -> None:
        count = len(data) // 512
        self.taskfile(lba, count, ext)
        if multi:
            cmd = ata.CMD_WRITE_MULTIPLE_EXT if ext else ata.CMD_WRITE_MULTIPLE
        else:
            cmd = ata.CMD_WRITE_SECTORS_EXT if ext else ata.CMD_WRITE_SECTORS
        self.outb(7, cmd)
        per = multi or 1
        pos = 0
        while pos < len(data):
            st = self.alt()
            assert st & ata.ST_DRQ, hex(st)
            n = min(per * 512, len(data) - pos)
            self.write_block(data[pos : pos + n])
            pos += n
            st = self.inb(7)
        assert st == ata.ST_DRDY | ata.ST_DSC, hex(st)


def ata_string(words: list[int]) -> str:
    return b"".join(w.to_bytes(2, "big") for w in words).decode().strip()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "ide.raw"
    p.write_bytes(make_pattern(8 << 20, seed=5))
    return p


def rig(image, *, width: int = 2, slave=None):
    pio = Bus("pio")
    rec = IrqRecorder()
    irq = IrqLine(14, rec)
    drive = AtaDrive(image, serial="BOITE-IDE-0", model="boite test disk")
    ch = AtaChannel(irq, drive, slave)
    ch.register(pio)
    return pio, ch, AtaPio(pio, width=width), rec


def test_signature_after_reset_and_absent_slave(disk: Path) -> None:
    pio, ch, d, _ = rig(RawFileImage(disk))
    d.softreset()
    d.select(0)
    assert (d.inb(2), d.inb(3), d.inb(4), d.inb(5)) == (1, 1, 0, 0)  # ATA signature
    assert d.inb(1) == 0x01  # diagnostic passed
    assert d.inb(7) == ata.ST_DRDY | ata.ST_DSC
    # libata's ata_devchk on the absent slave: the pattern does not read back.
    d.select(1)
    d.outb(2, 0x55)
    d.outb(3, 0xAA)
    assert (d.inb(2), d.inb(3)) != (0x55, 0xAA)
    assert d.inb(7) == 0
    # The master's registers do read back.
    d.select(0)
    d.outb(2, 0x55)
    d.outb(3, 0xAA)
    assert (d.inb(2), d.inb(3)) == (0x55, 0xAA)
    # An empty channel floats.
    assert pio.read(0x170 + 7, 1) == 0xFF


def test_identify_words(disk: Path) -> None:
    _, ch, d, _ = rig(RawFileImage(disk))
    w = d.identify()
    sectors = (8 << 20) // 512
    assert w[0] == 0x0040
    assert ata_string(w[27:47]) == "boite test disk"
    assert ata_string(w[10:20]) == "BOITE-IDE-0"
    assert w[49] & 0x0200  # LBA
    assert w[60] | w[61] << 16 == sectors
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == sectors
    assert w[83] & 0x0400 and w[86] & 0x0400  # LBA48 supported and enabled
    assert w[83] & 0x2000  # FLUSH CACHE EXT
    assert w[47] & 0xFF == ata.MAX_MULTIPLE
    raw = struct.pack("<256H", *w)
    assert raw[510] == 0xA5 and sum(raw) & 0xFF == 0


def test_lba48_capacity_beyond_lba28(tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(200 << 30)  # sparse: 200 GiB > the 128 GiB LBA28 limit
    _, _, d, _ = rig(RawFileImage(big))
    w = d.identify()
    assert w[60] | w[61] << 16 == (1 << 28) - 1
    assert w[100] | w[101] << 16 | w[102] << 32 == (200 << 30) // 512
    # Write and read back the last sectors through LBA48.
    last = (200 << 30) // 512 - 4
    data = make_pattern(2048, seed=9)
    d.write(last, data, ext=True)
    assert d.read(last, 4, ext=True) == data
    with open(big, "rb") as f:
        f.seek(last * 512)
        assert f.read(2048) == data


@pytest.mark.parametrize("width", [2, 4])
def test_read_write_all_forms_checked_by_qemu_img(tmp_path: Path, disk: Path, width: int) -> None:
    image = RawFileImage(disk)
    _, ch, d, rec = rig(image, width=width)
    orig = disk.read_bytes()
    assert d.read(0, 1) == orig[:512]
    assert d.read(10, 300, ext=True) == orig[10 * 512 : 310 * 512]
    d.select(0)
    d.outb(2, 8)
    assert d.command(ata.CMD_SET_MULTIPLE) == ata.ST_DRDY | ata.ST_DSC
    assert d.read(100, 37, multi=8) == orig[100 * 512 : 137 * 512]
    assert True in rec.levels

    want = bytearray(orig)
    for lba, n, ext, multi in (
        (4, 3, False, 0),
        (1000, 40, True, 0),
        (2000, 19, False, 8),
        (3000, 9, True, 8),
    ):
        data = make_pattern(n * 512, seed=lba)
        d.write(lba, data, ext=ext, multi=multi)
        want[lba * 512 : (lba + n) * 512] = data
    assert d.command(ata.CMD_FLUSH_CACHE) == ata.ST_DRDY | ata.ST_DSC
    assert d.command(ata.CMD_FLUSH_CACHE_EXT) == ata.ST_DRDY | ata.ST_DSC
    image.close()
    expected = tmp_path / "want.raw"
    expected.write_bytes(want)
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), str(expected)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert ch.accesses > 0


def test_chs_addressing_after_initialize_device_parameters(disk: Path) -> None:
    _, _, d, _ = rig(RawFileImage(disk))
    orig = disk.read_bytes()
    d.outb(2, 32)  # 32 sectors per track
    d.outb(6, 0xA0 | 3)  # 4 heads
    assert d.command(ata.CMD_INITIALIZE_PARAMS) == ata.ST_DRDY | ata.ST_DSC
    # Cylinder 2, head 1, sector 5 -> LBA (2*4+1)*32 + 4 = 292.
    d.outb(2, 1)
    d.outb(3, 5)
    d.outb(4, 2)
    d.outb(5, 0)
    d.outb(6, 0xA0 | 1)
    d.outb(7, ata.CMD_READ_SECTORS)
    assert d.inb(7) & ata.ST_DRQ
    assert d.read_block(512) == orig[292 * 512 : 293 * 512]


def test_errors_abort_with_the_right_bits(disk: Path) -> None:
    _, _, d, _ = rig(RawFileImage(disk))
    sectors = (8 << 20) // 512
    d.taskfile(sectors - 1, 2, ext=False)
    st = d.command(ata.CMD_READ_SECTORS)
    assert st & ata.ST_ERR and d.inb(1) & ata.ER_IDNF
    assert d.command(0x00) & ata.ST_ERR and d.inb(1) == ata.ER_ABRT  # NOP
    assert d.command(ata.CMD_IDENTIFY_PACKET) & ata.ST_ERR
    d.outb(2, 3)  # not a power of two
    assert d.command(ata.CMD_SET_MULTIPLE) & ata.ST_ERR
    d.outb(2, 0)
    assert d.command(ata.CMD_SET_MULTIPLE) == ata.ST_DRDY | ata.ST_DSC
    d.taskfile(0, 1, ext=False)
    assert d.command(ata.CMD_READ_MULTIPLE) & ata.ST_ERR  # multiple mode disabled
    d.outb(1, 0x03)
    d.outb(2, 0x0C)  # PIO mode 4
    assert d.command(ata.CMD_SET_FEATURES) == ata.ST_DRDY | ata.ST_DSC
    d.outb(1, 0x03)
    d.outb(2, 0x45)  # UDMA 5: no DMA here
    assert d.command(ata.CMD_SET_FEATURES) & ata.ST_ERR
    # The data port is inert when no transfer is running.
    assert d.pio.read(0x1F0, 2) == 0xFFFF
    d.pio.write(0x1F0, 2, 0x1234)
    assert d.read(0, 1) == disk.read_bytes()[:512]


def test_read_only_drive_refuses_writes(disk: Path) -> None:
    before = disk.read_bytes()
    _, _, d, _ = rig(RawFileImage(disk, read_only=True))
    d.taskfile(0, 1, ext=False)
    assert d.command(ata.CMD_WRITE_SECTORS) & ata.ST_ERR
    assert disk.read_bytes() == before


def test_nien_masks_the_interrupt_and_status_read_acks_it(disk: Path) -> None:
    pio, ch, d, rec = rig(RawFileImage(disk))
    pio.write(0x3F6, 1, 0)
    d.taskfile(0, 1, ext=False)
    d.outb(7, ata.CMD_READ_SECTORS)
    assert ch.irq.level
    d.alt()
    assert ch.irq.level  # alternate status does not acknowledge
    d.inb(7)
    assert not ch.irq.level
    d.read_block(512)
    pio.write(0x3F6, 1, ata.CTL_NIEN)
    d.taskfile(0, 1, ext=False)
    d.outb(7, ata.CMD_READ_SECTORS)
    assert not ch.irq.level and ch.irq_pending
    pio.write(0x3F6, 1, 0)  # unmasking delivers the pending interrupt
    assert ch.irq.level


def test_state_round_trip_mid_transfer(disk: Path) -> None:
    pio, ch, d, _ = rig(RawFileImage(disk), width=4)
    orig = disk.read_bytes()
    d.taskfile(50, 4, ext=True)
    d.outb(7, ata.CMD_READ_SECTORS_EXT)
    first = d.read_block(512 + 256)
    state = ch.save_state()
    # A new channel loaded from the state finishes the transfer.
    pio2 = Bus("pio")
    ch2 = AtaChannel(IrqLine(14), AtaDrive(RawFileImage(disk)))
    ch2.register(pio2)
    ch2.load_state(state)
    assert ch2.save_state() == state
    d2 = AtaPio(pio2, width=4)
    rest = d2.read_block(256)
    for _ in range(2):
        assert d2.inb(7) & ata.ST_DRQ
        rest += d2.read_block(512)
    assert first + rest == orig[50 * 512 : 54 * 512]


def test_string_io_matches_single_accesses(disk: Path) -> None:
    _, ch, d, _ = rig(RawFileImage(disk))
    orig = disk.read_bytes()
    d.taskfile(7, 3, ext=False)
    d.outb(7, ata.CMD_READ_SECTORS)
    assert ch.read_string(0, 2, 768) == orig[7 * 512 : 10 * 512]
    data = make_pattern(1024, seed=11)
    d.taskfile(20, 2, ext=False)
    d.outb(7, ata.CMD_WRITE_SECTORS)
    ch.write_string(0, 4, data)
    assert d.inb(7) == ata.ST_DRDY | ata.ST_DSC
    assert disk.read_bytes()[20 * 512 : 22 * 512] == data


def test_controller_puts_both_channels_on_their_ports(disk: Path, tmp_path: Path) -> None:
    other = tmp_path / "slave.raw"
    other.write_bytes(make_pattern(1 << 20, seed=2))
    router = IrqRouter()
    ctl = AtaController(
        router.line,
        {(0, 0): AtaDrive(RawFileImage(disk)), (1, 1): AtaDrive(RawFileImage(other))},
    )
    pio = Bus("pio")
    ctl.register(pio)
    assert ctl.channels[0].irq.gsi == 14 and ctl.channels[1].irq.gsi == 15
    sec = AtaPio(pio, 0x170, 0x376)
    sec.select(1)
    assert sec.inb(7) == ata.ST_DRDY | ata.ST_DSC
    sec.outb(2, 1)
    sec.outb(3, 3)
    sec.outb(4, 0)
    sec.outb(5, 0)
    sec.outb(6, 0xF0)
    sec.outb(7, ata.CMD_READ_SECTORS)
    assert sec.inb(7) & ata.ST_DRQ
    assert sec.read_block(512) == other.read_bytes()[3 * 512 : 4 * 512]
    assert ctl.accesses > 0
