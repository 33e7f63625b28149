"""Firmware boot: seconds from power-on to the bootloader's first output and to the
kernel's init, boite (SeaBIOS on the emulator) against `qemu-system-i386 -accel tcg`
(its own SeaBIOS) with the same medium: a grub-mkrescue ISO on an IDE CD-ROM holding the
guest kit's i386 kernel and initramfs (tests/guest/media.py builds it).

Both machines send the BIOS's and GRUB's text to COM1 through SeaBIOS's sercon (boite:
its fw_cfg `etc/sercon-port`; QEMU: the same file given with -fw_cfg, and -vga none).
Marks, on COM1: "Welcome to GRUB" (the bootloader's first output) and init's
BOITE-READY. The guest then exits through isa-debug-exit (0xf4) on both.

    python bench/firmware_boot.py [--memsize 96] [--timeout 900]

Final line: {"boite_emu_bootloader_s", "boite_emu_kernel_init_s",
"qemu_tcg_bootloader_s", "qemu_tcg_kernel_init_s"} (null where a mark never came).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "guest"))
sys.path.insert(0, str(ROOT / "tests"))

import media  # noqa: E402

from boite import guestkit  # noqa: E402

BOOTLOADER_MARK = b"Welcome to GRUB"
INIT_MARK = b"BOITE-READY"
# SeaBIOS's sercon draws the text screen with cursor moves that may split a line ("Wel",
# ESC[03;03H, "come to GRUB!"): marks are looked for in the text without them.
ANSI = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|c)")
CMDLINE = 'console=ttyS0 quiet boite.exitport=0xf4 boite.run="true"'


def run_boite(iso: Path, memsize: int, timeout: float) -> dict[str, float | None]:
    from boite.accel.emu.accel import EmuAccelerator
    from boite.machine.builder import build_machine
    from boite.machine.virtio.attach import DevicePlan, DiskPlan, attach_devices
    from guests.runner import CollectedOutput

    out = CollectedOutput()
    plan = DevicePlan(disks=[DiskPlan("ide1:0", "atapi", iso, 1, 0)])

    def devices(machine):
        attach_devices(machine, plan, open_disk=lambda p: None, with_rng=False)  # type: ignore[arg-type, return-value]

    t0 = time.monotonic()
    machine = build_machine(memsize, serial_backends=[out], firmware=True, extra_devices=[devices])
    accel = EmuAccelerator()
    accel.create(machine)
    marks: dict[str, float | None] = {"bootloader": None, "init": None}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            text = ANSI.sub(b"", bytes(out.output))
            now = time.monotonic() - t0
            if marks["bootloader"] is None and BOOTLOADER_MARK in text:
                marks["bootloader"] = now
            if marks["init"] is None and INIT_MARK in text:
                marks["init"] = now
            if now > timeout:
                accel.pause()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        accel.run()
    finally:
        time.sleep(0.1)
        done.set()
        accel.close()
        machine.memory.close()
    return marks


def run_qemu(iso: Path, memsize: int, timeout: float, work: Path) -> dict[str, float | None]:
    port = work / "sercon-port"
    port.write_bytes((0x3F8).to_bytes(2, "little"))
    argv = [
        "qemu-system-i386", "-accel", "tcg", "-m", str(memsize), "-display", "none",
        "-vga", "none", "-serial", "stdio", "-no-reboot", "-cdrom", str(iso),
        "-fw_cfg", f"name=etc/sercon-port,file={port}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    marks: dict[str, float | None] = {"bootloader": None, "init": None}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout is not None
    text = b""
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                text += os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic() - t0
            screen = ANSI.sub(b"", text)
            if marks["bootloader"] is None and BOOTLOADER_MARK in screen:
                marks["bootloader"] = now
            if marks["init"] is None and INIT_MARK in screen:
                marks["init"] = now
    finally:
        proc.kill()
        proc.wait()
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memsize", type=int, default=96)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    missing = media.tools_missing()
    if missing:
        sys.exit(f"firmware_boot: {missing}")
    kit = guestkit.ensure_kit(("i386", "initrd"))
    assert kit.i386_bzimage is not None and kit.initrd_i386 is not None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        iso = media.grub_iso(work / "kit.iso", kit.i386_bzimage, kit.initrd_i386, CMDLINE, work)
        qemu = run_qemu(iso, args.memsize, args.timeout, work)
        print(f"qemu-system-i386 -accel tcg: {qemu}", flush=True)
        ours = run_boite(iso, args.memsize, args.timeout)
        print(f"boite --accel emu: {ours}", flush=True)

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    print(json.dumps({
        "boite_emu_bootloader_s": r(ours["bootloader"]),
        "boite_emu_kernel_init_s": r(ours["init"]),
        "qemu_tcg_bootloader_s": r(qemu["bootloader"]),
        "qemu_tcg_kernel_init_s": r(qemu["init"]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
