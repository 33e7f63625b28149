"""The guest kit: everything a boite guest boots, built once per machine into a cache.

What is in it (sources in `guest/`):

- `initrd_i386`: an uncompressed newc initramfs holding `/init` (guest/init/init.c,
  `gcc -static -m32 -Os`) and Debian's static i386 busybox in `/bin/busybox` with a link
  for every applet (`/bin/sh`, `/bin/mount`, `/sbin/poweroff`, ...). 32-bit, so the same
  initramfs boots under all three kernels (x86_64 ones through IA32 emulation).
  Uncompressed on purpose: in the emulator, the kernel's LZ4 decompressor spent about 19 M
  guest instructions (some 40% of the boot) on it, where copying 2.7 MB is a few REP MOVS.
- `i386_bzimage` / `i386_vmlinux`: a tiny i386 Linux from Debian's linux-source-6.1 (`make
  tinyconfig` + guest/linux/common.config + guest/linux/i386.config), LZ4-compressed, and
  the same kernel as an ELF with a PVH entry note; the emulator boots the vmlinux (the
  demo does), which skips the decompressor. Minimum CPU i686 with an x87 FPU: it
  needs CPUID, the x87 FPU, TSC, CX8 and CMOV (the emulated CPU model has them). Debian's i386
  userland (busybox, glibc in init) is built for i686 and uses CMOV.
  What the i386 kernel asks of a CPU and machine (for the emulator): 486 instructions
  (BSWAP, CMPXCHG, XADD, INVLPG), CPUID (probed by toggling EFLAGS.ID), 2-level paging
  with 4 MiB pages if CPUID says PSE; no PAE, no local APIC or IO-APIC (uniprocessor,
  8259 PIC + 8254 PIT, HZ=100), no PCI, no ACPI, no HPET. It executes RDTSC, RDMSR/WRMSR,
  CMPXCHG8B, FXSAVE/XSAVE, SYSENTER/SYSEXIT (vDSO) only when CPUID reports TSC, MSR, CX8,
  FXSR/XSAVE, SEP, so report only what is implemented. It switches FPU state lazily
  or eagerly with FNSAVE/FXSAVE as CPUID's FXSR says.
  The userland (init's static glibc, Debian's i386 busybox) needs i686: CMOVcc, the hint
  NOP ENDBR32 (F3 0F 1E FB), F3 0F BC (TZCNT, which is BSF where BMI1 is not reported);
  glibc picks SSE/SSE2 string routines only if CPUID reports them.
- `x86_64_bzimage` / `x86_64_vmlinux`: the same for x86_64, with SMP, KVM_GUEST and PVH
  (`x86_64_vmlinux` is the ELF with the PVH entry note, for a direct PVH boot).
- `debian_vmlinuz`: Debian's stock x86_64 kernel (what linux-image-amd64 points at),
  fetched with `apt-get download`, not installed. `debian686_*` / `debian686pae_*`: the
  same for Debian's i386 kernels (linux-image-686 and -686-pae), with the package itself
  (`kernel.deb`, whose modules a test's initramfs loads).

Devices in both tiny kernels: 8250 serial console (`console=ttyS0`), virtio-mmio with
command-line devices (`virtio_mmio.device=<size>@<base>:<irq>`), virtio-blk, -net,
-console (hvc0), -rng, libata's legacy-port PATA (0x1f0/IRQ 14, 0x170/IRQ 15) as
/dev/sdX, ext4, devtmpfs, no modules. No ACPI: a power-off halts the CPU with
interrupts off unless `boite.exitport=` names an exit port (below).

The guest init's console protocol (other tests look for these lines; keep
guest/init/init.c in step):

    BOITE-READY uptime=<seconds>          init runs: /proc /sys /dev mounted, boite.ctl open
    BOITE-EXIT status=<N>                 boite.run's command ended (128+signal if killed)
    BOITE-STOP reason=ctl                 "poweroff" arrived on the boite.ctl line
    BOITE-POWEROFF status=<N> reason=<R>  processes stopped, synced, powering off now;
                                          R is done, shell-exit or stop-request
    BOITE-WARN <text> / BOITE-ERROR <text>

Kernel parameters init reads from /proc/cmdline:

    boite.run="CMD"      run CMD with /bin/sh -c, print BOITE-EXIT
    boite.shell=1        busybox sh on the console (after boite.run if both)
    boite.exitport=PORT  write the status byte to I/O port PORT before powering off
                         (QEMU: -device isa-debug-exit,iobase=PORT exits with 2*N+1)
    boite.ctl=DEVICE     a control line (/dev/ttyS1, /dev/hvc1): "poweroff" = soft stop
    boite.net=0          do not bring up the NICs (else each ethN takes a DHCP lease
                         in the background: busybox udhcpc; the kernels have AF_PACKET)
    boite.ip=A/P,GW,DNS  a static address for eth0 instead of DHCP (boite never
                         passes it: its NAT serves DHCP)
    boite.tools=0        do not start the guest tools agent (/sbin/boite-tools)

SIGTERM, SIGUSR1, SIGUSR2, SIGPWR and SIGINT (Ctrl-Alt-Del) to init are soft stops too;
SIGQUIT is a soft reboot (the same steps, then reboot(RB_AUTOBOOT)). init starts the guest
tools agent when the machine has the tools port, and then stays up (serving it) after
boite.run's command instead of powering off, unless boite.run was given without
boite.shell and the tools were not found.

The cache, under `$BOITE_CACHE/kit` (default `~/.cache/boite/kit`, or
`$XDG_CACHE_HOME/boite/kit`):

    <artifact>.lock               flock(2) held by whoever builds that artifact
    src/linux-source-6.1.lock     held while that tree is extracted
    src/linux-source-6.1/         the extracted kernel tree, shared by both kernel builds
    work/linux-<arch>/            make O= object dirs, kept so an edited config rebuilds little
    linux-i386-<hash>/            bzImage vmlinux config kernel.release build.log manifest.json
    linux-x86_64-<hash>/          bzImage vmlinux config kernel.release build.log manifest.json
    initrd-i386-<hash>/           initrd.cpio init busybox build.log manifest.json
    debian-amd64-<hash>/          vmlinuz config kernel.release package build.log manifest.json
    debian-686[-pae]-<hash>/      the same and kernel.deb (the package: its modules)

`<hash>` is 16 hex digits of SHA-256 over the guest/ files that feed that artifact (and
a format number of this module), so editing a kernel config rebuilds that kernel only.
An artifact is complete when its manifest.json exists: it is built in `<dir>.part` and
renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from boite.errors import BoiteError

# Bump when this module changes what it puts into an artifact.
KIT_FORMAT = 1

READY_MARKER = "BOITE-READY"
EXIT_MARKER = "BOITE-EXIT"
POWEROFF_MARKER = "BOITE-POWEROFF"

Progress = Callable[[str], None]


class KitError(BoiteError):
    """The guest kit cannot be built: a tool is missing or a build step failed."""


def guest_dir() -> Path:
    """guest/ of this checkout (src/boite/guestkit.py -> ../../guest)."""
    here = Path(__file__).resolve().parent.parent.parent / "guest"
    if not (here / "init" / "init.c").is_file():
        raise KitError(
            f"guest kit sources not found at {here}: boite must run from a source "
            "checkout (or an install that ships guest/)"
        )
    return here


def cache_root() -> Path:
    base = os.environ.get("BOITE_CACHE")
    if base:
        return Path(base) / "kit"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "boite" / "kit"


@dataclass(frozen=True)
class Artifact:
    """One cached thing: its inputs under guest/, the tools it needs, its files."""

    name: str
    label: str
    inputs: tuple[str, ...]
    tools: tuple[tuple[str, str], ...]  # (program or /absolute/file, Debian package)
    files: tuple[str, ...]
    version: str = ""  # bumped when the build itself changes (it is part of the hash)


_KERNEL_TOOLS = (
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("lz4", "lz4"),
    ("perl", "perl"),
)

ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact(
            "initrd-i386",
            "guest initramfs (i386 init + busybox + guest tools)",
            (
                "init/init.c",
                "init/udhcpc.script",
                "tools/boite-tools.c",
                "busybox/fetch-busybox.sh",
            ),
            (
                ("gcc", "gcc-multilib"),
                ("apt-get", "apt"),
                ("dpkg-deb", "dpkg"),
            ),
            ("initrd.cpio", "init", "busybox", "boite-tools"),
            "2: uncompressed",
        ),
        Artifact(
            "linux-i386",
            "guest kernel (i386)",
            ("linux/common.config", "linux/i386.config", "linux/build-kernel.sh"),
            _KERNEL_TOOLS,
            ("bzImage", "vmlinux", "config", "kernel.release"),
        ),
        Artifact(
            "linux-x86_64",
            "guest kernel (x86_64)",
            ("linux/common.config", "linux/x86_64.config", "linux/build-kernel.sh"),
            # objtool (x86_64 only) is built against libelf.
            _KERNEL_TOOLS + (("/usr/include/gelf.h", "libelf-dev"),),
            ("bzImage", "vmlinux", "config", "kernel.release"),
        ),
        Artifact(
            "debian-amd64",
            "Debian x86_64 kernel",
            ("debian/fetch-debian-kernel.sh",),
            (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")),
            ("vmlinuz", "config", "kernel.release", "package"),
        ),
        *(
            Artifact(
                f"debian-{flavour}",
                f"Debian i386 kernel ({flavour})",
                ("debian/fetch-debian-kernel.sh",),
                (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")),
                ("vmlinuz", "config", "kernel.release", "package", "kernel.deb"),
            )
            for flavour in ("686", "686-pae")
        ),
    )
}

# What each `which` name needs. The initramfs goes with every kernel.
KIT_PARTS: dict[str, tuple[str, ...]] = {
    "i386": ("initrd-i386", "linux-i386"),
    "x86_64": ("initrd-i386", "linux-x86_64"),
    "debian": ("initrd-i386", "debian-amd64"),
    "debian-686": ("initrd-i386", "debian-686"),
    "debian-686-pae": ("initrd-i386", "debian-686-pae"),
    "initrd": ("initrd-i386",),
}
ALL_PARTS = ("i386", "x86_64", "debian")


@dataclass(frozen=True)
class Kit:
    """Paths of the kit's artifacts; None for a part that was not asked for."""

    root: Path
    initrd_i386: Path | None = None
    init_i386: Path | None = None
    tools_i386: Path | None = None  # the guest tools agent, for users' own guests too
    busybox_i386: Path | None = None
    i386_bzimage: Path | None = None
    i386_vmlinux: Path | None = None
    i386_config: Path | None = None
    x86_64_bzimage: Path | None = None
    x86_64_vmlinux: Path | None = None
    x86_64_config: Path | None = None
    debian_vmlinuz: Path | None = None
    debian_config: Path | None = None
    debian686_vmlinuz: Path | None = None
    debian686_deb: Path | None = None
    debian686pae_vmlinuz: Path | None = None
    debian686pae_deb: Path | None = None
    dirs: dict[str, Path] | None = None

    def as_dict(self) -> dict[str, str | dict[str, str] | None]:
        out: dict[str, str | dict[str, str] | None] = {}
        for key, value in self.__dict__.items():
            if key == "dirs":
                out[key] = {k: str(v) for k, v in (value or {}).items()}
            else:
                out[key] = None if value is None else str(value)
        return out


def artifact_hash(artifact: Artifact, guest: Path | None = None) -> str:
    guest = guest or guest_dir()
    h = hashlib.sha256(f"boite-kit {KIT_FORMAT} {artifact.name}\n".encode())
    if artifact.version:
        h.update(f"version {artifact.version}\n".encode())
    for rel in artifact.inputs:
        data = (guest / rel).read_bytes()
        h.update(f"{rel} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def artifact_dir(name: str, root: Path | None = None) -> Path:
    art = ARTIFACTS[name]
    return (root or cache_root()) / f"{name}-{artifact_hash(art)}"


def _complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _parts_for(which: Iterable[str]) -> list[str]:
    names: list[str] = []
    for w in which:
        if w == "all":
            parts = [p for a in ALL_PARTS for p in KIT_PARTS[a]]
        elif w in KIT_PARTS:
            parts = list(KIT_PARTS[w])
        else:
            raise KitError(
                f"unknown guest kit part {w!r}: expected one of {', '.join([*KIT_PARTS, 'all'])}"
            )
        names.extend(p for p in parts if p not in names)
    return names


def kit_paths(which: Iterable[str] = ALL_PARTS, root: Path | None = None) -> Kit:
    """The kit's paths for `which`, whether built or not (see ensure_kit)."""
    root = root or cache_root()
    dirs = {name: artifact_dir(name, root) for name in _parts_for(which)}

    def f(name: str, file: str) -> Path | None:
        return dirs[name] / file if name in dirs else None

    return Kit(
        root=root,
        initrd_i386=f("initrd-i386", "initrd.cpio"),
        init_i386=f("initrd-i386", "init"),
        tools_i386=f("initrd-i386", "boite-tools"),
        busybox_i386=f("initrd-i386", "busybox"),
        i386_bzimage=f("linux-i386", "bzImage"),
        i386_vmlinux=f("linux-i386", "vmlinux"),
        i386_config=f("linux-i386", "config"),
        x86_64_bzimage=f("linux-x86_64", "bzImage"),
        x86_64_vmlinux=f("linux-x86_64", "vmlinux"),
        x86_64_config=f("linux-x86_64", "config"),
        debian_vmlinuz=f("debian-amd64", "vmlinuz"),
        debian_config=f("debian-amd64", "config"),
        debian686_vmlinuz=f("debian-686", "vmlinuz"),
        debian686_deb=f("debian-686", "kernel.deb"),
        debian686pae_vmlinuz=f("debian-686-pae", "vmlinuz"),
        debian686pae_deb=f("debian-686-pae", "kernel.deb"),
        dirs=dirs,
    )


def missing_parts(which: Iterable[str] = ("i386",), root: Path | None = None) -> list[str]:
    kit = kit_paths(which, root)
    return [name for name, d in (kit.dirs or {}).items() if not _complete(d)]


def ensure_kit(
    which: Iterable[str] = ("i386",),
    progress: Progress | None = None,
    root: Path | None = None,
) -> Kit:
    """Build whatever of the kit `which` names is not in the cache yet; return its paths.

    `which` holds "i386", "x86_64", "debian", "initrd" or "all". `progress` gets one line
    per step ("building guest kernel (i386)... step 2/3: ..."), for people.
    Concurrent callers (tests in parallel, two terminals) wait for one another on a lock.
    """
    which = tuple(which)
    root = root or cache_root()
    kit = kit_paths(which, root)
    todo = [n for n, d in (kit.dirs or {}).items() if not _complete(d)]
    if not todo:
        return kit
    for name in todo:
        _check_tools(ARTIFACTS[name])
    root.mkdir(parents=True, exist_ok=True)
    assert kit.dirs is not None
    for index, name in enumerate(todo, 1):
        # One lock per artifact: two kernels build side by side, one kernel never twice.
        with _locked(root / f"{name}.lock", ARTIFACTS[name], progress):
            if not _complete(kit.dirs[name]):
                _build(ARTIFACTS[name], kit.dirs[name], root, progress, index, len(todo))
    return kit


def _check_tools(art: Artifact) -> None:
    missing = [
        (prog, pkg)
        for prog, pkg in art.tools
        if not (Path(prog).is_file() if prog.startswith("/") else shutil.which(prog))
    ]
    if missing:
        progs = ", ".join(p for p, _ in missing)
        pkgs = " ".join(sorted({p for _, p in missing}))
        raise KitError(
            f"building the {art.label} needs {progs}, not found on PATH; "
            f"install the Debian packages ({pkgs}), e.g. with ./dev setup"
        )


@contextmanager
def _locked(path: Path, art: Artifact, progress: Progress | None) -> Iterator[None]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"waiting for another boite that is building the {art.label}…")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(
    art: Artifact, dest: Path, root: Path, progress: Progress | None, index: int, total: int
) -> None:
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    log = part / "build.log"
    started = time.monotonic()
    step = 0
    last = [""]

    def line(detail: str) -> str:
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        return f"building {art.label}… step {index}/{total}: {detail} [{minutes}:{seconds:02d}]"

    def say(detail: str) -> None:
        nonlocal step
        step += 1
        last[0] = detail
        if progress:
            progress(line(detail))

    # A long step (a kernel's make) shows it is alive: the same line with the time so far.
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_S):
            if progress and last[0]:
                progress(line(last[0]))

    if progress:
        progress(f"building {art.label}: full log in {log}")
        threading.Thread(target=tick, daemon=True, name="kit-progress").start()

    try:
        guest = guest_dir()
        if art.name == "initrd-i386":
            _build_initrd(guest, part, log, say)
        elif art.name.startswith("linux-"):
            arch = art.name.removeprefix("linux-")
            say(f"make tinyconfig + {arch}.config, then bzImage (minutes)")
            _run_logged(
                [
                    "bash",
                    str(guest / "linux" / "build-kernel.sh"),
                    arch,
                    str(root / "src" / "linux-source-6.1"),
                    str(root / "work" / art.name),
                    str(part),
                ],
                log,
                say,
                art,
            )
        elif art.name.startswith("debian-"):
            flavour = art.name.removeprefix("debian-")
            script = str(guest / "debian" / "fetch-debian-kernel.sh")
            _run_logged(["bash", script, str(part), flavour], log, say, art)
    finally:
        done.set()
    for file in art.files:
        if not (part / file).is_file():
            raise KitError(f"building the {art.label}: {file} was not produced; see {log}")
    manifest = {
        "artifact": art.name,
        "hash": dest.name.rsplit("-", 1)[1],
        "format": KIT_FORMAT,
        "inputs": list(art.inputs),
        "files": {f: (part / f).stat().st_size for f in art.files},
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (part / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if dest.exists():  # an incomplete leftover (no manifest): replace it
        shutil.rmtree(dest)
    part.rename(dest)


TICK_S = 30.0  # how often a long build step says it is still going


def _run_logged(
    argv: list[str], log: Path, say: Callable[[str], None], art: Artifact, cwd: Path | None = None
) -> None:
    """Run a build step with its output in `log`; BOITE-STEP lines become progress."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=_build_env()
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            text = line.decode(errors="replace").strip()
            if text.startswith("BOITE-STEP "):
                say(text.removeprefix("BOITE-STEP "))
        status = proc.wait()
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise KitError(
            f"building the {art.label} failed ({argv[1] if len(argv) > 1 else argv[0]} "
            f"exited with {status}); full log: {log}\n" + "\n".join(tail)
        )


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C")
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return env


# --- the initramfs ---------------------------------------------------------------------

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root",
         "etc", "mnt", "run", "usr/share", "usr/share/udhcpc")  # fmt: skip
# The kernel opens /dev/console for init before anyone can mount devtmpfs.
_NODES = (("dev/console", stat.S_IFCHR | 0o600, 5, 1), ("dev/null", stat.S_IFCHR | 0o666, 1, 3))
_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
    "etc/hostname": b"boite\n",
}
# Used if the host cannot run the i386 busybox to ask it for its applets.
_FALLBACK_APPLETS = (
    "bin/sh", "bin/ash", "bin/ls", "bin/cat", "bin/dd", "bin/sync", "bin/mount",
    "bin/umount", "bin/echo", "bin/mkdir", "bin/rm", "bin/cp", "bin/mv", "bin/ln",
    "bin/dmesg", "bin/sleep", "bin/uname", "bin/grep", "bin/sed", "bin/ps", "bin/kill",
    "sbin/poweroff", "sbin/reboot", "sbin/halt", "sbin/mdev", "sbin/ifconfig",
    "usr/bin/head", "usr/bin/tail", "usr/bin/wc", "usr/bin/od", "usr/bin/hexdump",
    "usr/bin/md5sum", "usr/bin/sha256sum", "usr/bin/cmp", "usr/bin/tr", "usr/bin/free",
)  # fmt: skip


def _build_initrd(guest: Path, part: Path, log: Path, say: Callable[[str], None]) -> None:
    art = ARTIFACTS["initrd-i386"]
    say("compiling init (gcc -static -m32 -Os)")
    _run_logged(
        ["gcc", "-static", "-m32", "-Os", "-s", "-Wall", "-o", str(part / "init"),
         str(guest / "init" / "init.c")],
        log, say, art,
    )  # fmt: skip
    say("compiling the guest tools agent (gcc -static -m32 -Os)")
    _run_logged(
        ["gcc", "-static", "-m32", "-Os", "-s", "-Wall", "-o", str(part / "boite-tools"),
         str(guest / "tools" / "boite-tools.c")],
        log, say, art,
    )  # fmt: skip
    say("fetching busybox-static:i386")
    _run_logged(
        ["bash", str(guest / "busybox" / "fetch-busybox.sh"), str(part / "busybox")],
        log,
        say,
        art,
    )
    applets = _applets(part / "busybox")
    say(f"writing the initramfs ({len(applets)} busybox applets)")
    cpio = NewcArchive()
    for d in _DIRS:
        cpio.add(d, stat.S_IFDIR | 0o755)
    for path, mode, major, minor in _NODES:
        cpio.add(path, mode, rdev=(major, minor))
    for path, data in _FILES.items():
        cpio.add(path, stat.S_IFREG | 0o644, data)
    cpio.add(
        "usr/share/udhcpc/default.script", stat.S_IFREG | 0o755,
        (guest / "init" / "udhcpc.script").read_bytes(),
    )  # fmt: skip
    cpio.add("init", stat.S_IFREG | 0o755, (part / "init").read_bytes())
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, (part / "busybox").read_bytes())
    cpio.add("sbin/boite-tools", stat.S_IFREG | 0o755, (part / "boite-tools").read_bytes())
    for applet in applets:
        if applet in ("bin/busybox", "init"):
            continue
        target = os.path.relpath("bin/busybox", os.path.dirname(applet))
        cpio.add(applet, stat.S_IFLNK | 0o777, target.encode())
    (part / "initrd.cpio").write_bytes(cpio.finish())


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return sorted(_FALLBACK_APPLETS)
    applets = sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})
    # Every applet's directory must exist in the archive.
    return [a for a in applets if os.path.dirname(a) in _DIRS]


class NewcArchive:
    """A cpio archive in the "newc" format (magic 070701), the one the kernel unpacks.

    Written here rather than with cpio(1) so device nodes need no root and the
    archive is the same bytes on every machine (uid 0, mtime 0, fixed inode numbers).
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nlink = 2 if stat.S_ISDIR(mode) else 1
        self._entry(name, mode, data, nlink, rdev)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", 1, (0, 0), ino=0)
        return self._out.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int,
        rdev: tuple[int, int],
        ino: int | None = None,
    ) -> None:
        if ino is None:
            ino = self._ino
            self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out = self._out
        out.write(header)
        out.write(encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))


def parse_newc(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc archive, up to the trailer."""
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            raise KitError(f"initramfs: no newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start % 4
        body = data[data_start : data_start + filesize]
        pos = data_start + filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return
        yield name, mode, body
