"""Boxes without boite.kernel boot through SeaBIOS on the emulator: a thin VMDK with GRUB
in its MBR (kit kernel on ext2) on ide0:0 and a grub-mkrescue ISO on the ATAPI CD-ROM
ide1:0, with `bios.bootOrder` choosing which. Both media are built here from Debian
packages and the guest kit (tests/guest/media.py)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from boite import guestkit
from boite.disk.ops import convert_disk
from boite.machine.firmware.seabios import bios_path
from conftest import requires_real_vtx

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(media.tools_missing() is not None, reason=str(media.tools_missing())),
    pytest.mark.skipif(not bios_path().exists(), reason="Debian's seabios is not installed"),
]


ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


def screen_text(out: str) -> str:
    """Console output without the terminal controls SeaBIOS's sercon sends (GRUB's
    screen redraws split lines with cursor moves)."""
    return ANSI.sub("", out)


def cmdline(medium: str) -> str:
    return f'console=ttyS0 quiet boite.exitport=0x505 boite.run="echo booted-from-{medium}"'


@pytest.fixture(scope="module")
def boot_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    kit = guestkit.ensure_kit(("i386", "initrd"))
    assert kit.i386_bzimage is not None and kit.initrd_i386 is not None
    work = tmp_path_factory.mktemp("media")
    iso = media.grub_iso(work / "kit.iso", kit.i386_bzimage, kit.initrd_i386, cmdline("iso"),
                         work)  # fmt: skip
    raw = media.grub_disk(work / "grub.raw", kit.i386_bzimage, kit.initrd_i386,
                          cmdline("disk"), work)  # fmt: skip
    vmdk = work / "grub.vmdk"
    convert_disk(raw, vmdk, "thin")
    return {"iso": iso, "vmdk": vmdk}


# Under KVM too where the host has real VT-x/AMD-V (kvm_pvm cannot boot them: skipped).
ACCELS = [pytest.param("emu", id="emu"), pytest.param("kvm", id="kvm", marks=requires_real_vtx)]


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize(("order", "medium"), [("cdrom,hdd", "iso"), ("hdd,cdrom", "disk")])
def test_bios_boots_the_medium_the_boot_order_names(boite_cli, tmp_path, boot_media, order,
                                                    medium, accel):  # fmt: skip
    box = tmp_path / "fwbox"
    r = boite_cli("create", box, "--disk", "0", "--memsize", "96")
    assert r.returncode == 0, r.stderr
    shutil.copyfile(boot_media["vmdk"], box / "grub.vmdk")  # a disk lives in its box
    vmx = box / "fwbox.vmx"
    text = vmx.read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("ethernet0"))
    text += (
        f'\nide0:0.present = "TRUE"\nide0:0.fileName = "grub.vmdk"\n'
        f'ide1:0.present = "TRUE"\nide1:0.deviceType = "cdrom-image"\n'
        f'ide1:0.fileName = "{boot_media["iso"]}"\nbios.bootOrder = "{order}"\n'
    )
    vmx.write_text(text)
    r = boite_cli("start", box, "--accel", accel, timeout=3000)
    out = screen_text(r.stdout)
    assert "SeaBIOS (version" in out, (out[-3000:], r.stderr[-2000:])
    # GRUB's line reaches the serial port through SeaBIOS's sercon, which redraws the
    # text screen in pieces: a piece may end mid-line and the next start on a new line
    # ("B" then "\nOITE-GRUB iso", seen once at load 6), so the line is looked for with
    # the line breaks taken out.
    assert f"BOITE-GRUB {medium}" in re.sub(r"[\r\n]", "", out), out[-3000:]
    assert f"booted-from-{medium}" in out and "BOITE-EXIT status=0" in out, out[-3000:]
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
