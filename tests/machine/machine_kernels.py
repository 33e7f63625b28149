"""Fixtures for the machine tests: guest kernels built here, real Linux kernels cached.

Test modules import the fixtures (`from .machine_kernels import *`); tests/machine is a
package, so `from conftest import ...` still means tests/conftest.py and basenames such
as test_hostile.py may repeat across test directories.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["debian_bzimage", "debian_vmlinux", "multiboot_kernels"]

GUESTS = Path(__file__).parent / "guests"
KERNEL_CACHE = Path(
    os.environ.get("BOITE_TEST_KERNELS", Path.home() / ".cache" / "boite" / "test-kernels")
)


@pytest.fixture(scope="session")
def multiboot_kernels(tmp_path_factory) -> dict[str, Path]:
    """The probe kernels of guests/: multiboot as an a.out-kludge flat binary ("aout") and
    as an i386 ELF ("elf"), a stand-in bzImage ("linux") and a PVH ELF ("pvh")."""
    for tool in ("nasm", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (./dev setup installs nasm and binutils)")
    out = tmp_path_factory.mktemp("multiboot")
    src = GUESTS / "multiboot_probe.asm"
    aout = out / "probe-aout.bin"
    obj = out / "probe.o"
    elf = out / "probe.elf"
    subprocess.run(["nasm", "-f", "bin", "-DAOUT", str(src), "-o", str(aout)], check=True)
    subprocess.run(["nasm", "-f", "elf32", str(src), "-o", str(obj)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-Ttext=0x100000", "-z", "max-page-size=0x1000",
         "--build-id=none", "-o", str(elf), str(obj)],
        check=True,
    )  # fmt: skip
    linux = out / "linux-probe.bin"
    subprocess.run(
        [
            "nasm",
            "-f",
            "bin",
            "-i",
            f"{GUESTS}/",
            str(GUESTS / "linux_probe.asm"),
            "-o",
            str(linux),
        ],
        check=True,
    )
    pvh_obj = out / "pvh.o"
    pvh = out / "pvh-probe.elf"
    subprocess.run(
        ["nasm", "-f", "elf32", "-i", f"{GUESTS}/", str(GUESTS / "pvh_probe.asm"), "-o",
         str(pvh_obj)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["ld", "-m", "elf_i386", "-T", str(GUESTS / "pvh_probe.ld"), "--build-id=none", "-o",
         str(pvh), str(pvh_obj)],
        check=True,
    )  # fmt: skip
    fwcfg = out / "fwcfg-probe.bin"
    subprocess.run(
        [
            "nasm",
            "-f",
            "bin",
            "-i",
            f"{GUESTS}/",
            str(GUESTS / "fwcfg_probe.asm"),
            "-o",
            str(fwcfg),
        ],
        check=True,
    )
    cmos = out / "cmos-probe.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-i", f"{GUESTS}/", str(GUESTS / "cmos_probe.asm"), "-o", str(cmos)],
        check=True,
    )
    kernels = {"aout": aout, "elf": elf, "linux": linux, "pvh": pvh, "fwcfg": fwcfg, "cmos": cmos}
    uart = out / "uart-probe.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-i", f"{GUESTS}/", str(GUESTS / "uart_probe.asm"), "-o", str(uart)],
        check=True,
    )
    kernels["uart"] = uart
    pic_pit = out / "pic-pit-probe.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-i", f"{GUESTS}/", str(GUESTS / "pic_pit_probe.asm"), "-o",
         str(pic_pit)],
        check=True,
    )  # fmt: skip
    kernels["pic_pit"] = pic_pit
    return kernels


def _debian_kernel_package() -> str | None:
    """The newest linux-image-6.1.0-N-amd64 that apt knows, by the metapackage's Depends."""
    try:
        dep = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
            timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", dep)
    return m.group(1) if m else None


@pytest.fixture(scope="session")
def debian_bzimage() -> Path:
    """Debian bookworm's stock x86_64 kernel (bzImage), fetched once with `apt-get download`
    into ~/.cache/boite/test-kernels (BOITE_TEST_KERNELS overrides)."""
    KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(KERNEL_CACHE.glob("vmlinuz-6.1.0-*-amd64"))
    if found:
        return found[-1]
    debs = sorted(KERNEL_CACHE.glob("linux-image-6.1.0-*-amd64_*.deb"))
    if not debs:
        pkg = _debian_kernel_package()
        if pkg is None or shutil.which("apt-get") is None:
            pytest.skip("no cached Debian kernel and apt cannot name linux-image-6.1.0-*-amd64")
        r = subprocess.run(
            ["apt-get", "download", pkg], cwd=KERNEL_CACHE, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        debs = sorted(KERNEL_CACHE.glob("linux-image-6.1.0-*-amd64_*.deb"))
        if r.returncode != 0 or not debs:
            pytest.skip(f"apt-get download {pkg} failed: {r.stderr.strip()[-300:]}")
    deb = debs[-1]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    subprocess.run(
        ["tar", "-x", "-C", str(KERNEL_CACHE), "--strip-components=2", "--wildcards",
         "./boot/vmlinuz-*"],
        stdin=tar.stdout, check=True,
    )  # fmt: skip
    tar.wait()
    found = sorted(KERNEL_CACHE.glob("vmlinuz-6.1.0-*-amd64"))
    if not found:
        pytest.skip(f"{deb} holds no boot/vmlinuz-*")
    return found[-1]


@pytest.fixture(scope="session")
def debian_vmlinux(debian_bzimage: Path) -> Path:
    """The ELF vmlinux inside the Debian bzImage (its PVH note included), cached."""
    from boite.machine.loader import extract_payload

    out = KERNEL_CACHE / debian_bzimage.name.replace("vmlinuz", "vmlinux")
    if not out.exists():
        data = extract_payload(debian_bzimage.read_bytes(), str(debian_bzimage))
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(out)
    return out
