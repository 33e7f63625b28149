"""Verbs through the guest tools: exec, cp, ip, shell."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
from pathlib import Path

from boite.errors import BoxError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "exec",
        help="run a command in a running box's guest (its exit status is boite's)",
        description="Run CMD in the guest through the guest tools; its stdout and stderr "
        "stream to boite's, and its exit status (128+N after signal N) is boite's. "
        "stdin is passed on when it is not a terminal.",
    )
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="(repeatable)")
    p.add_argument("--cwd", metavar="DIR", help="working directory in the guest (default /)")
    _wait_option(p)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser(
        "cp",
        help="copy a file between the host and a running box (BOX:PATH names the guest side)",
    )
    p.add_argument("source", metavar="SRC", help="FILE or BOX:PATH")
    p.add_argument("dest", metavar="DST", help="FILE or BOX:PATH (a directory keeps the name)")
    p.add_argument("--json", action="store_true", help="print what was copied as JSON")
    _wait_option(p)
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("ip", help="the guest's IPv4 address, as its tools report it")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--all", action="store_true", help="every address, with its interface")
    p.add_argument("--json", action="store_true")
    _wait_option(p)
    p.set_defaults(func=cmd_ip)

    p = sub.add_parser(
        "shell", help="an interactive shell in a running box's guest (a PTY over the tools)"
    )
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--shell", default="/bin/sh", metavar="PATH", help="default /bin/sh")
    _wait_option(p)
    p.set_defaults(func=cmd_shell)


def _wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait", type=float, default=60.0, metavar="S",
        help="seconds to wait for the guest tools of a box that is still booting (default 60)",
    )  # fmt: skip


def _write_fd(fd: int):
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BoxError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_exec(args: argparse.Namespace) -> int:
    from boite import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise BoxError("exec: no command given (boite exec BOX -- CMD...)")
    stdin = None if os.isatty(0) else sys.stdin.buffer
    return launch.exec(
        args.box, command, stdin=stdin, stdout=_write_fd(1), stderr=_write_fd(2),
        env=_env(args.env), cwd=args.cwd, wait_s=args.wait,
    )  # fmt: skip


def _guest_side(arg: str) -> tuple[str, str] | None:
    """BOX:PATH -> (BOX, PATH); a host path (one that exists, or without a colon) -> None."""
    if ":" not in arg or Path(arg).exists():
        return None
    box, _, path = arg.partition(":")
    return (box, path) if box and path else None


def cmd_cp(args: argparse.Namespace) -> int:
    from boite import launch

    src, dst = _guest_side(args.source), _guest_side(args.dest)
    if (src is None) == (dst is None):
        raise BoxError("cp: exactly one of SRC and DST must be BOX:PATH (the guest side)")
    if dst is not None:
        box, remote = dst
        local = Path(args.source)
        if not local.is_file():
            raise BoxError(f"cp: {local}: not a file")
        if remote.endswith("/"):
            remote += local.name
        size = launch.copy_to_guest(box, local, remote, args.wait)
        where, what = f"{box}:{remote}", str(local)
    else:
        assert src is not None
        box, remote = src
        local = Path(args.dest)
        if local.is_dir():
            local = local / Path(remote).name
        size = launch.copy_from_guest(box, remote, local, args.wait)
        where, what = str(local), f"{box}:{remote}"
    if args.json:
        print(json.dumps({"source": what, "dest": where, "bytes": size}))
    else:
        print(f"copied {what} -> {where} ({size} bytes)")
    return 0


def cmd_ip(args: argparse.Namespace) -> int:
    from boite import launch

    ips = launch.guest_addresses(args.box, args.wait)
    if args.json:
        print(json.dumps(ips if args.all else ips[:1]))
        return 0
    if not ips:
        raise BoxError(f"{args.box}: the guest has no IPv4 address besides loopback")
    if args.all:
        for ip in ips:
            print(f"{ip['interface']}\t{ip['address']}")
    else:
        print(ips[0]["address"].partition("/")[0])
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    """A PTY in the guest joined to this terminal: raw mode, window size followed."""
    from boite import launch
    from boite.cli.run import _raw_keep_output

    client = launch.tools_client(args.box, args.wait)
    size = shutil.get_terminal_size((80, 24))
    saved = None
    with contextlib.suppress(OSError, termios.error):
        if os.isatty(0):
            saved = termios.tcgetattr(0)
            _raw_keep_output(0)
    previous = None
    try:
        with client:

            def started(stream: int) -> None:
                nonlocal previous

                def on_winch(signum, frame) -> None:
                    cols, rows = shutil.get_terminal_size((80, 24))
                    with contextlib.suppress(Exception):
                        client.resize(stream, rows, cols)

                with contextlib.suppress(ValueError):
                    previous = signal.signal(signal.SIGWINCH, on_winch)

            env = {"TERM": os.environ.get("TERM", "xterm"), "HOME": "/root",
                   "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # fmt: skip
            return client.exec(
                [args.shell, "-l"], stdin=_Stdin(), stdout=_write_fd(1), env=env,
                pty=True, size=(size.lines, size.columns), on_started=started,
            )  # fmt: skip
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, saved)


class _Stdin:
    """Raw reads of fd 0 (what is typed, as it is typed), for the shell's input pump."""

    def read(self, n: int) -> bytes:
        try:
            return os.read(0, n)
        except OSError:
            return b""
