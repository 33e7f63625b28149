"""System-level behaviour against QEMU TCG (`qemu-system-i386 -accel tcg`) as the second
reference, where kvm_pvm cannot go: paging turned on by the guest, #PF error codes and
CR2, A/D bits, WP, INVLPG, CR3 reloads, ring 3 entered by IRET, INT from ring 3 with the
TSS stack switch, and faults at CPL 3. The same multiboot image runs under both and must
print the same lines and exit with the same status."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from boite.accel.base import StopReason
from boite.accel.cpustate import CpuState, DescriptorTable, Segment
from boite.accel.emu import EmuAccelerator
from boite.machine.devices import IsaDebugExit, Uart16550
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory
from guests.runner import CollectedOutput

pytestmark = pytest.mark.emu_tiers  # both tiers (tests/conftest.py)

GUESTS = Path(__file__).parent / "emu_guests"
LOAD = 0x100000

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-i386") is None, reason="qemu-system-i386 is not installed"
)


def _build(name: str, tmp: Path) -> Path:
    out = tmp / f"{name}.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-o", str(out), str(GUESTS / f"{name}.asm")],
        check=True,
        capture_output=True,
    )
    return out


def _multiboot_state(mem: GuestMemory, image: bytes) -> CpuState:
    """What a multiboot loader hands over (flat 32-bit, paging off, EAX = magic)."""
    off = image.index((0x1BADB002).to_bytes(4, "little"))
    entry = int.from_bytes(image[off + 28 : off + 32], "little")
    mem.write_u64(0x1000 + 8, 0x00CF9B000000FFFF)
    mem.write_u64(0x1000 + 16, 0x00CF93000000FFFF)
    code = Segment(selector=0x08, base=0, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    data = Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
    st = CpuState(rip=entry, cr0=0x11, gdt=DescriptorTable(0x1000, 23))
    st.segments = {"cs": code, **{n: data for n in ("ds", "es", "fs", "gs", "ss")}}
    st.gpr["rax"] = 0x2BADB002
    return st


def run_emu(image: bytes, translate: bool) -> tuple[int, bytes]:
    mem = GuestMemory.with_ram(16 << 20)
    m = Machine(mem)
    com = CollectedOutput()
    m.pio.register(0x3F8, 8, m.add_device("com1", Uart16550(m.irqs.line(4), com)))
    m.pio.register(0xF4, 1, m.add_device("debug-exit", IsaDebugExit(m)))
    mem.write(LOAD, image)
    m.boot_state = [_multiboot_state(mem, image)]
    acc = EmuAccelerator(translate=translate, hot_block=2)
    acc.create(m)
    res = acc.run()
    assert res.reason is StopReason.SHUTDOWN, res
    return res.exit_status, bytes(com.output)


def run_qemu(path: Path) -> tuple[int, bytes]:
    p = subprocess.run(
        ["qemu-system-i386", "-accel", "tcg", "-kernel", str(path), "-m", "64",
         "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    return p.returncode, p.stdout.replace(b"\r\n", b"\n")


@needs_qemu
@pytest.mark.parametrize("translate", [True, False], ids=["translated", "interpreted"])
def test_system_behaviour_matches_qemu_tcg(tmp_path, translate):
    img = _build("systest32", tmp_path)
    q_status, q_out = run_qemu(img)
    e_status, e_out = run_emu(img.read_bytes(), translate)
    assert q_out.endswith(b"done\n"), q_out
    assert e_out.decode() == q_out.decode()
    assert e_status == q_status == (0x31 << 1) | 1


@needs_qemu
def test_compute_loop_matches_qemu_tcg(tmp_path):
    img = _build("compute32", tmp_path)
    q_status, q_out = run_qemu(img)
    e_status, e_out = run_emu(img.read_bytes(), True)
    assert e_out == q_out and e_status == q_status == (0x31 << 1) | 1
