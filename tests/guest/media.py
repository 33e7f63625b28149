"""Boot media built from Debian packages and the guest kit, nothing downloaded:

- `grub_iso(...)`: `grub-mkrescue` (grub-pc-bin, xorriso, mtools) around the kit's
  kernel and initrd.
- `grub_disk(...)`: a raw disk with an MBR partition table, one ext2 partition filled by
  `mke2fs -d` (no mounting), GRUB's boot.img in the MBR and a core.img from
  `grub-mkimage` in the gap after it, patched as grub-install's setup step does
  (boot.img's kernel sector, core.img's first blocklist). No loop device, no root.

Each GRUB menu echoes a marker naming its medium (`BOITE-GRUB iso` / `BOITE-GRUB disk`)
before loading the kernel, so a test can tell which one the BIOS booted.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

GRUB_PC = Path("/usr/lib/grub/i386-pc")
SECTOR = 512
PART_START = 2048  # sectors: the partition starts at 1 MiB, core.img lives in the gap
KERNEL_SECTOR_AT = 0x5C  # boot.img: LBA of core.img's first sector (64-bit)
MBR_CODE_END = 0x1B8  # boot.img's code ends where the disk signature and table begin


def tools_missing() -> str | None:
    for tool in ("grub-mkrescue", "grub-mkimage", "xorriso", "mformat", "mke2fs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (grub-pc-bin, xorriso, mtools, e2fsprogs)"
    if not (GRUB_PC / "boot.img").exists():
        return "grub-pc-bin's i386-pc modules are not installed"
    return None


def grub_cfg(medium: str, cmdline: str, timeout: int = 0) -> str:
    return (
        f"set timeout={timeout}\n"
        f'menuentry "boite kit from {medium}" {{\n'
        f'  echo "BOITE-GRUB {medium}"\n'
        f"  linux /boot/bzImage {cmdline}\n"
        f"  initrd /boot/initrd.cpio\n"
        f"}}\n"
    )


def _tree(root: Path, kernel: Path, initrd: Path, cfg: str) -> None:
    (root / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(kernel, root / "boot" / "bzImage")
    shutil.copyfile(initrd, root / "boot" / "initrd.cpio")
    (root / "boot" / "grub" / "grub.cfg").write_text(cfg)


def grub_iso(out: Path, kernel: Path, initrd: Path, cmdline: str, work: Path) -> Path:
    root = work / "iso-root"
    _tree(root, kernel, initrd, grub_cfg("iso", cmdline))
    subprocess.run(["grub-mkrescue", "-o", str(out), str(root)], check=True, capture_output=True)
    return out


def grub_disk(out: Path, kernel: Path, initrd: Path, cmdline: str, work: Path,
              size_mb: int = 32) -> Path:  # fmt: skip
    root = work / "disk-root"
    _tree(root, kernel, initrd, grub_cfg("disk", cmdline))
    size = size_mb << 20
    part_sectors = size // SECTOR - PART_START
    with open(out, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-d", str(root),
         "-E", f"offset={PART_START * SECTOR}", str(out), str(part_sectors * SECTOR // 1024)],
        check=True, capture_output=True,
    )  # fmt: skip
    core = work / "core.img"
    subprocess.run(
        ["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p", "(hd0,msdos1)/boot/grub",
         "biosdisk", "part_msdos", "ext2", "normal", "linux", "echo", "configfile"],
        check=True, capture_output=True,
    )  # fmt: skip
    core_img = bytearray(core.read_bytes())
    core_sectors = -(-len(core_img) // SECTOR)
    if 1 + core_sectors > PART_START:
        raise RuntimeError(f"core.img needs {core_sectors} sectors, the gap has {PART_START - 1}")
    # grub-setup: core.img's first sector loads the rest (LBA 2.., to 0x820:0).
    struct.pack_into("<QHH", core_img, SECTOR - 12, 2, core_sectors - 1, 0x820)
    mbr = bytearray((GRUB_PC / "boot.img").read_bytes())
    struct.pack_into("<Q", mbr, KERNEL_SECTOR_AT, 1)
    mbr[MBR_CODE_END:SECTOR] = bytes(SECTOR - MBR_CODE_END)
    struct.pack_into("<B3sB3sII", mbr, 0x1BE, 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                     PART_START, part_sectors)  # fmt: skip
    mbr[510:512] = b"\x55\xaa"
    with open(out, "r+b") as f:
        f.write(mbr)
        f.write(core_img)
    return out
