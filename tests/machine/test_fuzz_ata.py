"""A hostile guest on the ATA ports: random register traffic never raises on the host,
never touches the disk file outside its size, and the channel still works afterwards."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from boite.machine.bus import Bus
from boite.machine.devices import ata
from boite.machine.devices.ata import AtaChannel, AtaDrive
from boite.machine.irq import IrqLine

from .test_ata import AtaPio
from .test_virtio_blk import RawFileImage, make_pattern

PORTS = [0x1F0 + i for i in range(8)] + [0x3F6]
COMMANDS = sorted(
    {
        ata.CMD_READ_SECTORS, ata.CMD_READ_SECTORS_EXT, ata.CMD_READ_MULTIPLE,
        ata.CMD_READ_MULTIPLE_EXT, ata.CMD_WRITE_SECTORS, ata.CMD_WRITE_SECTORS_EXT,
        ata.CMD_WRITE_MULTIPLE, ata.CMD_WRITE_MULTIPLE_EXT, ata.CMD_IDENTIFY,
        ata.CMD_SET_MULTIPLE, ata.CMD_SET_FEATURES, ata.CMD_FLUSH_CACHE,
        ata.CMD_INITIALIZE_PARAMS, ata.CMD_READ_NATIVE_MAX_EXT, ata.CMD_EXECUTE_DIAGNOSTIC,
        ata.CMD_READ_VERIFY_EXT, 0x00, 0xA0, 0xFF,
    }
)  # fmt: skip

access = st.one_of(
    # Task file writes biased towards the command register and real commands.
    st.tuples(st.just("w"), st.sampled_from(PORTS), st.just(1), st.integers(0, 255)),
    st.tuples(st.just("w"), st.just(0x1F7), st.just(1), st.sampled_from(COMMANDS)),
    st.tuples(st.just("r"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("w"), st.just(0x1F0), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("rs"), st.just(0x1F0), st.sampled_from([2, 4]), st.integers(0, 600)),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
@given(st.lists(access, max_size=60))
# Select the absent slave, then assert SRST: the channel must still show BSY in reset.
@example(ops=[("w", 0x1F6, 1, 0x10), ("w", 0x3F6, 1, 0x04)])
def test_random_port_traffic(tmp_path: Path, ops) -> None:
    disk = tmp_path / "fuzz-ata.raw"
    if not disk.exists():
        disk.write_bytes(make_pattern(1 << 20))
    pio = Bus("pio")
    ch = AtaChannel(IrqLine(14), AtaDrive(RawFileImage(disk)))
    ch.register(pio)
    for kind, port, size, value in ops:
        if kind == "w":
            pio.write(port, size, value)
        elif kind == "r":
            pio.read(port, size)
        else:
            ch.read_string(0, size, value)
    assert os.path.getsize(disk) == 1 << 20
    # Whatever happened, a soft reset brings back a working disk.
    d = AtaPio(pio)
    d.select(0)
    d.softreset()
    assert d.read(5, 2) == disk.read_bytes()[5 * 512 : 7 * 512]
    ch.close()
