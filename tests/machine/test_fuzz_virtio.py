"""Fuzz virtio-blk and virtio-net with hostile rings (short runs; bench/fuzz_virtio.py runs 1M).

Every request must end as a completion or as DEVICE_NEEDS_RESET; no exception may escape
the device, and the disk file never grows or is touched outside its size.
"""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.machine.virtio.fuzz import HEADER, RAM, TABLES, WINDOW, Desc, RequestSpec, VirtioFuzzer

_fuzzers: dict[str, VirtioFuzzer] = {}


def fuzzer(kind: str) -> VirtioFuzzer:
    if kind not in _fuzzers:
        _fuzzers[kind] = VirtioFuzzer(kind)
    return _fuzzers[kind]


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_cleanup():
    logging.getLogger("boite.virtio").setLevel(logging.ERROR)
    yield
    for f in _fuzzers.values():
        f.close()
    _fuzzers.clear()
    logging.getLogger("boite.virtio").setLevel(logging.NOTSET)


addresses = st.one_of(
    st.integers(WINDOW[0], WINDOW[1]),
    st.sampled_from([HEADER, TABLES, TABLES + 8, 0, RAM - 16, RAM, 1 << 32]),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 12, 16, 512, 4096, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)
)
descs = st.builds(Desc, addresses, lengths, st.integers(0, 7), st.integers(0, 65535))


@st.composite
def specs(draw, kind: str) -> RequestSpec:
    ds = draw(st.lists(descs, min_size=1, max_size=8))
    slots = draw(st.lists(st.integers(0, 255), min_size=len(ds), max_size=len(ds)))
    head = draw(st.one_of(st.sampled_from(slots), st.integers(0, 65535)))
    indirect = draw(st.none() | st.lists(descs, min_size=1, max_size=10))
    if kind == "blk":
        header = draw(
            st.builds(
                lambda t, s, rest: (
                    t.to_bytes(4, "little") + bytes(4) + s.to_bytes(8, "little") + rest
                ),
                st.sampled_from([0, 1, 4, 8, 11, 13, 99]),
                st.one_of(st.integers(0, 2048), st.integers(0, 2**64 - 1)),
                st.binary(max_size=48),
            )
        )
    else:
        header = draw(st.binary(min_size=12, max_size=12))
    spec = RequestSpec(ds, slots, head, indirect, header)
    spec.avail_jump = draw(st.none() | st.integers(0, 65535))
    spec.registers = draw(
        st.lists(
            st.tuples(st.integers(0, 63).map(lambda x: x * 4), st.integers(0, 2**32 - 1)),
            max_size=2,
        )
    )
    if kind == "net":
        spec.rx_frame = draw(st.binary(max_size=1600))
    return spec


_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@_SETTINGS
@given(specs("blk"))
def test_hypothesis_blk(spec: RequestSpec) -> None:
    f = fuzzer("blk")
    assert f.step(spec) != "escaped", f.first_escape
    f.check_invariants()


@_SETTINGS
@given(specs("net"))
def test_hypothesis_net(spec: RequestSpec) -> None:
    f = fuzzer("net")
    assert f.step(spec) != "escaped", f.first_escape


@pytest.mark.parametrize("kind", ["blk", "net"])
def test_structured_random_requests(kind: str) -> None:
    f = VirtioFuzzer(kind)
    try:
        rng = random.Random(20261126)
        for _ in range(3000):
            f.step(f.random_spec(rng))
        assert f.escaped == 0, f.first_escape
        assert f.counts["completed"] > 300 and f.counts["needs_reset"] > 300
        f.check_invariants()
        # After all that, an honest driver still gets service.
        assert not f.dev.broken
    finally:
        f.close()
