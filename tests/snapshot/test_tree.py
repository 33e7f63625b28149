"""The .vmsd tree and the disk-only snapshot operations on real VMDK chains."""

from __future__ import annotations

import os
import random
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snaptools import box_fixture, digest, disk_bytes, write_disk  # noqa: F401 - the `box` fixture

from boite.box import Box
from boite.box.vmxdict import VmxDict
from boite.disk import disk_info
from boite.errors import ConfigError, SnapshotError
from boite.snapshot import (
    SnapshotTree,
    check_snapshot_tree,
    delete_snapshot,
    load_tree,
    render_tree,
    revert_snapshot,
    take_snapshot,
    tree_as_dict,
)

# A tree as VMware Workstation writes it (two snapshots, the second a child of the first).
VMWARE_VMSD = """.encoding = "UTF-8"
snapshot.lastUID = "4"
snapshot.current = "4"
snapshot0.uid = "3"
snapshot0.filename = "lab-Snapshot3.vmsn"
snapshot0.displayName = "installed"
snapshot0.description = "clean|0Aafter setup"
snapshot0.createTimeHigh = "388745"
snapshot0.createTimeLow = "1991180826"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "lab.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot.numSnapshots = "2"
snapshot1.uid = "4"
snapshot1.filename = "lab-Snapshot4.vmsn"
snapshot1.parent = "3"
snapshot1.displayName = "patched"
snapshot1.type = "1"
snapshot1.createTimeHigh = "388801"
snapshot1.createTimeLow = "-814770620"
snapshot1.numDisks = "1"
snapshot1.disk0.fileName = "lab-000001.vmdk"
snapshot1.disk0.node = "scsi0:0"
snapshot1.disk0.mode = "persistent"
snapshot.mru0.uid = "4"
snapshot.mru1.uid = "3"
snapshot.needConsolidate = "FALSE"
"""


def test_reads_vmware_vmsd() -> None:
    tree = SnapshotTree.from_vmsd(VmxDict.parse(VMWARE_VMSD, "lab.vmsd"))
    assert tree.current == 4 and tree.last_uid == 4 and tree.mru == [4, 3]
    first, second = tree.snapshots[3], tree.snapshots[4]
    assert first.description == "clean\nafter setup"
    assert second.parent == 3 and second.type == "1"
    assert second.disks[0].file_name == "lab-000001.vmdk" and second.disks[0].node == "scsi0:0"
    # createTimeLow is a signed 32-bit half of microseconds since 1970.
    assert second.create_time_us == (388801 << 32) + (2**32 - 814770620)
    assert 2022 < 1970 + second.create_time / (365.25 * 86400) < 2023
    again = SnapshotTree.from_vmsd(VmxDict.parse(tree.to_vmsd().to_bytes(), "x.vmsd"))
    assert again.to_vmsd().to_bytes() == tree.to_vmsd().to_bytes()
    assert again.snapshots[4].other == {"disk0.mode": "persistent"}
    assert again.other == {"snapshot.needConsolidate": "FALSE"}
    text = tree.to_vmsd().to_bytes().decode()
    assert 'snapshot1.createTimeLow = "-814770620"' in text


def test_dissect_reads_our_vmsd(box: Box) -> None:
    """dissect.hypervisor's VMware dictionary parser reads the .vmsd boite writes."""
    from dissect.hypervisor.descriptor.vmx import VMX

    take_snapshot(box, "first", description='quote " and | pipe')
    take_snapshot(box, "second")
    parsed = VMX.parse(box.vmsd_path.read_text()).attr
    assert parsed["snapshot.numsnapshots"] == "2"
    assert parsed["snapshot1.parent"] == "1"
    # dissect keeps VMware's |XX escapes as they are in the file
    assert parsed["snapshot0.description"] == "quote |22 and |7C pipe"
    assert parsed["snapshot1.disk0.filename"] == "vm-000001.vmdk"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (("snapshot1.parent", "9"), "names parent 9"),
        (("snapshot0.parent", "4"), "loops"),
        (("snapshot.current", "7"), "no snapshot's uid"),
        (("snapshot.numSnapshots", "5"), "numSnapshots is 5"),
        (("snapshot0.uid", "x3"), "expected a whole number"),
        (("snapshot1.uid", "3"), "used by two snapshots"),
        (("snapshot0.numDisks", "2"), "numDisks is 2"),
        (("snapshot.lastUID", "1"), "lastUID 1 is below"),
    ],
)
def test_malformed_vmsd(change, match) -> None:
    d = VmxDict.parse(VMWARE_VMSD, "lab.vmsd")
    d[change[0]] = change[1]
    with pytest.raises(ConfigError, match=match):
        SnapshotTree.from_vmsd(d)


def test_snapshot_freezes_every_disk(box: Box) -> None:
    write_disk(box, 0, b"A" * 4096)
    write_disk(box, 512, b"data-disk", node="sata0:1")
    snap = take_snapshot(box, "first", description="before B")
    assert box.vmx["scsi0:0.fileName"] == "vm-000001.vmdk"
    assert box.vmx["sata0:1.fileName"] == "data-000001.vmdk"
    assert [(d.node, d.file_name) for d in snap.disks] == [
        ("scsi0:0", "vm.vmdk"),
        ("sata0:1", "data.vmdk"),
    ]
    child = disk_info(box.dir / "vm-000001.vmdk")
    assert child.parent_cid == disk_info(box.dir / "vm.vmdk").cid
    desc = (box.dir / "vm-000001.vmdk").read_bytes()[512:4096]
    assert b'parentFileNameHint="vm.vmdk"' in desc
    vmsd = VmxDict.load(box.vmsd_path)
    assert vmsd["snapshot.current"] == "1" and vmsd["snapshot0.numDisks"] == "2"
    assert vmsd["snapshot0.disk1.node"] == "sata0:1"
    assert (box.dir / "vm-Snapshot1.vmsn").exists()
    write_disk(box, 0, b"B" * 4096)
    assert disk_bytes(box.dir / "vm.vmdk")[:4096] == b"A" * 4096  # the frozen link kept A
    assert check_snapshot_tree(box) == []


def test_revert_branches_and_you_are_here(box: Box) -> None:
    write_disk(box, 0, b"A" * 512)
    take_snapshot(box, "a")
    write_disk(box, 0, b"B" * 512)
    take_snapshot(box, "b")
    write_disk(box, 0, b"C" * 512)
    box.vmx["memsize"] = "512"  # config changes after a snapshot are reverted too
    box.vmx.save(box.vmx_path)
    revert_snapshot(box, "a")
    assert disk_bytes(box.disk_path(box.vmx["scsi0:0.fileName"]))[:512] == b"A" * 512
    assert box.vmx["memsize"] == "256"
    write_disk(box, 0, b"D" * 512)
    take_snapshot(box, "a2")
    data = tree_as_dict(box)
    (a,) = data["snapshots"]
    assert [c["name"] for c in a["children"]] == ["b", "a2"]
    assert data["current"] == 3 and a["children"][1]["current"]
    text = render_tree(data)
    assert text.index("a2") < text.index("you are here")
    assert check_snapshot_tree(box) == []
    assert load_tree(box).mru[:2] == [3, 1]


def test_revert_drops_only_the_current_state(box: Box) -> None:
    take_snapshot(box, "a")
    write_disk(box, 0, b"X" * 512)
    current = box.vmx["scsi0:0.fileName"]
    revert_snapshot(box, "a")
    assert not (box.dir / current).exists()  # its data belonged to nobody else
    assert box.vmx["scsi0:0.fileName"] != current
    assert disk_bytes(box.disk_path(box.vmx["scsi0:0.fileName"]))[:512] == bytes(512)


def test_names_and_errors(box: Box) -> None:
    take_snapshot(box, "same")
    take_snapshot(box, "same")
    with pytest.raises(SnapshotError, match="2 snapshots are named 'same'"):
        revert_snapshot(box, "same")
    revert_snapshot(box, "#1")
    with pytest.raises(SnapshotError, match="no snapshot named 'other'"):
        delete_snapshot(box, "other")
    with pytest.raises(SnapshotError, match="needs a name"):
        take_snapshot(box, " ")
    box.vmx["sata0:1.fileName"] = "disk.img"
    with pytest.raises(SnapshotError, match="snapshots need VMDK disks"):
        take_snapshot(box, "raw")
    box.vmx["sata0:1.mode"] = "independent-persistent"  # independent disks are left out
    assert [d.node for d in take_snapshot(box, "ok").disks] == ["scsi0:0"]


class Model:
    """What every snapshot's disks and the current state must read, kept beside the box."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.snaps: dict[int, dict[str, str]] = {}  # uid -> node -> digest

    def current(self) -> dict[str, str]:
        return {
            n: digest(self.box.disk_path(self.box.vmx[f"{n}.fileName"]))
            for n in ("scsi0:0", "sata0:1")
        }

    def verify(self) -> None:
        tree = load_tree(self.box)
        assert set(tree.snapshots) == set(self.snaps)
        for uid, want in self.snaps.items():
            got = {
                d.node: digest(self.box.disk_path(d.file_name)) for d in tree.snapshots[uid].disks
            }
            assert got == want, f"snapshot #{uid} reads different data"
        assert check_snapshot_tree(self.box) == []


def random_walk(box: Box, rng: random.Random, steps: int) -> None:
    model = Model(box)
    for _ in range(steps):
        action = rng.choice(["write", "write", "snapshot", "revert", "delete"])
        if action == "write":
            node = rng.choice(["scsi0:0", "sata0:1"])
            off = rng.randrange(0, (2 << 20) - 8192, 512)
            write_disk(box, off, rng.randbytes(rng.choice([512, 4096, 70000])), node)
        elif action == "snapshot":
            before = model.current()
            snap = take_snapshot(box, f"s{rng.randrange(1000)}")
            model.snaps[snap.uid] = before
            assert model.current() == before
        elif action == "revert" and model.snaps:
            uid = rng.choice(sorted(model.snaps))
            revert_snapshot(box, f"#{uid}")
            assert model.current() == model.snaps[uid]
        elif action == "delete" and model.snaps:
            uid = rng.choice(sorted(model.snaps))
            before = model.current()
            delete_snapshot(box, f"#{uid}")
            del model.snaps[uid]
            assert model.current() == before
        model.verify()
    # Deleting everything leaves exactly the current state, with no delta files left over.
    before = model.current()
    for uid in list(model.snaps):
        delete_snapshot(box, f"#{uid}")
        del model.snaps[uid]
        model.verify()
    assert model.current() == before
    vmdks = sorted(p.name for p in box.dir.glob("*.vmdk"))
    assert len(vmdks) <= 4, vmdks  # each disk: its base and at most one delta


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_every_snapshot(box: Box, seed: int) -> None:
    random_walk(box, random.Random(seed), 14)


def test_qemu_and_libvmdk_agree_on_every_link(box: Box, tmp_path) -> None:
    pyvmdk = pytest.importorskip("pyvmdk")
    write_disk(box, 0, b"A" * 65536)
    take_snapshot(box, "a")
    write_disk(box, 65536, b"B" * 4096)
    take_snapshot(box, "b")
    revert_snapshot(box, "a")
    write_disk(box, 1 << 20, b"C" * 512)
    take_snapshot(box, "c")
    write_disk(box, 0, b"D" * 512)
    tree = load_tree(box)
    links = {d.file_name for s in tree.snapshots.values() for d in s.disks}
    links |= {box.vmx["scsi0:0.fileName"], box.vmx["sata0:1.fileName"]}
    for name in sorted(links):
        path = box.dir / name
        info = subprocess.run(
            ["qemu-img", "info", "--backing-chain", "--output=json", str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        import json

        qchain = [os.path.realpath(e["filename"]) for e in json.loads(info.stdout)]
        ours = [os.path.realpath(c["path"]) for c in disk_info(path).chain]
        assert qchain == ours, name
        raw = tmp_path / "expect.raw"
        raw.write_bytes(disk_bytes(path))
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw), str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert cmp.returncode == 0, (name, cmp.stdout, cmp.stderr)
        # libvmdk: each child accepts its parent only when the CIDs chain.
        handles = []
        for link in disk_info(path).chain:
            h = pyvmdk.handle()
            h.open(link["path"])
            h.open_extent_data_files()
            handles.append(h)
        for child, parent in zip(handles, handles[1:], strict=False):
            assert child.get_parent_content_identifier() == parent.get_content_identifier()
            child.set_parent(parent)
        handles[0].seek_offset(0, os.SEEK_SET)
        assert handles[0].read_buffer(4096) == disk_bytes(path)[:4096]
        for h in handles:
            h.close()


def test_check_finds_what_is_broken(box: Box) -> None:
    from boite.disk import set_cid
    from boite.snapshot import journal_path

    write_disk(box, 0, b"A" * 512)
    take_snapshot(box, "a")
    take_snapshot(box, "b")
    assert check_snapshot_tree(box) == []
    (box.dir / "vm-Snapshot1.vmsn").unlink()
    set_cid(box.dir / "vm-000001.vmdk", 0x12345678)  # b's frozen link: its child mismatches
    box.vmx["sata0:1.fileName"] = "data-000001.vmdk"  # writes into b's frozen link
    box.vmx.save(box.vmx_path)
    journal_path(box).write_text('{"op": "snapshot", "phase": "prepare", "created": []}')
    # (Box.open would undo the interrupted operation first; a live one shows like this.)
    found = "\n".join(str(p) for p in check_snapshot_tree(Box.open(box.dir, recover=False)))
    assert "vm-Snapshot1.vmsn does not exist" in found
    assert "parentCID" in found and "vm-000002.vmdk" in found
    assert "which snapshot #2 froze" in found
    assert "interrupted" in found
    box.vmsd_path.write_text('snapshot.current = "x"\n')
    found = "\n".join(str(p) for p in check_snapshot_tree(Box.open(box.dir)))
    assert "expected a whole number" in found


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_vmsd_reads_or_fails_typed(data) -> None:
    lines = VMWARE_VMSD.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(1, len(lines) - 1))
        key, _, value = lines[i].partition(" = ")
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            del lines[i]
        elif choice == 1:
            lines[i] = f'{key} = "{data.draw(st.sampled_from(["", "-1", "0", "99", "x", "3"]))}"'
        elif choice == 2:
            lines.insert(i, lines[data.draw(st.integers(1, len(lines) - 1))])
        else:
            lines[i] = f"snapshot{data.draw(st.integers(0, 3))}.{key.split('.', 1)[-1]} = {value}"
    try:
        tree = SnapshotTree.from_vmsd(VmxDict.parse("\n".join(lines) + "\n", "fuzz.vmsd"))
    except ConfigError:
        return
    tree.to_vmsd()  # whatever reads also writes
