"""A box laid out as VMware Workstation writes one for a Linux guest starts under boite:
every device boite does not emulate is named once in vmware.log and by `boite check`,
with what the guest gets instead, and nothing else fails."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from boite.disk import open_disk
from boite.disk.ops import create_disk
from boite.machine.firmware.seabios import bios_path
from conftest import requires_real_vtx

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios is not installed"),
]

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "21"
displayName = "Debian 12"
guestOS = "debian12-64"
memsize = "64"
numvcpus = "1"
nvram = "debian.nvram"
uuid.bios = "56 4d 1a 2b 3c 4d 5e 6f-70 81 92 a3 b4 c5 d6 e7"
scsi0.present = "TRUE"
scsi0.virtualDev = "lsilogic"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "debian.vmdk"
sata0.present = "TRUE"
ethernet0.present = "TRUE"
ethernet0.connectionType = "nat"
ethernet0.virtualDev = "e1000"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:c5:d6:e7"
sound.present = "TRUE"
sound.autoDetect = "TRUE"
usb.present = "TRUE"
ehci.present = "TRUE"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-raw"
ide1:0.fileName = "auto detect"
ide1:0.startConnected = "FALSE"
floppy0.present = "TRUE"
floppy0.startConnected = "FALSE"
floppy0.fileName = ""
serial0.present = "TRUE"
serial0.fileType = "file"
serial0.fileName = "serial0.log"
"""

BOOT_SECTOR = """\
bits 16
org 0x7c00
    xor ax, ax
    mov ds, ax
    mov si, msg
.next:
    lodsb
    test al, al
    jz .halt
    mov ah, 0x0e
    mov bx, 7
    int 0x10
    jmp .next
.halt:
    sti                 ; idle with interrupts on (cli; hlt would be a power-off)
    hlt
    jmp .halt
msg: db "BOITE-MBR booted from scsi0:0", 13, 10, 0
times 510 - ($ - $$) db 0
dw 0xaa55
"""


def boot_sector(work: Path) -> bytes:
    """A boot sector that prints through the BIOS (int 10h, which sercon sends to COM1)."""
    src = work / "mbr.asm"
    src.write_text(BOOT_SECTOR)
    subprocess.run(["nasm", "-f", "bin", "-o", str(work / "mbr.bin"), str(src)], check=True)
    return (work / "mbr.bin").read_bytes()


UNEMULATED = ("scsi0 (lsilogic)", "sata0 (ahci)", "ethernet0 (e1000)", "sound (", "usb (",
              "ehci (", "floppy0 (")  # fmt: skip


# Under KVM too where the host has real VT-x/AMD-V (kvm_pvm: skipped with that reason).
ACCELS = [pytest.param("emu", id="emu"), pytest.param("kvm", id="kvm", marks=requires_real_vtx)]


@pytest.mark.parametrize("accel", ACCELS)
def test_vmware_workstation_box_starts_and_names_what_it_replaces(boite_cli, tmp_path: Path,
                                                                  accel: str):  # fmt: skip
    box = tmp_path / "debian"
    box.mkdir()
    (box / "debian.vmx").write_text(VMX)
    create_disk(box / "debian.vmdk", 64 << 20, "thin")
    r = boite_cli("check", box)
    for name in UNEMULATED:
        assert sum(name in line for line in r.stdout.splitlines()) == 1, (name, r.stdout)
    assert "lsilogic) is not emulated; the guest gets its disks as virtio-blk" in r.stdout
    # the new disk is blank: check says the box cannot boot, and why; start refuses
    assert "no MBR boot signature" in r.stdout and r.returncode == 1, r.stdout
    r = boite_cli("start", box, "--accel", accel, timeout=120)
    assert r.returncode == 1 and "nothing the BIOS can boot" in r.stderr, r.stderr
    with open_disk(box / "debian.vmdk") as disk:  # what an installer leaves: an MBR
        disk.write(0, boot_sector(tmp_path))
    r = boite_cli("check", box)
    assert r.returncode == 0, r.stdout
    r = boite_cli("start", box, "--accel", accel, "--detach", timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        serial = box / "serial0.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if serial.exists() and b"BOITE-MBR booted from scsi0:0\r\n" in serial.read_bytes():
                break
            time.sleep(1)
        assert b"SeaBIOS (version" in serial.read_bytes()
        assert b"BOITE-MBR booted from scsi0:0" in serial.read_bytes()  # lsilogic's disk
    finally:
        boite_cli("stop", box, "hard", timeout=120)
    log = (box / "vmware.log").read_text()
    for name in UNEMULATED:
        assert log.count(name) == 1, (name, log[-3000:])
    assert "rror" not in log, log[-3000:]
