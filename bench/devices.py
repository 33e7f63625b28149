"""virtio-blk against the emulated ATA disk: the same data written and read through each.

Two harnesses, in one run when /dev/kvm is usable:

- kvm: bare-metal guests with minimal drivers (tests/guests/vblk32.asm, ata32.asm) run
  under KVM and move --mib MiB (virtio) / --ata-mib MiB (ATA) each way; MB/s and VM exits
  per MiB are differential against a 1 MiB run of the same guest, which removes the fixed
  cost of starting the VM. Under this project's kvm_pvm every `rep insw` exits every few
  words, so ATA moves less data by default (the rates are per MiB all the same).
- device: a guest-side driver in Python drives each device through its real register
  protocol on the machine's buses (MMIO registers and split virtqueues for virtio-blk; the
  task file and the PIO data port for ATA), the same --mib MiB through each, and every
  access a guest would make is made and counted (no accelerator, no exit cost).

Exits: for virtio, every MMIO register access (notify, interrupt status, ack); for ATA,
every port access. `--ata-io string` moves each DRQ block with one string operation
(Linux's `rep insw`/`outsw` of a sector, which KVM hands the VMM as one exit);
`dword`/`word` make one access per 4 or 2 bytes, as a guest without string I/O does.

    python bench/devices.py [--mib 64] [--ata-mib 4] [--harness both|kvm|device]
                            [--ata-io string|dword|word]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

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


def bench_kvm(tmp: str, kind: str, mib: int) -> dict[str, float]:
    """Run the bare-metal driver guest for `kind` moving `mib` MiB each way, and 1 MiB."""
    from boite.accel.base import StopReason
    from boite.accel.kvm import KvmAccelerator
    from guests.diskguest import run

    runs = []
    for size in (1, mib):
        path = os.path.join(tmp, f"kvm-{kind}-{size}.raw")
        with open(path, "wb") as f:
            f.truncate(size * MIB)
        r = run(kind, path, lambda: KvmAccelerator(irqchip=False, ap_start="entry"), BENCH_MIB=size)
        if r.result.reason != StopReason.SHUTDOWN or r.result.exit_status != (0x22 << 1) | 1:
            raise SystemExit(f"{kind} guest failed: {r.result} {r.output!r}")
        runs.append(r)
        os.unlink(path)
    small, big = runs
    moved = 2 * (mib - 1)  # MiB, both directions, beyond the 1 MiB baseline
    dt = max(big.seconds - small.seconds, 1e-9)
    return {
        "mb_s": moved / dt,
        "exits_per_mib": (big.exits - small.exits) / moved,
        "s": big.seconds,
        "mib": mib,
    }


def kvm_usable() -> bool:
    try:
        from boite.accel.kvm import kvm_usable as usable
    except ImportError:
        return False
    return usable()


def figures(v: dict[str, float], a: dict[str, float]) -> dict[str, float]:
    return {
        "virtio_mb_s": round(v["mb_s"], 1),
        "ata_mb_s": round(a["mb_s"], 2),
        "virtio_over_ata": round(v["mb_s"] / a["mb_s"], 1),
        "virtio_exits_per_mib": round(v["exits_per_mib"], 1),
        "ata_exits_per_mib": round(a["exits_per_mib"], 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mib",
        type=int,
        default=64,
        help="data moved each way (virtio; ATA too in the device harness)",
    )
    ap.add_argument(
        "--ata-mib", type=int, default=4, help="data moved each way by the ATA guest under KVM"
    )
    ap.add_argument("--harness", choices=("both", "kvm", "device"), default="both")
    ap.add_argument("--ata-io", choices=("string", "dword", "word"), default="string")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    total = args.mib * MIB
    use_kvm = args.harness in ("both", "kvm") and kvm_usable()
    if args.harness == "kvm" and not use_kvm:
        raise SystemExit("--harness kvm: /dev/kvm is not usable here")
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="boite-bench-") as tmp:
        if args.harness in ("both", "device"):
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
            os.unlink(vpath)
            os.unlink(apath)
            dev = dict(figures(v, a), mib_each_way=args.mib, ata_io=args.ata_io)
            print(f"device-level harness: {json.dumps(dev)}", file=sys.stderr)
            result.update(harness="device", **dev)
        if use_kvm:
            kv = bench_kvm(tmp, "virtio", max(args.mib, 2))
            ka = bench_kvm(tmp, "ata", max(args.ata_mib, 2))
            kvm = dict(figures(kv, ka), virtio_mib=kv["mib"], ata_mib=ka["mib"])
            print(f"KVM bare-metal guests: {json.dumps(kvm)}", file=sys.stderr)
            if result:
                result = {"harness": "kvm", **kvm, "device_level": result}
            else:
                result = {"harness": "kvm", **kvm}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
