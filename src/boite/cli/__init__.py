"""The `boite` command.

Each module in this package adds its verbs through `register(subparsers)`; main() finds
them all, so a new verb lives next to its kind (box, disk, run, snapshot) and this file
never grows.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
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
    try:
        status = args.func(args)
    except BoiteError as exc:
        return report_error(args, str(exc), type(exc).__name__, exc.exit_status)
    except OSError as exc:
        # Missing directory, disk full, file too large, permission denied: one line for a
        # person (the errno name too under --json), never a traceback.
        return report_error(args, os_error_message(exc), "OSError", 1, errno_name(exc))
    except KeyboardInterrupt:
        print("boite: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def os_error_message(exc: OSError) -> str:
    """`PATH: strerror` (`PATH -> PATH2` for a rename or link), as `cp` and `mv` say it."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    where = str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{where}: {reason}"


def errno_name(exc: OSError) -> str | None:
    return errno.errorcode.get(exc.errno) if exc.errno is not None else None


def report_error(
    args: argparse.Namespace, message: str, kind: str, status: int, code: str | None = None
) -> int:
    """One line on stderr; under --json also `{"error": {...}}` on stdout for scripts."""
    message = " ".join(message.splitlines()) if kind == "OSError" else message
    print(f"boite: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        error: dict[str, object] = {"message": message, "type": kind}
        if code is not None:
            error["errno"] = code
        print(json.dumps({"error": error}))
    return status


if __name__ == "__main__":
    sys.exit(main())
