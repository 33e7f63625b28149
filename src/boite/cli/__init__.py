"""The `boite` command.

Each module in this package adds its verbs through `register(subparsers)`; main() finds
them all, so a new verb lives next to its kind (box, disk, run, snapshot) and this file
never grows.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from boite import __version__
from boite.errors import BoiteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boite",
        description="A hackable hypervisor that keeps each VM in VMware Workstation's layout.",
    )
    parser.add_argument("--version", action="version", version=f"boite {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="show the VMM's and devices' events (what vmware.log gets) on stderr",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        from boite.events import set_verbose

        set_verbose(True)
    try:
        status = args.func(args)
    except BoiteError as exc:
        print(f"boite: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("boite: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
