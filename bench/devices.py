"""virtio-blk against the emulated ATA disk: the same 64 MiB written and read through each.

This is the device-level harness (first version of the benchmark): a guest-side driver in
Python drives each device through its real register protocol on the machine's buses (MMIO
registers and split virtqueues for virtio-blk; the task file and the PIO data port for
ATA), so every access a guest would make is made and counted. A guest running under KVM
or the emulator adds the cost of each exit on top; that version comes when the
accelerators can run the bare-metal driver guests.

Exits: for virtio, every MMIO register access (notify, interrupt status, ack); for ATA,
every port access. `--ata-io string` moves each DRQ block with one string operation
(Linux's `rep insw`/`outsw` of a sector, which KVM hands the VMM as one exit);
`dword`/`word` make one access per 4 or 2 bytes, as a guest without string I/O does.

    python bench/devices.py [--mib 64] [--ata-io string|dword|word]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from boite.machine.bus import Bus  # noqa: E402
from boite.machine.devices import ata  # noqa: E402
from boite.machine.devices.ata import AtaChannel, AtaDrive  # noqa: E402
from boite.machine.irq import IrqLine  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402
from boite.machine.virtio.blk import (  # noqa: E402
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from boite.machine.virtio.fuzz import RawFile  # noqa: E402
from boite.machine.virtio.guestdriver import BlkDriver, GuestAllocator  # noqa: E402
from boite.machine.virtio.mmio import MMIO_SIZE, VirtioMmio  # noqa: E402

MIB = 1 << 20
REQUEST = 256 << 10  # virtio-blk request size (Linux's default max_sectors_kb is larger)
BUF = 0x0100_0000  # guest buffer for request data
VIRTIO_BASE = 0xD000_0000


def pattern(offset: int, length: int) -> bytes:
    """Deterministic data, different per 256 KiB chunk."""
    seed = hashlib.sha256(offset.to_bytes(8, "little")).digest()
    return (seed * (length // len(seed) + 1))[:length]


def bench_virtio(path: str, total: int) -> dict[str, float]:
    memory = GuestMemory.with_ram(BUF + REQUEST + MIB)
    bus = Bus("mmio")
    image = RawFile.__new__(RawFile)
    image.fd = os.open(path, os.O_RDWR)
    image.size = os.fstat(image.fd).st_size
    image.raw_fd = image.fd
    dev = VirtioMmio(VirtioBlk(image), memory, IrqLine(5), base=VIRTIO_BASE)
    bus.register(VIRTIO_BASE, MMIO_SIZE, dev)
    drv = BlkDriver(bus, VIRTIO_BASE, memory, GuestAllocator(0x10000, BUF), indirect=True)
    drv.setup()
    setup_accesses = dev.register_reads + dev.register_writes

    data = {off: pattern(off, REQUEST) for off in range(0, total, REQUEST)}
    t0 = time.perf_counter()
    for off in range(0, total, REQUEST):
        memory.write(BUF, data[off])  # the guest's page cache filling its buffer
        status, _ = drv.request(VIRTIO_BLK_T_OUT, off // 512, BUF, REQUEST, write=True)
        assert status == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    for off in range(0, total, REQUEST):
        status, _ = drv.request(VIRTIO_BLK_T_IN, off // 512, BUF, REQUEST)
        assert status == VIRTIO_BLK_S_OK
        if off % (16 * MIB) == 0:  # spot-check what came back
            assert memory.read(BUF, REQUEST) == data[off]
    dt = time.perf_counter() - t0
    exits = dev.register_reads + dev.register_writes - setup_accesses
    image.close()
    return {"mb_s": 2 * total / MIB / dt, "exits_per_mib": exits / (2 * total / MIB), "s": dt}


class AtaGuest:
    """The ATA side of the harness: libata's PIO protocol with READ/WRITE MULTIPLE EXT."""

    def __init__(self, pio: Bus, channel: AtaChannel, io: str) -> None:
        self.pio, self.ch, self.io = pio, channel, io
        self.width = {"word": 2, "dword": 4, "string": 2}[io]
        # I/O instructions the guest executes: each one is an exit (a string op is one).
        self.exits = 0

    def out(self, port: int, value: int) -> None:
        self.exits += 1
        self.pio.write(port, 1, value)

    def inb(self, port: int) -> int:
        self.exits += 1
        return self.pio.read(port, 1)

    def taskfile48(self, lba: int, count: int) -> None:
        for port, hi, lo in (
            (0x1F2, count >> 8, count),
            (0x1F3, lba >> 24, lba),
            (0x1F4, lba >> 32, lba >> 8),
            (0x1F5, lba >> 40, lba >> 16),
        ):
            self.out(port, hi & 0xFF)
            self.out(port, lo & 0xFF)
        self.out(0x1F6, 0xE0)

    def read_block(self, n: int) -> bytes:
        if self.io == "string":
            # One `rep insw` per sector, as libata's ata_sff_data_xfer issues it.
            self.exits += n // 512
            return b"".join(self.ch.read_string(0, 2, 256) for _ in range(n // 512))
        w = self.width
        self.exits += n // w
        read = self.pio.read
        return b"".join(read(0x1F0, w).to_bytes(w, "little") for _ in range(n // w))

    def write_block(self, data: bytes) -> None:
        if self.io == "string":
            self.exits += len(data) // 512
            for i in range(0, len(data), 512):
                self.ch.write_string(0, 2, data[i : i + 512])
            return
        w = self.width
        self.exits += len(data) // w
        write = self.pio.write
        for i in range(0, len(data), w):
            write(0x1F0, w, int.from_bytes(data[i : i + w], "little"))

    def setup(self) -> None:
        self.out(0x3F6, 0)
        self.out(0x1F6, 0xA0)
        self.out(0x1F2, ata.MAX_MULTIPLE)
        self.out(0x1F7, ata.CMD_SET_MULTIPLE)
        assert self.inb(0x1F7) == ata.ST_DRDY | ata.ST_DSC

    def transfer(self, lba: int, data: bytes | None, count: int) -> bytes:
        self.taskfile48(lba, count)
        write = data is not None
        self.out(0x1F7, ata.CMD_WRITE_MULTIPLE_EXT if write else ata.CMD_READ_MULTIPLE_EXT)
        got = bytearray()
        block = ata.MAX_MULTIPLE * 512
        pos = 0
        while pos < count * 512:
            # Read: the interrupt says a block is ready; status read acknowledges it.
            # Write: poll alternate status for DRQ, then status after each block.
            st = self.inb(0x3F6 if write and pos == 0 else 0x1F7)
            if not st & ata.ST_DRQ:
                raise RuntimeError(f"ATA: no DRQ at byte {pos} (status {st:#x})")
            n = min(block, count * 512 - pos)
            if write:
                assert data is not None
                self.write_block(data[pos : pos + n])
            else:
                got += self.read_block(n)
            pos += n
            if write:
                st = self.inb(0x1F7)
                if pos < count * 512:
                    # The next block's DRQ is visible in the status just read.
                    if not st & ata.ST_DRQ:
                        raise RuntimeError(f"ATA: no DRQ for the next block (status {st:#x})")
        return bytes(got)


def bench_ata(path: str, total: int, io: str) -> dict[str, float]:
    pio = Bus("pio")
    image = RawFile.__new__(RawFile)
    image.fd = os.open(path, os.O_RDWR)
    image.size = os.fstat(image.fd).st_size
    image.raw_fd = image.fd
    ch = AtaChannel(IrqLine(14), AtaDrive(image))
    ch.register(pio)
    g = AtaGuest(pio, ch, io)
    g.setup()
    g.exits = 0
    accesses_before = ch.accesses
    per_cmd = REQUEST // 512  # same request size as virtio (READ MULTIPLE EXT, 16/DRQ)

    data = {off: pattern(off, REQUEST) for off in range(0, total, REQUEST)}
    t0 = time.perf_counter()
    for off in range(0, total, REQUEST):
        g.transfer(off // 512, data[off], per_cmd)
    g.out(0x1F7, ata.CMD_FLUSH_CACHE_EXT)
    assert g.inb(0x1F7) == ata.ST_DRDY | ata.ST_DSC
    for off in range(0, total, REQUEST):
        got = g.transfer(off // 512, None, per_cmd)
        if off % (16 * MIB) == 0:
            assert got == data[off]
    dt = time.perf_counter() - t0
    exits = g.exits
    if io != "string":  # the device counted the same accesses the guest made
        assert ch.accesses - accesses_before == exits, (ch.accesses - accesses_before, exits)
    image.close()
    return {"mb_s": 2 * total / MIB / dt, "exits_per_mib": exits / (2 * total / MIB), "s": dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="data moved each way, per device")
    ap.add_argument("--ata-io", choices=("string", "dword", "word"), default="string")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    total = args.mib * MIB
    with tempfile.TemporaryDirectory(prefix="boite-bench-") as tmp:
        vpath, apath = os.path.join(tmp, "virtio.raw"), os.path.join(tmp, "ata.raw")
        for p in (vpath, apath):
            with open(p, "wb") as f:
                f.truncate(total)
        v = bench_virtio(vpath, total)
        a = bench_ata(apath, total, args.ata_io)
        # Both devices left the same bytes on their disks.
        with open(vpath, "rb") as fv, open(apath, "rb") as fa:
            while chunk := fv.read(8 * MIB):
                if chunk != fa.read(8 * MIB):
                    raise SystemExit("virtio and ATA disks differ after the run")
    print(
        f"virtio-blk: {v['mb_s']:.1f} MB/s, {v['exits_per_mib']:.1f} exits/MiB; "
        f"ATA ({args.ata_io}): {a['mb_s']:.1f} MB/s, {a['exits_per_mib']:.1f} exits/MiB",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "harness": "device-level (Python guest driver on the buses, no accelerator)",
                "mib_each_way": args.mib,
                "ata_io": args.ata_io,
                "virtio_mb_s": round(v["mb_s"], 1),
                "ata_mb_s": round(a["mb_s"], 1),
                "virtio_over_ata": round(v["mb_s"] / a["mb_s"], 1),
                "virtio_exits_per_mib": round(v["exits_per_mib"], 1),
                "ata_exits_per_mib": round(a["exits_per_mib"], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
