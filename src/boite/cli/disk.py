"""`boite disk`: create, inspect, check, convert, grow, compact and map virtual disks.

Paths come last, as with qemu-img. A `.vmdk` name means VMDK, anything else a raw image.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator

from boite.errors import DiskError

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTB]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise DiskError(f"size {text!r}: expected a number with an optional K, M, G or T suffix")
    n = float(m.group(1)) * UNITS[m.group(2).upper()]
    size = int(n)
    if size % 512:
        size += 512 - size % 512  # disks hold whole sectors
    return size


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def progress_bar(what: str) -> Iterator:
    """A rich progress bar on a terminal's stderr; nothing when stderr is a pipe or file."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def cmd_create(args) -> int:
    from boite.disk import create_disk

    capacity = parse_size(args.size)
    create_disk(args.path, capacity, args.type, adapter=args.adapter)
    if args.json:
        print(json.dumps({"ok": True, "path": str(args.path), "type": args.type,
                          "capacity": capacity}))  # fmt: skip
    return 0


def cmd_info(args) -> int:
    from boite.disk import disk_info

    info = disk_info(args.path)
    if args.json:
        print(info.to_json())
        return 0
    print(f"image: {info.path}")
    print(f"format: {info.format} ({info.type})")
    print(f"virtual size: {human(info.capacity)} ({info.capacity} bytes)")
    print(f"allocated: {human(info.allocated)} ({info.allocated} bytes)")
    if info.cid is not None:
        print(f"CID: {info.cid:08x}")
    if info.parent_cid is not None:
        print(f"parentCID: {info.parent_cid:08x}")
    if len(info.chain) > 1:
        print("chain:")
        for depth, link in enumerate(info.chain):
            print(f"  {'  ' * depth}{link['path']} (CID {link['cid']}, {link['type']})")
    if not info.chain_ok:
        print(f"chain BROKEN: {info.chain_error}")
    if info.extents:
        print("extents:")
        for e in info.extents:
            print(f"  {e['access']} {e['sectors']} {e['type']} {e.get('file', '')}")
    if info.unclean:
        print("unclean shutdown: yes (run 'boite disk check')")
    return 0


def cmd_check(args) -> int:
    from boite.disk import check_disk

    report = check_disk(args.path, repair=args.repair)
    if args.json:
        print(report.to_json())
    else:
        for line in report.fixed:
            print(f"fixed: {line}")
        for line in report.warnings:
            print(f"warning: {line}")
        for line in report.errors:
            print(f"ERROR: {line}")
        print(
            "No errors were found on the disk."
            if report.ok
            else f"{len(report.errors)} errors found."
        )
    return 0 if report.ok else 2


def cmd_convert(args) -> int:
    from boite.disk import convert_disk, disk_info

    with progress_bar("converting") as update:
        convert_disk(args.src, args.dst, args.type, progress=update)
    if args.json:
        made = disk_info(args.dst)
        print(json.dumps({"ok": True, "src": str(args.src), "path": str(args.dst),
                          "type": made.type, "capacity": made.capacity}))  # fmt: skip
    return 0


def _in_its_box(path: str, what: str, operation):
    """Under the operation lock of the box the disk is in (boite.launch.disk_operation)."""
    from boite.launch import disk_operation

    return disk_operation(path, what, operation,
                   notify=lambda m: print(f"boite: {m}", file=sys.stderr, flush=True))  # fmt: skip


def _capacity(path) -> int:
    from boite.disk import open_disk

    with open_disk(path, read_only=True) as img:
        return img.size


def _on_disk(path) -> int:
    """Bytes the disk's own files take on the host (allocated blocks, holes excluded)."""
    from pathlib import Path

    from boite.disk import disk_info

    files = {Path(path)}
    with contextlib.suppress(Exception):
        files |= {Path(f) for f in disk_info(path).files or []}
    return sum(f.stat().st_blocks * 512 for f in files if f.exists())


def _said(args, data: dict, text: str) -> int:
    print(json.dumps(data) if getattr(args, "json", False) else text)
    return 0


def cmd_grow(args) -> int:
    from boite.box.sizes import format_size
    from boite.disk import grow_disk

    def grow() -> tuple[int, int]:
        before = _capacity(args.path)
        with progress_bar("growing") as update:
            grow_disk(args.path, parse_size(args.size), progress=update)
        return before, _capacity(args.path)

    before, after = _in_its_box(args.path, "disk grow", grow)
    text = (
        f"{args.path}: capacity {format_size(before)} -> {format_size(after)}"
        if after != before
        else f"{args.path}: already {format_size(after)}; nothing to do"
    )
    return _said(args, {"path": args.path, "capacity_before": before, "capacity": after}, text)


def cmd_compact(args) -> int:
    from boite.box.sizes import format_size
    from boite.disk import compact_disk

    def compact() -> tuple[int, int]:
        before = _on_disk(args.path)
        with progress_bar("compacting") as update:
            compact_disk(args.path, progress=update)
        return before, _on_disk(args.path)

    before, after = _in_its_box(args.path, "disk compact", compact)
    text = (
        f"{args.path}: {format_size(before)} -> {format_size(after)} on the host "
        f"({format_size(max(0, before - after))} freed)"
    )
    return _said(args, {"path": args.path, "bytes_before": before, "bytes": after}, text)


def cmd_map(args) -> int:
    from boite.disk import map_disk

    entries = map_disk(args.path)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    print(f"{'Offset':>16} {'Length':>16} {'Kind':<5} {'Depth':>5} File")
    for e in entries:
        print(f"{e.offset:#16x} {e.length:#16x} {e.kind:<5} {e.depth:>5} {e.file}")
    return 0


def register(subparsers) -> None:
    disk = subparsers.add_parser("disk", help="create, inspect and convert virtual disks")
    verbs = disk.add_subparsers(dest="disk_verb", metavar="ACTION")
    verbs.required = True
    types = ["thin", "flat", "split-thin", "split-flat", "stream", "raw"]

    p = verbs.add_parser("create", help="create an empty disk")
    p.add_argument("-s", "--size", required=True, help="capacity, e.g. 20G")
    p.add_argument("-t", "--type", default="thin", choices=types)
    p.add_argument("-a", "--adapter", default="lsilogic", choices=["ide", "buslogic", "lsilogic"])
    p.add_argument("--json", action="store_true", help="what it made, as JSON")
    p.add_argument("path")
    p.set_defaults(func=cmd_create)

    p = verbs.add_parser("info", help="type, size, allocation, CID chain, extents")
    p.add_argument("--json", action="store_true")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser("check", help="check a disk's metadata (and repair it)")
    p.add_argument("--repair", "-r", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("path")
    p.set_defaults(func=cmd_check)

    p = verbs.add_parser("convert", help="copy a disk (chain flattened) into another type")
    p.add_argument("-t", "--type", default=None, choices=types)
    p.add_argument("--json", action="store_true", help="what it made, as JSON")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_convert)

    p = verbs.add_parser("grow", help="make a disk bigger")
    p.add_argument("-s", "--size", required=True)
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="what it did, as JSON")
    p.set_defaults(func=cmd_grow)

    p = verbs.add_parser("compact", help="drop all-zero grains and defragment")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="what it did, as JSON")
    p.set_defaults(func=cmd_compact)

    p = verbs.add_parser("map", help="allocated ranges and which file holds them")
    p.add_argument("--json", action="store_true")
    p.add_argument("path")
    p.set_defaults(func=cmd_map)
