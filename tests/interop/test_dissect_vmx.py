"""dissect.hypervisor's VMX parser reads what boite writes, and agrees with boite on files
written by VMware."""

from __future__ import annotations

from pathlib import Path

import pytest

from boite.box import Box, VmxDict

vmx_module = pytest.importorskip("dissect.hypervisor.descriptor.vmx")
VMX = vmx_module.VMX

DATA = Path(__file__).resolve().parent.parent / "box" / "data"

try:
    from boite.disk import create_disk  # noqa: F401

    HAVE_DISKS = True
except ImportError:
    HAVE_DISKS = False


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BOITE_RUNTIME_DIR", str(tmp_path / "runtime"))


def dissect_parse(path: Path, encoding: str = "utf-8") -> VMX:
    return VMX.parse(path.read_bytes().decode(encoding))


def test_dissect_reads_a_box_made_by_boite_create(tmp_path):
    box = Box.create(
        tmp_path / "interop",
        memsize_mb=1024,
        cpus=4,
        disk_size=(32 << 20) if HAVE_DISKS else None,
        guest_os="ubuntu-64",
    )
    if not HAVE_DISKS:
        # Until the disk layer lands, name a disk the way `create` will.
        box.vmx["scsi0.present"] = "TRUE"
        box.vmx["scsi0.virtualDev"] = "pvscsi"
        box.vmx["scsi0:0.present"] = "TRUE"
        box.vmx["scsi0:0.fileName"] = "interop.vmdk"
        box.save()
    theirs = dissect_parse(box.vmx_path)
    ours = VmxDict.load(box.vmx_path)
    # Every key boite wrote, with the same value; nothing more, nothing less.
    assert theirs.attr == {k.lower(): ours[k] for k in ours} | {".encoding": "UTF-8"}
    assert theirs.attr["memsize"] == "1024" and theirs.attr["numvcpus"] == "4"
    assert theirs.attr["ethernet0.generatedaddress"] == box.config.nics[0].mac
    assert theirs.disks() == [d.file_name for d in box.config.disks] == ["interop.vmdk"]


@pytest.mark.parametrize("path", sorted(DATA.glob("*.vmx")), ids=lambda p: p.name)
def test_boite_and_dissect_agree_on_vmware_written_files(path):
    ours = VmxDict.load(path)
    theirs = dissect_parse(path, ours.encoding)
    for key in ours:
        value = ours[key]
        if "|" in value:
            continue  # dissect leaves VMware's |XX escapes undecoded; boite decodes them
        assert theirs.attr[key.lower()] == value, key


@pytest.mark.parametrize("path", sorted(DATA.glob("*.vmx")), ids=lambda p: p.name)
def test_boite_and_dissect_find_the_same_disks(path):
    from boite.box.config import BoxConfig

    ours = BoxConfig(VmxDict.load(path))
    theirs = dissect_parse(path, ours.vmx.encoding)
    # dissect lists every disk-bus device with a fileName that is not a CD-ROM.
    expected = sorted(s.file_name for s in ours.disk_slots() if s.file_name and not s.is_cdrom)
    assert sorted(theirs.disks()) == expected
