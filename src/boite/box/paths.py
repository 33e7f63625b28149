"""Paths read from box metadata: the one place that resolves and confines them.

A `.vmx`, a `.vmsd` and the crash journal (`NAME.boite-journal`) name files: disks,
`nvram`, `checkpoint.vmState`, `serialN.fileName`, `snapshotN.filename`,
`snapshotN.diskK.fileName`, the journal's created/deleted files. Each such name is
resolved here (relative to the box directory, every symbolic link followed) and checked
before anything uses it. The policy, written down for users in docs/security.md:

- Files boite or the VMM write (`nvram`, serial port files and pipes, `.vmem`/`.vmss`/
  `.vmsn`, `vmware.log`, delta disks) live inside the box directory. They are opened
  without following symbolic links (O_NOFOLLOW on every component under the box), new
  ones with O_EXCL, and created 0600: guest RAM, disks and console output are private.
- boite deletes, renames and truncates only files inside the box directory of the kinds
  it makes (`.vmdk`, `.vmsn`, `.vmem`, `.vmss`), never the box's own `.vmx`/`.vmsd`.
- Disks (with their extents and parent links) outside the box, and disks that are block
  or character devices (`/dev/sda`), are used only when the `.vmx` says
  `boite.allowExternalDisks = "TRUE"`; `boite check` and `boite start` name them.
- Read-only inputs may live anywhere: `boite.kernel`/`boite.initrd` (regular files no
  larger than guest RAM) and CD-ROM images. `boite check` lists them as leaving the box.

Files boite reads whole (the `.vmx`, `.vmsd`, `.nvram`, the journal, a kernel) are opened
non-blocking and checked with fstat before one byte is read: a FIFO, a device or a
directory is refused, and so is a file larger than what that kind of file can be. Error
messages name the file, the key and the value, never the file's bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from boite.errors import BoiteError, ConfigError

if TYPE_CHECKING:
    from boite.box.box import Box

# The opt-in key for disks outside the box or on raw devices (box-wide, like VMware's own
# `diskLib.*` and `disk.*` settings).
ALLOW_EXTERNAL_DISKS = "boite.allowExternalDisks"
# What boite makes and may therefore remove, rename or truncate.
OWNED_SUFFIXES = (".vmdk", ".vmsn", ".vmem", ".vmss")
PRIVATE_MODE = 0o600  # guest RAM, disks, console output: readable by the owner only

_TRUE = {"true", "yes", "on", "1"}


class BoxPathError(ConfigError):
    """A name read from box metadata leaves the box directory, or names something boite
    may not use for that key. Carries the file, the key and the value."""

    def __init__(self, source: str, key: str, value: str, reason: str) -> None:
        self.source, self.key, self.value, self.reason = str(source), key, value, reason
        super().__init__(f"{source}: {key} = {value!r}: {reason}")


class FileKindError(ConfigError):
    """A file boite reads or writes is not a regular file, or is larger than its kind."""


def kind_of(mode: int) -> str:
    """What a file is, in words, from its st_mode."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return words
    return "not a regular file"


# -- resolving ------------------------------------------------------------------------------


def real_dir(box_dir: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(box_dir))


def _check_name(value: str, source: str, key: str) -> None:
    if not value.strip():
        raise BoxPathError(source, key, value, "names no file")
    if "\0" in value:
        raise BoxPathError(source, key, value, "holds a NUL byte; no file has that name")
    if "://" in value:
        raise BoxPathError(source, key, value, "is a URL, expected a file name")


def locate(box_dir: str | os.PathLike[str], value: str, *, source: str, key: str) -> Path:
    """Where `value` (relative to the box directory, or absolute) really is: every
    symbolic link resolved, `..` applied."""
    _check_name(value, source, key)
    return Path(os.path.realpath(os.path.join(real_dir(box_dir), value)))


def is_inside(box_dir: str | os.PathLike[str], real: str | os.PathLike[str]) -> bool:
    """Whether the resolved path `real` is a file under the box directory (not the
    directory itself)."""
    top = str(real_dir(box_dir))
    real = str(real)
    return real != top and os.path.commonpath([top, real]) == top


def inside(box_dir: str | os.PathLike[str], value: str, *, source: str, key: str) -> Path:
    """The resolved path of `value`, which must be inside the box directory."""
    real = locate(box_dir, value, source=source, key=key)
    if not is_inside(box_dir, real):
        raise BoxPathError(
            source, key, value, f"leaves the box directory {real_dir(box_dir)} (it is {real})"
        )
    return real


def owned(
    box_dir: str | os.PathLike[str],
    value: str,
    *,
    source: str,
    key: str,
    protected: tuple[str, ...] = (),
) -> Path:
    """The resolved path of a file boite may remove, rename or truncate: inside the box,
    of a kind boite makes, and none of the box's own files named in `protected`."""
    real = inside(box_dir, value, source=source, key=key)
    if real.suffix.lower() not in OWNED_SUFFIXES or real.name in protected:
        raise BoxPathError(
            source,
            key,
            value,
            "boite removes or rewrites only the files it makes in the box "
            f"({', '.join(OWNED_SUFFIXES)}), and not the box's own "
            f"{', '.join(protected) or 'metadata'}",
        )
    return real


# -- opening --------------------------------------------------------------------------------


def open_regular(path: str | os.PathLike[str], *, what: str, nofollow: bool = False) -> int:
    """An fd for reading a regular file. Opened non-blocking (a FIFO cannot hang the
    open), then fstat'ed: anything but a regular file is refused with FileKindError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise FileKindError(
                f"{path}: the {what} is a symbolic link; boite does not follow it"
            ) from None
        raise
    return _regular_or_close(fd, f"{path}: the {what}")


def _regular_or_close(fd: int, what: str) -> int:
    """`fd` back in blocking mode if it is a regular file; else closed and FileKindError."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileKindError(f"{what} is {kind_of(st.st_mode)}, expected a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: str | os.PathLike[str], limit: int, *, what: str, nofollow: bool = False
) -> bytes:
    """The whole of a regular file of at most `limit` bytes (checked before reading and
    while reading, so a growing file cannot exceed it either)."""
    fd = open_regular(path, what=what, nofollow=nofollow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FileKindError(
                f"{path}: {size} bytes, more than a {what} can be ({limit}); not a {what}"
            )
        chunks: list[bytes] = []
        total = 0
        # The size it has now in one read (a kernel and its initrd are megabytes: no
        # joining copy), then smaller reads to its end: it may have grown meanwhile.
        want = size + 1
        while True:
            chunk = os.read(fd, min(want, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileKindError(f"{path}: the {what} grew past {limit} bytes while read")
            want = 1 << 20
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _walk_to_parent(top: Path, rel: Path, display: str) -> int:
    """A directory fd for the parent of `rel` under `top`, every component opened with
    O_NOFOLLOW (a symlink swapped in after the check cannot lead out)."""
    dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.parts[:-1]:
            try:
                nfd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise FileKindError(
                        f"{display}: {part} on the way there is not a plain directory"
                    ) from None
                raise
            os.close(dfd)
            dfd = nfd
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def open_output(
    box_dir: str | os.PathLike[str],
    value: str,
    *,
    source: str,
    key: str,
    append: bool = True,
    exclusive: bool = False,
    mode: int = PRIVATE_MODE,
) -> int:
    """An fd for writing a file the VMM produces (serial output, logs): inside the box,
    opened without following links (O_NOFOLLOW), created `mode` (0600), O_EXCL when
    `exclusive`; an existing FIFO, device or directory there is refused (non-blocking open,
    so nothing waits for a reader)."""
    real = inside(box_dir, value, source=source, key=key)
    top = real_dir(box_dir)
    rel = real.relative_to(top)
    dfd = _walk_to_parent(top, rel, str(real))
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= os.O_APPEND if append else 0
    flags |= os.O_EXCL if exclusive else 0
    try:
        try:
            fd = os.open(rel.name, flags, mode, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BoxPathError(
                    source, key, value, "is a symbolic link; boite does not write through links"
                ) from None
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads
                raise FileKindError(
                    f"{real}: ({key}) is a named pipe (FIFO), expected a regular file"
                ) from None
            raise
    finally:
        os.close(dfd)
    return _regular_or_close(fd, f"{real} ({key})")


def create_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """Create a new file boite writes (a temporary to be renamed, a state file): O_EXCL, so
    a link planted under that name is never followed, and 0600."""
    return os.open(
        path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE
    )


def remove_owned(box_dir: str | os.PathLike[str], path: str | os.PathLike[str], *,
                 source: str, key: str) -> None:  # fmt: skip
    """Remove a file boite made in the box (a missing one is fine); anything outside the
    box or of another kind raises BoxPathError and stays."""
    real = owned(box_dir, os.fspath(path), source=source, key=key)
    real.unlink(missing_ok=True)


# -- what a box references --------------------------------------------------------------------


def allows_external_disks(box: Box) -> bool:
    return (box.vmx.get(ALLOW_EXTERNAL_DISKS) or "").strip().lower() in _TRUE


@dataclass(frozen=True)
class ExternalPath:
    """A file a box references that is outside its directory (or is a device)."""

    key: str  # as the metadata spells it: `scsi0:1.fileName`, `boite.kernel` ...
    value: str  # the name as written
    path: str  # where it resolves
    kind: str  # disk, disk parent, disk extent, device, image, kernel, remote disk, output
    allowed: bool
    note: str  # why it may be used, or why not

    @property
    def problem(self) -> str:
        """A sentence for a refused one."""
        where = f" ({self.path})" if self.path else ""
        return f"the {self.kind}{where} leaves the box: {self.note}"

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else "refused"
        where = self.path or "(no usable file name)"
        return f"{self.key} = {self.value!r} leaves the box: {where} ({self.kind}; {verdict}: {self.note})"


def _is_device(real: Path) -> bool:
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


# Deeper than any chain VMware makes (496 snapshots), so a looping chain ends.
MAX_CHAIN = 1024


def _disk_chain(start: Path, walked: set[str]) -> Iterator[tuple[str, Path]]:
    """(what, real path) of a VMDK's extent files and of its parents and their extents, as
    far as they read. `walked` is shared by every disk of a box: links that snapshots
    share are read once."""
    from boite.disk.ops import disk_files, is_vmdk_name
    from boite.disk.vmdk import read_descriptor

    path: Path | None = start
    depth = 0
    while path is not None and str(path) not in walked and depth < MAX_CHAIN:
        walked.add(str(path))
        depth += 1
        if not is_vmdk_name(path) or not path.is_file():
            return
        try:
            files = disk_files(path)
            desc, _ = read_descriptor(path)
        except BoiteError:
            return
        for extent in files[1:]:
            yield "disk extent", Path(os.path.realpath(extent))
        if not desc.has_parent:
            return
        from boite.disk.descriptor import parent_path

        try:
            path = Path(os.path.realpath(parent_path(path, desc.parent_hint or "")))
        except BoiteError:
            return
        yield "disk parent", path


def external_paths(box: Box) -> list[ExternalPath]:
    """Every file the box's `.vmx` and `.vmsd` name that leaves the box directory, and
    every device used as a disk: allowed or refused by the policy above."""
    out: list[ExternalPath] = []
    src = box.vmx_path.name
    allow = allows_external_disks(box)
    disk_note = (
        f"{ALLOW_EXTERNAL_DISKS} is TRUE"
        if allow
        else f'set {ALLOW_EXTERNAL_DISKS} = "TRUE" to use it'
    )

    def add(key: str, value: str, real: Path | str, kind: str, allowed: bool, note: str):
        out.append(ExternalPath(key, value, str(real), kind, allowed, note))

    walked: set[str] = set()

    def disk(key: str, value: str) -> None:
        if "://" in value:
            add(key, value, value, "remote disk", True, "remote storage, named by its URL")
            return
        try:
            real = locate(box.dir, value, source=src, key=key)
        except BoxPathError as exc:
            add(key, value, "", "disk", False, exc.reason)
            return
        if _is_device(real):
            add(key, value, real, "device", allow, disk_note)
            return
        if not is_inside(box.dir, real):
            add(key, value, real, "disk", allow, disk_note)
        for what, part in _disk_chain(real, walked):
            if _is_device(part) or not is_inside(box.dir, part):
                add(key, value, part, what, allow, disk_note)

    try:
        slots = box.config.disk_slots()
    except ConfigError:
        slots = []
    for slot in slots:
        if not slot.present or not slot.file_name:
            continue
        key = f"{slot.key}.fileName"
        if slot.is_cdrom:
            if (slot.device_type or "").lower().endswith("image") and "://" not in slot.file_name:
                try:
                    real = locate(box.dir, slot.file_name, source=src, key=key)
                except BoxPathError:
                    continue
                if not is_inside(box.dir, real):
                    add(key, slot.file_name, real, "image", True, "a read-only CD-ROM image")
            continue
        disk(key, slot.file_name)
    try:
        from boite.snapshot import load_tree

        tree = load_tree(box, check_paths=False)  # listed here, not refused wholesale
        vmsd = box.vmsd_path.name
    except (BoiteError, ImportError):
        tree = None  # an unreadable tree: `check` says why
    for s in tree.snapshots.values() if tree is not None else ():
        for k, d in enumerate(s.disks):
            disk(f"{vmsd}: {s.where}.disk{k}.fileName", d.file_name)
        if s.filename:
            try:
                real = locate(box.dir, s.filename, source=vmsd, key=f"{s.where}.filename")
            except BoxPathError as exc:
                add(f"{vmsd}: {s.where}.filename", s.filename, "", "snapshot state", False,
                    exc.reason)  # fmt: skip
                continue
            if not is_inside(box.dir, real):
                add(f"{vmsd}: {s.where}.filename", s.filename, real, "snapshot state", False,
                    "snapshot files live inside the box")  # fmt: skip

    # What the VMM writes must stay inside.
    writes = [("nvram", box.config.nvram)]
    writes += [("checkpoint.vmState", box.vmx.get("checkpoint.vmState") or "")]
    try:
        serials = box.config.serials
    except ConfigError:
        serials = []
    for port in serials:
        if port.present and (port.file_type or "").lower() in ("file", "pipe"):
            writes.append((f"serial{port.index}.fileName", port.file_name or ""))
    for key, value in writes:
        if not value:
            continue
        try:
            real = locate(box.dir, value, source=src, key=key)
        except BoxPathError as exc:
            add(key, value, "", "output", False, exc.reason)
            continue
        if not is_inside(box.dir, real):
            add(key, value, real, "output", False, "files the VMM writes live inside the box")

    # Read-only boot files may live anywhere (the guest kit lives in a cache).
    for key in ("boite.kernel", "boite.initrd"):
        value = box.vmx.get(key) or ""
        if not value:
            continue
        try:
            real = locate(box.dir, value, source=src, key=key)
        except BoxPathError as exc:
            add(key, value, "", key.split(".")[1], False, exc.reason)
            continue
        if not is_inside(box.dir, real):
            add(key, value, real, key.split(".")[1], True, "read only, loaded into guest RAM")
    return out


def refused_paths(box: Box) -> list[ExternalPath]:
    return [p for p in external_paths(box) if not p.allowed]


def require_allowed_paths(box: Box) -> list[ExternalPath]:
    """What `start` calls: raise BoxPathError for the first path the policy refuses;
    return the external ones it allows (for the log and the console)."""
    found = external_paths(box)
    for p in found:
        if not p.allowed:
            raise BoxPathError(str(box.vmx_path), p.key, p.value, p.problem)
    return found


def disk_file(box: Box, value: str, *, source: str, key: str) -> Path:
    """The resolved path of a disk link a snapshot operation reads or writes: inside the
    box, or outside it (or a device) only with `boite.allowExternalDisks`."""
    if "://" in value:
        raise BoxPathError(source, key, value, "a remote disk has no snapshot links")
    real = locate(box.dir, value, source=source, key=key)
    if (_is_device(real) or not is_inside(box.dir, real)) and not allows_external_disks(box):
        raise BoxPathError(
            source, key, value,
            f"leaves the box directory (it is {real}); set {ALLOW_EXTERNAL_DISKS} = \"TRUE\" "
            "to use a disk outside it",
        )  # fmt: skip
    return real
