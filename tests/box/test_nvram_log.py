"""The .nvram layout and vmware.log format and rotation."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boite.box.log import LINE, VmwareLog
from boite.box.nvram import MAGIC, Nvram
from boite.errors import ConfigError


def test_nvram_round_trip_keeps_cmos_and_settings(tmp_path):
    nv = Nvram(bytes(range(128)))
    nv.boot_order = ["cdrom", "hdd"]
    nv.settings["uefi.secureBoot"] = "FALSE"
    path = tmp_path / "box.nvram"
    nv.save(path)
    again = Nvram.load(path)
    assert bytes(again.cmos) == bytes(range(128))
    assert again.boot_order == ["cdrom", "hdd"]
    assert again.settings["uefi.secureboot"] == "FALSE"
    assert again.to_bytes() == path.read_bytes()
    assert path.read_bytes()[:8] == MAGIC


def test_nvram_two_cmos_banks():
    nv = Nvram(bytes(256))
    assert len(Nvram.from_bytes(nv.to_bytes()).cmos) == 256
    with pytest.raises(ConfigError, match="128 or 256"):
        Nvram(bytes(100))


def test_nvram_default_boot_order_is_disk_first():
    assert Nvram().boot_order == ["hdd", "cdrom", "net"]
    with pytest.raises(ConfigError, match="usb-stick"):
        Nvram().boot_order = ["usb-stick"]


def test_damaged_nvram_names_the_offset(tmp_path):
    data = bytearray(Nvram().to_bytes())
    data[40] ^= 0xFF  # a CMOS byte
    path = tmp_path / "x.nvram"
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: offset \d+: checksum"):
        Nvram.load(path)
    path.write_bytes(b"NOTNVRAM" + bytes(200))
    with pytest.raises(ConfigError, match="offset 0: magic"):
        Nvram.load(path)
    good = Nvram().to_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(ConfigError, match="header promises"):
        Nvram.load(path)
    huge = bytearray(good)
    struct.pack_into("<I", huge, 12, 0xFFFFFFFF)
    with pytest.raises(ConfigError, match="offset 12"):
        Nvram.from_bytes(bytes(huge))


@given(st.binary(max_size=600), st.integers(0, 400), st.binary(min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_hostile_nvram_gives_config_error_or_loads(junk, at, patch):
    good = bytearray(Nvram().to_bytes())
    for candidate in (junk, bytes(good[:at] + patch + good[at + len(patch) :])):
        try:
            Nvram.from_bytes(candidate)
        except ConfigError:
            pass


def test_log_lines_use_vmwares_format(tmp_path):
    with VmwareLog.open(tmp_path) as log:
        log.info("Powering on.")
        log.warning("two\nlines", group="vcpu-0")
        log.error("bad")
    lines = (tmp_path / "vmware.log").read_text().splitlines()
    assert len(lines) == 4
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed)
    assert [(m["level"], m["group"], m["message"]) for m in parsed] == [
        ("In(05)", "vmx", "Powering on."),
        ("Wa(03)", "vcpu-0", "two"),
        ("Wa(03)", "vcpu-0", "lines"),
        ("Er(02)", "vmx", "bad"),
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed[0]["time"])


@pytest.mark.parametrize("keep_old", [3, 1, 0])
def test_log_rotates_at_each_power_on_keeping_keep_old(tmp_path, keep_old):
    for power_on in range(6):
        with VmwareLog.open(tmp_path, keep_old) as log:
            log.info(f"power-on {power_on}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["vmware.log"] + [f"vmware-{i}.log" for i in range(keep_old)])
    assert "power-on 5" in (tmp_path / "vmware.log").read_text()
    for i in range(keep_old):
        assert f"power-on {4 - i}" in (tmp_path / f"vmware-{i}.log").read_text()


def test_smaller_keep_old_removes_the_extra_old_logs(tmp_path):
    for _ in range(5):
        VmwareLog.open(tmp_path, 3).close()
    VmwareLog.open(tmp_path, 1).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmware-0.log", "vmware.log"]


def test_huge_keep_old_and_gaps(tmp_path):
    (tmp_path / "vmware-0.log").write_text("zero")
    (tmp_path / "vmware-5.log").write_text("five")
    (tmp_path / "vmware.log").write_text("current")
    (tmp_path / "vmware-x.log").write_text("not ours")
    VmwareLog.open(tmp_path, 10**9).close()
    assert (tmp_path / "vmware-0.log").read_text() == "current"
    assert (tmp_path / "vmware-1.log").read_text() == "zero"
    assert (tmp_path / "vmware-6.log").read_text() == "five"
    assert (tmp_path / "vmware-x.log").read_text() == "not ours"


@given(
    st.sampled_from([128, 256]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.lists(st.sampled_from(["hdd", "cdrom", "net", "floppy"]), unique=True),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
)
@settings(max_examples=100, deadline=None)
def test_nvram_round_trip_property(cmos, order, note):
    nv = Nvram(cmos)
    nv.boot_order = order
    nv.settings["boite.note"] = note
    again = Nvram.from_bytes(nv.to_bytes())
    assert bytes(again.cmos) == cmos
    assert again.boot_order == order
    assert again.settings["boite.note"] == note
    assert again.to_bytes() == nv.to_bytes()
