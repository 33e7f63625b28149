"""The guest and the kernel file are hostile: random register traffic never breaks a
device, and mangled kernels give a typed error, never a traceback."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.errors import ConfigError
from boite.machine.builder import build_machine
from boite.machine.devices.uart import ConsoleBackend
from boite.machine.loader import load_kernel

from .machine_kernels import *  # noqa: F403 - the fixtures

PORTS = [
    *range(0x20, 0x22), *range(0x40, 0x44), 0x60, 0x61, 0x64, 0x70, 0x71, 0x92,
    *range(0xA0, 0xA2), *range(0x3F8, 0x400), *range(0x2F8, 0x300), 0x4D0, 0x4D1,
    0x510, 0x511,
]  # fmt: skip
IOAPIC = [0xFEC00000, 0xFEC00010, 0xFEC00040]

access = st.tuples(
    st.booleans(),  # write?
    st.sampled_from(PORTS + IOAPIC),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 0xFFFF_FFFF),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=300), st.binary(max_size=64))
def test_random_register_traffic(accesses, typed):
    now = [0]
    con = ConsoleBackend(ring_size=4096)
    m = build_machine(8, serial_backends=[con, con], clock_ns=lambda: now[0])
    try:
        for i, (write, addr, size, value) in enumerate(accesses):
            now[0] += 1000 * i
            bus = m.mmio if addr >= 0xFEC00000 else m.pio
            if write:
                if addr == 0x64 and value & 0xFF in (0xFE, 0xF0, 0xF2, 0xFC):
                    value = 0x20  # keep the machine out of reset for this test
                bus.write(addr, size, value)
            else:
                assert 0 <= bus.read(addr, size) < 1 << (8 * size)
            if i % 50 == 0:
                con.send(typed)
                m.devices["pit"].advance()
                m.devices["rtc"].advance()
                pic = m.devices["pic"]
                if pic.pending():
                    assert 0 <= pic.acknowledge() <= 0xFF
        state = json.loads(json.dumps(m.save_device_state()))
        m2 = build_machine(8, serial_backends=[ConsoleBackend(), ConsoleBackend()])
        m2.load_device_state(state)
        again = json.loads(json.dumps(m2.save_device_state()))
        for name in ("com1", "pic", "i8042", "ioapic", "fw_cfg", "port92"):
            assert again[name] == state[name], name
        m2.memory.close()
    finally:
        m.memory.close()


def _mangle(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for off, val in edits:
        out[off % len(out)] = val
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 0x2000), st.integers(0, 255)), min_size=1, max_size=8)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits, st.sampled_from(["aout", "elf", "linux", "pvh"]), st.integers(0, 3))
def test_mangled_kernels_give_typed_errors(multiboot_kernels, tmp_path_factory, change, kind, cut):
    data = multiboot_kernels[kind].read_bytes()
    data = _mangle(data, change)
    if cut:
        data = data[: len(data) * cut // 4]
    path = tmp_path_factory.mktemp("k") / "kernel"
    path.write_bytes(data)
    m = build_machine(8)
    try:
        load_kernel(m, path, cmdline="x")
    except ConfigError:
        pass  # KernelFormatError: the typed answer to a bad file
    else:
        assert m.boot_state and m.boot_state[0].rip < 1 << 32
    finally:
        m.memory.close()


def test_huge_header_values_stay_inside_guest_ram(tmp_path):
    magic, flags = 0x1BADB002, 0x00010000
    hdr = struct.pack("<III", magic, flags, -(magic + flags) & 0xFFFFFFFF)
    for fields in (
        (0xFFFF_F000, 0xFFFF_F000, 0, 0xFFFF_FFFF, 0xFFFF_F000),
        (0x100000, 0x100000, 0xFFFF_FFFF, 0, 0x100000),
        (0x100000, 0x100000, 0, 0xF000_0000, 0x100000),
    ):
        p = tmp_path / "k"
        p.write_bytes(hdr + struct.pack("<IIIII", *fields) + bytes(64))
        m = build_machine(8)
        try:
            load_kernel(m, p)
        except ConfigError as e:
            assert str(p) in str(e)
        finally:
            m.memory.close()
