"""Lifecycle verbs with the names vmrun and virsh users know: reset, pause, unpause, clone."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reset", help="reset a running box (soft: a reboot through the tools)")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument(
        "mode", nargs="?", choices=("soft", "hard"), default="soft",
        help="soft: the guest tools reboot the guest (hard where there are none); "
        "hard: the machine is rebuilt at once, as by the reset button",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reset)

    for verb, text in (("pause", "freeze a running box's vCPUs"), ("unpause", "let them run")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_pause if verb == "pause" else cmd_unpause)

    p = sub.add_parser(
        "clone",
        help="make a new box from SRC (new uuid.bios, MACs, name), as `vmrun clone`",
        description="Full clone: a flattened copy of every disk (current state, or as of "
        "--snapshot). Linked clone (--linked, needs --snapshot): each disk is a delta on the "
        "snapshot's disk; the source then refuses to delete that snapshot.",
    )
    p.add_argument("source", metavar="SRC", help="box directory or .vmx file")
    p.add_argument("dest", metavar="DST", help="the new box directory")
    p.add_argument("--linked", action="store_true", help="share the snapshot's disks")
    p.add_argument("--snapshot", metavar="NAME", help="clone the box as of this snapshot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clone)


def _done(args: argparse.Namespace, data: dict, text: str) -> int:
    print(json.dumps({"ok": True, **data}) if args.json else text)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from boite import launch

    box = launch.open_box(args.box)
    how = launch.reset(box, args.mode)
    text = {
        "tools": f"{box.name}: the guest tools reboot the guest (soft reset)",
        "hard": f"{box.name} reset (hard)"
        + (" - no guest tools to ask for a soft one" if args.mode == "soft" else ""),
    }[how]
    return _done(args, {"box": box.name, "mode": args.mode, "how": how}, text)


def cmd_pause(args: argparse.Namespace) -> int:
    from boite import launch

    box = launch.open_box(args.box)
    launch.pause(box)
    return _done(args, {"box": box.name, "state": "paused"}, f"{box.name} paused")


def cmd_unpause(args: argparse.Namespace) -> int:
    from boite import launch

    box = launch.open_box(args.box)
    launch.resume(box)
    return _done(args, {"box": box.name, "state": "running"}, f"{box.name} running again")


def cmd_clone(args: argparse.Namespace) -> int:
    import sys

    from boite import launch

    source = launch.open_box(args.source)
    clone = launch.clone(
        source, args.dest, linked=args.linked, snapshot=args.snapshot,
        notify=lambda m: print(f"boite: {m}", file=sys.stderr, flush=True),
    )  # fmt: skip
    kind = "linked" if args.linked else "full"
    return _done(
        args,
        {"box": str(clone.dir), "kind": kind, "uuid.bios": clone.vmx.get("uuid.bios")},
        f"cloned {source.name} -> {clone.dir}/ ({kind}"
        + (f", from snapshot {args.snapshot!r})" if args.snapshot else ")"),
    )
