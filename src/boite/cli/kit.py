"""`boite kit build [--json] [PART...]` and `boite kit path [PART...]`: the guest kit."""

from __future__ import annotations

import argparse
import json
import sys

from boite import guestkit

PART_CHOICES = [*guestkit.KIT_PARTS, "all"]


def _part(value: str) -> str:
    # Not `choices=`: argparse checks an empty nargs="*" list against choices too.
    if value not in PART_CHOICES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(PART_CHOICES)})"
        )
    return value


def register(sub: argparse._SubParsersAction) -> None:
    kit = sub.add_parser("kit", help="build or locate the guest kit (kernels + initramfs)")
    verbs = kit.add_subparsers(dest="kit_verb", metavar="ACTION")
    verbs.required = True

    build = verbs.add_parser(
        "build", help="build what is missing into the cache (minutes the first time)"
    )
    build.add_argument(
        "parts",
        nargs="*",
        type=_part,
        metavar="PART",
        help=f"what to build: {', '.join(PART_CHOICES)} (default: i386)",
    )
    build.add_argument("--json", action="store_true", help="print the artifact paths as JSON")
    build.set_defaults(func=cmd_build)

    path = verbs.add_parser("path", help="print the cache directory, or one artifact's path")
    path.add_argument(
        "parts", nargs="*", type=_part, metavar="PART", help="which parts (default: all)"
    )
    path.add_argument("--json", action="store_true", help="all paths of PARTs as JSON")
    path.set_defaults(func=cmd_path)


def _progress_printer():
    """One line per step on stderr (through rich, in colour, when stderr is a terminal)."""
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
        return lambda line: console.print(f"[bold]boite[/]: {line}", highlight=False)
    return lambda line: print(f"boite: {line}", file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    parts = args.parts or ["i386"]
    kit = guestkit.ensure_kit(parts, progress=_progress_printer())
    if args.json:
        print(json.dumps(kit.as_dict(), indent=2))
    else:
        for key, value in kit.as_dict().items():
            if key not in ("dirs", "root") and value is not None:
                print(f"{key:16} {value}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    if not args.parts and not args.json:
        print(guestkit.cache_root())
        return 0
    parts = args.parts or list(guestkit.ALL_PARTS)
    kit = guestkit.kit_paths(parts)
    data = kit.as_dict()
    data["missing"] = guestkit.missing_parts(parts)  # type: ignore[assignment]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            if key not in ("dirs", "root", "missing") and value is not None:
                print(f"{key:16} {value}")
        if data["missing"]:
            print(f"not built yet: {', '.join(data['missing'])} (run: boite kit build {' '.join(parts)})",
                  file=sys.stderr)  # fmt: skip
    return 0
