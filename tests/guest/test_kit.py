"""The guest kit: built (or found in the cache), its artifacts are what they claim, and
it boots under QEMU TCG before boite itself can boot it.

The first run on a machine builds two kernels (minutes); later runs find them cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from boite import guestkit
from boite.guestkit import KitError, NewcArchive, parse_newc

GUEST = Path(__file__).resolve().parents[2] / "guest"
EXIT_PORT = 0xF4  # QEMU isa-debug-exit: exit status = 2 * value + 1

# The first test to need the kit builds it (kernels: many minutes on 2 cores), inside its
# own time; the suite-wide per-test limit is for tests, not for that one-time build.
pytestmark = pytest.mark.timeout(3600)


# --- fast checks, no kit needed -------------------------------------------------------


def test_newc_archive_is_read_by_cpio(tmp_path: Path) -> None:
    cpio = NewcArchive()
    cpio.add("dev", stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho odd length!\n")
    cpio.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    raw = cpio.finish()
    assert len(raw) % 4 == 0
    listing = subprocess.run(
        ["cpio", "-itv"], input=raw, capture_output=True, check=True
    ).stdout.decode()
    assert re.search(r"^crw------- .* 5,\s+1 .* dev/console$", listing, re.M), listing
    assert re.search(r"^lrwxrwxrwx .* bin/sh -> busybox$", listing, re.M), listing
    # cpio extracts the same bytes we put in.
    subprocess.run(
        ["cpio", "-id", "--no-absolute-filenames", "init"], input=raw, cwd=tmp_path, check=True,
        capture_output=True,
    )  # fmt: skip
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho odd length!\n"
    names = [(n, stat.S_IFMT(m)) for n, m, _ in parse_newc(raw)]
    assert names == [
        ("dev", stat.S_IFDIR),
        ("dev/console", stat.S_IFCHR),
        ("init", stat.S_IFREG),
        ("bin/sh", stat.S_IFLNK),
    ]


def test_parse_newc_rejects_garbage() -> None:
    with pytest.raises(KitError, match="no newc header at offset 0"):
        list(parse_newc(b"X" * 200))


def test_hash_follows_the_inputs(tmp_path: Path) -> None:
    copy = tmp_path / "guest"
    shutil.copytree(GUEST, copy)
    arts = guestkit.ARTIFACTS
    before = {name: guestkit.artifact_hash(a, copy) for name, a in arts.items()}
    assert before == {name: guestkit.artifact_hash(a, GUEST) for name, a in arts.items()}
    with open(copy / "linux" / "i386.config", "a") as fh:
        fh.write("CONFIG_PRINTK_TIME=y\n")
    after = {name: guestkit.artifact_hash(a, copy) for name, a in arts.items()}
    changed = {name for name in arts if before[name] != after[name]}
    assert changed == {"linux-i386"}
    with open(copy / "linux" / "common.config", "a") as fh:
        fh.write("CONFIG_PRINTK_TIME=y\n")
    after2 = {name: guestkit.artifact_hash(a, copy) for name, a in arts.items()}
    assert {name for name in arts if after[name] != after2[name]} == {
        "linux-i386",
        "linux-x86_64",
    }


def test_cache_root_follows_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BOITE_CACHE", str(tmp_path))
    assert guestkit.cache_root() == tmp_path / "kit"
    kit = guestkit.kit_paths(["i386"])
    assert kit.i386_bzimage is not None and kit.i386_bzimage.parent.parent == tmp_path / "kit"
    assert kit.x86_64_bzimage is None and kit.debian_vmlinuz is None
    assert guestkit.missing_parts(["i386"]) == ["initrd-i386", "linux-i386"]


def test_unknown_part_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="unknown guest kit part 'arm64': expected one of"):
        guestkit.ensure_kit(["arm64"], root=tmp_path)


def test_missing_tool_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    # A PATH with everything but dpkg-deb.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("gcc", "apt-get", "lz4", "bash"):
        found = shutil.which(prog)
        if found:
            (bin_dir / prog).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(KitError, match=r"needs dpkg-deb, not found on PATH.*\(dpkg\)"):
        guestkit.ensure_kit(["initrd"], root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_kit_build_shows_its_current_step_elapsed_time_and_log(tmp_path: Path) -> None:
    """A long build is not one unchanging line: each step with the time so far, and where
    the whole log is (the initramfs, in an empty cache: seconds, not a kernel's minutes)."""
    import sys

    env = dict(os.environ, BOITE_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "boite", "kit", "build", "initrd"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0 and "apt-get" in proc.stderr:
        pytest.skip(f"busybox-static:i386 cannot be fetched here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    log = re.search(r"full log in (\S+build\.log)", proc.stderr)
    assert log, proc.stderr
    steps = re.findall(r"step \d+/\d+: (.+) \[(\d+):(\d\d)\]$", proc.stderr, re.M)
    assert len({what for what, _, _ in steps}) >= 3, proc.stderr  # the step changes
    assert any("busybox" in what for what, _, _ in steps), proc.stderr
    done = guestkit.kit_paths(["initrd"], root=tmp_path / "kit")
    assert done.initrd_i386 is not None and done.initrd_i386.is_file()
    assert (done.initrd_i386.parent / "build.log").is_file()  # kept beside the artifact


def test_cli_kit_path(boite_cli, monkeypatch, tmp_path: Path) -> None:
    env_cache = tmp_path / "c"
    monkeypatch.setenv("BOITE_CACHE", str(env_cache))  # the subprocess inherits it
    plain = boite_cli("kit", "path")
    data = boite_cli("kit", "path", "i386", "--json")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == str(env_cache / "kit")
    info = json.loads(data.stdout)
    assert info["missing"] == ["initrd-i386", "linux-i386"]
    assert info["i386_bzimage"].startswith(str(env_cache / "kit" / "linux-i386-"))
    bad = boite_cli("kit", "build", "sparc")
    assert bad.returncode == 2 and "invalid choice: 'sparc'" in bad.stderr


# --- the built kit --------------------------------------------------------------------


@pytest.fixture(scope="session")
def kit() -> guestkit.Kit:
    """The i386 kit and the initramfs, built once per machine (minutes the first time)."""
    return guestkit.ensure_kit(["i386"], progress=print)


def test_init_is_a_static_32bit_elf(kit: guestkit.Kit) -> None:
    assert kit.init_i386 is not None
    data = kit.init_i386.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 1, "ELFCLASS32"
    assert data[5] == 1, "little-endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (2, 3), "ET_EXEC for EM_386"
    phoff, = struct.unpack_from("<I", data, 28)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    p_types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in p_types, "no PT_INTERP: statically linked"
    assert 2 not in p_types, "no PT_DYNAMIC: statically linked"
    assert b"BOITE-READY uptime=%s" in data


def test_initramfs_holds_init_and_busybox(kit: guestkit.Kit) -> None:
    assert kit.initrd_i386 is not None
    cpio = kit.initrd_i386.read_bytes()
    assert cpio[:6] == b"070701", "an uncompressed newc archive"
    entries = {name: (mode, body) for name, mode, body in parse_newc(cpio)}
    assert entries["init"][1] == kit.init_i386.read_bytes()
    assert stat.S_IMODE(entries["init"][0]) == 0o755
    assert entries["bin/busybox"][1][:5] == b"\x7fELF\x01"
    for applet in ("bin/sh", "bin/mount", "bin/ls", "bin/cat", "bin/dd", "bin/sync",
                   "sbin/poweroff"):  # fmt: skip
        mode, target = entries[applet]
        assert stat.S_ISLNK(mode), applet
        assert os.path.normpath(os.path.join(os.path.dirname(applet), target.decode())) == (
            "bin/busybox"
        )
    assert stat.S_ISCHR(entries["dev/console"][0])
    # cpio(1), which we did not write, lists the same archive.
    listing = subprocess.run(["cpio", "-it"], input=cpio, capture_output=True, check=True)
    assert "init" in listing.stdout.decode().split()


def _bzimage_facts(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    assert data[0x202:0x206] == b"HdrS", f"{path}: no Linux boot protocol header"
    version, = struct.unpack_from("<H", data, 0x206)  # fmt: skip
    kver_ptr, = struct.unpack_from("<H", data, 0x20E)  # fmt: skip
    kver = data[0x200 + kver_ptr : 0x200 + kver_ptr + 200].split(b"\0")[0].decode()
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    # payload_offset counts from the protected-mode kernel, after the setup sectors.
    pm_start = (setup_sects + 1) * 512
    payload = data[pm_start + payload_offset : pm_start + payload_offset + payload_length]
    return {"protocol": version, "version": kver, "payload": payload, "loadflags": data[0x211]}


def _config_lines(fragments: list[Path]) -> list[str]:
    lines = []
    for frag in fragments:
        for line in frag.read_text().splitlines():
            if line.startswith("CONFIG_") or re.match(r"# CONFIG_\w+ is not set", line):
                lines.append(line)
    return lines


def test_i386_kernel_is_what_it_claims(kit: guestkit.Kit) -> None:
    assert kit.i386_bzimage is not None and kit.i386_config is not None
    facts = _bzimage_facts(kit.i386_bzimage)
    assert facts["protocol"] >= 0x20C
    release = (kit.i386_bzimage.parent / "kernel.release").read_text().strip()
    assert release.startswith("6.1.")
    assert str(facts["version"]).startswith(release + " ")
    assert bytes(facts["payload"])[:4] == b"\x02\x21\x4c\x18", "KERNEL_LZ4 payload"
    config = kit.i386_config.read_text().splitlines()
    for line in _config_lines([GUEST / "linux" / "common.config", GUEST / "linux" / "i386.config"]):
        if line.startswith("#"):
            key = line.split()[1]
            assert not any(c.startswith(key + "=") for c in config), line
        else:
            assert line in config, line
    # The emulator-facing facts the module docstring states.
    for must in ("CONFIG_X86_32=y", "CONFIG_M686=y", "CONFIG_KERNEL_LZ4=y",
                 "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"):  # fmt: skip
        assert must in config, must
    assert "CONFIG_MATH_EMULATION=y" not in config, "the kernel uses the emulated x87"
    assert "CONFIG_X86_CMOV=y" in config, "i686: CMOV is required"
    for absent in ("CONFIG_X86_PAE=y", "CONFIG_SMP=y", "CONFIG_PCI=y",
                   "CONFIG_ACPI=y", "CONFIG_MODULES=y", "CONFIG_KERNEL_XZ=y"):  # fmt: skip
        assert absent not in config, absent


def test_manifest_describes_the_artifact(kit: guestkit.Kit) -> None:
    assert kit.dirs is not None
    for name, d in kit.dirs.items():
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["artifact"] == name
        assert d.name == f"{name}-{manifest['hash']}"
        for file, size in manifest["files"].items():
            assert (d / file).stat().st_size == size


def test_ensure_kit_twice_builds_nothing(kit: guestkit.Kit) -> None:
    lines: list[str] = []
    again = guestkit.ensure_kit(["i386"], progress=lines.append)
    assert again == kit
    assert lines == []


def test_cli_kit_build_json_names_the_cached_files(kit: guestkit.Kit, boite_cli) -> None:
    proc = boite_cli("kit", "build", "i386", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["i386_bzimage"] == str(kit.i386_bzimage)
    assert data["initrd_i386"] == str(kit.initrd_i386)
    assert data["x86_64_bzimage"] is None
    assert proc.stderr == ""  # cached: nothing built, no progress lines


# --- boots under QEMU TCG (the real proof) ---------------------------------------------


def _qemu(argv: list[str], timeout: float = 240, input: bytes | None = None):
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (Debian package qemu-system-x86)")
    return subprocess.run(
        argv, capture_output=True, timeout=timeout, input=input if input is not None else b""
    )


def _markers(out: str) -> dict[str, str]:
    found = {}
    # Not anchored at the line start: init's marker can land after a shell prompt that
    # was printed in the same instant (seen on a loaded host).
    for m in re.finditer(r"(BOITE-[A-Z]+)\b ?(.*?)\r?$", out, re.M):
        found.setdefault(m.group(1), m.group(2))
    return found


def _boot(qemu: str, kernel: Path, initrd: Path, append: str, *extra: str, input=None):
    argv = [qemu, "-accel", "tcg", "-m", "256", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 boite.exitport={EXIT_PORT:#x} {append}",
            "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            *extra]  # fmt: skip
    proc = _qemu(argv, input=input)
    return proc, proc.stdout.decode(errors="replace")


# `touch -t` sets a file's times through the 32-bit time_t system calls Debian's busybox makes
# (CONFIG_COMPAT_32BIT_TIME, also under the x86_64 kernels' IA32 emulation).
RUN = (
    'boite.run="echo hi-from-$(uname -m); ls /bin/busybox; grep ^fpu /proc/cpuinfo | head -n1; '
    'touch -t 202103040506.07 /tmp/t && ls -l --full-time /tmp/t; exit 7"'
)
TOUCHED = re.compile(r"^-rw-r--r-- .* 2021-03-04 05:06:07 \+0000 /tmp/t\r?$", re.M)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cpu",
    [
        "qemu32",
        # The oldest CPU the i686 kernel is built for: x87 without FXSR (FNSAVE context
        # switches), no SSE.
        "pentium2",
    ],
)
def test_i386_kernel_boots_runs_and_powers_off(kit: guestkit.Kit, cpu: str) -> None:
    assert kit.i386_bzimage and kit.initrd_i386
    proc, out = _boot("qemu-system-i386", kit.i386_bzimage, kit.initrd_i386, RUN, "-cpu", cpu)
    marks = _markers(out)
    assert re.fullmatch(r"uptime=\d+\.\d\d", marks.get("BOITE-READY", "")), out[-3000:]
    assert re.search(r"hi-from-i[3-6]86", out), out[-2000:]
    assert "/bin/busybox" in out
    assert TOUCHED.search(out), out[-2000:]
    assert marks["BOITE-EXIT"] == "status=7"
    assert marks["BOITE-POWEROFF"] == "status=7 reason=done"
    assert "Kernel panic" not in out
    assert proc.returncode == 2 * 7 + 1, out[-2000:]
    assert re.search(r"^fpu\s*: yes\r?$", out, re.M), out[-2000:]


# microvm is QEMU's machine with virtio-mmio devices (the i386 kit kernel has no PCI):
# acpi=off so that it names them on the command line, the bzImage (it adds them only for a
# Linux boot-protocol kernel), and a CPU without a local APIC, since the kit kernel drives
# the 8259 PIC and microvm's firmware does not route it through LINT0.
MICROVM = ["-M", "microvm,acpi=off", "-cpu", "pentium3,-apic", "-nodefaults"]


@pytest.mark.slow
def test_the_kit_takes_a_dhcp_lease_from_qemus_user_networking(kit: guestkit.Kit) -> None:
    """Every ethN asks for a lease (busybox udhcpc on the AF_PACKET the kernel has); eth0
    keeps the default route and DNS."""
    assert kit.i386_bzimage and kit.initrd_i386
    wait = (
        "until ip route | grep -q ^default.*eth0 && ip -4 addr show eth1 | grep -q inet &&"
        " test -s /etc/resolv.conf; do sleep 1; done"
    )
    run = f'boite.tools=0 boite.run="{wait}; ip -4 addr; ip route; cat /etc/resolv.conf"'
    proc, out = _boot(
        "qemu-system-x86_64", kit.i386_bzimage, kit.initrd_i386, run, *MICROVM,
        "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
        "-netdev", "user,id=n1,net=10.0.3.0/24", "-device", "virtio-net-device,netdev=n1",
    )  # fmt: skip
    assert _markers(out).get("BOITE-EXIT") == "status=0", out[-3000:]
    assert re.search(r"inet 10\.0\.2\.15/24 .*eth0", out), out[-2000:]
    assert re.search(r"inet 10\.0\.3\.15/24 .*eth1", out), out[-2000:]
    assert re.search(r"^default via 10\.0\.2\.2 dev eth0", out, re.M), out[-2000:]
    assert re.search(r"^nameserver 10\.0\.2\.3\r?$", out, re.M), out[-2000:]


def _converse(argv: list[str], script: list[tuple[bytes, bytes]], timeout: float = 240):
    """Run QEMU; each time the console shows the next expected text, type its answer.
    Returns (exit status, console output)."""
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (Debian package qemu-system-x86)")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    watchdog = threading.Timer(timeout, proc.kill)  # a hung guest fails, not hangs, the run
    watchdog.start()
    assert proc.stdout is not None and proc.stdin is not None
    seen = b""
    pos = 0  # the next expected text must appear after the last one matched
    pending = list(script)
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            seen += chunk
            while pending and (at := seen.find(pending[0][0], pos)) >= 0:
                expected, answer = pending.pop(0)
                pos = at + len(expected)
                proc.stdin.write(answer)
                proc.stdin.flush()
        status = proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
    return status, seen.decode(errors="replace")


@pytest.mark.slow
def test_busybox_shell_on_the_console(kit: guestkit.Kit) -> None:
    assert kit.i386_bzimage and kit.initrd_i386
    argv = ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-kernel", str(kit.i386_bzimage),
            "-initrd", str(kit.initrd_i386),
            "-append", f"console=ttyS0 boite.shell=1 boite.exitport={EXIT_PORT:#x}",
            "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]  # fmt: skip
    # busybox's poweroff signals init (SIGUSR2): a soft stop, as from a person.
    status, out = _converse(
        argv,
        [
            (b"BOITE-READY", b""),
            (b"# ", b"echo shell-$((6*7))\n"),
            (b"shell-42", b"grep -c devtmpfs /proc/mounts\n"),
            (b"\n1\r\n", b"poweroff\n"),
        ],
    )
    assert "shell-42" in out, out[-3000:]
    assert re.search(r"^1\r?$", out, re.M), "devtmpfs mounted once on /dev"
    assert _markers(out).get("BOITE-POWEROFF") == "status=0 reason=stop-request", out[-2000:]
    assert status == 1


@pytest.fixture(scope="session")
def kit_x86_64() -> guestkit.Kit:
    return guestkit.ensure_kit(["x86_64"], progress=print)


@pytest.fixture(scope="session")
def kit_debian() -> guestkit.Kit:
    return guestkit.ensure_kit(["debian"], progress=print)


@pytest.mark.slow  # builds a second kernel the first time (minutes)
def test_x86_64_kernel_is_what_it_claims(kit_x86_64: guestkit.Kit) -> None:
    k = kit_x86_64
    assert k.x86_64_bzimage and k.x86_64_vmlinux and k.x86_64_config
    facts = _bzimage_facts(k.x86_64_bzimage)
    assert bytes(facts["payload"])[:4] == b"\x02\x21\x4c\x18"
    config = k.x86_64_config.read_text().splitlines()
    for line in _config_lines(
        [GUEST / "linux" / "common.config", GUEST / "linux" / "x86_64.config"]
    ):
        if not line.startswith("#"):
            assert line in config, line
    vmlinux = k.x86_64_vmlinux.read_bytes()
    assert vmlinux[:5] == b"\x7fELF\x02"
    # The PVH entry is an ELF note (Xen's XEN_ELFNOTE_PHYS32_ENTRY = 18) named "Xen".
    assert b"Xen\0" in vmlinux


@pytest.mark.slow
@pytest.mark.parametrize("image", ["bzImage", "vmlinux-pvh"])
def test_x86_64_kernel_boots(kit_x86_64: guestkit.Kit, image: str) -> None:
    k = kit_x86_64
    assert k.x86_64_bzimage and k.x86_64_vmlinux and k.initrd_i386
    kernel = k.x86_64_bzimage if image == "bzImage" else k.x86_64_vmlinux
    proc, out = _boot("qemu-system-x86_64", kernel, k.initrd_i386, RUN)
    marks = _markers(out)
    assert "BOITE-READY" in marks, out[-3000:]
    assert "hi-from-x86_64" in out
    assert TOUCHED.search(out), out[-2000:]
    assert marks["BOITE-EXIT"] == "status=7"
    assert proc.returncode == 15, out[-2000:]


@pytest.mark.slow
def test_debian_kernel_boots_to_init(kit_debian: guestkit.Kit) -> None:
    k = kit_debian
    assert k.debian_vmlinuz and k.initrd_i386
    proc, out = _boot("qemu-system-x86_64", k.debian_vmlinuz, k.initrd_i386, "quiet " + RUN)
    marks = _markers(out)
    assert "BOITE-READY" in marks, out[-3000:]
    assert "hi-from-x86_64" in out
    assert TOUCHED.search(out), out[-2000:]
    assert marks["BOITE-POWEROFF"] == "status=7 reason=done"
    assert proc.returncode == 15, out[-2000:]
    release = (k.debian_vmlinuz.parent / "kernel.release").read_text().strip()
    assert re.fullmatch(r"6\.1\.0-\d+-amd64", release)
    assert "CONFIG_VIRTIO_MMIO=m" in k.debian_config.read_text().splitlines()


@pytest.mark.slow
def test_soft_stop_through_the_control_line(kit: guestkit.Kit, tmp_path: Path) -> None:
    """`boite.ctl=/dev/ttyS1` with nothing to run: init waits until "poweroff" arrives on
    COM2, then stops cleanly (what `boite stop BOX soft` sends)."""
    assert kit.i386_bzimage and kit.initrd_i386
    if shutil.which("qemu-system-i386") is None:
        pytest.skip("qemu-system-i386 is not installed (Debian package qemu-system-x86)")
    fifo = tmp_path / "ctl"
    os.mkfifo(f"{fifo}.in")
    os.mkfifo(f"{fifo}.out")
    argv = ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-kernel", str(kit.i386_bzimage),
            "-initrd", str(kit.initrd_i386),
            "-append", f"console=ttyS0 boite.ctl=/dev/ttyS1 boite.exitport={EXIT_PORT:#x}",
            "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", "stdio", "-chardev", f"pipe,id=ctl,path={fifo}", "-serial", "chardev:ctl"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    watchdog = threading.Timer(240, proc.kill)  # a hung guest fails the test, not the run
    watchdog.start()
    # QEMU opens both ends of the pipe; keep ours open so it never sees EOF.
    ctl_out = os.open(f"{fifo}.out", os.O_RDONLY | os.O_NONBLOCK)
    ctl_in = open(f"{fifo}.in", "wb", buffering=0)
    lines = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if raw.startswith(b"BOITE-READY"):
                ctl_in.write(b"poweroff\n")
        status = proc.wait(timeout=240)
    finally:
        watchdog.cancel()
        proc.kill()
        ctl_in.close()
        os.close(ctl_out)
    out = "".join(lines)
    marks = _markers(out)
    assert marks.get("BOITE-STOP") == "reason=ctl", out[-2000:]
    assert marks["BOITE-POWEROFF"] == "status=0 reason=stop-request"
    assert status == 1
