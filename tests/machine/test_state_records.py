"""Every device's saved state: typed, versioned records that round-trip exactly and refuse
anything else with a CheckpointError naming the device and the field, all or nothing.

The machine here is a real PC from `build_machine` with every kind of device boite has
(COM ports, CMOS RTC, i8042 and port 0x92, PIC, PIT and port 0x61, IOAPIC, fw_cfg,
debug-exit, power-off and reset ports, two ATA channels, virtio-mmio blk, net, console
and rng). Its state is round-tripped as built, after host-side register traffic, and
after a bare-metal guest ran on it under the emulator; then fuzzed: record by record
(random values, missing and extra fields, wrong types and versions) and as a whole
checkpoint file (bit flips, truncation) through `restore_machine`. The end-to-end part
resumes and reverts damaged files through the `boite` command.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib
import json
import os
import pkgutil
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import boite.machine as machine_package
from boite.accel.emu import EmuAccelerator
from boite.box.checkpoint import (
    Checkpoint,
    CheckpointGroup,
    Tag,
    read_checkpoint,
    write_checkpoint,
)
from boite.disk import open_disk
from boite.errors import CheckpointError, GuestError
from boite.machine.builder import build_machine
from boite.machine.device import Device, StatelessDevice
from boite.machine.devices.debugcon import DEBUGCON_PORT, DebugCon
from boite.machine.devices.lapic import ApicBus
from boite.machine.devices.uart import NullBackend
from boite.machine.machine import Machine
from boite.machine.pci import PciFunction
from boite.machine.virtio.attach import DevicePlan, DiskPlan, NicPlan, attach_devices
from boite.machine.virtio.fuzz import SocketWire
from boite.machine.virtio.guestdriver import BlkDriver, GuestAllocator, VirtioMmioDriver
from boite.machine.virtio.mmio import VirtioBackend, VirtioMmio
from boite.machine.virtio.pci import VirtioPci
from boite.machine.virtio.rng import VirtioRng
from boite.snapshot import restore_machine
from conftest import requires_kvm
from guests.build import assemble
from guests.runner import MODES

MiB = 1 << 20
RAM_MB = 8
FROZEN_NS = 5_000_000_000_000
FROZEN_WALL = 1_800_000_000.0
VIRTIO_BLK, VIRTIO_NET, VIRTIO_CONSOLE = 0xD000_0000, 0xD000_1000, 0xD000_2000
# Every port a device of the built machine answers (the fuzz reads them after a load).
PORTS = (
    *range(0x3F8, 0x400), *range(0x2F8, 0x300), 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1,
    *range(0x40, 0x44), 0x61, 0x70, 0x71, 0x60, 0x64, 0x92, *range(0x1F0, 0x1F8), 0x3F6,
    *range(0x170, 0x178), 0x376, 0x510, 0x511, 0x505, 0xCF9,
)  # fmt: skip


class QuietPort:
    """A named virtio-console port's host end (as the guest tools' is) that ignores data."""

    name = "org.boite.test.0"

    def connect(self, port: Any) -> None:
        pass

    def receive(self, data: bytes) -> None:
        pass

    def opened(self, is_open: bool) -> None:
        pass


class PcWithEverything:
    """build_machine() plus every virtio and ATA device, on raw disks in `directory`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        disks = []
        for key, kind, ch, unit in (
            ("scsi0:0", "virtio-blk", 0, 0),
            ("ide0:0", "ata", 0, 0),
            ("ide1:1", "ata", 1, 1),
        ):
            path = directory / f"{key.replace(':', '-')}.img"
            if not path.exists():
                path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
            disks.append(DiskPlan(key, kind, path, ch, unit))
        plan = DevicePlan(disks, [NicPlan("ethernet0", "00:0c:29:aa:bb:cc", "hostonly", "")])
        self.attached: Any = None

        def hook(machine: Machine) -> str:
            self.attached = attach_devices(
                machine, plan, open_disk=open_disk, open_tap=lambda _name: SocketWire(),
                with_console=True, console=lambda data: None, ports=[QuietPort()],
            )  # fmt: skip
            # What a firmware-booted machine has beyond these (issue 12): SeaBIOS's debug
            # port, a virtio-pci function, a bare PCI function, a local APIC.
            machine.attach("debugcon", DebugCon(), ports=[(DEBUGCON_PORT, 1)])
            rng = VirtioPci(VirtioRng(), machine.memory, name="virtio-rng-pci")
            machine.attach("virtio-rng-pci", rng, pci=(machine.pci.free_slot(), 0))
            probe = PciFunction(0x1234, 0x5678, 0xFF0000, interrupt_pin=1)
            machine.attach("pci-probe", probe, pci=(machine.pci.free_slot(), 0))
            machine.attach("lapic0", ApicBus(1, time.monotonic_ns).apics[0])
            return " ".join(self.attached.cmdline)

        self.machine = build_machine(
            RAM_MB, serial_backends=[NullBackend(), NullBackend()], extra_devices=[hook]
        )

    def freeze_clocks(self) -> None:
        """Time-relative fields (PIT phases, RTC offsets) compare equal under a still clock."""
        for dev in self.machine.devices.values():
            if hasattr(dev, "clock_ns"):
                dev.clock_ns = lambda: FROZEN_NS
            if hasattr(dev, "wall_clock"):
                dev.wall_clock = lambda: FROZEN_WALL

    def close(self) -> None:
        self.attached.close()
        self.machine.memory.close()


@pytest.fixture
def pc(tmp_path):
    made: list[PcWithEverything] = []

    def make() -> PcWithEverything:
        made.append(PcWithEverything(tmp_path / "disks"))
        made[-1].freeze_clocks()
        return made[-1]

    yield make
    for p in made:
        p.close()


def host_traffic(m: Machine) -> None:
    """Register traffic as a guest's drivers would make it: every device away from reset."""
    pio = m.pio
    pio.write(0x3F8 + 3, 1, 0x83)  # COM1: DLAB, 8N1
    pio.write(0x3F8, 1, 0x01)  # 115200 baud
    pio.write(0x3F8 + 3, 1, 0x03)
    pio.write(0x3F8 + 2, 1, 0xC7)  # FIFO on, trigger 14
    pio.write(0x3F8 + 1, 1, 0x05)
    pio.write(0x3F8 + 7, 1, 0x5A)
    m.devices["com1"].feed(b"typed ahead" * 3)
    for port, value in (
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xB8),
        (0xA0, 0x11),
        (0xA1, 0x28),
        (0xA1, 0x02),
        (0xA1, 0x01),
        (0x4D1, 0x0E),
    ):
        pio.write(port, 1, value)  # fmt: skip
    pio.write(0x43, 1, 0x34)  # PIT channel 0, mode 2, 1000 Hz
    pio.write(0x40, 1, 0xA9)
    pio.write(0x40, 1, 0x04)
    pio.write(0x43, 1, 0xB6)  # channel 2 mode 3, LSB only so far
    pio.write(0x42, 1, 0x33)
    pio.write(0x43, 1, 0x00)  # latch channel 0
    pio.read(0x40, 1)
    pio.write(0x61, 1, 0x03)
    pio.write(0x70, 1, 0x0B)
    pio.write(0x71, 1, 0x42)  # RTC: periodic interrupt on
    pio.write(0x70, 1, 0x8F)  # NMI masked, index 0x0f
    pio.write(0x64, 1, 0x20)  # i8042: read the command byte (waits in the output buffer)
    m.devices["i8042"].inject_scancodes(b"\x1e\x9e\x30")
    pio.write(0x64, 1, 0xD1)  # a command waiting for its data byte
    pio.write(0x92, 1, 0x02)
    ioapic = m.mmio
    ioapic.write(0xFEC0_0000, 4, 0x12)  # redirection entry 1, low half
    ioapic.write(0xFEC0_0010, 4, 0x0000_A031)
    pio.write(0x510, 2, 0x0000)  # fw_cfg: signature, two bytes read
    pio.read(0x511, 1)
    pio.read(0x511, 1)
    pio.write(0x1F6, 1, 0xE0)  # ATA: IDENTIFY on ide0 master, ten words read
    pio.write(0x1F7, 1, 0xEC)
    for _ in range(10):
        pio.read(0x1F0, 2)
    pio.write(0x176, 1, 0xF0)  # ide1 slave selected, a task file written
    pio.write(0x172, 1, 0x08)
    alloc = GuestAllocator(0x40_0000, 0x60_0000)
    blk = BlkDriver(m.mmio, VIRTIO_BLK, m.memory, alloc)
    blk.setup()
    data = alloc.alloc(4096)
    assert blk.request(0, 8, data, 4096) == (0, 4097)
    VirtioMmioDriver(m.mmio, VIRTIO_CONSOLE, m.memory, alloc).init(0xFFFF_FFFF_FFFF)
    m.devices["virtio-console"].backend.feed(b"hvc0 input")
    net = VirtioMmioDriver(m.mmio, VIRTIO_NET, m.memory, alloc)
    net.write_reg(0x070, 1)  # ACKNOWLEDGE only: a driver half way through probing
    net.write_reg(0x030, 1)
    net.write_reg(0x038, 64)


# -- the pattern holds for every device ------------------------------------------------------


def subclasses_in_machine(base: type) -> set[type]:
    """Every subclass of `base` defined under boite.machine (all its modules imported)."""
    for info in pkgutil.walk_packages(machine_package.__path__, "boite.machine."):
        importlib.import_module(info.name)
    found: set[type] = set()
    todo = [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("boite.machine.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def device_classes() -> set[type[Device]]:
    return subclasses_in_machine(Device) - {StatelessDevice}


def test_every_device_class_saves_a_checked_record() -> None:
    """A device added later (PCI, IDE/ATAPI, LAPIC...) must follow machine/state.py."""
    for cls in device_classes():
        if issubclass(cls, StatelessDevice):
            continue
        for method in ("save_state", "check_state", "apply_state"):
            assert getattr(cls, method) is not getattr(Device, method), (
                f"{cls.__module__}.{cls.__name__} has no {method}(): give it a StateRecord "
                "(docs/architecture.md, 'Device state')"
            )


def test_every_virtio_backend_with_state_saves_a_checked_record() -> None:
    """A backend's record is checked by the transport through check_state/apply_state;
    one that only overrides save_state/load_state would save what no restore accepts."""
    for cls in subclasses_in_machine(VirtioBackend):
        own = {
            m for m in ("save_state", "load_state", "check_state", "apply_state") if m in vars(cls)
        }
        if own:
            assert own >= {"save_state", "check_state", "apply_state"}, (
                f"{cls.__module__}.{cls.__name__} overrides {sorted(own)}: a backend with state "
                "needs save_state, check_state and apply_state (docs/architecture.md, "
                "'Device state')"
            )


def test_the_machine_has_every_kind_of_device(pc) -> None:
    m = pc().machine
    on_buses = [d for bus in (m.pio, m.mmio) for _, _, d in bus.devices()]
    kinds = {type(d) for d in [*m.devices.values(), *on_buses]}
    kinds |= {type(d.backend) for d in m.devices.values() if isinstance(d, VirtioMmio)}
    wanted = device_classes() | subclasses_in_machine(VirtioBackend)
    missing = {c for c in wanted if c not in kinds}
    assert not missing, f"add {sorted(c.__name__ for c in missing)} to PcWithEverything"
    # A device with state that the machine does not list would not be saved at all.
    saved = [id(d) for d in m.devices.values()]
    for d in on_buses:
        if isinstance(d, Device) and not isinstance(d, StatelessDevice):
            assert id(d) in saved, f"{type(d).__name__} is on a bus but not in machine.devices"


# -- round trips -----------------------------------------------------------------------------


def assert_round_trip(saved: dict[str, Any], target: Machine) -> None:
    target.load_device_state(copy.deepcopy(saved))
    again = target.save_device_state()
    for name in saved:
        assert again[name] == saved[name], name
    assert set(again) == set(saved)


def test_built_machine_round_trips(pc) -> None:
    a = pc()
    fresh = a.machine.save_device_state()
    assert all(s["version"] >= 1 for s in fresh.values())
    host_traffic(a.machine)
    busy = a.machine.save_device_state()
    assert busy != fresh
    b = pc()
    assert_round_trip(busy, b.machine)
    assert_round_trip(fresh, b.machine)


def test_round_trip_through_a_checkpoint_file(pc, tmp_path) -> None:
    a = pc()
    host_traffic(a.machine)
    state = a.machine.save_device_state()
    write_checkpoint(tmp_path / "s.vmsn", tmp_path / "s.vmem", [], a.machine.memory, state)
    saved = read_checkpoint(tmp_path / "s.vmsn")
    saved.memory.close()
    assert saved.device_state == state
    assert_round_trip(saved.device_state, pc().machine)


def run_guest_on(p: PcWithEverything, guest: str, **defines: Any) -> EmuAccelerator:
    """Load a flat 32-bit bare-metal guest and run it to its debug-exit under the emulator."""
    load_addr, make_state = MODES["flat32"]
    p.machine.memory.write(load_addr, assemble(guest, **defines).read_bytes())
    p.machine.boot_state = [make_state(p.machine.memory, load_addr)]
    accel = EmuAccelerator()
    accel.create(p.machine)
    for dev in p.machine.devices.values():  # the guest runs in real time
        if hasattr(dev, "clock_ns"):
            dev.clock_ns = time.monotonic_ns
    accel.run()
    assert p.machine.exit_status == (0x21 << 1) | 1, p.machine.exit_status
    p.freeze_clocks()
    return accel


@pytest.mark.parametrize("guest", ["vblk32", "ata32"])
def test_state_after_a_guest_run_restores_exactly(pc, tmp_path, guest) -> None:
    """A real driver's traffic, saved to a checkpoint and resumed into a fresh machine:
    devices and vCPU come back as they were."""
    a = pc()
    accel = run_guest_on(a, guest, VBLK=VIRTIO_BLK)
    state = a.machine.save_device_state()
    cpus = accel.save_cpu_state()
    vmsn = tmp_path / "g.vmsn"
    write_checkpoint(vmsn, vmsn.with_suffix(".vmem"), cpus, a.machine.memory, state,
                     meta={"accelerator": "emu", "vcpus": 1})  # fmt: skip
    accel.close()
    b = pc()
    accel2 = EmuAccelerator()
    accel2.create(b.machine)
    restore_machine(b.machine, accel2, vmsn)
    assert b.machine.save_device_state() == state
    back = accel2.save_cpu_state()
    for st in (cpus[0], back[0]):
        st["msrs"].pop("16", None)  # the TSC runs on
    assert back == cpus
    assert b.machine.memory.read(0x100000, 4096) == a.machine.memory.read(0x100000, 4096)
    accel2.close()


# -- record fuzz -----------------------------------------------------------------------------


def junk(rng: random.Random) -> Any:
    """A value of any JSON (or checkpoint-JSON) type, often at a width's edge."""
    pick = rng.randrange(12)
    if pick < 4:
        bits = rng.choice((1, 2, 3, 4, 7, 8, 15, 16, 24, 31, 32, 47, 48, 63, 64, 65, 200))
        return rng.choice(
            (0, 1, -1, (1 << bits) - 1, 1 << bits, -(1 << bits), rng.getrandbits(bits))
        )
    if pick == 4:
        return rng.choice((True, False, None))
    if pick == 5:
        return rng.choice((0.5, -1.0, float("nan"), float("inf"), 1e300, 0.0))
    if pick == 6:
        n = rng.choice((0, 1, 2, 7, 8, 31, 32, 33, 129, 256, 257, 1024, 4096))
        return rng.randbytes(n).hex()
    if pick == 7:
        return rng.choice(
            ("", "read", "write", "zz", "0g", "ABCD", " 00", "\u00e9\u00e9", "x" * 300)
        )
    if pick == 8:
        return [junk(rng) for _ in range(rng.choice((0, 1, 2, 3, 4, 24, 25)))]
    if pick == 9:
        return {rng.choice(("a", "version", "size", "memory")): junk(rng) for _ in range(2)}
    if pick == 10:
        return rng.randbytes(rng.choice((0, 1, 16, 512)))  # what {"$bytes": ...} decodes to
    return tuple(rng.getrandbits(8) for _ in range(rng.choice((0, 2, 3))))


def mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """`value` with one change somewhere inside it."""
    if isinstance(value, dict) and value and rng.random() < 0.9:
        out = dict(value)
        key = rng.choice(sorted(out))
        roll = rng.random()
        if roll < 0.08:
            del out[key]
        elif roll < 0.14:
            out[rng.choice(("extra", "memory", "Version", "rx "))] = junk(rng)
        elif roll < 0.2 and depth == 0:
            out["version"] = rng.choice((0, 2, -1, "1", 1.0, None, True))
        else:
            out[key] = mutate(out[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out_l = list(value)
        roll = rng.random()
        if roll < 0.1:
            out_l.pop(rng.randrange(len(out_l)))
        elif roll < 0.2:
            out_l.append(copy.deepcopy(rng.choice(out_l)))
        else:
            i = rng.randrange(len(out_l))
            out_l[i] = mutate(out_l[i], rng, depth + 1)
        return out_l
    if type(value) is int and rng.random() < 0.6:  # a near miss: same type, edge values
        return rng.choice((value + 1, value - 1, value ^ (1 << rng.randrange(64)), value << 8, 0))
    return junk(rng)


def poke(m: Machine) -> None:
    """What the guest and the VMM do next with a machine whose state was just loaded."""
    for port in PORTS:
        m.pio.read(port, 1)
    m.pio.write(0x1F0, 2, 0xBEEF)
    m.pio.write(0x170, 4, 0xBEEF)
    m.pio.read(0x170, 4)
    for dev_name in ("pit", "rtc"):
        dev = m.devices.get(dev_name)
        if dev is not None:
            dev.next_deadline_ns()
            dev.advance()
    for base in (VIRTIO_BLK, VIRTIO_NET, VIRTIO_CONSOLE, 0xD000_3000):
        for off in (0x034, 0x044, 0x060, 0x070, 0x080, 0x100, 0x108):
            m.mmio.read(base + off, 4)
        for q in (0, 1):
            m.mmio.write(base + 0x050, 4, q)  # QueueNotify: pops what the rings hold
    m.mmio.read(0xFEC0_0010, 4)
    m.save_device_state()


def test_fuzzed_records_load_whole_or_fail_naming_device_and_field(pc) -> None:
    """Thousands of damaged records: each loads completely (and the machine goes on
    working) or raises CheckpointError naming the device, with no device changed."""
    p = pc()
    m = p.machine
    host_traffic(m)
    baseline = m.save_device_state()
    names = sorted(baseline)
    rng = random.Random(14)
    refused = accepted = 0
    for case in range(3000):
        name = rng.choice(names)
        state = dict(baseline)  # mutate() copies what it changes
        state[name] = mutate(state[name], rng)
        try:
            m.load_device_state(state)
        except CheckpointError as exc:
            refused += 1
            assert str(exc).startswith(f"device {name!r}: "), (case, str(exc))
            assert "\n" not in str(exc) and len(str(exc)) < 400, str(exc)
            if case % 5 == 0:  # (the machine is at the baseline before every case)
                assert m.save_device_state() == baseline, f"case {case}: {name} half-restored"
            continue
        accepted += 1
        try:
            poke(m)
        except GuestError:
            pass  # the guest's own fault, as it would be without a restore
        m.load_device_state(baseline)
    assert refused > 2000 and accepted > 100, (refused, accepted)


def test_machine_level_record_is_checked(pc) -> None:
    m = pc().machine
    good = m.save_device_state()
    for bad, match in [
        ([1], "not a dictionary"),
        ({**good, "lpt1": {"version": 1}}, "device\\(s\\) lpt1 which this machine does not have"),
        ({k: v for k, v in good.items() if k != "pit"}, "no saved state for device\\(s\\) pit"),
        ({**good, "virtio-blk-scsi0:0": {**good["virtio-blk-scsi0:0"], "queues": [{"memory": 5, "size": 3}]}},
         "device 'virtio-blk-scsi0:0': queues\\[0\\].memory: unknown field"),
    ]:  # fmt: skip
        with pytest.raises(CheckpointError, match=match):
            m.load_device_state(bad)
    assert m.save_device_state() == good


@pytest.mark.parametrize(
    ("device", "change", "match"),
    [
        ("com1", {"rx": "00" * 17}, "rx: .* at most 16"),
        ("com1", {"ier": 0x10}, "ier: 0x10 has bits 0x10 outside 0xf"),
        ("pit", {"channels": "x"}, "channels: 'x' is not a list"),
        ("rtc", {"cmos": "00" * 127}, "cmos: .*expected 128"),
        ("rtc", {"offset": float("nan")}, "offset: nan is not a finite number"),
        ("i8042", {"scancode_set": 4}, "scancode_set: 4 is not one of"),
        ("ioapic", {"redir": [0] * 23}, "redir: 23 items, expected 24"),
        ("fw_cfg", {"offset": -1}, "offset: -0x1 is outside 0x0..0xffffffffffffffff"),
        ("ata0", {"xfer": "seek"}, "xfer: 'seek' is not one of"),
        ("ata0", {"xfer": "read", "buffer": "00" * 100}, "buffer: 100 bytes is not whole sectors"),
        ("virtio-net-ethernet0", {"backend": {"version": 1, "mac": "0011"}}, "backend.mac: 2 bytes, expected 6"),
        ("virtio-rng", {"interrupt_status": 4}, "interrupt_status: 0x4 has bits"),
        ("pic", {"version": 2}, "version: 2, this boite reads version 1 of PicState"),
        ("reset-control", {"value": 0x04}, "value: 0x4 has bits"),
    ],
)  # fmt: skip
def test_a_refusal_names_the_device_and_field(pc, device, change, match) -> None:
    m = pc().machine
    state = m.save_device_state()
    assert device in state, sorted(state)
    state[device] = {**state[device], **change}
    with pytest.raises(CheckpointError, match=f"^device '{device}': {match}"):
        m.load_device_state(state)


def test_a_live_virtqueue_must_lie_in_guest_ram(pc) -> None:
    p = pc()
    host_traffic(p.machine)
    good = p.machine.save_device_state()
    blk = good["virtio-blk-scsi0:0"]
    q = blk["queues"][0]
    assert q["ready"] and q["size"] == 256
    for change, match in [
        ({"desc_addr": RAM_MB * MiB - 16}, "descriptor table .* is outside guest RAM"),
        ({"used_addr": q["used_addr"] + 2}, "used ring at .* is not 4-byte aligned"),
        ({"size": 3}, "size 3 is not a power of two <= 256"),
        ({"size": 512}, "size 512 is not a power of two <= 256"),
        ({"avail_addr": 1 << 63}, "available ring .* is outside guest RAM"),
        ({"event_idx": not q["event_idx"]}, "ring features differ"),
    ]:
        state = copy.deepcopy(good)
        state["virtio-blk-scsi0:0"]["queues"][0].update(change)
        with pytest.raises(
            CheckpointError, match=f"^device 'virtio-blk-scsi0:0': queues\\[0\\]: {match}"
        ):
            p.machine.load_device_state(state)
    # A queue the driver has not made ready yet holds whatever it wrote so far.
    state = copy.deepcopy(good)
    state["virtio-blk-scsi0:0"]["queues"][0].update(ready=False, size=3, desc_addr=1 << 63)
    p.machine.load_device_state(state)


# -- whole-file fuzz through restore_machine --------------------------------------------------


@pytest.fixture
def saved_checkpoint(pc, tmp_path) -> tuple[Path, PcWithEverything, EmuAccelerator]:
    """A checkpoint of the busy machine (host traffic, then a virtio-blk guest run), and a
    fresh machine with its accelerator to restore it into."""
    a = pc()
    host_traffic(a.machine)
    accel = run_guest_on(a, "vblk32", VBLK=VIRTIO_BLK)
    vmsn = tmp_path / "f.vmsn"
    write_checkpoint(vmsn, vmsn.with_suffix(".vmem"), accel.save_cpu_state(), a.machine.memory,
                     a.machine.save_device_state(), meta={"accelerator": "emu", "vcpus": 1})  # fmt: skip
    accel.close()
    b = pc()
    accel2 = EmuAccelerator()
    accel2.create(b.machine)
    yield vmsn, b, accel2
    accel2.close()


def test_damaged_checkpoint_files_restore_whole_or_raise_checkpoint_error(saved_checkpoint) -> None:
    vmsn, b, accel = saved_checkpoint
    good = vmsn.read_bytes()
    restore_machine(b.machine, accel, vmsn)
    baseline = b.machine.save_device_state()
    damaged = vmsn.with_name("d.vmsn")
    vmsn.with_suffix(".vmem").rename(damaged.with_suffix(".vmem"))
    fd = os.open(damaged, os.O_RDWR | os.O_CREAT, 0o600)
    rng = random.Random(1414)
    outcomes = {"refused": 0, "restored": 0}
    cpu_tags = Checkpoint.parse(good).groups["cpu"].tags
    for case in range(1500):
        raw = bytearray(good)
        if case % 5 == 0:
            raw = raw[: rng.randrange(len(raw))]  # truncated
        elif case % 5 == 1:
            raw = bytearray(retag_cpu(good, rng.choice(cpu_tags), rng))
        else:
            for _ in range(rng.choice((1, 1, 2, 8))):
                pos = rng.randrange(len(raw))
                raw[pos] ^= 1 << rng.randrange(8)  # bit flips
        os.ftruncate(fd, 0)  # one descriptor: opening with O_TRUNC per case is slow
        os.pwrite(fd, raw, 0)
        try:
            restore_machine(b.machine, accel, damaged)
        except CheckpointError as exc:
            outcomes["refused"] += 1
            assert "\n" not in str(exc), str(exc)
            assert b.machine.save_device_state() == baseline, f"case {case} half-restored"
            continue
        outcomes["restored"] += 1  # a flip in a value that is still valid
        try:
            poke(b.machine)
        except GuestError:
            pass
        b.machine.load_device_state(baseline)
    os.close(fd)
    assert outcomes["refused"] > 1000, outcomes


def test_a_short_vmem_is_refused_before_any_ram_changes(saved_checkpoint) -> None:
    vmsn, b, accel = saved_checkpoint
    before = b.machine.memory.read(0, RAM_MB * MiB)
    devices = b.machine.save_device_state()
    vmem = vmsn.with_suffix(".vmem")
    os.truncate(vmem, vmem.stat().st_size - 4096)
    with pytest.raises(CheckpointError, match="describes 0x800000 bytes of .vmem, .* has 0x7ff000"):
        restore_machine(b.machine, accel, vmsn)
    assert b.machine.memory.read(0, RAM_MB * MiB) == before
    assert b.machine.save_device_state() == devices


def _tagged(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    raise TypeError(type(obj).__name__)


def retag_cpu(good: bytes, tag: Tag, rng: random.Random) -> bytes:
    """The checkpoint with one vCPU tag given another well-formed value: a register at
    another width or value, a blob of another size, other JSON in `boite:extra`."""
    ckpt = Checkpoint.parse(good)
    if tag.block and tag.name == "boite:extra":
        extra = json.loads(tag.value)
        # junk() may put bytes inside: tag them as the checkpoint's JSON does
        value = json.dumps(mutate(extra, rng), allow_nan=True, default=_tagged).encode()
    elif tag.block:
        value = rng.randbytes(rng.choice((0, 1, 511, 512, 513, 4096)))
    else:
        width = rng.choice((0, 1, 2, 4, 8, 9, 16, 61))
        value = rng.choice((rng.randbytes(width), b"\xff" * width, bytes(width)))
    old = ckpt.groups["cpu"]
    ckpt.groups["cpu"] = fresh = CheckpointGroup("cpu")
    for t in old.tags:
        same = (t.name, t.indices) == (tag.name, tag.indices)
        fresh.add(Tag(t.name, t.indices, value, block=t.block) if same else t)
    return ckpt.to_bytes()


# -- end to end: `boite start` (resume) and `boite revert` of a damaged state -----------------


def run_boite(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boite", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def box_files(box_dir: Path) -> dict[str, str]:
    """The box as bytes: every file but the logs (a refused start logs why)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(box_dir.iterdir())
        if p.is_file() and not p.name.startswith("vmware") and not p.name.endswith(".lck")
    }


def error_line(stderr: str) -> str:
    """The one line that says what went wrong (notes may come before it), no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("boite: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rewrite_device_state(path: Path, change) -> None:
    """Change the device state inside a checkpoint, keeping the container well formed."""
    ckpt = Checkpoint.read(path)
    group = ckpt.groups["boite"]
    state = json.loads(group.bytes("deviceState") or b"")
    change(state)
    tags = [
        Tag(t.name, t.indices, json.dumps(state).encode(), block=True)
        if t.name == "deviceState"
        else t
        for t in group.tags
    ]
    ckpt.groups["boite"] = fresh = CheckpointGroup("boite")
    for t in tags:
        fresh.add(t)
    ckpt.write(path)


@pytest.mark.slow
def test_cli_resume_and_revert_of_damaged_states_fail_in_one_line(tmp_path) -> None:
    from boite.box.box import Box

    box = Box.create(tmp_path / "spin", memsize_mb=16, disk_size=None)
    box.vmx["boite.kernel"] = str(assemble("mb_spin"))
    box.save()
    ctl = box.dir / "spin.ctl"
    try:
        assert run_boite("start", box.dir, "--detach", "--accel", "emu").returncode == 0
        r = run_boite("snapshot", box.dir, "mid", "--json")
        assert r.returncode == 0, r.stderr
        r = run_boite("suspend", box.dir)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not ctl.exists())
    finally:
        run_boite("stop", box.dir, "hard")
    vmss, vmsn = box.dir / "spin.vmss", box.dir / "spin-Snapshot1.vmsn"
    assert vmss.exists() and vmsn.exists()

    # A hostile suspend state: a UART whose receive FIFO holds more than the chip can.
    rewrite_device_state(vmss, lambda state: state["com1"].update(rx="41" * 40))
    before = box_files(box.dir)
    r = run_boite("start", box.dir, "--accel", "emu")
    assert r.returncode != 0
    err = error_line(r.stderr)
    assert "device 'com1': rx: 40 bytes, at most 16" in err, err
    assert box_files(box.dir) == before

    # A truncated memory snapshot: revert refuses it before touching the box.
    vmsn.write_bytes(vmsn.read_bytes()[:-100])
    before = box_files(box.dir)
    r = run_boite("revert", box.dir, "mid")
    assert r.returncode != 0
    err = error_line(r.stderr)
    assert "spin-Snapshot1.vmsn" in err, err
    assert box_files(box.dir) == before


def test_the_emulator_refuses_a_running_second_vcpu_before_anything_changes() -> None:
    from boite.accel.cpustate import CpuState
    from boite.snapshot import unportable_state

    parked = CpuState(extra={"kvm_mp_state": 1})
    assert unportable_state([CpuState(), parked], "emu") == []
    assert unportable_state([CpuState(), CpuState()], "emu") == [
        "vCPU 1 was running, and the emulator runs only vCPU 0"
    ]
    assert unportable_state([CpuState(), CpuState()], "kvm") == []


@requires_kvm
def test_a_kvm_state_with_every_blob_reads_back_checked(tmp_path) -> None:
    """What KVM saves with its in-kernel irqchip (XSAVE, LAPIC, events, PIC/IOAPIC, PIT,
    clock) passes the checks, through a checkpoint file."""
    from boite.accel.cpustate import CpuState
    from boite.accel.kvm import KvmAccelerator
    from guests.runner import build_guest_machine

    machine, _, _ = build_guest_machine("count32", "flat32", LIMIT=10)
    accel = KvmAccelerator(irqchip=True)
    try:
        accel.create(machine)
        saved = accel.save_cpu_state()
    finally:
        accel.close()
    extra = CpuState.from_dict(saved[0]).extra
    assert {"kvm_xsave", "kvm_lapic", "kvm_vcpu_events", "kvm_mp_state"} <= set(extra)
    assert len(extra["kvm_vm"]["kvm_irqchip"]) == 3 and extra["kvm_vm"]["kvm_pit2"]
    vmsn = tmp_path / "k.vmsn"
    write_checkpoint(vmsn, vmsn.with_suffix(".vmem"), saved, machine.memory, {})
    back = read_checkpoint(vmsn)
    back.memory.close()
    machine.memory.close()
    assert [s.to_dict() for s in back.cpu_states] == saved
