"""Random interleaved writes, reads, discards, flushes and reopens match a bytearray model,
on a thin disk and on the top of a 3-deep snapshot chain."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.disk import check_disk, create_child, create_disk, open_disk

SIZE = 2 * 1024 * 1024 + 3 * 512  # 32 grains and a partial one
EXAMPLES = int(os.environ.get("BOITE_HYPOTHESIS_EXAMPLES", "40"))

offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.sampled_from([0, 65536 - 512, 65536, 131072 - 1, SIZE - 512, SIZE - 1]),
)
op = st.tuples(
    st.sampled_from(["write", "write", "read", "discard", "flush", "reopen"]),
    offsets,
    st.integers(1, 200_000),
    st.integers(0, 255),
)


def run_ops(path: Path, model: bytearray, ops, base: int = 0) -> None:
    size = len(model)
    d = open_disk(path)
    try:
        for kind, off, n, byte in ops:
            off = base + off
            n = min(n, size - off)
            if kind == "write":
                data = bytes([byte]) * n if byte % 3 else os.urandom(n)
                d.write(off, data)
                model[off : off + n] = data
            elif kind == "read":
                assert d.read(off, n) == model[off : off + n]
            elif kind == "discard":
                d.discard(off, n)
                model[off : off + n] = bytes(n)
            elif kind == "flush":
                d.flush()
            else:
                d.close()
                d = open_disk(path)
        assert d.read(0, size) == model
    finally:
        d.close()
    with open_disk(path, read_only=True) as d:
        assert d.read(0, size) == model
    report = check_disk(path)
    assert report.ok and report.leaked_bytes == 0, report


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40))
def test_thin_disk_matches_model(ops):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.vmdk"
        create_disk(path, SIZE)
        run_ops(path, bytearray(SIZE), ops)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=25), st.lists(op, max_size=25), st.lists(op, max_size=40))
def test_three_deep_chain_matches_model(base_ops, mid_ops, top_ops):
    with tempfile.TemporaryDirectory() as tmp:
        base, mid, top = (Path(tmp) / n for n in ("vm.vmdk", "vm-000001.vmdk", "vm-000002.vmdk"))
        model = bytearray(SIZE)
        create_disk(base, SIZE)
        run_ops(base, model, base_ops)
        create_child(base, mid)
        run_ops(mid, model, mid_ops)
        create_child(mid, top)
        run_ops(top, model, top_ops)


GT_SPAN = 512 * 65536  # one grain table maps 32 MiB


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=30))
def test_runs_across_a_grain_table_boundary(ops):
    """Reads and writes that span two grain tables (offsets around 32 MiB)."""
    size = GT_SPAN + 4 * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.vmdk"
        create_disk(path, size)
        run_ops(path, bytearray(size), ops, base=GT_SPAN - SIZE // 2)


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=15), st.lists(op, max_size=15), st.lists(op, max_size=15))
def test_consolidation_keeps_every_view(base_ops, mid_ops, top_ops):
    """merge_parent_into_child and commit_child_into_parent leave the data a user sees intact."""
    from boite.disk import commit_child_into_parent, merge_parent_into_child

    with tempfile.TemporaryDirectory() as tmp:
        base, mid, top = (Path(tmp) / n for n in ("vm.vmdk", "vm-000001.vmdk", "vm-000002.vmdk"))
        model = bytearray(SIZE)
        create_disk(base, SIZE)
        run_ops(base, model, base_ops)
        create_child(base, mid)
        run_ops(mid, model, mid_ops)
        create_child(mid, top)
        run_ops(top, model, top_ops)
        merge_parent_into_child(top)  # top absorbs mid, then sits on base
        with open_disk(top, read_only=True) as d:
            assert d.parent.path == str(base) and d.read(0, SIZE) == model
        os.unlink(mid)
        commit_child_into_parent(top)  # base takes top's data
        with open_disk(base, read_only=True) as d:
            assert d.read(0, SIZE) == model
        assert check_disk(base).ok
