"""Initramfs images made of Debian's own i386 packages, for tests that boot stock kernels.

The guest kit's initramfs (src/boite/guestkit.py) holds boite's own static init and a
static busybox. The images made here hold what a distribution would run instead:
binaries from Debian 12's i386 packages (the dynamic `busybox`, `python3.11-minimal`,
...), with the shared libraries they need, and optionally the stock kernel's own modules
from its package. The boot is then all Debian code, from the kernel to the libc.

    from guests.stockinitrd import stock_initrd
    img = stock_initrd(
        run='python3 -c "print(2 ** 0.5)"',
        packages=("busybox", "python3.11-minimal", "libpython3.11-minimal"),
        links={"usr/bin/python3": "python3.11"},
    )
    # boot img.path with console=ttyS0 boite.exitport=0x505

    # the stock kernel's own drivers, then what they found (STOCK-DISK, STOCK-CPUS ...)
    img = stock_initrd(run=PROBE_SCRIPT, kernel_deb=kit.debian686_deb,
                       modules=DISK_MODULES)

What goes in:
- every file of the `packages` (Debian i386 package names, `:i386` implied) except
  documentation and shared objects; the shared objects (and the ELF interpreter,
  /lib/ld-linux.so.2) that their programs need, found by following DT_NEEDED through the
  packages' `Depends` closure (apt-cache depends --recurse). Plug-ins loaded with
  dlopen (python's lib-dynload) are not followed: name them in `extra` (globs);
- with `kernel_deb`, the `modules` and every module they depend on (the `depends=`
  field of each .ko's .modinfo section: what depmod writes to modules.dep, which the
  package does not ship since depmod runs at installation) under
  /lib/modules/<release>/, in load order in /etc/boite/modules; modules built into the
  kernel (modules.builtin) are listed there as built in and not loaded;
- `files` (path -> bytes) and `links` (path -> symlink target) as given;
- /init, a busybox sh script.

What /init does (the kit's console markers, documented in guestkit.py, so the harness
helpers that look for them work unchanged):
1. `busybox --install -s` (a link per applet), mounts /proc, /sys, devtmpfs on /dev,
   a tmpfs on /tmp; prints `BOITE-READY uptime=<seconds>`;
2. loads the modules in order with insmod, one line each:
   `STOCK-INSMOD <name> ok`, `STOCK-INSMOD <name> builtin` or
   `STOCK-INSMOD <name> failed status=<N>` (init goes on: the test decides);
3. runs `run` with /bin/sh (from /etc/boite/run.sh), prints `BOITE-EXIT status=<N>`;
4. syncs, prints `BOITE-POWEROFF status=<N> reason=done`, writes the status byte to
   the I/O port named by `boite.exitport=PORT` on the kernel command line (through
   /dev/port, as the kit's init does with outb), then `poweroff -f`.

The image is cached in the guest kit's cache as `stock-initrd-<hash>/initrd.cpio` (with
a manifest.json naming the package versions), the hash covering this module's format,
/init, `run`, the package versions apt would download now, the kernel package's
name and version, the modules, `files`, `links` and `extra`: a Debian point release
makes a new image, an unchanged request reuses the old one.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from boite.guestkit import KitError, NewcArchive, cache_root

# Bump when what goes into an image changes for the same request.
FORMAT = 1

ARCH = "i386"
# The stock drivers of a PC's disks: virtio-blk over virtio-pci, PIIX IDE through libata
# (sd_mod gives its disks block devices; the virtio disk needs no more).
DISK_MODULES = ("virtio_pci", "virtio_blk", "ata_piix", "sd_mod")
# Where Debian's i386 ld.so looks without an ld.so.cache (its built-in trusted dirs).
LIBRARY_DIRS = ("lib/i386-linux-gnu", "usr/lib/i386-linux-gnu", "lib", "usr/lib")
# Not needed in a guest, and large.
SKIPPED = ("usr/share/doc/*", "usr/share/man/*", "usr/share/lintian/*", "usr/share/bug/*",
           "usr/share/info/*", "usr/share/locale/*", "etc/*")  # fmt: skip

INIT_SCRIPT = r"""#!/bin/busybox sh
# boite's init for images of Debian packages (tests/guests/stockinitrd.py).
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
read uptime idle </proc/uptime
echo "BOITE-READY uptime=$uptime"
port=0
for word in $(cat /proc/cmdline); do
  case "$word" in boite.exitport=*) port=$((${word#boite.exitport=})) ;; esac
done
release=$(uname -r)
while read -r name how; do
  [ -n "$name" ] || continue
  if [ "$how" = builtin ]; then
    echo "STOCK-INSMOD $name builtin"
  elif insmod "/lib/modules/$release/$how"; then
    echo "STOCK-INSMOD $name ok"
  else
    echo "STOCK-INSMOD $name failed status=$?"
  fi
done </etc/boite/modules
sh /etc/boite/run.sh
status=$?
echo "BOITE-EXIT status=$status"
sync
echo "BOITE-POWEROFF status=$status reason=done"
if [ "$port" -gt 0 ]; then
  printf "\\$(printf %o $((status & 255)))" | dd of=/dev/port bs=1 seek=$port 2>/dev/null
fi
poweroff -f
"""

# A `run` script for hardware tests: what the stock kernel found, one line per fact.
#   STOCK-CPUS <n>                        processors the kernel brought up
#   STOCK-DISK <name> sectors=<n> driver=<module or "?">   every block device but ram/loop
#   STOCK-PCI <slot> <vendor>:<device> driver=<name or "-">   every PCI function
PROBE_SCRIPT = r"""
echo "STOCK-CPUS $(grep -c '^processor' /proc/cpuinfo)"
for dev in /sys/block/*; do
  name=${dev##*/}
  case "$name" in ram*|loop*) continue ;; esac
  driver=$(readlink "$dev/device/driver" 2>/dev/null)
  [ -n "$driver" ] || driver=$(readlink "$dev/device/../driver" 2>/dev/null)
  driver=${driver##*/}
  echo "STOCK-DISK $name sectors=$(cat "$dev/size") driver=${driver:-?}"
done
for fn in /sys/bus/pci/devices/*; do
  [ -e "$fn" ] || continue
  driver=$(readlink "$fn/driver" 2>/dev/null)
  driver=${driver##*/}
  echo "STOCK-PCI ${fn##*/} $(cat "$fn/vendor"):$(cat "$fn/device") driver=${driver:--}"
done
"""

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "dev", "proc", "sys", "tmp",
         "root", "etc", "etc/boite", "run", "mnt")  # fmt: skip
_NODES = (("dev/console", stat.S_IFCHR | 0o600, 5, 1), ("dev/null", stat.S_IFCHR | 0o666, 1, 3))


# The floating-point program of the stock userland tests (test_stock_userland, the
# kernel-less tests/accel/test_emu_usermode.py): its printed line must match the host's.
FP_PROGRAM = """\
import math
xs = [math.sin(k) * math.exp(-k / 7) for k in range(1, 40)]
p = 1.0
for k in range(1, 30):
    p *= 1 + 1 / k**1.5
print("STOCK-PY", repr(math.fsum(xs)), repr(sum(xs)), repr(p), math.sqrt(2) ** 0.5,
      math.log10(12345.678), math.atan2(-1.5, 0.3), (0.1).hex(), float("1e-310") * 3,
      10**-5 / 3, round(math.pi, 7), int(2**52 * math.tau), math.cos(1e22), math.tan(0.5),
      7.0 % 2.5, divmod(-7.5, 2), f"{math.e:.30f}", 1e308 * 10, float("nan") != float("nan"))
"""


@dataclass(frozen=True)
class StockInitrd:
    """A built image: `path` is the newc archive to pass as the initrd."""

    path: Path
    packages: dict[str, str]  # name -> version, every package a file came from
    modules: tuple[str, ...]  # load order, dependencies first (built-in ones included)
    manifest: dict = field(default_factory=dict)


def stock_initrd(
    run: str,
    packages: Sequence[str] = ("busybox",),
    *,
    kernel_deb: Path | None = None,
    modules: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    links: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
    root: Path | None = None,
) -> StockInitrd:
    """The image for this request, built (minutes: downloads) or taken from the cache."""
    files = dict(files or {})
    links = dict(links or {})
    if "busybox" not in packages:
        raise KitError("a stock initramfs needs the busybox package: /init is a busybox script")
    if modules and kernel_deb is None:
        raise KitError("modules come from a kernel package: pass kernel_deb")
    closure = _depends_closure(packages)
    versions = {name: _candidate_version(name) for name in closure}
    kernel_pkg = _deb_field(kernel_deb, "Package") + "=" + _deb_field(kernel_deb, "Version") \
        if kernel_deb else ""  # fmt: skip
    h = hashlib.sha256(f"boite stock-initrd {FORMAT}\n".encode())
    h.update(INIT_SCRIPT.encode())
    h.update(json.dumps([run, sorted(packages), sorted(versions.items()), kernel_pkg,
                         list(modules), sorted(links.items()), sorted(extra)]).encode())  # fmt: skip
    for path, data in sorted(files.items()):
        h.update(f"{path} {len(data)}\n".encode() + data)
    dest = (root or cache_root()) / f"stock-initrd-{h.hexdigest()[:16]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "stock-initrd.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "manifest.json").is_file():
            _build(dest, run, packages, closure, versions, kernel_deb, modules, files, links,
                   extra)  # fmt: skip
    manifest = json.loads((dest / "manifest.json").read_text())
    return StockInitrd(
        dest / "initrd.cpio", manifest["packages"], tuple(manifest["modules"]), manifest
    )


# --- apt and dpkg ----------------------------------------------------------------------
def _apt(argv: list[str]) -> str:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KitError(f"{argv[0]}: {e}") from None
    if r.returncode != 0:
        raise KitError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def _depends_closure(packages: Iterable[str]) -> list[str]:
    """The packages and everything they Depend/Pre-Depend on, recursively (i386)."""
    out = _apt(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                *(f"{p}:{ARCH}" for p in packages)])  # fmt: skip
    names = []
    for line in out.splitlines():
        if line and not line[0].isspace() and not line.startswith("<"):
            name = line.strip().removesuffix(f":{ARCH}")
            if name not in names:
                names.append(name)
    missing = [p for p in packages if p not in names]
    if missing:
        raise KitError(f"apt does not know {', '.join(missing)} for {ARCH}")
    return names


def _candidate_version(package: str) -> str:
    out = _apt(["apt-cache", "show", "--no-all-versions", f"{package}:{ARCH}"])
    for line in out.splitlines():
        if line.startswith("Version: "):
            return line.removeprefix("Version: ").strip()
    raise KitError(f"apt-cache show {package}:{ARCH} names no version")


def _deb_field(deb: Path, name: str) -> str:
    return _apt(["dpkg-deb", "-f", str(deb), name]).strip()


def _download(versions: Mapping[str, str], into: Path) -> dict[str, Path]:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "download", "-q", *(f"{n}:{ARCH}={v}" for n, v in versions.items())]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=into, env=env, timeout=900)
    if r.returncode != 0:
        raise KitError(f"apt-get download failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    debs = {}
    for deb in into.glob("*.deb"):
        debs[_deb_field(deb, "Package")] = deb
    missing = sorted(set(versions) - set(debs))
    if missing:
        raise KitError(f"apt-get download left out {', '.join(missing)}")
    return debs


def _extract(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _apt(["dpkg-deb", "-x", str(deb), str(into)])


# --- ELF -------------------------------------------------------------------------------
PT_DYNAMIC, PT_INTERP, PT_LOAD = 2, 3, 1
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def _is_elf32(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and len(data) >= 52 and data[4] == 1 and data[5] == 1


def elf_needs(data: bytes, what: str) -> tuple[str | None, list[str]]:
    """(PT_INTERP path, DT_NEEDED sonames) of a 32-bit little-endian ELF."""
    if not _is_elf32(data):
        raise KitError(f"{what}: not a 32-bit little-endian ELF")
    phoff, = struct.unpack_from("<I", data, 0x1C)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    if phoff + phnum * phentsize > len(data) or (phnum and phentsize < 32):
        raise KitError(f"{what}: program headers run past the file")
    phs = [struct.unpack_from("<IIIIII", data, phoff + i * phentsize) for i in range(phnum)]
    interp = None
    dynamic = None
    for p_type, off, _vaddr, _paddr, filesz, _memsz in phs:
        if off + filesz > len(data):
            raise KitError(f"{what}: a segment runs past the file")
        if p_type == PT_INTERP:
            interp = data[off : off + filesz].split(b"\0")[0].decode()
        elif p_type == PT_DYNAMIC:
            dynamic = (off, filesz)
    if dynamic is None:
        return interp, []
    tags = [struct.unpack_from("<iI", data, dynamic[0] + i) for i in range(0, dynamic[1] - 7, 8)]
    strtab = next((v for t, v in tags if t == DT_STRTAB), None)
    if strtab is None:
        raise KitError(f"{what}: a dynamic section without DT_STRTAB")
    # DT_STRTAB is an address: find the file offset through the segment holding it.
    for p_type, off, vaddr, _paddr, filesz, _memsz in phs:
        if p_type == PT_LOAD and vaddr <= strtab < vaddr + filesz:
            stroff = off + strtab - vaddr
            break
    else:
        raise KitError(f"{what}: DT_STRTAB {strtab:#x} is in no loaded segment")
    needed = []
    for tag, value in tags:
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            end = data.find(b"\0", stroff + value)
            if end < 0:
                raise KitError(f"{what}: DT_NEEDED name runs past the file")
            needed.append(data[stroff + value : end].decode())
    return interp, needed


def elf_section(data: bytes, name: str, what: str) -> bytes | None:
    """The contents of section `name` of a 32-bit ELF (a kernel module), or None."""
    if not _is_elf32(data):
        raise KitError(f"{what}: not a 32-bit little-endian ELF")
    shoff, = struct.unpack_from("<I", data, 0x20)  # fmt: skip
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
    if shoff + shnum * shentsize > len(data) or shstrndx >= shnum or shentsize < 40:
        raise KitError(f"{what}: section headers run past the file")
    shs = [struct.unpack_from("<IIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = shs[shstrndx][4]
    for sh_name, _type, _flags, _addr, off, size in shs:
        end = data.find(b"\0", names_off + sh_name)
        if data[names_off + sh_name : end].decode(errors="replace") == name:
            if off + size > len(data):
                raise KitError(f"{what}: section {name} runs past the file")
            return data[off : off + size]
    return None


# --- what goes in ----------------------------------------------------------------------
def _skipped(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            yield str((Path(dirpath) / name).relative_to(root))


class _Tree:
    """The files chosen for the image, read from the extracted packages in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, tuple[int, bytes]] = {}  # rel -> (mode, data or link target)
        self.dirs: set[str] = set()  # the packages' directories, kept even where emptied

    def resolve(self, rel: str, hops: int = 0) -> str:
        """`rel` with its symlinks followed inside the tree, recording every link."""
        if hops > 16:
            raise KitError(f"symlink loop at {rel}")
        path = self.root / rel
        if path.is_symlink():
            target = os.readlink(path)
            self.entries[rel] = (stat.S_IFLNK | 0o777, target.encode())
            nxt = posixpath.normpath(
                target.lstrip("/") if target.startswith("/") else
                posixpath.join(posixpath.dirname(rel), target)
            )  # fmt: skip
            if nxt.startswith(".."):
                raise KitError(f"symlink {rel} -> {target} leaves the tree")
            return self.resolve(nxt, hops + 1)
        return rel

    def add_file(self, rel: str) -> str:
        real = self.resolve(rel)
        path = self.root / real
        if not path.is_file():
            raise KitError(f"{rel}: {real} is not a file in the extracted packages")
        mode = path.stat().st_mode
        self.entries[real] = (stat.S_IFREG | (mode & 0o777), path.read_bytes())
        return real

    def find_library(self, soname: str) -> str | None:
        for d in LIBRARY_DIRS:
            rel = f"{d}/{soname}"
            if (self.root / rel).exists() or (self.root / rel).is_symlink():
                return rel
        return None


def _choose(root: Path, payload: dict[str, list[str]], extra: Sequence[str]) -> _Tree:
    """The payload packages' files (no shared objects) and the libraries they need."""
    tree = _Tree(root)
    elves: list[str] = []
    for _package, members in payload.items():
        for rel in members:
            path = root / rel
            if _skipped(rel, SKIPPED) or path.is_dir() and not path.is_symlink():
                continue
            tree.dirs.add(posixpath.dirname(rel))  # python wants lib-dynload/ to exist
            data = b"" if path.is_symlink() else path.read_bytes()[:64]
            is_so = ".so" in posixpath.basename(rel) and (path.is_symlink() or _is_elf32(data))
            if is_so and not any(fnmatch.fnmatch(rel, p) for p in extra):
                continue  # a library or plug-in: only if something needs it
            real = tree.add_file(rel) if not path.is_symlink() else tree.resolve(rel)
            if (root / real).is_file() and _is_elf32((root / real).read_bytes()[:64]):
                elves.append(real)
    seen: set[str] = set()
    while elves:
        rel = elves.pop()
        if rel in seen:
            continue
        seen.add(rel)
        interp, needed = elf_needs(tree.entries[rel][1], rel)
        wants = [interp.lstrip("/")] if interp else []
        for soname in needed:
            lib = tree.find_library(soname)
            if lib is None:
                raise KitError(f"{rel} needs {soname}, which no package of the closure holds")
            wants.append(lib)
        for want in wants:
            real = tree.add_file(want)
            if real not in seen:
                elves.append(real)
    return tree


def _members(deb_root: Path) -> list[str]:
    return list(_walk(deb_root))


# --- kernel modules --------------------------------------------------------------------
def _modinfo_depends(ko: bytes, what: str) -> list[str]:
    info = elf_section(ko, ".modinfo", what) or b""
    for item in info.split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[8:].decode().split(",") if d]
    return []


def _modname(path: str) -> str:
    return posixpath.basename(path).removesuffix(".ko").replace("-", "_")


def _kernel_modules(
    deb: Path, wanted: Sequence[str]
) -> tuple[str, list[tuple[str, str]], dict[str, bytes]]:
    """(release, [(name, relative path or "builtin")] in load order, {rel: .ko bytes})."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    kos: dict[str, tuple[str, bytes]] = {}  # name -> (path under lib/modules/<rel>/, data)
    builtin: set[str] = set()
    release = ""
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                parts = member.name.lstrip("./").split("/")
                if len(parts) < 4 or parts[:2] != ["lib", "modules"] or not member.isfile():
                    continue
                release = parts[2]
                rel = "/".join(parts[3:])
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                if rel.endswith(".ko"):
                    kos[_modname(rel)] = (rel, fh.read())
                elif rel == "modules.builtin":
                    builtin = {_modname(line) for line in fh.read().decode().split()}
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise KitError(f"dpkg-deb --fsys-tarfile {deb} failed")
    if not release:
        raise KitError(f"{deb}: no lib/modules/<release>/ in the package")
    order: list[tuple[str, str]] = []
    placed: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in placed:
            return
        if name in chain:
            raise KitError(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name in kos:
            rel, data = kos[name]
            for dep in _modinfo_depends(data, rel):
                visit(dep, (*chain, name))
            order.append((name, rel))
        elif name in builtin:
            order.append((name, "builtin"))
        else:
            raise KitError(f"{deb.name}: no module {name} (neither a .ko nor built in)")
        placed.add(name)

    for name in wanted:
        visit(name, ())
    blobs = {rel: kos[name][1] for name, rel in order if rel != "builtin"}
    return release, order, blobs


# --- the build -------------------------------------------------------------------------
def _build(
    dest: Path,
    run: str,
    packages: Sequence[str],
    closure: Sequence[str],
    versions: Mapping[str, str],
    kernel_deb: Path | None,
    modules: Sequence[str],
    files: Mapping[str, bytes],
    links: Mapping[str, str],
    extra: Sequence[str],
) -> None:
    with tempfile.TemporaryDirectory(prefix="boite-stock-initrd-") as tmp:
        work = Path(tmp)
        (work / "debs").mkdir()
        debs = _download(versions, work / "debs")
        payload: dict[str, list[str]] = {}
        for name in closure:
            one = work / "pkg" / name
            _extract(debs[name], one)
            if name in packages:
                payload[name] = _members(one)
            _extract(debs[name], work / "root")  # all of them, for the libraries
        tree = _choose(work / "root", payload, extra)

        module_lines: list[str] = []
        order: list[tuple[str, str]] = []
        if kernel_deb is not None and modules:
            release, order, blobs = _kernel_modules(kernel_deb, modules)
            for rel, data in blobs.items():
                tree.entries[f"lib/modules/{release}/{rel}"] = (stat.S_IFREG | 0o644, data)
            module_lines = [f"{name} {rel}" for name, rel in order]

        cpio = NewcArchive()
        dirs = set(_DIRS) | tree.dirs
        for rel in [*tree.entries, *tree.dirs, *files, *links]:
            parent = posixpath.dirname(rel)
            while parent:
                dirs.add(parent)
                parent = posixpath.dirname(parent)
        for d in sorted(dirs):
            cpio.add(d, stat.S_IFDIR | 0o755)
        for path, mode, major, minor in _NODES:
            cpio.add(path, mode, rdev=(major, minor))
        for rel, (mode, data) in sorted(tree.entries.items()):
            cpio.add(rel, mode, data)
        for rel, data in sorted(files.items()):
            cpio.add(rel, stat.S_IFREG | 0o644, data)
        for rel, target in sorted(links.items()):
            cpio.add(rel, stat.S_IFLNK | 0o777, target.encode())
        cpio.add("etc/boite/modules", stat.S_IFREG | 0o644,
                 "".join(line + "\n" for line in module_lines).encode())  # fmt: skip
        cpio.add("etc/boite/run.sh", stat.S_IFREG | 0o644, run.encode() + b"\n")
        cpio.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode())

        part = dest.with_name(dest.name + ".part")
        if part.exists():
            shutil.rmtree(part)
        part.mkdir()
        (part / "initrd.cpio").write_bytes(cpio.finish())
        manifest = {
            "format": FORMAT,
            "packages": dict(sorted(versions.items())),
            "payload": sorted(packages),
            "kernel_package": _deb_field(kernel_deb, "Package") + "="
            + _deb_field(kernel_deb, "Version") if kernel_deb else None,
            "modules": [name for name, _ in order],
            "files": len(tree.entries),
            "bytes": (part / "initrd.cpio").stat().st_size,
        }  # fmt: skip
        (part / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        part.rename(dest)


# --- booting -----------------------------------------------------------------------------
@dataclass
class BootRun:
    """What a boot printed, how it ended: `stopped_on` is the pattern that ended it early
    (the process was killed), "timeout", or None when it exited by itself."""

    output: str
    returncode: int | None
    stopped_on: str | None

    def tail(self, chars: int = 3000) -> str:
        return f"stopped_on={self.stopped_on} rc={self.returncode}\n{self.output[-chars:]}"


def boot_with_markers(argv: Sequence[str], stop_on: Sequence[str] = (), timeout: float = 3600
                      ) -> BootRun:  # fmt: skip
    """Run `argv` (a `boite boot ...`), collecting its stdout and stderr; end it early when
    a line holds one of `stop_on` (a kernel panic, a known dead end) or after `timeout`
    seconds, so a guest that can never finish fails at once with its own last words."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    out = bytearray()
    stopped: str | None = None
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while stopped is None:
            left = deadline - time.monotonic()
            if left <= 0:
                stopped = "timeout"
                break
            if not sel.select(min(left, 5.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            start = max(0, len(out) - 200)
            out += chunk
            window = out[start:].decode(errors="replace")
            stopped = next((p for p in stop_on if p in window), None)
    finally:
        sel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        proc.stdout.close()
    text = out.decode(errors="replace").replace("\r\n", "\n")
    return BootRun(text, None if stopped else returncode, stopped)


def python_userland() -> StockInitrd:
    """Busybox and python3.11 with FP_PROGRAM as /etc/boite/fp.py; init runs it."""
    return stock_initrd(
        run='python3 -c "$(cat /etc/boite/fp.py)"',
        packages=("busybox", "python3.11-minimal", "libpython3.11-minimal"),
        files={"etc/boite/fp.py": FP_PROGRAM.encode()},
        links={"usr/bin/python3": "python3.11"},
    )
