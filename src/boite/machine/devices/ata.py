"""A fully emulated ATA (IDE) disk controller on the legacy PC ports, PIO, with ATAPI.

Every byte the guest moves goes through the 16- or 32-bit data register, one emulated
access at a time: the opposite of virtio, and the reason to measure both. Enough of
ATA/ATAPI-6 for Linux's libata (pata_legacy, ata_generic) and the old ide driver:
signature after reset, IDENTIFY DEVICE, READ/WRITE SECTORS (and MULTIPLE, and the LBA48
EXT forms), FLUSH CACHE, SET FEATURES, SET MULTIPLE MODE, INITIALIZE DEVICE PARAMETERS.

ATAPI drives (devices/atapi.py) sit on the same channels: the packet signature, IDENTIFY
PACKET DEVICE and PACKET, with the data moved by PIO in pieces of the byte count limit.
The PCI function around the channels (bus-master registers, the PCI identity) is
devices/ide.py.

Ports (a channel answers both ranges): primary 0x1f0-0x1f7 + 0x3f6 on IRQ 14, secondary
0x170-0x177 + 0x376 on IRQ 15.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

from boite.disk.base import SECTOR, BlockImage
from boite.errors import BoiteError, CheckpointError
from boite.machine.bus import Bus
from boite.machine.device import Device, StatelessDevice
from boite.machine.devices.atapi import CD_SECTOR, MAX_READ_SECTORS, AtapiDrive, CheckCondition
from boite.machine.irq import IrqLine
from boite.machine.machine import IoRange
from boite.machine.state import (
    Int,
    Items,
    Nested,
    Optional,
    StateRecord,
    choice,
    data,
    flag,
    items,
    optional,
    span,
    uint,
)

log = logging.getLogger("boite.ata")


def _is_atapi(drive: Any) -> bool:
    return isinstance(drive, AtapiDrive)


PRIMARY = (0x1F0, 0x3F6, 14)
SECONDARY = (0x170, 0x376, 15)

# Status register.
ST_BSY = 0x80
ST_DRDY = 0x40
ST_DF = 0x20
ST_DSC = 0x10
ST_DRQ = 0x08
ST_ERR = 0x01
# Error register.
ER_UNC = 0x40
ER_IDNF = 0x10
ER_ABRT = 0x04
# Device control register.
CTL_NIEN = 0x02
CTL_SRST = 0x04
CTL_HOB = 0x80
# Device register.
DEV_LBA = 0x40
DEV_SLAVE = 0x10

# Commands.
CMD_DEVICE_RESET = 0x08
CMD_RECALIBRATE = 0x10
CMD_READ_SECTORS = 0x20
CMD_READ_SECTORS_NORETRY = 0x21
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_NATIVE_MAX_EXT = 0x27
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS = 0x30
CMD_WRITE_SECTORS_NORETRY = 0x31
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_READ_VERIFY = 0x40
CMD_READ_VERIFY_NORETRY = 0x41
CMD_READ_VERIFY_EXT = 0x42
CMD_EXECUTE_DIAGNOSTIC = 0x90
CMD_INITIALIZE_PARAMS = 0x91
CMD_IDENTIFY_PACKET = 0xA1
CMD_PACKET = 0xA0
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE = 0xC6
CMD_STANDBY_IMMEDIATE = 0xE0
CMD_IDLE_IMMEDIATE = 0xE1
CMD_STANDBY = 0xE2
CMD_IDLE = 0xE3
CMD_CHECK_POWER_MODE = 0xE5
CMD_FLUSH_CACHE = 0xE7
CMD_IDENTIFY = 0xEC
CMD_FLUSH_CACHE_EXT = 0xEA
CMD_SET_FEATURES = 0xEF
CMD_READ_NATIVE_MAX = 0xF8

MAX_MULTIPLE = 16  # sectors per DRQ block for READ/WRITE MULTIPLE
LBA28_MAX = (1 << 28) - 1


def _ata_string(text: str, length: int) -> list[int]:
    """ATA strings: space padded, two characters per word, first one in the high byte."""
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, length, 2)]


class AtaDrive:
    """One ATA disk (master or slave) on a BlockImage."""

    def __init__(
        self,
        image: BlockImage,
        *,
        model: str = "boite ATA disk",
        serial: str = "BOITE0000000001",
        firmware: str = "1.0",
        read_only: bool | None = None,
    ) -> None:
        self.image = image
        self.model = model
        self.serial = serial
        self.firmware = firmware
        self.read_only = bool(image.read_only if read_only is None else read_only)
        # Set when the channel sits on a PCI IDE function with bus mastering: IDENTIFY
        # then offers multiword DMA 0-2 and Ultra DMA 0-5, and the DMA commands work.
        self.dma_capable = False
        self.sectors = image.size // SECTOR
        # Default translation (what BIOSes report): 16 heads, 63 sectors per track.
        self.cylinders = max(1, min(16383, self.sectors // (16 * 63)))
        self.reset()

    def reset(self) -> None:
        self.heads = 16
        self.spt = 63
        self.multi_count = MAX_MULTIPLE
        self.write_cache = True
        self.status = ST_DRDY | ST_DSC
        self.error = 0x01  # "no error detected" after a diagnostic
        self.dma_mode = 0  # SET FEATURES' transfer mode: 0x20-0x22 MWDMA, 0x40-0x45 UDMA
        self.sense = (0, 0, 0)  # an ATAPI drive's; kept so both kinds save alike

    def identify(self) -> bytes:
        w = [0] * 256
        w[0] = 0x0040  # fixed disk, not removable
        w[1] = self.cylinders
        w[3] = 16
        w[6] = 63
        w[10:20] = _ata_string(self.serial, 20)
        w[23:27] = _ata_string(self.firmware, 8)
        w[27:47] = _ata_string(self.model, 40)
        w[47] = 0x8000 | MAX_MULTIPLE
        w[49] = 0x0200 | 0x0800 | 0x0400  # LBA, IORDY supported, IORDY may be disabled
        w[50] = 0x4000
        w[51] = 0x0200  # PIO timing mode 2
        w[53] = 0x0006  # words 64-70 and 88 are valid
        cur_cyl = max(1, min(65535, self.sectors // (self.heads * self.spt))) if self.spt else 0
        w[54] = cur_cyl
        w[55] = self.heads
        w[56] = self.spt
        chs = min(cur_cyl * self.heads * self.spt, 0xFFFFFFFF)
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[59] = (0x0100 | self.multi_count) if self.multi_count else 0
        lba28 = min(self.sectors, LBA28_MAX)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[64] = 0x0003  # PIO modes 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120  # cycle times (ns)
        w[80] = 0x007E  # ATA-1 .. ATA-6
        w[82] = 0x4000 | 0x0020  # NOP, write cache
        w[83] = 0x4000 | 0x2000 | 0x1000 | 0x0400  # FLUSH EXT, FLUSH, LBA48
        w[84] = 0x4000
        w[85] = 0x4000 | (0x0020 if self.write_cache else 0)
        w[86] = 0x2000 | 0x1000 | 0x0400
        w[87] = 0x4000
        for i in range(4):
            w[100 + i] = (self.sectors >> (16 * i)) & 0xFFFF
        if self.dma_capable:
            w[49] |= 0x0100  # DMA
            w[53] |= 0x0004  # word 88 valid
            w[63] = 0x0007 | (
                (1 << (8 + self.dma_mode - 0x20)) if 0x20 <= self.dma_mode <= 0x22 else 0
            )
            w[88] = 0x003F | (
                (1 << (8 + self.dma_mode - 0x40)) if 0x40 <= self.dma_mode <= 0x45 else 0
            )
        data = bytearray(b"".join(v.to_bytes(2, "little") for v in w))
        # Integrity word: signature A5h, and a checksum making all 512 bytes sum to 0.
        data[510] = 0xA5
        data[511] = (-sum(data[:511])) & 0xFF
        return bytes(data)


@dataclass(frozen=True)
class AtaDriveState(StateRecord):
    heads: int = span(1, 16)
    spt: int = uint(8)
    multi_count: int = choice(0, *(1 << n for n in range(MAX_MULTIPLE.bit_length())))
    write_cache: bool = flag()
    status: int = uint(8)
    error: int = uint(8)
    dma_mode: int = choice(0, 0x20, 0x21, 0x22, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45)
    sense: tuple[int, ...] = items(Int(0, 0xFF), max_len=3, exact=3)  # ATAPI: key, ASC, ASCQ


@dataclass(frozen=True)
class AtaChannelState(StateRecord):
    """A channel's task file (each register and its HOB copy), the PIO transfer in
    progress (its buffer: one DRQ block) and the drives' settings."""

    VERSION = 2  # 2: the ATAPI packet transfer and the pending bus-master DMA command
    devctl: int = uint(8)
    device: int = uint(8)
    feature: int = uint(8)
    hob_feature: int = uint(8)
    nsect: int = uint(8)
    hob_nsect: int = uint(8)
    lbal: int = uint(8)
    hob_lbal: int = uint(8)
    lbam: int = uint(8)
    hob_lbam: int = uint(8)
    lbah: int = uint(8)
    hob_lbah: int = uint(8)
    irq_pending: bool = flag()
    in_reset: bool = flag()
    xfer: str = choice("", "read", "write")
    xfer_lba: int = uint(48)
    xfer_left: int = span(0, 1 << 16)  # LBA48 counts up to 65536 sectors
    xfer_block: int = span(1, MAX_MULTIPLE)
    xfer_pos: int = span(0, MAX_MULTIPLE * SECTOR)
    xfer_drive: int = span(0, 1)
    buffer: bytes = data(max_len=MAX_MULTIPLE * SECTOR)
    drives: tuple[AtaDriveState | None, ...] = items(
        Optional(Nested(AtaDriveState)), max_len=2, exact=2
    )
    sig_pending: bool = flag()
    atapi_packet: bool = flag()  # the buffer holds the 12-byte command being written
    atapi_limit: int = uint(16)
    atapi_pos: int = span(0, MAX_READ_SECTORS * CD_SECTOR)
    atapi_data: bytes = data(max_len=MAX_READ_SECTORS * CD_SECTOR)
    dma_op: tuple[int, ...] | None = optional(Items(Int(0, (1 << 48) - 1), max_len=4, exact=4))

    def validate(self) -> None:
        if self.atapi_packet or self.atapi_data:  # packet or a piece of an ATAPI reply
            if self.xfer and self.xfer_pos >= len(self.buffer):
                raise self.invalid("xfer_pos", "outside the ATAPI buffer")
            if self.atapi_pos > len(self.atapi_data):
                raise self.invalid("atapi_pos", "past the reply")
            return
        if not self.xfer:
            if self.buffer or self.xfer_pos:
                raise self.invalid("buffer", "data without a transfer in progress")
            return
        if not self.buffer or len(self.buffer) % SECTOR:
            raise self.invalid("buffer", f"{len(self.buffer)} bytes is not whole sectors")
        if self.xfer_pos >= len(self.buffer):
            raise self.invalid(
                "xfer_pos", f"{self.xfer_pos} is not inside the {len(self.buffer)}-byte block"
            )
        if len(self.buffer) > self.xfer_left * SECTOR:
            raise self.invalid("xfer_left", f"{self.xfer_left} sectors left, the block holds more")


class AtaControl(StatelessDevice):
    """The channel's control block register (alternate status / device control)."""

    name = "ata-control"

    def __init__(self, channel: AtaChannel) -> None:
        self.channel = channel

    def bus_read(self, offset: int, size: int) -> int:
        self.channel.accesses += 1
        return self.channel.alt_status()

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.channel.accesses += 1
        self.channel.write_control(value & 0xFF)


class AtaChannel(Device):
    """One IDE channel: a command block, a control register, up to two drives, one IRQ."""

    name = "ata"

    def __init__(
        self,
        irq: IrqLine,
        master: AtaDrive | None = None,
        slave: AtaDrive | None = None,
        *,
        cmd_base: int = PRIMARY[0],
        ctl_port: int = PRIMARY[1],
    ) -> None:
        self.irq = irq
        self.drives: list[AtaDrive | None] = [master, slave]
        self.cmd_base = cmd_base
        self.ctl_port = ctl_port
        self.control = AtaControl(self)
        # Emulated register accesses (the benchmark's "exits").
        self.accesses = 0
        self.reset()

    def port_ranges(self) -> list[IoRange]:
        """The command block (8 ports) and the control register, for Machine.attach."""
        return [
            IoRange(self.cmd_base, 8, handler=self),
            IoRange(self.ctl_port, 1, handler=self.control),
        ]

    def register(self, pio: Bus) -> None:
        for r in self.port_ranges():
            pio.register(r.base, r.length, r.handler or self)

    def close(self) -> None:
        """Power-off: flush and close the drives' images (safe twice)."""
        for d in self.drives:
            if d is not None:
                d.image.close()

    # --- Device ---------------------------------------------------------------------
    def reset(self) -> None:
        self.devctl = 0
        self.device = 0xA0  # bits 7 and 5 are obsolete ones that old drivers set
        self.feature = self.hob_feature = 0
        self.nsect = self.hob_nsect = 0
        self.lbal = self.hob_lbal = 0
        self.lbam = self.hob_lbam = 0
        self.lbah = self.hob_lbah = 0
        self.irq_pending = False
        self.in_reset = False
        self.sig_pending = True
        self._end_transfer()
        for d in self.drives:
            if d is not None:
                d.reset()
        self._signature()
        self.irq.lower()

    def save_state(self) -> dict[str, Any]:
        drives = tuple(None if d is None else AtaDriveState.of(d) for d in self.drives)
        op = None if self.dma_op is None else tuple(self.dma_op)
        return AtaChannelState.of(
            self,
            buffer=bytes(self.buffer),
            drives=drives,
            atapi_data=bytes(self.atapi_data),
            dma_op=op,
        ).to_dict()

    def check_state(self, state: Any) -> AtaChannelState:
        rec = AtaChannelState.from_dict(state)
        for unit, (drive, saved) in enumerate(zip(self.drives, rec.drives, strict=True)):
            if (drive is None) != (saved is None):
                had = "no drive" if saved is None else "a drive"
                raise CheckpointError(
                    f"drives[{unit}]: the state has {had} where this channel has "
                    f"{'none' if drive is None else 'one'}"
                )
        if rec.xfer:
            drive = self.drives[rec.xfer_drive]
            if drive is None:
                raise CheckpointError(f"xfer_drive: a transfer with drive {rec.xfer_drive}, absent")
            if rec.xfer_lba + rec.xfer_left > max(drive.sectors, 1):
                raise CheckpointError(
                    f"xfer_lba: sectors {rec.xfer_lba}+{rec.xfer_left} run past the disk's "
                    f"{drive.sectors}"
                )
        if rec.dma_op is not None:
            write, lba, count, unit = rec.dma_op
            drive = self.drives[unit] if unit in (0, 1) else None
            if drive is None or _is_atapi(drive) or lba + count > drive.sectors or write > 1:
                raise CheckpointError(
                    f"dma_op: {list(rec.dma_op)} names no DMA this channel can do"
                )
        return rec

    def apply_state(self, rec: AtaChannelState) -> None:
        rec.put(self, "buffer", "drives", "dma_op")
        self.buffer = bytearray(rec.buffer)
        self.dma_op = None if rec.dma_op is None else list(rec.dma_op)
        for d, ds in zip(self.drives, rec.drives, strict=True):
            if d is not None and ds is not None:
                ds.put(d)
        self.irq.set(self.irq_pending and not self.devctl & CTL_NIEN)

    # --- helpers --------------------------------------------------------------------
    @property
    def selected(self) -> int:
        return 1 if self.device & DEV_SLAVE else 0

    def _drive(self) -> AtaDrive | None:
        return self.drives[self.selected]

    def _signature(self) -> None:
        """What a drive leaves in the task file after reset or diagnostic: 'I am ATA'
        (LBA mid/high 0, 0) or 'I am ATAPI' (0x14, 0xEB). The task file is one per
        channel here, so until the next command the signature follows the selection."""
        self.device = 0
        self._show_signature()
        self.sig_pending = True
        for d in self.drives:
            if d is not None:
                d.error = 0x01
                d.status = ST_DRDY | ST_DSC if not _is_atapi(d) else 0

    def _show_signature(self) -> None:
        d = self._drive()
        self.nsect = self.lbal = 1
        self.lbam, self.lbah = (0x14, 0xEB) if _is_atapi(d) else (0, 0)

    def _end_transfer(self) -> None:
        self.xfer = ""
        self.xfer_lba = 0
        self.xfer_left = 0
        self.xfer_block = 1
        self.xfer_pos = 0
        self.xfer_drive = 0
        self.buffer = bytearray()
        self.atapi_data = b""
        self.atapi_limit = 0
        self.atapi_pos = 0
        self.atapi_packet = False
        self.dma_op: list[int] | None = None  # [write, lba, count, drive] awaiting the engine

    def _raise_irq(self) -> None:
        self.irq_pending = True
        if not self.devctl & CTL_NIEN:
            self.irq.raise_()

    def _done(self, drive: AtaDrive, status: int = ST_DRDY | ST_DSC) -> None:
        drive.status = status
        drive.error = 0
        self._raise_irq()

    def _abort(self, drive: AtaDrive, error: int = ER_ABRT) -> None:
        self._end_transfer()
        drive.status = ST_DRDY | ST_DSC | ST_ERR
        drive.error = error
        self._raise_irq()

    def alt_status(self) -> int:
        # While SRST is asserted every device on the channel resets: device 0 shows BSY
        # whichever device the host had selected (the reset clears the selection too).
        if self.in_reset and any(self.drives):
            return ST_BSY
        d = self._drive()
        if d is None:
            return 0 if any(self.drives) else 0xFF
        return d.status

    def write_control(self, value: int) -> None:
        was_reset = self.devctl & CTL_SRST
        self.devctl = value
        if value & CTL_SRST and not was_reset:
            self.in_reset = True
            self._end_transfer()
            self.irq_pending = False
            self.irq.lower()
        elif was_reset and not value & CTL_SRST:
            self.in_reset = False
            for d in self.drives:
                if d is not None:
                    d.reset()
            self._signature()
        if value & CTL_NIEN:
            self.irq.lower()
        elif self.irq_pending:
            self.irq.raise_()

    # --- the command block ----------------------------------------------------------
    def bus_read(self, offset: int, size: int) -> int:
        self.accesses += 1
        if offset == 0:
            return self._read_data(size)
        d = self._drive()
        if d is None:
            return 0 if any(self.drives) else 0xFF
        hob = bool(self.devctl & CTL_HOB)
        if offset == 1:
            return d.error
        if offset == 2:
            return self.hob_nsect if hob else self.nsect
        if offset == 3:
            return self.hob_lbal if hob else self.lbal
        if offset == 4:
            return self.hob_lbam if hob else self.lbam
        if offset == 5:
            return self.hob_lbah if hob else self.lbah
        if offset == 6:
            return self.device
        # Reading the status register acknowledges the interrupt.
        status = self.alt_status()
        if self.irq_pending:
            self.irq_pending = False
            self.irq.lower()
        return status

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        if offset == 0:
            self._write_data(size, value)
            return
        value &= 0xFF
        if self.in_reset:
            return
        # Any task file write clears HOB; each register keeps its previous value for LBA48.
        self.devctl &= ~CTL_HOB
        if offset != 6:
            self.sig_pending = False  # the host is setting up a command: keep its values
        if offset == 1:
            self.hob_feature, self.feature = self.feature, value
        elif offset == 2:
            self.hob_nsect, self.nsect = self.nsect, value
        elif offset == 3:
            self.hob_lbal, self.lbal = self.lbal, value
        elif offset == 4:
            self.hob_lbam, self.lbam = self.lbam, value
        elif offset == 5:
            self.hob_lbah, self.lbah = self.lbah, value
        elif offset == 6:
            self.device = value
            if self.sig_pending:
                self._show_signature()
        else:
            self._command(value)

    # --- data register --------------------------------------------------------------
    def _read_data(self, size: int) -> int:
        if self.xfer != "read":
            return 0xFFFFFFFF >> (32 - 8 * size) if size < 4 else 0xFFFFFFFF
        pos = self.xfer_pos
        value = int.from_bytes(self.buffer[pos : pos + size], "little")
        self.xfer_pos = pos + size
        if self.xfer_pos >= len(self.buffer):
            self._read_block_done()
        return value

    def _write_data(self, size: int, value: int) -> None:
        if self.xfer != "write":
            return
        pos = self.xfer_pos
        n = min(size, len(self.buffer) - pos)
        self.buffer[pos : pos + n] = value.to_bytes(size, "little")[:n]
        self.xfer_pos = pos + n
        if self.xfer_pos >= len(self.buffer):
            self._write_block_done()

    def read_string(self, offset: int, size: int, count: int) -> bytes:
        """`rep insw/insd` in one call (an accelerator's string-I/O exit); same semantics."""
        if offset != 0 or self.xfer != "read":
            return b"".join(
                self.bus_read(offset, size).to_bytes(size, "little") for _ in range(count)
            )
        out = bytearray()
        want = size * count
        while len(out) < want and self.xfer == "read":
            n = min(want - len(out), len(self.buffer) - self.xfer_pos)
            out += self.buffer[self.xfer_pos : self.xfer_pos + n]
            self.xfer_pos += n
            self.accesses += n // size
            if self.xfer_pos >= len(self.buffer):
                self._read_block_done()
        if len(out) < want:  # past the transfer: what _read_data answers, as many accesses
            self.accesses += (want - len(out)) // size
            out += b"\xff" * (want - len(out))
        return bytes(out)

    def write_string(self, offset: int, size: int, data: bytes) -> None:
        """`rep outsw/outsd` in one call."""
        if offset != 0 or self.xfer != "write":
            for i in range(0, len(data) - size + 1, size):
                self.bus_write(offset, size, int.from_bytes(data[i : i + size], "little"))
            return
        pos = 0
        while pos < len(data) and self.xfer == "write":
            n = min(len(data) - pos, len(self.buffer) - self.xfer_pos)
            self.buffer[self.xfer_pos : self.xfer_pos + n] = data[pos : pos + n]
            self.xfer_pos += n
            pos += n
            self.accesses += n // size
            if self.xfer_pos >= len(self.buffer):
                self._write_block_done()

    def _read_block_done(self) -> None:
        if self.atapi_data:
            self._atapi_next()
            return
        n = len(self.buffer) // SECTOR
        self.xfer_lba += n
        self.xfer_left -= n
        if self.xfer_left > 0:
            self._load_read_block()
        else:
            drive = self.drives[self.xfer_drive]
            self._end_transfer()
            if drive is not None:
                drive.status = ST_DRDY | ST_DSC

    def _write_block_done(self) -> None:
        drive = self.drives[self.xfer_drive]
        assert drive is not None
        if self.atapi_packet:
            self._atapi_run(drive, bytes(self.buffer))
            return
        try:
            drive.image.write(self.xfer_lba * SECTOR, bytes(self.buffer))
        except (OSError, BoiteError) as e:
            log.warning("ata: write at LBA %d failed: %s", self.xfer_lba, e)
            self._abort(drive, ER_ABRT)
            return
        n = len(self.buffer) // SECTOR
        self.xfer_lba += n
        self.xfer_left -= n
        if self.xfer_left > 0:
            self._prepare_write_block(drive)
            self._raise_irq()
        else:
            self._end_transfer()
            self._done(drive)

    def _load_read_block(self) -> None:
        drive = self.drives[self.xfer_drive]
        assert drive is not None
        n = min(self.xfer_block, self.xfer_left)
        buf = bytearray(n * SECTOR)
        try:
            drive.image.read_into(self.xfer_lba * SECTOR, buf)
        except (OSError, BoiteError) as e:
            log.warning("ata: read at LBA %d failed: %s", self.xfer_lba, e)
            self._abort(drive, ER_UNC)
            return
        self.buffer = buf
        self.xfer_pos = 0
        drive.status = ST_DRDY | ST_DSC | ST_DRQ
        drive.error = 0
        self._raise_irq()

    def _prepare_write_block(self, drive: AtaDrive) -> None:
        n = min(self.xfer_block, self.xfer_left)
        self.buffer = bytearray(n * SECTOR)
        self.xfer_pos = 0
        drive.status = ST_DRDY | ST_DSC | ST_DRQ
        drive.error = 0

    # --- commands -------------------------------------------------------------------
    def _lba_count(self, drive: AtaDrive, ext: bool) -> tuple[int, int] | None:
        if ext:
            lba = (
                self.hob_lbah << 40
                | self.hob_lbam << 32
                | self.hob_lbal << 24
                | self.lbah << 16
                | self.lbam << 8
                | self.lbal
            )
            count = (self.hob_nsect << 8 | self.nsect) or 65536
        else:
            count = self.nsect or 256
            if self.device & DEV_LBA:
                lba = (self.device & 0x0F) << 24 | self.lbah << 16 | self.lbam << 8 | self.lbal
            else:
                cyl, head, sector = self.lbah << 8 | self.lbam, self.device & 0x0F, self.lbal
                if sector == 0 or sector > drive.spt or head >= drive.heads:
                    return None
                lba = (cyl * drive.heads + head) * drive.spt + sector - 1
        if lba + count > drive.sectors:
            return None
        return lba, count

    def _command(self, cmd: int) -> None:
        drive = self._drive()
        if drive is None:
            return  # nobody answers; the guest sees status 0 and times out
        self.irq_pending = False
        self.irq.lower()
        self._end_transfer()
        self.sig_pending = False
        if _is_atapi(drive):
            self._atapi_command(drive, cmd)
        elif cmd in _RW_COMMANDS:
            self._read_write(drive, cmd, *_RW_COMMANDS[cmd])
        elif cmd in _DMA_COMMANDS:
            write, ext = _DMA_COMMANDS[cmd]
            where = self._lba_count(drive, ext)
            if not drive.dma_capable or (write and drive.read_only):
                self._abort(drive)
            elif where is None:
                self._abort(drive, ER_IDNF)
            else:
                # The data moves when the host starts the bus-master engine (run_dma).
                self.dma_op = [int(write), where[0], where[1], self.selected]
                drive.status = ST_DRDY | ST_DSC | ST_DRQ
                drive.error = 0
        elif cmd == CMD_IDENTIFY:
            self._send_identify(drive, drive.identify())
        elif cmd in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            try:
                if not drive.read_only:
                    drive.image.flush()
            except (OSError, BoiteError) as e:
                log.warning("ata: flush failed: %s", e)
                self._abort(drive)
                return
            self._done(drive)
        elif cmd == CMD_SET_MULTIPLE:
            n = self.nsect
            if n > MAX_MULTIPLE or n & (n - 1):
                self._abort(drive)
                return
            drive.multi_count = n
            self._done(drive)
        elif cmd == CMD_SET_FEATURES:
            self._set_features(drive)
        elif cmd == CMD_INITIALIZE_PARAMS:
            if self.nsect == 0:
                self._abort(drive)
                return
            drive.heads = (self.device & 0x0F) + 1
            drive.spt = self.nsect
            self._done(drive)
        elif cmd in (CMD_READ_VERIFY, CMD_READ_VERIFY_NORETRY, CMD_READ_VERIFY_EXT):
            if self._lba_count(drive, cmd == CMD_READ_VERIFY_EXT) is None:
                self._abort(drive, ER_IDNF)
            else:
                self._done(drive)
        elif cmd == CMD_EXECUTE_DIAGNOSTIC:
            self._signature()
            self.irq_pending = False
            self._raise_irq()
        elif cmd == CMD_CHECK_POWER_MODE:
            self.nsect = 0xFF  # active or idle
            self._done(drive)
        elif cmd in (CMD_READ_NATIVE_MAX, CMD_READ_NATIVE_MAX_EXT):
            top = drive.sectors - 1
            if cmd == CMD_READ_NATIVE_MAX:
                top = min(top, LBA28_MAX)
                self.device = (self.device & 0xF0) | (top >> 24 & 0x0F)
            else:
                self.hob_lbal, self.hob_lbam, self.hob_lbah = (
                    top >> 24 & 0xFF,
                    top >> 32 & 0xFF,
                    top >> 40 & 0xFF,
                )
            self.lbal, self.lbam, self.lbah = top & 0xFF, top >> 8 & 0xFF, top >> 16 & 0xFF
            self._done(drive)
        elif CMD_RECALIBRATE <= cmd <= 0x1F or cmd in (
            CMD_STANDBY_IMMEDIATE,
            CMD_IDLE_IMMEDIATE,
            CMD_STANDBY,
            CMD_IDLE,
        ):
            self._done(drive)
        else:
            # IDENTIFY PACKET, DEVICE RESET (packet only), DMA, SMART, ...: not this disk.
            self._abort(drive)

    def _send_identify(self, drive: Any, data: bytes) -> None:
        """One 512-byte block for the host to read (IDENTIFY [PACKET] DEVICE)."""
        self.buffer = bytearray(data)
        self.xfer, self.xfer_left, self.xfer_block = "read", 1, 1
        self.xfer_drive = self.selected
        drive.status = ST_DRDY | ST_DSC | ST_DRQ
        drive.error = 0
        self._raise_irq()

    # --- bus-master DMA -------------------------------------------------------------
    def run_dma(self, memory: Any, prd_table: int, to_memory: bool) -> tuple[bool, bool]:
        """The bus-master engine started: move the pending DMA command's sectors through
        the PRD table at `prd_table` (entries: u32 address, u16 byte count with 0 =
        64 KiB, bit 15 of the last word = end of table). Returns (ok, table longer than
        the transfer). A table outside RAM, a short table or a wrong direction fail the
        command with ABRT; the interrupt is raised either way."""
        op = self.dma_op
        if op is None:
            return False, False
        self.dma_op = None
        write, lba, count, unit = op
        drive = self.drives[unit]
        if drive is None:
            return False, False
        if bool(write) == to_memory:
            self._abort(drive)
            return False, False
        left = count * SECTOR
        pos = lba * SECTOR
        entry = prd_table & ~3
        try:
            for _ in range(8192):  # a PRD table is at most 64 KiB of 8-byte entries
                addr, length, flags = struct.unpack("<IHH", memory.read(entry, 8))
                length = length or 0x10000
                n = min(length, left)
                if n:
                    if write:
                        drive.image.write(pos, memory.read(addr & ~1, n))
                    else:
                        buf = bytearray(n)
                        drive.image.read_into(pos, buf)
                        memory.write(addr & ~1, buf)
                    pos += n
                    left -= n
                entry += 8
                if left == 0 or flags & 0x8000:
                    longer = left == 0 and not (flags & 0x8000 and n == length)
                    break
            else:
                longer = False
        except (OSError, BoiteError) as e:  # GuestError (table or buffer outside RAM) too
            log.warning("ata: DMA at LBA %d failed: %s", lba, e)
            self._abort(drive, ER_ABRT)
            return False, False
        if left:
            self._abort(drive, ER_ABRT)
            return False, False
        self._done(drive)
        return True, longer

    # --- ATAPI ------------------------------------------------------------------------
    def _atapi_command(self, drive: Any, cmd: int) -> None:
        if cmd == CMD_IDENTIFY_PACKET:
            self._send_identify(drive, drive.identify_packet())
        elif cmd == CMD_PACKET:
            if self.feature & 1:  # DMA requested: this drive moves data by PIO only
                self._abort(drive)
                return
            limit = self.lbam | self.lbah << 8
            self.atapi_limit = (limit or 0xFFFE) & ~1
            self.atapi_packet = True
            self.xfer = "write"
            self.xfer_drive = self.selected
            self.buffer = bytearray(12)
            self.xfer_pos = 0
            self.nsect = 0x01  # CoD: the host sends the command packet
            drive.status = ST_DRDY | ST_DSC | ST_DRQ
            drive.error = 0
        elif cmd == CMD_DEVICE_RESET:
            drive.reset()
            self._signature()
        elif cmd == CMD_IDENTIFY:
            self._show_signature()  # "I am ATAPI": the host should use IDENTIFY PACKET
            self._abort(drive)
        elif cmd in (CMD_EXECUTE_DIAGNOSTIC,):
            self._signature()
            self._raise_irq()
        elif cmd in (CMD_SET_FEATURES, CMD_CHECK_POWER_MODE, CMD_IDLE_IMMEDIATE, CMD_STANDBY_IMMEDIATE,
                     CMD_FLUSH_CACHE):  # fmt: skip
            self._done(drive)
        else:
            self._abort(drive)

    def _atapi_run(self, drive: Any, cdb: bytes) -> None:
        limit = self.atapi_limit
        self._end_transfer()
        try:
            data = drive.execute(cdb)
        except CheckCondition as c:
            self.nsect = 0x03  # IO + CoD: command complete
            drive.status = ST_DRDY | ST_DSC | ST_ERR
            drive.error = c.sense[0] << 4 | 0x04
            self._raise_irq()
            return
        if not data:
            self._atapi_complete(drive)
            return
        self.atapi_data = data
        self.atapi_limit = limit or 0xFFFE
        self.atapi_pos = 0
        self.xfer_drive = self.selected
        self._atapi_next()

    def _atapi_next(self) -> None:
        drive = self.drives[self.xfer_drive]
        assert drive is not None
        if self.atapi_pos >= len(self.atapi_data):
            self._end_transfer()
            self._atapi_complete(drive)
            return
        limit = self.atapi_limit
        chunk = self.atapi_data[self.atapi_pos : self.atapi_pos + limit]
        self.atapi_pos += len(chunk)
        self.buffer = bytearray(chunk)
        self.xfer = "read"
        self.xfer_pos = 0
        self.lbam, self.lbah = len(chunk) & 0xFF, len(chunk) >> 8
        self.nsect = 0x02  # IO: data to the host
        drive.status = ST_DRDY | ST_DSC | ST_DRQ
        drive.error = 0
        self._raise_irq()

    def _atapi_complete(self, drive: Any) -> None:
        self.nsect = 0x03
        drive.status = ST_DRDY | ST_DSC
        drive.error = 0
        self._raise_irq()

    def _set_features(self, drive: AtaDrive) -> None:
        sub = self.feature
        if sub == 0x02:
            drive.write_cache = True
        elif sub == 0x82:
            drive.write_cache = False
        elif sub == 0x03:
            mode = self.nsect
            # PIO default / PIO flow-control modes 0-4; MWDMA 0-2 and UDMA 0-5 where the
            # channel has a bus-master engine.
            dma = 0x20 <= mode <= 0x22 or 0x40 <= mode <= 0x45
            if not (mode in (0x00, 0x01) or 0x08 <= mode <= 0x0C or (dma and drive.dma_capable)):
                self._abort(drive)
                return
            if dma:
                drive.dma_mode = mode
        elif sub not in (0x55, 0xAA, 0x66, 0xCC):  # read look-ahead, reverting defaults
            self._abort(drive)
            return
        self._done(drive)

    def _read_write(self, drive: AtaDrive, cmd: int, write: bool, ext: bool, multi: bool) -> None:
        if multi and drive.multi_count == 0:
            self._abort(drive)
            return
        if write and drive.read_only:
            self._abort(drive)
            return
        where = self._lba_count(drive, ext)
        if where is None:
            self._abort(drive, ER_IDNF)
            return
        self.xfer_drive = self.selected
        self.xfer_lba, self.xfer_left = where
        self.xfer_block = drive.multi_count if multi else 1
        if write:
            self.xfer = "write"
            self._prepare_write_block(drive)  # no interrupt before the first block
        else:
            self.xfer = "read"
            self._load_read_block()


# DMA command -> (write, lba48)
_DMA_COMMANDS = {0xC8: (False, False), 0x25: (False, True), 0xCA: (True, False), 0x35: (True, True)}

# command -> (write, lba48, multiple)
_RW_COMMANDS = {
    CMD_READ_SECTORS: (False, False, False),
    CMD_READ_SECTORS_NORETRY: (False, False, False),
    CMD_READ_SECTORS_EXT: (False, True, False),
    CMD_READ_MULTIPLE: (False, False, True),
    CMD_READ_MULTIPLE_EXT: (False, True, True),
    CMD_WRITE_SECTORS: (True, False, False),
    CMD_WRITE_SECTORS_NORETRY: (True, False, False),
    CMD_WRITE_SECTORS_EXT: (True, True, False),
    CMD_WRITE_MULTIPLE: (True, False, True),
    CMD_WRITE_MULTIPLE_EXT: (True, True, True),
}


class AtaController:
    """The PC's two legacy IDE channels; absent channels are not put on the bus."""

    def __init__(
        self,
        irq_for: Any,
        disks: dict[tuple[int, int], AtaDrive],
    ) -> None:
        """`irq_for(gsi) -> IrqLine`; `disks` maps (channel, unit) to a drive."""
        self.channels: list[AtaChannel | None] = []
        for ch, (cmd, ctl, irq) in enumerate((PRIMARY, SECONDARY)):
            master, slave = disks.get((ch, 0)), disks.get((ch, 1))
            if master is None and slave is None:
                self.channels.append(None)
                continue
            self.channels.append(
                AtaChannel(irq_for(irq), master, slave, cmd_base=cmd, ctl_port=ctl)
            )

    def register(self, pio: Bus) -> None:
        for ch in self.channels:
            if ch is not None:
                ch.register(pio)

    @property
    def accesses(self) -> int:
        return sum(ch.accesses for ch in self.channels if ch is not None)
