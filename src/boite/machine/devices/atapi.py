"""An ATAPI CD-ROM drive (MMC over the ATA packet interface) on an ISO image.

The channel (devices/ata.py) carries the ATA side: the packet signature after reset
(LBA mid/high 0x14/0xEB), IDENTIFY PACKET DEVICE, PACKET (0xA0) with the 12-byte command
written to the data register, data moved in pieces of at most the byte count the host
put in LBA mid/high, the interrupt reason in the sector count register (CoD, IO). This
module answers the commands themselves (SPC/MMC): TEST UNIT READY, REQUEST SENSE,
INQUIRY, READ CAPACITY, READ(10)/(12), READ TOC (format 0), MODE SENSE(10),
GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, START STOP UNIT, PREVENT ALLOW MEDIUM
REMOVAL, SET CD SPEED, MECHANISM STATUS; anything else is CHECK CONDITION with
ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE. The medium is 2048-byte sectors;
without one (`startConnected = FALSE`) the drive reports NOT READY / MEDIUM NOT PRESENT.
"""

from __future__ import annotations

import struct

from boite.disk.base import BlockImage
from boite.errors import BoiteError

CD_SECTOR = 2048
MAX_READ_SECTORS = 1024  # 2 MiB per READ; Linux's sr and BIOS loaders ask far less

SENSE_NONE, SENSE_NOT_READY, SENSE_MEDIUM_ERROR, SENSE_ILLEGAL_REQUEST = 0x00, 0x02, 0x03, 0x05
SENSE_UNIT_ATTENTION = 0x06
ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_INVALID_FIELD = 0x20, 0x21, 0x24
ASC_MEDIUM_NOT_PRESENT, ASC_READ_ERROR = 0x3A, 0x11


class CheckCondition(Exception):
    def __init__(self, key: int, asc: int, ascq: int = 0) -> None:
        super().__init__(f"sense {key:#x}/{asc:#x}/{ascq:#x}")
        self.sense = (key, asc, ascq)


def _ata_words(text: str, nbytes: int) -> bytes:
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes)
    return b"".join(bytes([raw[i + 1], raw[i]]) for i in range(0, nbytes, 2))


class AtapiDrive:
    """An ATAPI CD-ROM; `image` None is an empty tray."""

    is_atapi = True
    read_only = True

    def __init__(
        self,
        image: BlockImage | None,
        *,
        model: str = "boite ATAPI CD-ROM",
        serial: str = "BOITE-CD0",
        firmware: str = "1.0",
    ) -> None:
        self.image = image
        self.model = model
        self.serial = serial
        self.firmware = firmware
        self.reset()

    @property
    def sectors(self) -> int:
        return self.image.size // CD_SECTOR if self.image is not None else 0

    # What an ATA disk's state record also holds (geometry, transfer modes): fixed here.
    heads, spt, multi_count, write_cache, dma_mode = 16, 63, 0, False, 0

    def reset(self) -> None:
        self.status = 0
        self.error = 0x01
        self.sense = (SENSE_NONE, 0, 0)

    def identify_packet(self) -> bytes:
        w = bytearray(512)

        def put(i: int, v: int) -> None:
            struct.pack_into("<H", w, 2 * i, v)

        # ATAPI, CD-ROM (type 5), removable, DRQ within 50 us, 12-byte packets
        put(0, 0x8000 | (5 << 8) | 0x80 | (2 << 5))
        w[20:40] = _ata_words(self.serial, 20)
        w[46:54] = _ata_words(self.firmware, 8)
        w[54:94] = _ata_words(self.model, 40)
        put(49, 0x0200)  # LBA (and no DMA: transfers are PIO)
        put(53, 0x0002)  # words 64-70 valid
        put(64, 0x0003)  # PIO 3 and 4
        put(65, 120)
        put(66, 120)
        put(67, 120)
        put(68, 120)
        put(80, 0x0030)  # ATA/ATAPI-4, -5
        return bytes(w)

    def _need_medium(self) -> None:
        if self.image is None:
            raise CheckCondition(SENSE_NOT_READY, ASC_MEDIUM_NOT_PRESENT)

    def execute(self, cdb: bytes) -> bytes:
        """Run one packet command; the data to send to the host (maybe empty). Raises
        CheckCondition on failure, with `self.sense` set for REQUEST SENSE."""
        try:
            data = self._execute(cdb)
        except CheckCondition as c:
            self.sense = c.sense
            raise
        if cdb[0] != 0x03:
            self.sense = (SENSE_NONE, 0, 0)
        return data

    def _execute(self, cdb: bytes) -> bytes:
        op = cdb[0]
        alloc16 = struct.unpack_from(">H", cdb, 7)[0]
        if op == 0x00:  # TEST UNIT READY
            self._need_medium()
            return b""
        if op == 0x03:  # REQUEST SENSE
            key, asc, ascq = self.sense
            sense = bytearray(18)
            sense[0], sense[2], sense[7], sense[12], sense[13] = 0x70, key, 10, asc, ascq
            self.sense = (SENSE_NONE, 0, 0)
            return bytes(sense[: cdb[4]])
        if op == 0x12:  # INQUIRY
            inq = bytearray(36)
            inq[0], inq[1], inq[2], inq[3], inq[4] = 0x05, 0x80, 0x00, 0x21, 31
            inq[8:16] = b"BOITE   "
            inq[16:32] = self.model.encode("ascii", "replace")[:16].ljust(16)
            inq[32:36] = self.firmware.encode("ascii", "replace")[:4].ljust(4)
            return bytes(inq[: cdb[4]])
        if op == 0x25:  # READ CAPACITY
            self._need_medium()
            return struct.pack(">II", max(self.sectors - 1, 0), CD_SECTOR)
        if op in (0x28, 0xA8):  # READ(10) / READ(12)
            self._need_medium()
            lba = struct.unpack_from(">I", cdb, 2)[0]
            count = alloc16 if op == 0x28 else struct.unpack_from(">I", cdb, 6)[0]
            if lba + count > self.sectors:
                raise CheckCondition(SENSE_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
            if count > MAX_READ_SECTORS:  # the transfer is buffered: keep it bounded
                raise CheckCondition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            buf = bytearray(count * CD_SECTOR)
            try:
                assert self.image is not None
                self.image.read_into(lba * CD_SECTOR, buf)
            except (OSError, BoiteError):
                raise CheckCondition(SENSE_MEDIUM_ERROR, ASC_READ_ERROR) from None
            return bytes(buf)
        if op == 0x43:  # READ TOC/PMA/ATIP, format 0 (LBA or MSF)
            self._need_medium()
            msf = bool(cdb[1] & 2)
            fmt = cdb[2] & 0xF or (cdb[9] >> 6)
            if fmt == 1:  # multi-session info: one session starting at 0
                toc = struct.pack(">HBBBBBBI", 10, 1, 1, 0, 0x14, 1, 0, 0)
                return toc[:alloc16]
            if fmt != 0:
                raise CheckCondition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD)

            def addr(lba: int) -> bytes:
                if not msf:
                    return struct.pack(">I", lba)
                lba += 150
                return bytes([0, lba // 4500, (lba // 75) % 60, lba % 75])

            body = bytes([0, 0x14, 1, 0]) + addr(0) + bytes([0, 0x16, 0xAA, 0]) + addr(self.sectors)
            return (struct.pack(">HBB", len(body) + 2, 1, 1) + body)[:alloc16]
        if op == 0x5A:  # MODE SENSE(10): an empty mode parameter header
            return struct.pack(">HBBBBH", 6, 0x01, 0, 0, 0, 0)[:alloc16]
        if op == 0x46:  # GET CONFIGURATION: current profile CD-ROM (0x0008)
            return struct.pack(">IHH", 4, 0, 0x0008 if self.image is not None else 0)[:alloc16]
        if op == 0x4A:  # GET EVENT STATUS NOTIFICATION (polled): no event, media class
            if not cdb[1] & 1:
                raise CheckCondition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            present = 0x02 if self.image is not None else 0
            return struct.pack(">HBBBBBB", 6, 0x04, 0x10, 0, present, 0, 0)[:alloc16]
        if op == 0xBD:  # MECHANISM STATUS
            return struct.pack(">BBBBBBH", 0, 0, 0, 0, 0, 0, 0)[:alloc16]
        if op in (0x1B, 0x1E, 0xBB, 0x35):  # START STOP, PREVENT ALLOW, SET SPEED, SYNC
            return b""
        raise CheckCondition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
