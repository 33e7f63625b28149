"""Whole-disk operations: create, open, info, check, convert, grow, compact, map, chains."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from boite.disk.base import SECTOR, BlockImage
from boite.disk.descriptor import (
    NO_PARENT_CID,
    Descriptor,
    ExtentLine,
    extent_path,
    geometry_ddb,
    new_cid,
    parent_path,
)
from boite.disk.hostfile import fsync_dir, is_zero, open_image_file
from boite.disk.raw import RawImage
from boite.disk.sparse import (
    DEFAULT_GRAIN,
    MAGIC,
    SparseExtent,
    check_sparse,
    create_sparse,
    grow_sparse,
)
from boite.disk.stream import StreamWriter
from boite.disk.vmdk import MAX_CHAIN, VmdkDisk, read_descriptor, write_descriptor_file
from boite.errors import DiskError, DiskFormatError

DISK_TYPES = ("thin", "flat", "split-thin", "split-flat", "stream", "raw")
CREATE_TYPE_OF = {
    "thin": "monolithicSparse",
    "flat": "monolithicFlat",
    "split-thin": "twoGbMaxExtentSparse",
    "split-flat": "twoGbMaxExtentFlat",
    "stream": "streamOptimized",
}
TYPE_OF_CREATE = {v: k for k, v in CREATE_TYPE_OF.items()}
SPLIT_SECTORS = 4192256  # VMware's 2 GB extent: 2047 MiB
COPY_CHUNK = 1 << 20
if TYPE_CHECKING:
    from typing import TypeAlias  # 3.10+; PyPy 3.9 runs the emulator

Progress: TypeAlias = "Callable[[int, int], None] | None"


def is_vmdk_name(path) -> bool:
    return str(path).lower().endswith(".vmdk")


def _looks_vmdk(path) -> bool:
    if is_vmdk_name(path):
        return True
    try:
        fd = open_image_file(path, False)
    except (OSError, DiskError, DiskFormatError):
        return False
    try:
        return int.from_bytes(os.pread(fd, 4, 0).ljust(4, b"\0"), "little") == MAGIC
    finally:
        os.close(fd)


def open_disk(path_or_url, read_only: bool = False) -> BlockImage:
    """Open any disk boite knows: a VMDK of any kind with its parents, a raw file, nbd://."""
    s = os.fspath(path_or_url)
    if isinstance(s, str) and s.startswith("nbd://"):
        from boite.disk.nbd import open_nbd

        return open_nbd(s, read_only=read_only)
    if not os.path.exists(s):
        raise DiskError(f"{s}: no such disk")
    if _looks_vmdk(s):
        return VmdkDisk(s, read_only=read_only)
    return RawImage(s, read_only=read_only)


# -- create -------------------------------------------------------------------------------


def _sectors(capacity_bytes: int) -> int:
    if capacity_bytes < 0:
        raise DiskError(f"disk size {capacity_bytes} is negative")
    return -(-capacity_bytes // SECTOR)


def _base_descriptor(create_type: str, sectors: int, adapter: str) -> Descriptor:
    return Descriptor(create_type=create_type, cid=new_cid(), ddb=geometry_ddb(sectors, adapter))


def _split_sizes(sectors: int) -> list[int]:
    sizes = []
    while sectors > 0:
        sizes.append(min(SPLIT_SECTORS, sectors))
        sectors -= sizes[-1]
    return sizes or [0]


def _private(path: str, flags: int) -> int:
    """Disks are created 0600 (guest data is the owner's alone), as VMware creates them."""
    return os.open(path, flags, 0o600)


def create_disk(
    path,
    capacity_bytes: int,
    disk_type: str = "thin",
    *,
    adapter: str = "lsilogic",
    overwrite: bool = False,
    descriptor: Descriptor | None = None,
) -> None:
    """Create an empty disk. A name not ending in .vmdk (or type 'raw') makes a raw image.

    `descriptor`, when given, supplies CID, parent and disk database for the new VMDK.
    Flat types are preallocated (as vdiskmanager's `-t 2`/`-t 3`); an operating-system
    failure (no space, file too large) leaves no file behind and is raised as the OSError
    it is (the CLI says it in one line, with its errno name under --json).
    """
    path = Path(path)
    if disk_type not in DISK_TYPES:
        raise DiskError(f"disk type {disk_type!r}, expected one of {', '.join(DISK_TYPES)}")
    if path.exists() and not overwrite:
        raise DiskError(f"{path}: already exists; refusing to overwrite a disk")
    sectors = _sectors(capacity_bytes)
    if disk_type == "raw" and is_vmdk_name(path):
        raise DiskError(f"{path}: a .vmdk name means VMDK; pick another name for a raw image")
    made: list[Path] = []
    try:
        _create_files(path, sectors, disk_type, adapter, descriptor, overwrite, made)
    except BaseException:
        for f in made:
            f.unlink(missing_ok=True)
        raise


def _new_file(path: Path, made: list[Path], overwrite: bool) -> int:
    if not overwrite and path.exists():
        raise DiskError(f"{path}: already exists; refusing to overwrite it")
    fd = _private(str(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
    made.append(path)
    return fd


def _preallocated(path: Path, nbytes: int, made: list[Path], overwrite: bool) -> None:
    """A file of `nbytes` whose blocks are all reserved (posix_fallocate)."""
    fd = _new_file(path, made, overwrite)
    try:
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                exc.filename = str(path)
                raise
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_room(path: Path, nbytes: int) -> None:
    """Refuse a preallocation the filesystem cannot hold before reserving any of it: a
    failing fallocate would first fill the filesystem for everyone else."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: a preallocated disk needs {nbytes} bytes, the "
            f"filesystem has {free} free",
            str(path),
        )


def _create_files(
    path: Path,
    sectors: int,
    disk_type: str,
    adapter: str,
    descriptor: Descriptor | None,
    overwrite: bool,
    made: list[Path],
) -> None:
    if disk_type == "raw" or not is_vmdk_name(path):
        fd = _new_file(path, made, True)
        try:
            os.ftruncate(fd, sectors * SECTOR)
        finally:
            os.close(fd)
        return
    create_type = CREATE_TYPE_OF[disk_type]
    d = _base_descriptor(create_type, sectors, adapter)
    if descriptor is not None:
        d.cid, d.parent_cid, d.parent_hint = (
            descriptor.cid,
            descriptor.parent_cid,
            descriptor.parent_hint,
        )
        d.ddb = dict(descriptor.ddb) or d.ddb
    stem = path.name[: -len(".vmdk")]
    if disk_type in ("flat", "split-flat"):
        _check_room(path, sectors * SECTOR)
    if disk_type == "thin":
        d.extents = [ExtentLine("RW", sectors, "SPARSE", path.name)]
        made.append(path)
        create_sparse(path, sectors, d.to_bytes())
    elif disk_type == "stream":
        d.extents = [ExtentLine("RW", sectors, "SPARSE", path.name)]
        made.append(path)
        StreamWriter(path, sectors, d.to_bytes()).close()
    elif disk_type == "flat":
        name = f"{stem}-flat.vmdk"
        d.extents = [ExtentLine("RW", sectors, "FLAT", name, 0)]
        _preallocated(path.parent / name, sectors * SECTOR, made, overwrite)
        made.append(path)
        write_descriptor_file(path, d)
    else:
        sparse = disk_type == "split-thin"
        for i, n in enumerate(_split_sizes(sectors), 1):
            name = f"{stem}-{'s' if sparse else 'f'}{i:03d}.vmdk"
            if sparse:
                made.append(path.parent / name)
                create_sparse(path.parent / name, n)
                d.extents.append(ExtentLine("RW", n, "SPARSE", name))
            else:
                _preallocated(path.parent / name, n * SECTOR, made, overwrite)
                d.extents.append(ExtentLine("RW", n, "FLAT", name, 0))
        made.append(path)
        write_descriptor_file(path, d)


def create_child(parent_path_: str | os.PathLike, child_path: str | os.PathLike) -> None:
    """Create a delta disk (monolithicSparse) on top of a VMDK, as a snapshot does."""
    parent = Path(parent_path_).resolve()
    child = Path(child_path)
    if not is_vmdk_name(child):
        raise DiskError(f"{child}: a delta disk must be a .vmdk")
    with VmdkDisk(parent, read_only=True) as p:  # proves the parent's chain opens
        pd = p.descriptor
        size = p.size
    d = Descriptor(
        create_type="monolithicSparse",
        cid=new_cid(),
        parent_cid=pd.cid,
        parent_hint=os.path.relpath(parent, child.resolve().parent),
        ddb=dict(pd.ddb),
    )
    create_disk(child, size, "thin", descriptor=d)


def set_parent(child_path, parent_path_: str | os.PathLike | None) -> None:
    """Point a delta disk at a (new) parent, taking its current CID; None makes it a base."""
    child = Path(child_path).resolve()
    desc, embedded = read_descriptor(child)
    if parent_path_ is None:
        desc.parent_cid, desc.parent_hint = NO_PARENT_CID, None
    else:
        parent = Path(parent_path_).resolve()
        pdesc, _ = read_descriptor(parent)
        desc.parent_cid = pdesc.cid
        desc.parent_hint = os.path.relpath(parent, child.parent)
    _store_descriptor(child, desc, embedded)


def set_cid(path, cid: int | None = None) -> int:
    """Set (or randomise) a disk's CID; returns it."""
    p = Path(path).resolve()
    desc, embedded = read_descriptor(p)
    desc.set_cid(new_cid(desc.cid) if cid is None else cid)
    _store_descriptor(p, desc, embedded)
    return desc.cid


def _store_descriptor(path: Path, desc: Descriptor, embedded: bool) -> None:
    if embedded:
        ext = SparseExtent(path, read_only=False)
        try:
            if not ext.header.desc_offset:
                raise DiskError(f"{path}: sparse extent has no room for a descriptor")
            ext.write_descriptor(desc.to_bytes())
            os.fsync(ext.fd)
        finally:
            ext.close()
    else:
        write_descriptor_file(path, desc)


# -- info ---------------------------------------------------------------------------------


@dataclass
class DiskInfo:
    path: str
    format: str  # vmdk | raw
    type: str  # createType, or "raw"
    capacity: int  # bytes
    allocated: int  # bytes of guest data held by this layer's files
    cid: int | None = None
    parent_cid: int | None = None
    parent: str | None = None
    chain: list[dict] = field(default_factory=list)
    extents: list[dict] = field(default_factory=list)
    unclean: bool = False
    files: list[str] = field(default_factory=list)
    chain_ok: bool = True
    chain_error: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("cid", "parent_cid"):
            if d[key] is not None:
                d[key] = f"{d[key]:08x}"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def disk_info(path) -> DiskInfo:
    if str(path).startswith("nbd://"):
        with open_disk(path, read_only=True) as img:
            return DiskInfo(str(path), "nbd", "nbd", img.size, img.size)
    p = Path(path)
    if not p.exists():
        raise DiskError(f"{p}: no such disk")
    if not _looks_vmdk(p):
        with RawImage(p, read_only=True) as r:
            alloc = sum(n for _, n in r.allocated_ranges())
            return DiskInfo(str(p.resolve()), "raw", "raw", r.size, alloc, files=[str(p.resolve())])
    with VmdkDisk(p, read_only=True, open_parent=False) as d:
        desc = d.descriptor
        info = DiskInfo(
            path=d.path,
            format="vmdk",
            type=desc.create_type,
            capacity=d.size,
            allocated=d.allocated_bytes(),
            cid=desc.cid,
            parent_cid=desc.parent_cid if desc.has_parent else None,
            unclean=any(isinstance(e, SparseExtent) and bool(e.header.unclean) for e in d.extents),
            files=d.files(),
        )
        if d.embedded:
            ext = d.extents[0]
            info.extents.append(
                {"access": "RW", "sectors": ext.size // SECTOR, "type": "SPARSE", "file": d.path}
            )
        else:
            for line in desc.extents:
                e = {"access": line.access, "sectors": line.sectors, "type": line.kind}
                if line.filename:
                    e["file"] = str(extent_path(d.path, line.filename))
                if line.kind in ("FLAT", "VMFS"):
                    e["offset"] = line.offset
                info.extents.append(e)
    # walk the chain by descriptors, reporting (not raising) a broken link
    cur, cdesc, seen = Path(info.path), desc, {info.path}
    info.chain.append({"path": info.path, "cid": f"{desc.cid:08x}", "type": desc.create_type})
    while cdesc.has_parent:
        try:
            pp = parent_path(cur, cdesc.parent_hint or "")
            if str(pp) in seen or len(seen) > MAX_CHAIN:
                raise DiskFormatError(f"{cur}: parent chain loops back to {pp}")
            pdesc, _ = read_descriptor(pp)
        except (DiskError, DiskFormatError) as exc:
            info.chain_ok, info.chain_error = False, str(exc)
            break
        if info.parent is None:
            info.parent = str(pp)
        if pdesc.cid != cdesc.parent_cid:
            info.chain_ok = False
            info.chain_error = (
                f"{cur}: parentCID {cdesc.parent_cid:08x} does not match {pp} CID {pdesc.cid:08x}"
            )
        info.chain.append({"path": str(pp), "cid": f"{pdesc.cid:08x}", "type": pdesc.create_type})
        seen.add(str(pp))
        cur, cdesc = pp, pdesc
    return info


# -- check --------------------------------------------------------------------------------


@dataclass
class CheckReport:
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    leaked_bytes: int = 0
    unclean: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_disk(path, repair: bool = False) -> CheckReport:
    """Check a disk's own files and its chain links; with repair, fix what is safe to fix."""
    p = Path(path)
    report = CheckReport(str(p))
    if not _looks_vmdk(p):
        if not p.exists():
            raise DiskError(f"{p}: no such disk")
        return report  # a raw image has no metadata to be inconsistent
    desc, embedded = read_descriptor(p)
    files: list[tuple[Path, int | None]] = []
    if embedded:
        files.append((p, None))
    else:
        for line in desc.extents:
            if line.kind == "ZERO":
                continue
            f = extent_path(p, line.filename or "")
            if not f.exists():
                report.errors.append(f"extent file {f} is missing")
                continue
            if line.kind == "SPARSE":
                files.append((f, line.sectors))
            elif line.kind in ("FLAT", "VMFS"):
                _check_flat_length(f, line, report)
    for f, sectors in files:
        try:
            fd = open_image_file(f, False)
            try:
                report.unclean |= os.pread(fd, 1, 72) == b"\x01"
            finally:
                os.close(fd)
            res = check_sparse(f, repair=repair, expected_sectors=sectors)
        except DiskFormatError as exc:
            report.errors.append(str(exc))
            continue
        report.errors += [f"{f}: {e}" for e in res.errors]
        report.fixed += [f"{f}: {x}" for x in res.fixed]
        report.warnings += [f"{f}: {x}" for x in res.warnings]
        report.leaked_bytes += res.leaked_bytes
    if report.leaked_bytes:
        report.warnings.append(
            f"{report.leaked_bytes} bytes leaked (written by an unflushed write before a crash); "
            "'check --repair' reclaims them"
        )
    if report.unclean and not repair:
        report.warnings.append("disk was not closed cleanly (uncleanShutdown is set)")
    if repair and report.ok:
        report.unclean = False
    try:
        info = disk_info(p)
    except DiskFormatError as exc:
        report.errors.append(str(exc))
        return report
    if not info.chain_ok:
        report.errors.append(info.chain_error or "parent chain is broken")
    return report


def _check_flat_length(f: Path, line: ExtentLine, report: CheckReport) -> None:
    """A flat extent file must hold what its descriptor line says. Reads past its end give
    zeroes (as qemu's file driver does, and as a sparse file's unwritten tail would), so
    a file cut short (an interrupted copy) loses data silently: check says so."""
    st = f.stat()
    if not stat.S_ISREG(st.st_mode):
        return
    need = (line.offset + line.sectors) * SECTOR
    if st.st_size < need:
        report.errors.append(
            f"extent file {f} is {st.st_size} bytes, but its descriptor line (at offset "
            f"{line.where}) needs {need}: the last {need - st.st_size} bytes of the extent are "
            "missing and read as zeroes"
        )


# -- map ----------------------------------------------------------------------------------


@dataclass
class MapEntry:
    offset: int
    length: int
    kind: str  # data | zero
    depth: int  # 0 = this disk, 1 = its parent, ...
    file: str

    def to_dict(self) -> dict:
        return asdict(self)


def _subtract(gaps: list[tuple[int, int]], off: int, n: int) -> tuple[list, list]:
    """Split [off, off+n) against the uncovered gaps: (covered pieces, remaining gaps)."""
    covered, rest = [], []
    end = off + n
    for g0, g1 in gaps:
        a, b = max(g0, off), min(g1, end)
        if a >= b:
            rest.append((g0, g1))
            continue
        covered.append((a, b - a))
        if g0 < a:
            rest.append((g0, a))
        if b < g1:
            rest.append((b, g1))
    return covered, rest


def image_map(img: BlockImage) -> list[MapEntry]:
    """Which layer holds each allocated range of an open image (the top layer wins)."""
    if isinstance(img, RawImage):
        return [MapEntry(o, n, "data", 0, img.path) for o, n in img.allocated_ranges()]
    if not isinstance(img, VmdkDisk):
        return [MapEntry(0, img.size, "data", 0, getattr(img, "url", "remote"))]
    out: list[MapEntry] = []
    gaps = [(0, img.size)]
    for depth, layer in enumerate(img.chain):
        if not gaps:
            break
        new_gaps = gaps
        for off, n, kind in layer.own_ranges():
            n = min(n, img.size - off)
            if n <= 0:
                continue
            covered, new_gaps = _subtract(new_gaps, off, n)
            out += [MapEntry(o, m, kind, depth, layer.path) for o, m in covered]
        gaps = new_gaps
    out.sort(key=lambda e: e.offset)
    merged: list[MapEntry] = []
    for e in out:
        last = merged[-1] if merged else None
        if (
            last
            and (last.kind, last.depth) == (e.kind, e.depth)
            and last.offset + last.length == e.offset
        ):
            last.length += e.length
        else:
            merged.append(e)
    return merged


def map_disk(path) -> list[MapEntry]:
    with open_disk(path, read_only=True) as img:
        return image_map(img)


# -- convert / rebuild --------------------------------------------------------------------


READERS = 4  # threads reading the source ahead of the copy (qemu-img convert keeps 8 requests)
IN_FLIGHT = 8  # chunks read ahead


def _read_ahead(src: BlockImage, chunks: list[tuple[int, int, int, int]]):
    """Yield (chunk, its bytes) in order. A local source is read by READERS threads,
    IN_FLIGHT chunks ahead, each first hinting its whole chunk to the kernel (posix_fadvise
    WILLNEED on the host ranges under it): a cold copy keeps many reads in flight instead
    of one synchronous read at a time, and reading overlaps the writing."""
    if not getattr(src, "parallel_reads", False) or len(chunks) < 2:
        buf = bytearray(COPY_CHUNK)
        for c in chunks:
            mv = memoryview(buf)[: c[1]]
            src.read_into(c[0], mv)
            yield c, mv
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def job(c: tuple[int, int, int, int], buf: bytearray) -> bytearray:
        src.prefetch(c[0], c[1])
        src.read_into(c[0], memoryview(buf)[: c[1]])
        return buf

    free = [bytearray(COPY_CHUNK) for _ in range(IN_FLIGHT)]
    pending: deque = deque()
    nxt = 0
    with ThreadPoolExecutor(READERS, thread_name_prefix="boite-copy") as pool:
        try:
            while nxt < len(chunks) or pending:
                while free and nxt < len(chunks):
                    pending.append((chunks[nxt], pool.submit(job, chunks[nxt], free.pop())))
                    nxt += 1
                c, fut = pending.popleft()
                buf = fut.result()
                yield c, memoryview(buf)[: c[1]]
                free.append(buf)
        finally:
            for _, fut in pending:
                fut.cancel()


def _chunks(
    size: int, ranges: list[tuple[int, int]], grain: int
) -> list[tuple[int, int, int, int]]:
    """(position, length, range start, range end) of every read the copy makes, in order."""
    out = []
    copied_to = 0  # ranges may share a grain (4 KiB holes in a raw file): copy each once
    for off, n in ranges:
        end = off + n
        pos = max(off - off % grain, copied_to)
        while pos < end:
            m = min(COPY_CHUNK, size - pos, -(-(end - pos) // grain) * grain)
            out.append((pos, m, off, end))
            pos += m
            copied_to = pos
    return out


WRITE_BEHIND = 32 << 20  # bytes written between two writeback starts


def _copy(
    src: BlockImage,
    ranges: list[tuple[int, int]],
    sink: Callable[[int, memoryview], None],
    progress: Progress,
    grain: int = DEFAULT_GRAIN * SECTOR,
    dst: BlockImage | None = None,
) -> None:
    """Read `ranges` of src in chunks and hand every non-zero, grain-aligned run to sink.

    `dst` (the image sink writes to) is told to start writing back every WRITE_BEHIND
    bytes, so that its final fdatasync overlaps the copy instead of following it.
    """
    total = sum(n for _, n in ranges)
    done = 0
    written = 0
    for (pos, m, off, end), mv in _read_ahead(src, _chunks(src.size, ranges, grain)):
        run = None
        for g in range(0, m, grain):
            piece = mv[g : g + grain]
            if is_zero(piece):
                if run is not None:
                    sink(pos + run, mv[run:g])
                    written += g - run
                    run = None
            elif run is None:
                run = g
        if run is not None:
            sink(pos + run, mv[run:m])
            written += m - run
        if dst is not None and written >= WRITE_BEHIND:
            dst.start_writeback()
            written = 0
        done += max(0, min(pos + m, end) - max(pos, off))
        if progress:
            progress(min(done, total), total)


def _merge_ranges(entries: list[MapEntry]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in entries:
        if e.kind != "data":
            continue
        if out and out[-1][0] + out[-1][1] >= e.offset:
            o, n = out[-1]
            out[-1] = (o, max(n, e.offset + e.length - o))
        else:
            out.append((e.offset, e.length))
    return out


def convert_disk(
    src, dst, disk_type: str | None = None, progress: Progress = None, *, adapter: str | None = None
) -> None:
    """Copy any disk (a whole chain flattened) into a new one of `disk_type`, keeping sparseness."""
    dst = Path(dst)
    if disk_type is None:
        disk_type = "thin" if is_vmdk_name(dst) else "raw"
    if not is_vmdk_name(dst) and disk_type != "raw":
        disk_type = "raw"
    if is_vmdk_name(dst) and disk_type == "raw":
        raise DiskError(f"{dst}: a .vmdk name means VMDK; pick another name for a raw image")
    if dst.exists():
        raise DiskError(f"{dst}: already exists; refusing to overwrite a disk")
    with open_disk(src, read_only=True) as s:
        ranges = _merge_ranges(image_map(s))
        ad = adapter
        if ad is None and isinstance(s, VmdkDisk):
            ad = s.descriptor.ddb.get("ddb.adapterType")
        ad = ad if ad in ("ide", "buslogic", "lsilogic", "legacyESX") else "lsilogic"
        # Build the new disk under a hidden directory beside the target and move it into
        # place only when complete: a killed convert leaves nothing under the target's names.
        tmpdir = _staging_dir(dst)
        try:
            new = tmpdir / dst.name
            create_disk(new, s.size, disk_type, adapter=ad)
            # every name the disk will have must be free before the (long) copy starts
            for f in tmpdir.iterdir():
                if (dst.parent / f.name).exists():
                    raise DiskError(
                        f"{dst.parent / f.name}: already exists; refusing to overwrite it"
                    )
            _write_new(s, ranges, new, disk_type, s.size, progress, ad, None, created=True)
            _move_into_place(tmpdir, dst)
        except OSError as exc:  # disk full, file too large, ...: named by the target
            exc.filename, exc.filename2 = str(dst), None
            raise
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


STAGING = ".boite-convert-"


def _staging_dir(dst: Path) -> Path:
    """A fresh hidden directory beside `dst`, named for this process; the leftovers of
    converts to the same name whose process is gone are removed first."""
    prefix = f".{dst.name}{STAGING}"
    try:
        for old in dst.parent.glob(f"{glob.escape(prefix)}*"):
            pid = old.name[len(prefix) :]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        tmpdir = dst.parent / f"{prefix}{os.getpid()}"
        shutil.rmtree(tmpdir, ignore_errors=True)
        tmpdir.mkdir(mode=0o700)
    except OSError as exc:
        raise DiskError(f"{dst}: cannot write there: {exc.strerror or exc}") from None
    return tmpdir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmpdir: Path, dst: Path) -> None:
    """Extents first, the descriptor (or the only file) last, never over an existing file."""
    for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == dst.name):
        target = dst.parent / f.name
        try:
            os.link(f, target)  # fails if the name was taken meanwhile, unlike rename
            f.unlink()
        except FileExistsError:
            raise DiskError(f"{target}: already exists; refusing to overwrite it") from None
        except OSError:  # a filesystem without hard links
            if target.exists():
                raise DiskError(f"{target}: already exists; refusing to overwrite it") from None
            os.replace(f, target)
    fsync_dir(dst.parent)


def _write_new(
    s: BlockImage,
    ranges: list[tuple[int, int]],
    dst: Path,
    disk_type: str,
    capacity: int,
    progress: Progress,
    adapter: str,
    descriptor: Descriptor | None,
    *,
    created: bool = False,
) -> None:
    if not created:
        create_disk(dst, capacity, disk_type, adapter=adapter, descriptor=descriptor)
    ok = False
    try:
        if disk_type == "stream":
            sd, _ = read_descriptor(dst)  # create_disk took CID, parent and ddb from `descriptor`
            w = StreamWriter(dst, -(-capacity // SECTOR), sd.to_bytes())
            gb = w.grain_bytes

            def sink(off: int, mv: memoryview) -> None:
                for i in range(0, len(mv), gb):
                    piece = mv[i : i + gb]
                    if not is_zero(piece):
                        w.write_grain((off + i) // gb, piece)

            try:
                _copy(s, ranges, sink, progress, gb)
            finally:
                w.close()
        else:
            target = (
                VmdkDisk(dst, read_only=False, keep_cid=True, open_parent=False)
                if is_vmdk_name(dst)
                else RawImage(dst)
            )
            with target as t:

                def sink(off: int, mv: memoryview) -> None:
                    n = min(len(mv), t.size - off)
                    if n > 0:
                        t.write(off, mv[:n])

                _copy(s, ranges, sink, progress, dst=t)
        ok = True
    finally:
        if not ok:
            _remove_disk_files(dst)


def _remove_disk_files(path: Path) -> None:
    try:
        if is_vmdk_name(path):
            desc, embedded = read_descriptor(path)
            if not embedded:
                for line in desc.extents:
                    if line.filename:
                        extent_path(path, line.filename).unlink(missing_ok=True)
    except (DiskError, DiskFormatError):
        pass
    path.unlink(missing_ok=True)


def _type_of(desc: Descriptor) -> str:
    t = TYPE_OF_CREATE.get(desc.create_type)
    if t is None:
        raise DiskError(f"createType {desc.create_type!r} cannot be rebuilt by boite")
    return t


def _rebuild(path: Path, capacity: int, drop_zero: bool, progress: Progress) -> None:
    """Rewrite a VMDK's own layer (same type, CID, parent) into fresh files, then swap them in."""
    path = path.resolve()
    desc, _ = read_descriptor(path)
    disk_type = _type_of(desc)
    if capacity != desc.capacity_sectors * SECTOR:
        geo = geometry_ddb(capacity // SECTOR, _adapter(desc))
        desc.ddb.update({k: v for k, v in geo.items() if "geometry" in k})
    tmpdir = path.parent / f".{path.name}.boite-rebuild"
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    try:
        new = tmpdir / path.name
        with VmdkDisk(path, read_only=True) as src:
            ranges = [(o, n) for o, n, k in src.own_ranges() if k == "data"]
            zero_masks = [(o, n) for o, n, k in src.own_ranges() if k == "zero"]
            own = _OwnLayer(src, drop_zero)
            _write_new(own, ranges, new, disk_type, capacity, progress, _adapter(desc), desc)
            if src.parent is not None and (zero_masks or own.kept_zero):
                with VmdkDisk(new, read_only=False, keep_cid=True, open_parent=False) as t:
                    for o, n in zero_masks + own.kept_zero:
                        n = min(n, t.size - o)
                        if n > 0:
                            t.write(o, bytes(n))
        # extents first, the descriptor (or the monolithic file) last
        old_files = set(disk_files(path))
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
            old_files.discard(path.parent / f.name)
        for f in old_files:
            f.unlink(missing_ok=True)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def disk_files(path) -> list[Path]:
    """A VMDK's own files: the descriptor (or monolithic file) and its extent files."""
    path = Path(path)
    desc, embedded = read_descriptor(path)
    out = [path]
    if not embedded:
        out += [extent_path(path, e.filename) for e in desc.extents if e.filename]
    return out


VmdkFiles = disk_files  # the name the snapshot code first used


class _OwnLayer(BlockImage):
    """A VMDK's own layer only (parents read as zeroes); optionally hides all-zero grains
    whose parent data is zero too, remembering the ones that must stay to mask a parent."""

    def __init__(self, disk: VmdkDisk, drop_zero: bool) -> None:
        self.disk = disk
        self.size = disk.size
        self.drop_zero = drop_zero
        self.kept_zero: list[tuple[int, int]] = []
        self.read_only = True

    def read_into(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        for ext, start in zip(self.disk.extents, self.disk.starts, strict=True):
            a, b = max(offset, start), min(offset + len(mv), start + ext.size)
            if a < b:
                ext.read_into(a - start, mv[a - offset : b - offset], None)
        if self.disk.parent is not None:
            gs = DEFAULT_GRAIN * SECTOR
            for g in range(0, len(mv), gs):
                piece = mv[g : g + gs]
                if is_zero(piece):
                    under = bytearray(len(piece))
                    self.disk._below(offset + g, memoryview(under))
                    if not is_zero(under) or not self.drop_zero:
                        self.kept_zero.append((offset + g, len(piece)))

    def write(self, offset: int, data) -> None:
        raise DiskError("read-only view")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def grow_disk(path, new_size: int, progress: Progress = None) -> None:
    """Make a disk bigger (never smaller); the new space reads as zeroes."""
    p = Path(path)
    sectors = _sectors(new_size)
    if not _looks_vmdk(p):
        size = p.stat().st_size
        if sectors * SECTOR < size:
            raise DiskError(
                f"{p}: new size {new_size} is smaller than {size}; shrinking loses data"
            )
        os.truncate(p, sectors * SECTOR)
        return
    desc, _ = read_descriptor(p)
    with VmdkDisk(p, read_only=True, open_parent=False) as d:
        old_sectors = d.size // SECTOR
    if sectors < old_sectors:
        raise DiskError(
            f"{p}: new size {sectors * SECTOR} is smaller than {old_sectors * SECTOR}; shrinking loses data"
        )
    if sectors == old_sectors:
        return
    if desc.create_type == "monolithicFlat":
        line = desc.extents[-1]
        f = extent_path(p, line.filename or "")
        line.sectors += sectors - old_sectors
        need = (line.offset + line.sectors) * SECTOR
        have = f.stat().st_size
        if have < need:
            _check_room(f, need - have)
            fd = open_image_file(f, True)
            try:
                os.posix_fallocate(fd, have, need - have)  # flat stays preallocated
            except OSError as exc:
                os.ftruncate(fd, have)
                exc.filename = str(f)
                raise
            finally:
                os.close(fd)
        desc.ddb.update(
            {k: v for k, v in geometry_ddb(sectors, _adapter(desc)).items() if "geometry" in k}
        )
        write_descriptor_file(p, desc)
        return
    if desc.create_type == "monolithicSparse" and desc.extents:
        # in place: no data moves, whatever the disk holds
        desc.extents[0].sectors = sectors
        geo = geometry_ddb(sectors, _adapter(desc))
        desc.ddb.update({k: v for k, v in geo.items() if "geometry" in k})
        grow_sparse(p, sectors, desc.to_bytes())
        return
    _rebuild(p, sectors * SECTOR, drop_zero=False, progress=progress)


def _adapter(desc: Descriptor) -> str:
    a = desc.ddb.get("ddb.adapterType", "lsilogic")
    return a if a in ("ide", "buslogic", "lsilogic", "legacyESX") else "lsilogic"


def compact_disk(path, progress: Progress = None) -> None:
    """Drop all-zero grains and lay the rest out in guest order (same type, CID and parent)."""
    p = Path(path)
    if not _looks_vmdk(p):
        with RawImage(p) as r:
            for off, n in r.allocated_ranges():
                buf = bytearray(min(n, COPY_CHUNK))
                pos = off
                while pos < off + n:
                    m = min(len(buf), off + n - pos)
                    mv = memoryview(buf)[:m]
                    r.read_into(pos, mv)
                    for g in range(0, m, 65536):
                        if is_zero(mv[g : g + 65536]):
                            r.discard(pos + g, min(65536, m - g))
                    pos += m
        return
    desc, _ = read_descriptor(p)
    if desc.create_type in ("monolithicFlat", "twoGbMaxExtentFlat"):
        with VmdkDisk(p, read_only=False, keep_cid=True) as d:
            buf = bytearray(COPY_CHUNK)
            for o, n, kind in d.own_ranges():
                if kind != "data":
                    continue  # ZERO extents hold nothing to free
                pos = o
                while pos < o + n:
                    m = min(COPY_CHUNK, o + n - pos)
                    mv = memoryview(buf)[:m]
                    d.read_into(pos, mv)
                    for g in range(0, m, 65536):
                        if is_zero(mv[g : g + 65536]):
                            # only the extents under this piece (a descriptor may list
                            # 100,000 of them: no walk over all of them per piece)
                            d.discard(pos + g, min(65536, m - g))
                    pos += m
        return
    with VmdkDisk(p, read_only=True) as d:
        size = d.size
    _rebuild(p, size, drop_zero=True, progress=progress)


# -- chains: consolidation helpers for snapshot deletion ----------------------------------


def commit_child_into_parent(child_path, progress: Progress = None) -> int:
    """Write a delta disk's own data into its parent, as deleting the child's snapshot does.

    The parent keeps its CID while data moves (so a crash leaves the child still reading the
    same bytes); then it gets a new CID, which is returned. Afterwards the child is stale:
    the caller deletes it or re-points its users. Other children of the parent must not
    exist (their view would change); the caller checks that.
    """
    child = Path(child_path).resolve()
    with VmdkDisk(child, read_only=True) as c:
        if c.parent is None:
            raise DiskError(f"{child}: has no parent to commit into")
        ppath = c.parent.path
        ranges = [(o, n) for o, n, _ in c.own_ranges()]
        total = sum(n for _, n in ranges)
        done = 0
        with VmdkDisk(ppath, read_only=False, keep_cid=True) as p:
            for off, n in ranges:
                pos = off
                while pos < off + n:
                    m = min(COPY_CHUNK, off + n - pos, p.size - pos)
                    if m <= 0:
                        break
                    p.write(pos, c.read(pos, m))
                    pos += m
                    done += m
                    if progress:
                        progress(done, total)
            p.flush()
            cid = new_cid(p.descriptor.cid)
            p.set_cid(cid)
    return cid


def merge_parent_into_child(child_path, progress: Progress = None) -> None:
    """Pull a parent's own data into its child, then re-point the child at the grandparent.

    The child's content (and CID) stay the same, so the child's own children stay valid;
    the parent is untouched and can be deleted once nothing else uses it.
    """
    child = Path(child_path).resolve()
    with VmdkDisk(child, read_only=False, keep_cid=True) as c:
        if c.parent is None:
            raise DiskError(f"{child}: has no parent to merge")
        parent = c.parent
        grand = parent.parent.path if parent.parent is not None else None
        # what the parent holds minus what the child already covers
        gaps = [(o, o + n) for o, n, _ in parent.own_ranges()]
        for o, n, _ in c.own_ranges():
            _, gaps = _subtract(gaps, o, n)
        ranges = [(a, b - a) for a, b in sorted(gaps)]
        total = sum(n for _, n in ranges)
        done = 0
        for off, n in ranges:
            pos = off
            while pos < off + n:
                m = min(COPY_CHUNK, off + n - pos, c.size - pos)
                if m <= 0:
                    break
                # the child's view here is the parent's data (the child has none);
                # writing it back makes the child hold it
                c.write(pos, c.read(pos, m))
                pos += m
                done += m
                if progress:
                    progress(done, total)
        c.flush()
    set_parent(child, grand)
