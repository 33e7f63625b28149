"""Paths read from box metadata (box/paths.py), and what a hostile box directory can make
boite read: `..`, absolute names, symlinks out, FIFOs, devices, huge files, encrypted boxes.

Every CLI call runs with a timeout: a FIFO that hangs boite fails the test instead of
hanging it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from boite.box import Box
from boite.box.nvram import Nvram
from boite.box.paths import (
    ALLOW_EXTERNAL_DISKS,
    BoxPathError,
    FileKindError,
    external_paths,
    inside,
    open_output,
    owned,
    read_regular,
)

TIMEOUT = 60


def _box(tmp_path: Path, name: str = "vm", disk: int | None = None) -> Box:
    return Box.create(tmp_path / name, memsize_mb=16, disk_size=disk)


def _one_line_error(r, *words: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("boite: note:")]
    assert len(lines) == 1 and lines[0].startswith("boite: error:"), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


# -- resolving and confining ------------------------------------------------------------------


def test_inside_resolves_and_confines(tmp_path):
    box = tmp_path / "b"
    box.mkdir()
    (tmp_path / "secret").write_text("x")
    (box / "sub").mkdir()
    assert inside(box, "sub/a.vmdk", source="b.vmx", key="k") == box.resolve() / "sub/a.vmdk"
    assert inside(box, str(box / "a.vmdk"), source="b.vmx", key="k") == box.resolve() / "a.vmdk"
    (box / "out").symlink_to(tmp_path / "secret")
    (box / "outdir").symlink_to(tmp_path)
    for value in ("../secret", str(tmp_path / "secret"), "out", "outdir/secret", "sub/../../x",
                  "/etc/passwd", "."):  # fmt: skip
        with pytest.raises(BoxPathError) as info:
            inside(box, value, source="b.vmx", key="serial0.fileName")
        assert "b.vmx: serial0.fileName = " in str(info.value) and repr(value) in str(info.value)
        assert info.value.key == "serial0.fileName" and info.value.value == value
    for value in ("", "a\0b", "nbd://host/x"):
        with pytest.raises(BoxPathError):
            inside(box, value, source="b.vmx", key="k")


def test_owned_names_only_what_boite_makes(tmp_path):
    box = tmp_path / "b"
    box.mkdir()
    assert owned(box, "b-000001.vmdk", source="j", key="delete").name == "b-000001.vmdk"
    assert owned(box, "b-Snapshot1.vmsn", source="j", key="delete").suffix == ".vmsn"
    for value in ("b.vmx", "b.nvram", "vmware.log", "notes.txt"):
        with pytest.raises(BoxPathError, match="only the files it makes"):
            owned(box, value, source="j", key="delete")
    with pytest.raises(BoxPathError, match="only the files it makes"):
        owned(box, "b.vmdk", source="j", key="delete", protected=("b.vmdk",))
    with pytest.raises(BoxPathError, match="leaves the box"):
        owned(box, "../other/x.vmdk", source="j", key="delete")


def test_read_regular_refuses_fifos_devices_and_huge_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileKindError, match="named pipe"):
        read_regular(fifo, 1 << 20, what="nvram file")  # returns at once: no writer needed
    with pytest.raises(FileKindError, match="character device"):
        read_regular("/dev/zero", 1 << 20, what="nvram file")
    with pytest.raises(FileKindError, match="directory"):
        read_regular(tmp_path, 1 << 20, what="nvram file")
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that cost nothing
    with pytest.raises(FileKindError, match="2147483648 bytes") as info:
        read_regular(huge, 1 << 20, what="nvram file")
    assert "\\x00" not in str(info.value)
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert read_regular(small, 3, what="x") == b"abc"


def test_open_output_never_follows_links_and_creates_0600(tmp_path):
    box = tmp_path / "b"
    box.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    old = os.umask(0o022)
    try:
        fd = open_output(box, "serial0.log", source="b.vmx", key="serial0.fileName")
    finally:
        os.umask(old)
    os.write(fd, b"hi")
    os.close(fd)
    assert stat.S_IMODE((box / "serial0.log").stat().st_mode) == 0o600
    (box / "link.log").symlink_to(victim)
    with pytest.raises(BoxPathError):
        open_output(box, "link.log", source="b.vmx", key="serial0.fileName")
    with pytest.raises(BoxPathError):
        open_output(box, str(victim), source="b.vmx", key="serial0.fileName")
    os.mkfifo(box / "pipe.log")
    with pytest.raises(FileKindError, match="named pipe"):
        open_output(box, "pipe.log", source="b.vmx", key="serial0.fileName")
    assert victim.read_text() == "keep"


# -- item 14 / 6: FIFOs, devices and huge files the box names --------------------------------


@pytest.mark.parametrize("what", ["nvram", "vmsd", "vmx"])
def test_a_fifo_as_box_metadata_never_hangs(tmp_path, boite_cli, what):
    box = _box(tmp_path)
    target = {"nvram": box.nvram_path, "vmsd": box.vmsd_path, "vmx": box.vmx_path}[what]
    target.unlink()
    os.mkfifo(target)
    arg = box.vmx_path if what == "vmx" else box.dir
    for verb in (("info",), ("check",), ("snapshots",), ("snapshot", "s")):
        r = boite_cli(verb[0], arg, *verb[1:], timeout=TIMEOUT)
        assert "Traceback" not in r.stderr, (verb, r.stderr)
        if what == "vmx" or (what == "vmsd" and verb[0] != "info"):
            assert r.returncode != 0 and "named pipe" in r.stdout + r.stderr, (verb, r.stderr)
        elif what == "nvram" and verb[0] in ("info", "check"):
            assert "named pipe" in r.stdout, (verb, r.stdout)
        # (snapshots and snapshot of a powered-off box do not read the nvram)


def test_nvram_naming_a_device_or_a_huge_file_is_refused(tmp_path, boite_cli):
    box = _box(tmp_path)
    box.vmx["nvram"] = "/dev/zero"
    box.save()
    r = boite_cli("info", box.dir, "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert any("nvram" in p and "leaves the box" in p for p in problems), problems
    # Inside the box, but a link to a device, or 2 GiB: refused without reading it.
    box.vmx["nvram"] = "vm.nvram"
    box.save()
    nvram = box.dir / "vm.nvram"
    nvram.unlink()
    nvram.symlink_to("/dev/zero")
    r = boite_cli("check", box.dir, timeout=TIMEOUT)
    assert r.returncode == 1 and "leaves the box" in r.stdout, r.stdout + r.stderr
    nvram.unlink()
    with open(nvram, "wb") as f:
        f.truncate(2 << 30)
    r = boite_cli("info", box.dir, timeout=TIMEOUT)
    assert r.returncode == 0 and "2147483648 bytes" in r.stdout, r.stdout + r.stderr


def test_a_huge_kernel_is_refused_before_it_is_read(tmp_path, boite_cli):
    box = _box(tmp_path)
    kernel = tmp_path / "huge-kernel"
    with open(kernel, "wb") as f:
        f.truncate(6 << 30)
    box.vmx["boite.kernel"] = str(kernel)
    box.save()
    r = boite_cli("check", box.dir, timeout=TIMEOUT)
    assert r.returncode == 1 and "boite.kernel" in r.stdout, r.stdout + r.stderr
    r = boite_cli("start", box.dir, "--accel", "emu", timeout=TIMEOUT)
    _one_line_error(r, "boite.kernel", "6442450944 bytes")
    os.mkfifo(tmp_path / "fifo-kernel")
    box.vmx["boite.kernel"] = str(tmp_path / "fifo-kernel")
    box.save()
    r = boite_cli("start", box.dir, "--accel", "emu", timeout=TIMEOUT)
    _one_line_error(r, "named pipe")


def test_lock_file_errors_do_not_quote_its_bytes(tmp_path):
    from boite.box.lock import BoxLock
    from boite.errors import LockError

    box = _box(tmp_path)
    lock = BoxLock(box.vmx_path)
    lock.path.write_bytes(b"SECRET-CONTENTS " * 8)
    with pytest.raises(LockError) as info:
        lock.read_holder()
    assert "SECRET" not in str(info.value)
    lock.path.unlink()
    os.mkfifo(lock.path)
    with pytest.raises(LockError, match="named pipe"):
        lock.read_holder()


# -- item 3: what a .vmx may reference ----------------------------------------------------------


def test_files_the_vmm_writes_stay_inside_the_box(tmp_path, boite_cli):
    from boite.machine.builder import machine_from_box

    box = _box(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    box.vmx["serial0.fileName"] = str(victim)
    box.save()
    r = boite_cli("check", box.dir, timeout=TIMEOUT)
    assert r.returncode == 1 and "serial0.fileName" in r.stdout, r.stdout
    with pytest.raises(BoxPathError, match="serial0.fileName"):
        machine_from_box(Box.open(box.dir))
    # A symlinked serial0.log inside the box is not followed either.
    box.vmx["serial0.fileName"] = "serial0.log"
    box.save()
    (box.dir / "serial0.log").symlink_to(victim)
    with pytest.raises(BoxPathError, match="serial0.fileName"):
        machine_from_box(Box.open(box.dir))
    assert victim.read_text() == "keep"
    # nvram elsewhere: nothing is created there.
    (box.dir / "serial0.log").unlink()
    elsewhere = tmp_path / "elsewhere.nvram"
    box.vmx["nvram"] = str(elsewhere)
    box.save()
    with pytest.raises(BoxPathError, match="nvram"):
        opened = Box.open(box.dir)
        opened.nvram.save(opened.nvram_path)
    with pytest.raises(BoxPathError, match="nvram"):
        machine_from_box(Box.open(box.dir))
    assert not elsewhere.exists()


def test_external_disks_need_the_opt_in_key(tmp_path, boite_cli):
    from boite.disk import create_disk

    box = _box(tmp_path)
    outside = tmp_path / "shared.vmdk"
    create_disk(outside, 1 << 20, "thin")
    box.vmx["scsi0.present"] = "TRUE"
    box.vmx["scsi0:1.present"] = "TRUE"
    box.vmx["scsi0:1.fileName"] = str(outside)
    box.vmx["scsi0:2.present"] = "TRUE"
    box.vmx["scsi0:2.fileName"] = "/dev/null"
    box.save()
    found = {p.key: p for p in external_paths(Box.open(box.dir))}
    assert not found["scsi0:1.fileName"].allowed and found["scsi0:2.fileName"].kind == "device"
    r = boite_cli("check", box.dir, timeout=TIMEOUT)
    assert r.returncode == 1, r.stdout
    assert "scsi0:1.fileName" in r.stdout and ALLOW_EXTERNAL_DISKS in r.stdout
    assert "/dev/null" in r.stdout
    r = boite_cli("start", box.dir, "--accel", "emu", timeout=TIMEOUT)
    _one_line_error(r, "scsi0:1.fileName", ALLOW_EXTERNAL_DISKS)
    # Opted in: the disk is allowed, and `check` still names it as leaving the box.
    box.vmx[ALLOW_EXTERNAL_DISKS] = "TRUE"
    del box.vmx["scsi0:2.present"]
    del box.vmx["scsi0:2.fileName"]
    box.save()
    r = boite_cli("check", box.dir, timeout=TIMEOUT)
    # its only problem now: no kernel and blank disks, nothing to boot (issue 12)
    assert r.returncode == 1 and "1 problem" in r.stdout, r.stdout + r.stderr
    assert "nothing the BIOS can boot" in r.stdout
    assert "leaves the box" in r.stdout and str(outside) in r.stdout
    info = json.loads(boite_cli("info", box.dir, "--json", timeout=TIMEOUT).stdout)
    assert [p["key"] for p in info["external_paths"]] == ["scsi0:1.fileName"]
    r = boite_cli("start", box.dir, "--accel", "emu", timeout=TIMEOUT)
    assert "boite: note: scsi0:1.fileName" in r.stderr and "leaves the box" in r.stderr
    _one_line_error(r, "boite.kernel")  # (this box has none; the note came first)


def test_a_delta_whose_parent_is_outside_is_an_external_disk(tmp_path):
    from boite.disk import create_child, create_disk

    box = _box(tmp_path)
    base = tmp_path / "base.vmdk"
    create_disk(base, 1 << 20, "thin")
    create_child(base, box.dir / "vm-000001.vmdk")  # a linked clone of another VM's disk
    box.vmx["scsi0.present"] = "TRUE"
    box.vmx["scsi0:0.present"] = "TRUE"
    box.vmx["scsi0:0.fileName"] = "vm-000001.vmdk"
    box.save()
    found = external_paths(Box.open(box.dir))
    assert [(p.kind, p.path, p.allowed) for p in found] == [("disk parent", str(base), False)]


# -- item 16: encrypted boxes -----------------------------------------------------------------


def test_an_encrypted_vmx_is_reported_and_refused(tmp_path, boite_cli):
    box = tmp_path / "enc"
    box.mkdir()
    (box / "enc.vmx").write_text(
        '.encoding = "UTF-8"\n'
        'displayName = "enc"\n'
        'encryption.keySafe = "vmware:key/list/(pair/(null/vmware%3akey%2fnull%3f,HMAC-SHA-256,'
        'AAAA))"\n'
        'encryption.data = "QUJDREVGR0g="\n'
    )
    r = boite_cli("info", box, "--json", timeout=TIMEOUT)
    assert r.returncode == 0 and json.loads(r.stdout)["encrypted"] is True, r.stdout + r.stderr
    r = boite_cli("info", box, timeout=TIMEOUT)
    assert "encrypted" in r.stdout
    r = boite_cli("check", box, timeout=TIMEOUT)
    assert r.returncode == 1 and "encrypt" in r.stdout, r.stdout
    r = boite_cli("start", box, "--accel", "emu", timeout=TIMEOUT)
    _one_line_error(r, "encrypted")


# -- item 15: operating-system errors are one line ---------------------------------------------


def test_os_errors_are_one_line(tmp_path, boite_cli):
    r = boite_cli("disk", "create", "-s", "1M", tmp_path / "missing" / "x.vmdk", timeout=TIMEOUT)
    _one_line_error(r, "No such file or directory", "missing")
    boite_cli("create", tmp_path / "vm", "--disk", "1M", check=True)
    r = boite_cli("disk", "convert", tmp_path / "vm" / "vm.vmdk", tmp_path / "no" / "y.vmdk",
                  timeout=TIMEOUT)  # fmt: skip
    _one_line_error(r, "No such file or directory")


def test_file_too_large_is_one_line_and_json_under_json(tmp_path):
    import resource
    import subprocess
    import sys

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "boite", *args], capture_output=True, text=True,
            preexec_fn=limited, timeout=TIMEOUT, cwd=tmp_path,
        )  # fmt: skip

    r = run("create", "big", "--disk", "64M", "--disk-type", "flat")
    _one_line_error(r, "File too large")
    r = run("create", "big2", "--disk", "64M", "--disk-type", "flat", "--json")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    error = json.loads(r.stdout)["error"]
    assert "File too large" in error["message"] and error["type"] == "OSError"
    assert error["errno"] == "EFBIG"


def test_boite_errors_are_json_under_json(tmp_path, boite_cli):
    r = boite_cli("info", tmp_path / "missing", "--json", timeout=TIMEOUT)
    assert r.returncode == 1
    assert "no such box" in json.loads(r.stdout)["error"]["message"]


# -- item 10: file modes --------------------------------------------------------------------------


def test_guest_ram_state_and_disks_are_created_0600(tmp_path):
    from boite.box.vmem import write_vmem
    from boite.machine.memory import GuestMemory
    from boite.snapshot import take_snapshot

    old = os.umask(0o022)
    try:
        box = _box(tmp_path, disk=1 << 20)
        memory = GuestMemory()
        memory.add_region(0, 1 << 20)
        try:
            write_vmem(box.dir / "x.vmem", memory)
        finally:
            memory.close()
        take_snapshot(box, "one")
        Nvram().save(box.nvram_path)
        from boite.disk import convert_disk

        convert_disk(box.dir / "vm.vmdk", box.dir / "flat.vmdk", "flat")
        convert_disk(box.dir / "vm.vmdk", box.dir / "copy.img", "raw")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in box.dir.iterdir() if p.is_file()}
    for name, mode in modes.items():
        if name.endswith((".vmdk", ".vmem", ".vmss", ".vmsn", ".img")):
            assert mode == 0o600, (name, oct(mode), modes)


def test_a_looping_disk_chain_ends(tmp_path):
    from boite.disk import create_child, create_disk, set_parent

    box = _box(tmp_path)
    create_disk(box.dir / "base.vmdk", 1 << 20, "thin")
    create_child(box.dir / "base.vmdk", box.dir / "base-000001.vmdk")
    set_parent(box.dir / "base.vmdk", box.dir / "base-000001.vmdk")  # base <-> child
    box.vmx["scsi0.present"] = "TRUE"
    box.vmx["scsi0:0.present"] = "TRUE"
    box.vmx["scsi0:0.fileName"] = "base-000001.vmdk"
    box.save()
    assert external_paths(Box.open(box.dir)) == []  # a loop inside the box: nothing leaves it


def test_a_vmsd_linked_out_of_the_box_is_not_read(tmp_path, boite_cli):
    box = _box(tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN SECRET KEY-----\n")
    box.vmsd_path.unlink()
    (box.dir / "vm.vmsd").symlink_to(secret)
    for verb in ("snapshots", "check", "snapshot"):
        r = boite_cli(verb, box.dir, *(["s"] if verb == "snapshot" else []), timeout=TIMEOUT)
        assert r.returncode != 0 and "SECRET" not in r.stdout + r.stderr, (verb, r.stdout)
        assert "leaves the box" in r.stdout + r.stderr, (verb, r.stdout, r.stderr)
    assert secret.read_text() == "-----BEGIN SECRET KEY-----\n"
