"""The MP table a directly booted kernel finds when the machine has several vCPUs."""

from __future__ import annotations

import struct

from boite.machine.builder import build_machine
from boite.machine.loader.mptable import CONFIG_ADDR, FLOATING_ADDR
from guests.build import assemble


def _entries(table: bytes) -> list[tuple[int, bytes]]:
    count = struct.unpack_from("<H", table, 34)[0]
    out, pos = [], 44
    for _ in range(count):
        kind = table[pos]
        size = 20 if kind == 0 else 8
        out.append((kind, table[pos : pos + size]))
        pos += size
    assert pos == len(table)
    return out


def test_a_direct_boot_with_three_vcpus_has_an_mp_table_naming_them() -> None:
    kernel = assemble("mb_halt")
    m = build_machine(16, 3, kernel=kernel)
    try:
        floating = m.memory.read(FLOATING_ADDR, 16)
        assert floating[:4] == b"_MP_" and sum(floating) & 0xFF == 0
        assert struct.unpack_from("<I", floating, 4)[0] == CONFIG_ADDR
        assert floating[11] == 0  # a configuration table follows, no default config
        length = struct.unpack_from("<H", m.memory.read(CONFIG_ADDR, 8), 4)[0]
        table = m.memory.read(CONFIG_ADDR, length)
        assert table[:4] == b"PCMP" and sum(table) & 0xFF == 0
        assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000
        entries = _entries(table)
        cpus = [e for k, e in entries if k == 0]
        assert [(c[1], c[3]) for c in cpus] == [(0, 3), (1, 1), (2, 1)]  # ids, EN/BP
        (ioapic,) = [e for k, e in entries if k == 2]
        assert ioapic[1] == 0 and struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
        pins = {e[5]: (e[7], struct.unpack_from("<H", e, 2)[0]) for k, e in entries
                if k == 3 and e[1] == 0}  # fmt: skip
        assert pins[0] == (2, 0) and pins[4] == (4, 0) and 2 not in pins
        assert pins[9] == (9, 0xD) and pins[11] == (11, 0xD)  # level, active high
        lints = sorted((e[1], e[7]) for k, e in entries if k == 4)
        assert lints == [(1, 1), (3, 0)]  # LINT1 NMI, LINT0 ExtINT
    finally:
        m.memory.close()


def test_one_vcpu_gets_no_mp_table() -> None:
    m = build_machine(16, 1, kernel=assemble("mb_halt"))
    try:
        assert m.memory.read(FLOATING_ADDR, 4) != b"_MP_"
    finally:
        m.memory.close()
