"""The tiny Linux guest sees /dev/vda (virtio-blk) and /dev/sda (emulated ATA) backed by
VMDKs: it reads a known pattern from each, writes, syncs and powers off, and the host
checks both VMDKs with qemu-img compare.

Linux boots under KVM only on real VT-x/AMD-V (this project's kvm_pvm ends in emulation
failures, QEMU too), and under the emulator unless BOITE_SKIP_EMU_LINUX is set (slow: the
emulator interprets every instruction of the boot). BOITE_TEST_KERNEL / BOITE_TEST_INITRD
name a kernel and initramfs to use instead of the guest kit's (for machines without the
kit's build tools).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import requires_real_vtx

pytestmark = pytest.mark.slow


ACCELS = [
    pytest.param("kvm", marks=requires_real_vtx),
    pytest.param(
        "emu",
        marks=pytest.mark.skipif(
            bool(os.environ.get("BOITE_SKIP_EMU_LINUX")),
            reason="BOITE_SKIP_EMU_LINUX is set (Linux under the emulator takes a minute or more)",
        ),
    ),
]

SIZE = 8 << 20


def _kernel_and_initrd() -> tuple[str, str]:
    if os.environ.get("BOITE_TEST_KERNEL"):
        return os.environ["BOITE_TEST_KERNEL"], os.environ["BOITE_TEST_INITRD"]
    guestkit = pytest.importorskip("boite.guestkit", reason="needs the guest kit")
    kit = guestkit.ensure_kit(("i386",))
    return str(kit.i386_bzimage), str(kit.initrd_i386)


def _disk(tmp_path: Path, name: str, seed: int) -> tuple[Path, bytes]:
    block = hashlib.sha256(f"{name}-{seed}".encode()).digest()
    data = b"".join(
        hashlib.sha256(block + i.to_bytes(4, "little")).digest() for i in range(SIZE // 32)
    )
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(data)
    vmdk = tmp_path / f"{name}.vmdk"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk)], check=True
    )
    return vmdk, data


@pytest.mark.parametrize("accel", ACCELS)
def test_linux_reads_and_writes_vda_and_sda(tmp_path: Path, accel: str) -> None:
    from boite.machine.builder import build_machine
    from boite.machine.devices import ConsoleBackend
    from boite.machine.virtio.attach import DiskFiles
    from boite.vmm import Vmm, accelerator_for

    kernel, initrd = _kernel_and_initrd()
    vda, vda_data = _disk(tmp_path, "vda", 1)
    sda, sda_data = _disk(tmp_path, "sda", 2)
    run = (
        "for d in vda sda; do dd if=/dev/$d bs=4096 count=1 2>/dev/null | md5sum; done; "
        "echo boite-was-here-vda | dd of=/dev/vda bs=512 seek=64 conv=notrunc 2>/dev/null; "
        "echo boite-was-here-sda | dd of=/dev/sda bs=512 seek=64 conv=notrunc 2>/dev/null; "
        "sync; echo disks-done"
    )
    cmdline = f'console=ttyS0 panic=-1 boite.exitport=0x505 boite.run="{run}"'
    console = ConsoleBackend()
    disks = DiskFiles([str(vda), f"ide:{sda}"], with_rng=True)

    def make_machine():
        return build_machine(
            256, 1, {1: console}, kernel, initrd, cmdline,
            emulated_irqchip=accel == "emu", extra_devices=[disks],
        )  # fmt: skip

    vmm = Vmm(make_machine, lambda: accelerator_for(accel), console=console, name="linux-disks")
    seen = bytearray()

    def watch(data: bytes) -> None:
        # Stop at the init's power-off marker: what happens after it (the exit-port write,
        # a halt) is the accelerator's business, not the disks'.
        seen.extend(data)
        at = seen.find(b"BOITE-POWEROFF")
        if at >= 0 and b"\n" in seen[at:] and not stopping:  # the whole line is out
            stopping.append(True)
            threading.Thread(target=vmm.stop, kwargs={"soft": False}, daemon=True).start()

    stopping: list[bool] = []
    console.attach(watch)
    vmm.run()
    out = seen.decode(errors="replace")
    assert "BOITE-POWEROFF status=0" in out, out[-4000:]
    for data in (vda_data, sda_data):
        assert hashlib.md5(data[:4096]).hexdigest() in out, out[-4000:]
    assert "disks-done" in out and "BOITE-EXIT status=0" in out, out[-4000:]

    for path, data, tag in ((vda, vda_data, b"vda"), (sda, sda_data, b"sda")):
        want = bytearray(data)
        line = b"boite-was-here-" + tag + b"\n"
        want[64 * 512 : 64 * 512 + len(line)] = line
        expected = tmp_path / f"{tag.decode()}-expected.raw"
        expected.write_bytes(want)
        res = subprocess.run(
            ["qemu-img", "compare", "-F", "raw", str(path), str(expected)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr
