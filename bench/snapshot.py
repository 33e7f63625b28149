"""Snapshot and restore of a guest with 1 GiB of RAM, mostly touched: boite against QEMU.

boite: a box runs a spinning bare-metal guest in the VMM (KVM when /dev/kvm works, else
the emulator) with the same RAM image loaded; `snapshot_running` takes a memory snapshot
(pause, vCPU + device state, sparse .vmem, .vmsn, .vmsd; fsync'd as boite always does),
and `restore_machine` loads it into a fresh machine. QEMU: the same image in a paused
`qemu-system-x86_64 -m 1G`, saved with `migrate "exec:cat > FILE"` (max-bandwidth
unlimited) and loaded with `-incoming defer` + `migrate-incoming "exec:cat FILE"`,
timed from the command to `query-migrate` saying completed (QEMU's start-up not counted).
Both sides skip zero pages; both restores read their file from disk (evicted from the
page cache first). Final line: JSON with the figures.

    python bench/snapshot.py [--ram-mib 1024] [--touched 0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from boite.accel.cpustate import CpuState, Segment  # noqa: E402
from boite.box import Box  # noqa: E402
from boite.box.checkpoint import write_checkpoint  # noqa: E402
from boite.machine.machine import Machine  # noqa: E402
from boite.machine.memory import GuestMemory  # noqa: E402
from boite.snapshot import restore_machine, snapshot_running  # noqa: E402
from boite.vmm import Vmm, accelerator_for  # noqa: E402

MiB = 1 << 20
LOAD_AT = 1 * MiB  # below it the PC has its BIOS/VGA areas in QEMU
SPIN_AT = 0x7C00  # `jmp $` for boite's guest


def evict(path: Path) -> None:
    """Write a file out and drop it from the page cache: both restores read from disk,
    as after a reboot (boite's O_DIRECT .vmem never enters the cache; QEMU's file does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_image(path: Path, size: int, touched: float) -> None:
    """The RAM image both sides load: random data for `touched` of it, zeroes after."""
    data_end = int(size * touched) // MiB * MiB
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for off in range(0, data_end, len(block)):
            f.write(block[: min(len(block), data_end - off)])
        f.truncate(size)


def spinning_machine(ram: int, image: Path | None) -> Machine:
    memory = GuestMemory.with_ram(ram)
    machine = Machine(memory)
    memory.write(SPIN_AT, b"\xeb\xfe")  # jmp $
    if image is not None:
        with open(image, "rb") as f:
            f.readinto(memory.view(LOAD_AT, os.path.getsize(image)))
    code = Segment(selector=0, base=0, limit=0xFFFF, type=0xB)
    data = Segment(selector=0, base=0, limit=0xFFFF, type=0x3)
    state = CpuState(rip=SPIN_AT, cr0=0x10)
    state.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    machine.boot_state = [state]
    return machine


def accel_factory():
    accel = accelerator_for("auto")
    if accel.name == "kvm":
        from boite.accel.kvm import KvmAccelerator

        return "kvm", lambda: KvmAccelerator(irqchip=False)
    return accel.name, type(accel)


def bench_boite(work: Path, ram: int, image: Path) -> dict[str, float | str]:
    name, factory = accel_factory()
    box = Box.create(work / "benchbox", memsize_mb=ram // MiB, disk_size=0)
    vmm = Vmm(lambda: spinning_machine(ram, image), factory, name="bench")
    thread = threading.Thread(target=vmm.run, daemon=True)
    thread.start()
    while vmm.state.value != "running":
        time.sleep(0.01)
    time.sleep(0.2)
    t0 = time.perf_counter()
    snap = snapshot_running(vmm, box, "bench", memory=True)
    snapshot_s = time.perf_counter() - t0
    while vmm.state.value != "running":
        time.sleep(0.01)
    vmm.pause()
    while vmm.state.value != "paused":
        time.sleep(0.01)
    # The same save without fsync, for a like-for-like look at QEMU (which does not sync).
    t0 = time.perf_counter()
    write_checkpoint(
        work / "nosync.vmsn",
        work / "nosync.vmem",
        vmm.accel.save_cpu_state(),
        vmm.machine.memory,
        vmm.machine.save_device_state(),
        durable=False,
    )
    nosync_s = time.perf_counter() - t0
    vmm.stop()
    thread.join(30)
    vmsn = box.dir / snap.filename
    vmem = vmsn.with_suffix(".vmem")
    evict(vmem)

    machine = spinning_machine(ram, None)
    accel = factory()
    accel.create(machine)
    t0 = time.perf_counter()
    restore_machine(machine, accel, vmsn)
    restore_s = time.perf_counter() - t0
    with open(image, "rb") as f:
        ok = machine.memory.read(LOAD_AT, os.path.getsize(image)) == f.read()
    accel.close()
    machine.memory.close()
    if not ok:
        raise SystemExit("boite restored different RAM than it saved")
    return {
        "accelerator": name,
        "snapshot_s": snapshot_s,
        "snapshot_nosync_s": nosync_s,
        "restore_s": restore_s,
        "vmem_allocated": os.stat(vmem).st_blocks * 512,
    }


class Qmp:
    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def wait_migration(self) -> None:
        while True:
            status = self.cmd("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {status}")
            time.sleep(0.002)


def qemu(work: Path, ram: int, extra: list[str]) -> tuple[subprocess.Popen, Qmp]:
    sock = work / f"qmp-{len(list(work.iterdir()))}.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", f"{ram // MiB}M",
         "-nodefaults", "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off",
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    return proc, Qmp(sock)


def bench_qemu(work: Path, ram: int, image: Path) -> dict[str, float]:
    state = work / "qemu.migration"
    loader = f"loader,file={image},addr={LOAD_AT:#x},force-raw=on"
    proc, qmp = qemu(work, ram, ["-device", loader])
    try:
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        t0 = time.perf_counter()
        qmp.cmd("migrate", uri=f"exec:cat > {state}")
        qmp.wait_migration()
        snapshot_s = time.perf_counter() - t0
        qmp.cmd("quit")
    finally:
        proc.wait(30)
    evict(state)
    proc, qmp = qemu(work, ram, ["-incoming", "defer"])
    try:
        t0 = time.perf_counter()
        qmp.cmd("migrate-incoming", uri=f"exec:cat {state}")
        qmp.wait_migration()
        restore_s = time.perf_counter() - t0
        qmp.cmd("quit")
    finally:
        proc.wait(30)
    return {"snapshot_s": snapshot_s, "restore_s": restore_s, "file": state.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram-mib", type=int, default=1024)
    parser.add_argument("--touched", type=float, default=0.9, help="share of RAM with data")
    args = parser.parse_args()
    ram = args.ram_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="boite-bench-snapshot-"))
    try:
        image = work / "ram.bin"
        make_image(image, ram - 2 * LOAD_AT, args.touched)
        ours = bench_boite(work, ram, image)
        theirs = bench_qemu(work, ram, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"boite ({ours['accelerator']} VMM): snapshot {ours['snapshot_s']:.3f} s "
        f"(without fsync {ours['snapshot_nosync_s']:.3f} s), restore {ours['restore_s']:.3f} s, "
        f".vmem holds {ours['vmem_allocated'] / MiB:.0f} MiB"
    )
    print(
        f"QEMU migrate-to-file: snapshot {theirs['snapshot_s']:.3f} s, restore "
        f"{theirs['restore_s']:.3f} s, file {theirs['file'] / MiB:.0f} MiB"
    )
    print(
        json.dumps(
            {
                "ram_mib": args.ram_mib,
                "touched": args.touched,
                "boite_accelerator": ours["accelerator"],
                "snapshot_s_boite": round(ours["snapshot_s"], 4),
                "snapshot_s_boite_nosync": round(ours["snapshot_nosync_s"], 4),
                "snapshot_s_qemu": round(theirs["snapshot_s"], 4),
                "restore_s_boite": round(ours["restore_s"], 4),
                "restore_s_qemu": round(theirs["restore_s"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
