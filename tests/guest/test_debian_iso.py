"""Debian 12's stock kernel (linux-image-686, unmodified) through SeaBIOS and GRUB from an
ISO on a boite box, under the emulator, driven with the CLI as a user would:

- the ISO is made here by `grub-mkrescue` around the stock vmlinuz and an initramfs of
  Debian packages (busybox and the kernel package's own modules: tests/guests/stockinitrd.py);
- the box (`boite create`, then .vmx keys) has 1 or 2 vCPUs, a virtio-blk-pci disk (scsi0:0,
  lsilogic in VMware's terms), an IDE disk (ide0:0) and the ISO on the ATAPI CD-ROM
  (ide1:0), `bios.bootOrder = "cdrom"`;
- the guest's init loads the stock modules, shows what the stock drivers found (each
  disk's first sector carries a marker the test wrote, the CD's sector 16 is ISO 9660's
  volume descriptor "CD001"), counts its CPUs, then waits on the ACPI power button's
  input device and runs `poweroff -f` when it is pressed (the kernel's ACPI S5 through
  PM1a_CNT);
- the host runs `boite stop BOX soft`: the box must go down by the ACPI power button
  (no guest tools, no keyboard fallback) and say so, in the JSON and in vmware.log.

What it took under the emulator with 1 vCPU (2026-12-07): the DSDT's PCI0 _CRS (without
its windows Linux claimed no BAR, and ata_piix found no legacy IDE ports), the PIIX IDE
timing registers (ata_piix skips a channel whose IDETIM decode bit reads clear), RDPMC
(the kernel's P6 PMU driver reads its counters on power-off) and a guest that waits for
its power-button reader before saying it waits (boite presses the button once). With 2
vCPUs: the IOAPIC no longer inverts a pin for its polarity bit (Linux programs PCI INTx
without a _PRT as level/active low, and the idle line looked asserted: an IRQ storm on CPU
1, the soft lockup), and an EOI or TPR write that lets a held-back vector through wakes a
halted vCPU.

Cost under the emulator with 1 vCPU on the native tier, the whole test on this project's 2
shared cores: 6 minutes of wall time at load 5, 12.5 at load 7-8. At load 5 (before the
native tier's later speed-ups, 6.5 minutes to STOCK-WAITING): 2 minutes to the kernel's
first line (SeaBIOS, GRUB reading the CD, and the stock kernel's own XZ decompressor: a
firmware boot unpacks in the guest), 1.5 more to init, 3 more loading the modules and
probing the disks (the ATAPI CD-ROM is PIO only). The QEMU test beside it checks the same
ISO and guest script in about 90 s.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boite import guestkit
from boite.disk import open_disk
from boite.disk.ops import create_disk
from boite.machine.firmware.seabios import bios_path
from conftest import requires_real_vtx

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

from guests.stockinitrd import DISK_MODULES, stock_initrd  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(6000),
    pytest.mark.skipif(media.tools_missing() is not None, reason=str(media.tools_missing())),
    pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios is not installed"),
]

# sr_mod: the CD-ROM's block device; evdev: /dev/input/event* for the power button,
# which the ACPI button driver (`button`) registers as an input device.
MODULES = (*DISK_MODULES, "sr_mod", "evdev", "button")
VD_MARK = b"BOITE-VIRTIO-BLK-PCI-DISK"
HD_MARK = b"BOITE-IDE-DISK"

RUN = r"""
# libata and SCSI probe asynchronously: give the three disks time to appear.
for i in $(seq 120); do
  [ -e /sys/block/vda ] && [ -e /sys/block/sda ] && [ -e /sys/block/sr0 ] && break
  sleep 1
done
echo "STOCK-CPUS $(grep -c '^processor' /proc/cpuinfo)"
for dev in /sys/block/*; do
  name=${dev##*/}
  case "$name" in ram*|loop*) continue ;; esac
  mark=$(dd if=/dev/$name bs=2048 count=1 2>/dev/null | head -c 32 | tr -dc 'A-Z-')
  echo "STOCK-DISK $name sectors=$(cat $dev/size) mark=${mark:-none}"
done
cd9660=$(dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=1 count=5 2>/dev/null)
echo "STOCK-CD sr0 volume=$cd9660"
for ev in /sys/class/input/event*; do
  [ "$(cat $ev/device/name 2>/dev/null)" = "Power Button" ] || continue
  echo "STOCK-BUTTON /dev/input/${ev##*/}"
  (dd if=/dev/input/${ev##*/} bs=16 count=1 of=/dev/null 2>/dev/null; : >/tmp/pressed) &
  # A press before the reader has the device open is lost: wait until it has.
  for i in $(seq 60); do
    ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -q "/dev/input/${ev##*/}" && break
    sleep 1
  done
done
echo "STOCK-WAITING for the power button"
while [ ! -e /tmp/pressed ]; do sleep 1; done
echo "STOCK-PRESSED powering off"
poweroff -f
"""

ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


def _wait_for(path: Path, marks: tuple[str, ...], seconds: float, stop: tuple[str, ...] = ()
              ) -> str:  # fmt: skip
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        if path.exists():
            text = ANSI.sub("", path.read_bytes().decode(errors="replace"))
            if all(m in text for m in marks) or any(s in text for s in stop):
                return text
        time.sleep(2)
    return text


def _check_guest_findings(out: str, cpus: int = 2) -> None:
    """What the stock drivers found, as the guest printed it (the same on both peers)."""
    assert "STOCK-WAITING" in out, out[-4000:]
    for name in ("virtio_pci", "virtio_blk", "ata_piix", "sd_mod", "sr_mod", "evdev"):
        assert re.search(rf"STOCK-INSMOD {name} (ok|builtin)", out), (name, out[-3000:])
    assert f"STOCK-CPUS {cpus}" in out, out[-3000:]
    assert f"STOCK-DISK vda sectors=131072 mark={VD_MARK.decode()}" in out, out[-3000:]
    assert f"STOCK-DISK sda sectors=65536 mark={HD_MARK.decode()}" in out, out[-3000:]
    assert "STOCK-CD sr0 volume=CD001" in out, out[-3000:]
    assert "STOCK-BUTTON /dev/input/event" in out, out[-3000:]


@pytest.fixture(scope="module")
def debian_iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kit = guestkit.ensure_kit(["debian-686"])
    assert kit.debian686_vmlinuz is not None and kit.debian686_deb is not None
    img = stock_initrd(run=RUN, kernel_deb=kit.debian686_deb, modules=MODULES)
    work = tmp_path_factory.mktemp("debian-iso")
    return media.grub_iso(work / "debian.iso", kit.debian686_vmlinuz, img.path,
                          "console=ttyS0 quiet cryptomgr.notests", work)  # fmt: skip


@pytest.mark.skipif(shutil.which("qemu-system-i386") is None, reason="needs qemu-system-i386")
def test_the_same_iso_under_qemu(debian_iso: Path, tmp_path: Path) -> None:
    """The medium and the guest's script checked against a real peer: QEMU TCG with the
    same disks (raw), 2 CPUs, and `system_powerdown` (its ACPI power button)."""
    for name, size, mark in (("vd.raw", 64 << 20, VD_MARK), ("hd.raw", 32 << 20, HD_MARK)):
        (tmp_path / name).write_bytes(mark.ljust(512, b"\0") + bytes(size - 512))
    (tmp_path / "sercon-port").write_bytes((0x3F8).to_bytes(2, "little"))
    serial, monitor = tmp_path / "serial.log", tmp_path / "monitor.sock"
    proc = subprocess.Popen(
        ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-smp", "2", "-display", "none",
         "-vga", "none", "-no-reboot", "-serial", f"file:{serial}",
         "-monitor", f"unix:{monitor},server,nowait",
         "-drive", f"file={tmp_path / 'vd.raw'},format=raw,if=virtio",
         "-drive", f"file={tmp_path / 'hd.raw'},format=raw,if=ide,index=0",
         "-drive", f"file={debian_iso},media=cdrom,if=ide,index=2", "-boot", "d",
         "-fw_cfg", f"name=etc/sercon-port,file={tmp_path / 'sercon-port'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out = _wait_for(serial, ("STOCK-WAITING",), 900, ("Kernel panic",))
        _check_guest_findings(out)
        # Pressed again every 10 s, as a user would: the guest's reader of the button's
        # event device starts in the background just before STOCK-WAITING, and a press
        # before it has opened the device is not seen (a race a loaded host can lose).
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(monitor))
            for _ in range(30):
                s.sendall(b"system_powerdown\n")
                try:
                    proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            assert proc.wait(1) == 0
    finally:
        proc.kill()
        proc.wait()
    out = ANSI.sub("", serial.read_bytes().decode(errors="replace"))
    assert "STOCK-PRESSED powering off" in out and "reboot: Power down" in out, out[-3000:]


# Under KVM too where the host has real VT-x/AMD-V (kvm_pvm cannot boot Linux: skipped).
# Under the emulator with 1 vCPU (the 8259) and 2 (the IOAPIC and both LAPICs): both run
# by default in the slow suite, ~6-8 minutes each on 2 cores.
CASES = [
    pytest.param("emu", 1, id="emu-1cpu"),
    pytest.param("emu", 2, id="emu-2cpu"),
    pytest.param("kvm", 2, id="kvm-2cpu", marks=requires_real_vtx),
]


@pytest.mark.parametrize(("accel", "cpus"), CASES)
def test_debian_686_from_a_grub_iso_finds_its_disks_counts_cpus_and_powers_off(
    boite_cli, tmp_path: Path, debian_iso: Path, accel: str, cpus: int
) -> None:
    iso = debian_iso
    box = tmp_path / "deb"
    r = boite_cli("create", box, "--disk", "0", "--memsize", "256", "--cpus", str(cpus))
    assert r.returncode == 0, r.stderr
    create_disk(box / "vd.vmdk", 64 << 20, "thin")
    create_disk(box / "hd.vmdk", 32 << 20, "thin")
    for name, mark in (("vd.vmdk", VD_MARK), ("hd.vmdk", HD_MARK)):
        with open_disk(box / name) as disk:
            disk.write(0, mark.ljust(512, b"\0"))
    vmx = box / "deb.vmx"
    text = "\n".join(ln for ln in vmx.read_text().splitlines() if not ln.startswith("ethernet0"))
    vmx.write_text(text + f"""
scsi0.present = "TRUE"
scsi0.virtualDev = "lsilogic"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "vd.vmdk"
ide0:0.present = "TRUE"
ide0:0.fileName = "hd.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "{iso}"
bios.bootOrder = "cdrom"
""")  # fmt: skip
    r = boite_cli("check", box)
    assert r.returncode == 0, r.stdout + r.stderr

    # The native tier under the emulator: about a third of the Python tiers' CPU time.
    tier = ["--emu-tier", "native"] if accel == "emu" else []
    r = boite_cli("start", box, "--accel", accel, *tier, "--detach", timeout=120)
    assert r.returncode == 0, r.stderr
    serial = box / "serial0.log"
    try:
        out = _wait_for(serial, ("STOCK-WAITING",), 4800,
                        ("Kernel panic", "BOITE-EXIT", "BUG: soft lockup"))  # fmt: skip
        # GRUB's line comes through sercon's screen redraws, maybe cut by a line break
        # (test_firmware_boot.py): looked for without the breaks.
        grub = "BOITE-GRUB iso" in re.sub(r"[\r\n]", "", out)
        assert "SeaBIOS (version" in out and grub, out[-3000:]
        _check_guest_findings(out, cpus)
        r = boite_cli("stop", box, "soft", "--timeout", "300", "--json", timeout=400)
    finally:
        boite_cli("stop", box, "hard", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    outcome = json.loads(r.stdout.strip().splitlines()[-1])
    assert outcome.get("how") == "soft" and outcome.get("method") == "acpi", outcome
    assert "ACPI S5 via PM1a_CNT" in outcome.get("detail", ""), outcome
    out = ANSI.sub("", serial.read_bytes().decode(errors="replace"))
    assert "STOCK-PRESSED powering off" in out, out[-3000:]
    assert "reboot: Power down" in out, out[-3000:]
    log = (box / "vmware.log").read_text()
    assert "Soft stop: the guest powered off when asked through the ACPI power button " \
        "(ACPI S5 via PM1a_CNT)." in log, log[-3000:]  # fmt: skip
    assert "The guest powered off through ACPI S5 via PM1a_CNT." in log, log[-3000:]
