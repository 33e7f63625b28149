"""Memory snapshots and suspend of a running bare-metal guest, under KVM and the emulator.

The guest (tests/guests/count32.asm) counts in EBX and writes every value to port 0x510.
A snapshot taken mid-count, reverted to and started again, must carry on from exactly the
saved value; so must a suspended box on its next start. A state saved under one
accelerator resumes under the other.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from boite.box import Box
from boite.box.checkpoint import read_checkpoint
from boite.snapshot import (
    check_snapshot_tree,
    resume_state,
    resumed,
    resuming_accelerator,
    revert_snapshot,
    snapshot_running,
    suspend_running,
)
from boite.vmm import Vmm
from conftest import kvm_available
from guests.runner import build_guest_machine


class CounterPort:
    """Port 0x510: records the count; asks the VMM to pause once it reaches `pause_at`."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.vmm: Vmm | None = None
        self.pause_at: int | None = None

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)
        if value == self.pause_at and self.vmm is not None:
            self.vmm.pause()


def accelerator(name: str):
    if name == "kvm":
        if not kvm_available():
            pytest.skip("needs /dev/kvm (not present)")
        from boite.accel.kvm import KvmAccelerator

        return lambda: KvmAccelerator(irqchip=False)
    from boite.accel.emu import EmuAccelerator

    return EmuAccelerator


def counting_vmm(limit: int, accel_factory, port: CounterPort, vcpus: int = 1) -> Vmm:
    def build():
        machine, _com1, _ = build_guest_machine("count32", "flat32", vcpus=vcpus, LIMIT=limit)
        machine.pio.register(0x510, 4, port)
        return machine

    vmm = Vmm(build, accel_factory, name="counter")
    port.vmm = vmm
    return vmm


def start(vmm: Vmm) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["status"] = vmm.run()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def finish(t: threading.Thread, out: dict) -> int:
    t.join(120)
    assert not t.is_alive(), "the guest did not finish"
    if "error" in out:
        raise out["error"]
    return out["status"]


def wait_paused(vmm: Vmm) -> None:
    import time

    deadline = time.monotonic() + 30
    while vmm.state.value != "paused":
        assert time.monotonic() < deadline, f"never paused: {vmm.state.value}"
        time.sleep(0.005)


@pytest.fixture
def diskless_box(tmp_path) -> Box:
    return Box.create(tmp_path / "counter", disk_size=0)


EXIT = (0x28 << 1) | 1


@pytest.mark.parametrize(
    ("first", "second"),
    [("kvm", "kvm"), ("emu", "emu"), ("kvm", "emu"), ("emu", "kvm")],
)
def test_revert_to_memory_snapshot_keeps_counting(diskless_box: Box, first, second) -> None:
    box = diskless_box
    pause_at = 700
    limit = pause_at + 1500
    port = CounterPort()
    port.pause_at = pause_at
    vmm = counting_vmm(limit, accelerator(first), port)
    t, out = start(vmm)
    wait_paused(vmm)
    snap = snapshot_running(vmm, box, "mid-count", memory=True)
    vmm.resume()
    assert finish(t, out) == EXIT
    assert port.values == list(range(1, limit + 1))

    vmsn = box.dir / snap.filename
    saved = read_checkpoint(vmsn)
    assert saved.cpu_states[0].gpr["rbx"] == pause_at
    assert saved.meta["accelerator"] == first
    saved.memory.close()
    assert check_snapshot_tree(box) == []

    revert_snapshot(box, "mid-count")
    state = resume_state(box)
    assert state == vmsn
    port2 = CounterPort()
    restored: list[bool] = []
    vmm2 = counting_vmm(
        limit,
        resuming_accelerator(accelerator(second), state, lambda: restored.append(True)),
        port2,
    )
    assert vmm2.run() == EXIT
    assert restored == [True]
    assert port2.values == list(range(pause_at + 1, limit + 1))
    resumed(Box.open(box.dir))
    box = Box.open(box.dir)
    assert "checkpoint.vmState" not in box.vmx
    assert vmsn.exists()  # a snapshot's state stays for the next revert


@pytest.mark.parametrize("accel", ["kvm", "emu"])
def test_suspend_then_start_resumes_and_removes_the_state(diskless_box: Box, accel) -> None:
    box = diskless_box
    pause_at, limit = 500, 1800
    port = CounterPort()
    port.pause_at = pause_at
    vmm = counting_vmm(limit, accelerator(accel), port)
    t, out = start(vmm)
    wait_paused(vmm)
    path = suspend_running(vmm, box)
    assert finish(t, out) == 0  # powered off, not finished
    assert port.values == list(range(1, pause_at + 1))
    assert path == box.dir / "counter.vmss"
    assert (box.dir / "counter.vmem").exists()
    box = Box.open(box.dir)
    assert box.vmx["checkpoint.vmState"] == "counter.vmss"
    assert check_snapshot_tree(box) == []

    # volatility3's stacker pairs the .vmem with the .vmss: RAM as the guest left it.
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical, vmware

    ctx = contexts.Context()
    ctx.config["layers.f.location"] = Path(box.dir / "counter.vmem").as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "layers.f", "f"))
    layer = vmware.VmwareStacker.stack(ctx, "f")
    code = layer.read(0x100000, 16)
    assert code.startswith(b"\x31\xdb")  # xor ebx, ebx: the guest's first instruction

    port2 = CounterPort()
    vmm2 = counting_vmm(limit, resuming_accelerator(accelerator(accel), resume_state(box)), port2)
    assert vmm2.run() == EXIT
    assert port2.values == list(range(pause_at + 1, limit + 1))
    resumed(box)
    assert not (box.dir / "counter.vmss").exists() and not (box.dir / "counter.vmem").exists()
    assert "checkpoint.vmState" not in Box.open(box.dir).vmx


class SnapshotControl:
    """The control socket `boite start` runs (snapshot.control_server), for a test VMM."""

    def __init__(self, vmm: Vmm, box: Box) -> None:
        from boite.snapshot import control_server
        from boite.vmm import control_socket_path

        self.path = control_socket_path(box.dir, box.name)
        self.server = control_server(vmm, box, self.path)

    def __enter__(self) -> SnapshotControl:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()


def test_cli_snapshot_and_suspend_of_a_running_box(diskless_box: Box, boite_cli) -> None:
    if not kvm_available():
        pytest.skip("needs /dev/kvm (not present)")
    box = diskless_box
    port = CounterPort()
    port.pause_at = 300
    vmm = counting_vmm(1_000_000_000, accelerator("kvm"), port)
    with box.acquire_lock(), SnapshotControl(vmm, box) as control:
        box.set_control_socket(str(control.path))
        t, out = start(vmm)
        wait_paused(vmm)
        vmm.resume()
        r = boite_cli("snapshot", box.dir, "live", "--description", "counting", "--json")
        assert r.returncode == 0, r.stderr
        assert json_loads(r.stdout)["uid"] == 1
        # A running box reverts in place (issue 13): its memory snapshot resumes.
        r = boite_cli("revert", box.dir, "live", "--json")
        assert r.returncode == 0 and json_loads(r.stdout)["memory"] is True, r.stderr
        assert vmm.state.value == "running"
        r = boite_cli("suspend", box.dir)
        assert r.returncode == 0 and "counter.vmss" in r.stdout, r.stderr
        assert finish(t, out) == 0
    counted = port.values[-1]
    saved = read_checkpoint(box.dir / "counter.vmss")
    # Paused after its last OUT, or between that INC and the OUT that would follow.
    assert saved.cpu_states[0].gpr["rbx"] in (counted, counted + 1)
    saved.memory.close()
    # The next start resumes the count exactly where it stopped.
    port2 = CounterPort()
    port2.pause_at = counted + 50
    vmm2 = counting_vmm(
        1_000_000_000, resuming_accelerator(accelerator("kvm"), resume_state(box)), port2
    )
    t, out = start(vmm2)
    wait_paused(vmm2)
    vmm2.stop()
    assert finish(t, out) == 0
    assert port2.values == list(range(counted + 1, counted + 51))
    snap = read_checkpoint(box.dir / "counter-Snapshot1.vmsn")
    assert 300 <= snap.cpu_states[0].gpr["rbx"] < counted
    snap.memory.close()
    r = boite_cli("snapshots", box.dir, "--json")
    data = json_loads(r.stdout)
    assert data["suspended"] == "counter.vmss" and data["snapshots"][0]["memory"]
    assert "the next start resumes from counter.vmss" in boite_cli("snapshots", box.dir).stdout
    assert check_snapshot_tree(Box.open(box.dir)) == []


def json_loads(text: str):
    import json

    return json.loads(text)


def test_running_snapshot_moves_a_virtio_disk_onto_its_new_link(tmp_path) -> None:
    """Writes after a live snapshot land in the new delta; the frozen link keeps the old
    data (the device is switched while the guest is paused)."""
    from boite.disk import open_disk
    from boite.machine.virtio.blk import VirtioBlk
    from boite.machine.virtio.mmio import VirtioMmio

    box = Box.create(tmp_path / "withdisk", disk_size=4 << 20)
    port = CounterPort()
    port.pause_at = 200
    blk: list[VirtioBlk] = []

    def build():
        machine, _com1, _ = build_guest_machine("count32", "flat32", LIMIT=1_000_000_000)
        machine.pio.register(0x510, 4, port)
        backend = VirtioBlk(open_disk(box.disk_path(box.vmx["scsi0:0.fileName"])))
        dev = VirtioMmio(backend, machine.memory, machine.irqs.line(5), base=0xD000_2000)
        machine.mmio.register(0xD000_2000, 0x1000, dev)
        machine.add_device("virtio-blk-scsi0:0", dev)
        blk.append(backend)
        return machine

    vmm = Vmm(build, accelerator("kvm" if kvm_available() else "emu"), name="disk")
    port.vmm = vmm
    t, out = start(vmm)
    wait_paused(vmm)
    blk[0].image.write(0, b"A" * 512)  # what the guest wrote before the snapshot
    snapshot_running(vmm, box, "live", memory=True)
    assert blk[0].image.path == str((box.dir / "withdisk-000001.vmdk").resolve())
    blk[0].image.write(0, b"B" * 512)  # and after it
    blk[0].image.flush()
    vmm.stop()
    finish(t, out)
    with open_disk(box.dir / "withdisk.vmdk", read_only=True) as frozen:
        assert frozen.read(0, 512) == b"A" * 512
    with open_disk(box.dir / "withdisk-000001.vmdk", read_only=True) as current:
        assert current.read(0, 512) == b"B" * 512
    assert check_snapshot_tree(Box.open(box.dir)) == []


def test_the_emulator_refuses_a_64_bit_state(tmp_path) -> None:
    from boite.accel.cpustate import CpuState
    from boite.box.checkpoint import write_checkpoint
    from boite.errors import SnapshotError
    from boite.machine.memory import GuestMemory
    from boite.snapshot import restore_machine, unportable_state

    st = CpuState(efer=0x500, cr0=0x8000_0011, cr4=0x20)  # long mode: LME, LMA, PG, PAE
    st.gpr["r9"] = 1 << 40
    assert unportable_state([st], "kvm") == []
    assert unportable_state([st], "emu") == [
        "vCPU 0 is in 64-bit long mode (EFER.LMA)",
        "vCPU 0 has 64-bit values in r9",
    ]
    write_checkpoint(
        tmp_path / "l.vmsn", tmp_path / "l.vmem", [st], GuestMemory.with_ram(1 << 20), {}
    )
    machine, _, _ = build_guest_machine("count32", "flat32", LIMIT=10)
    accel = accelerator("emu")()
    accel.create(machine)
    with pytest.raises(SnapshotError, match="emu accelerator cannot resume this state"):
        restore_machine(machine, accel, tmp_path / "l.vmsn")


def test_emulated_two_vcpu_box_snapshots_and_reverts(diskless_box: Box) -> None:
    """A 2-vCPU machine under the emulator whose guest never starts its AP: the snapshot
    holds both vCPUs (the second parked, waiting for INIT/SIPI as KVM would see it) and
    both local APICs, and reverts."""
    from boite.accel.emu import EmuAccelerator
    from boite.errors import AccelError

    box = diskless_box
    port = CounterPort()
    port.pause_at = 300
    vmm = counting_vmm(900, EmuAccelerator, port, vcpus=2)
    logged: list[str] = []
    vmm.log = logged.append  # type: ignore[method-assign]
    t, out = start(vmm)
    wait_paused(vmm)
    assert not any("stay parked" in line for line in logged), logged
    snap = snapshot_running(vmm, box, "two", memory=True)
    vmm.resume()
    assert finish(t, out) == EXIT
    saved = read_checkpoint(box.dir / snap.filename)
    assert len(saved.cpu_states) == 2
    assert saved.cpu_states[1].extra["kvm_mp_state"] == 1  # KVM_MP_STATE_UNINITIALIZED
    assert len(saved.device_state["lapic"]["apics"]) == 2
    saved.memory.close()

    revert_snapshot(box, "two")
    port2 = CounterPort()
    vmm2 = counting_vmm(
        900, resuming_accelerator(EmuAccelerator, resume_state(box)), port2, vcpus=2
    )
    assert vmm2.run() == EXIT
    assert port2.values == list(range(301, 901))

    # A state where vCPU 1 was running (KVM_MP_STATE_RUNNABLE) goes on with it running;
    # a state for another number of vCPUs does not load.
    machine, _, _ = build_guest_machine("count32", "flat32", vcpus=2, LIMIT=10)
    acc = EmuAccelerator()
    acc.create(machine)
    states = acc.save_cpu_state()
    assert acc.smp is not None and acc.smp.waiting == [False, True]
    states[1] = dict(states[0], extra={"kvm_mp_state": 0})
    acc.load_cpu_state(states)
    assert acc.smp.waiting == [False, False]
    with pytest.raises(AccelError, match="3 vCPU states for 2 vCPUs"):
        acc.load_cpu_state(states + states[:1])
    acc.close()
