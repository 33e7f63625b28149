"""Verbs about snapshots: snapshot, snapshots, revert, delete-snapshot, suspend.

The work is in boite.launch: a running box's VMM does it (its operation lock serializes
requests), a stopped box's operation holds the box lock, and a second command waits for
either (bounded, saying so on stderr) instead of failing or interleaving.
"""

from __future__ import annotations

import argparse
import json
import sys

from boite.box import Box


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="take a snapshot of a box (disks; RAM too if running)")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("name", metavar="NAME", help="the snapshot's display name")
    p.add_argument("--description", default="", metavar="TEXT")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="save guest RAM, vCPUs and devices too (default: when the box is running)",
    )
    p.add_argument("--json", action="store_true", help="print the new snapshot as JSON")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("snapshots", help="show a box's snapshot tree and where you are in it")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser(
        "revert",
        help="go back to a snapshot (the current state is dropped; a running box restarts "
        "from it, resuming a memory snapshot)",
    )
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("name", metavar="NAME", help="snapshot name, or #UID")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("delete-snapshot", help="remove a snapshot, consolidating its delta disks")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("name", metavar="NAME", help="snapshot name, or #UID")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("suspend", help="save a running box's state to NAME.vmss and power off")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_suspend)


def _notify(message: str) -> None:
    print(f"boite: {message}", file=sys.stderr, flush=True)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from boite import launch

    taken = launch.snapshot(
        Box.open(args.box), args.name, args.description, args.memory, notify=_notify
    )
    if args.json:
        print(json.dumps({"uid": taken.uid, "name": taken.name}))
    else:
        print(f"snapshot {taken.name!r} (#{taken.uid}) taken")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from boite.snapshot import render_tree, tree_as_dict

    box = Box.open(args.box)  # finishes or undoes an interrupted operation first
    if box.recovered and not args.json:
        print(f"note: {box.recovered}")
    data = tree_as_dict(box)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_tree(data))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from boite import launch

    done = launch.revert(Box.open(args.box), args.name, notify=_notify)
    if args.json:
        print(json.dumps({"ok": True, "uid": done.uid, "name": done.name,
                          "running": done.running, "memory": done.memory}))  # fmt: skip
    elif done.running:
        how = "resumed from its memory" if done.memory else "restarted"
        print(f"reverted to {done.name!r} (#{done.uid}); the box {how}")
    else:
        print(f"reverted to {done.name!r} (#{done.uid})")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from boite import launch

    done = launch.delete_snapshot(Box.open(args.box), args.name, notify=_notify)
    if args.json:
        print(json.dumps({"ok": True, "uid": done.uid, "name": done.name}))
    else:
        print(f"deleted snapshot {done.name!r} (#{done.uid})")
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    from boite import launch

    where = launch.suspend(Box.open(args.box), notify=_notify)
    print(json.dumps({"ok": True, "file": where}) if args.json else f"suspended to {where}")
    return 0
