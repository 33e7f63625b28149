"""The `boite` command.

Each module in this package adds its verbs through `register(subparsers)`; main() finds
them all, so a new verb lives next to its kind (box, disk, run, snapshot) and this file
never grows.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import json
import os
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


def _verbs(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each verb and its one-line help, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: helps.get(name, "") for name in action.choices}
    return {}


def _print_verbs(parser: argparse.ArgumentParser) -> None:
    verbs = _verbs(parser)
    width = max(map(len, verbs), default=0)
    print(
        f"usage: boite VERB [ARGS...]   (boite VERB --help for one verb)\n\n{parser.description}\n"
    )
    for name, text in verbs.items():
        print(f"  {name:<{width}}  {text}")


def _unknown_verb(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """A suggestion for a mistyped verb ("strat" -> "start"), or None if it is a verb."""
    verb = argv[0]
    verbs = list(_verbs(parser))
    if verb.startswith("-") or verb in verbs:
        return None
    close = difflib.get_close_matches(verb, verbs, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown verb {verb!r}{hint} (`boite` lists the verbs)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:
            _print_verbs(parser)
            return 0
        problem = _unknown_verb(parser, argv)
        if problem is not None:
            print(f"boite: error: {problem}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
        if args.verbose:
            from boite.events import set_verbose

            set_verbose(True)
        try:
            status = args.func(args)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except BoiteError as exc:
            return report_error(args, str(exc), type(exc).__name__, exc.exit_status)
        except OSError as exc:
            # Missing directory, disk full, file too large, permission denied: one line for
            # a person (the errno name too under --json), never a traceback.
            return report_error(args, os_error_message(exc), "OSError", 1, errno_name(exc))
        except KeyboardInterrupt:
            print("boite: interrupted", file=sys.stderr)
            return 130
        return int(status or 0)
    except BrokenPipeError:
        # The reader left (`boite info | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


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
