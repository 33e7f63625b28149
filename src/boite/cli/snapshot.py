"""Verbs about snapshots: snapshot, snapshots, revert, delete-snapshot, suspend."""

from __future__ import annotations

import argparse
import json

from boite.box import Box
from boite.errors import BoxError


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

    p = sub.add_parser("revert", help="go back to a snapshot (the current state is dropped)")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("name", metavar="NAME", help="snapshot name, or #UID")
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("delete-snapshot", help="remove a snapshot, consolidating its delta disks")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("name", metavar="NAME", help="snapshot name, or #UID")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("suspend", help="save a running box's state to NAME.vmss and power off")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.set_defaults(func=cmd_suspend)


def _live_holder(box: Box):
    """Who runs the box, or None; a lock left by a killed process does not count."""
    holder = box.lock_holder
    if holder is None or holder.is_dead_here():
        return None
    return holder


def _running_control(box: Box) -> str | None:
    """The control socket of the VMM running this box, or None when it is not running."""
    from boite.box import list_running

    holder = _live_holder(box)
    if holder is None:
        return None
    for running in list_running():
        if running.pid == holder.pid and getattr(running, "control", None):
            return running.control
    raise BoxError(
        f"{box.vmx_path}: the box is running (pid {holder.pid} on {holder.host}) but its VMM "
        "has no control socket this command can reach"
    )


def _vmm_request(control: str, request: dict) -> dict:
    from pathlib import Path

    from boite.vmm import control_request  # the VMM's side of the control socket

    # Saving RAM takes seconds per GiB: wait for it rather than the default 10 s.
    return control_request(Path(control), request, timeout=600)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from boite.snapshot import take_snapshot

    box = Box.open(args.box)
    control = _running_control(box)
    if control is not None:
        reply = _vmm_request(
            control,
            {
                "cmd": "snapshot",
                "name": args.name,
                "description": args.description,
                "memory": args.memory is not False,
            },
        )
        uid, name = reply.get("uid"), args.name
    else:
        if args.memory:
            raise BoxError(
                f"{box.vmx_path}: --memory needs a running box (this one is powered off); "
                "start it first, or take a disk snapshot without --memory"
            )
        snap = take_snapshot(box, args.name, args.description)
        uid, name = snap.uid, snap.display_name
    if args.json:
        print(json.dumps({"uid": uid, "name": name}))
    else:
        print(f"snapshot {name!r} (#{uid}) taken")
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
    from boite.snapshot import revert_snapshot

    box = Box.open(args.box)
    if _live_holder(box) is not None:
        raise BoxError(f"{box.vmx_path}: stop the box before reverting it (it is running)")
    snap = revert_snapshot(box, args.name)
    print(f"reverted to {snap.display_name!r} (#{snap.uid})")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from boite.snapshot import delete_snapshot

    box = Box.open(args.box)
    if _live_holder(box) is not None:
        raise BoxError(f"{box.vmx_path}: stop the box before deleting a snapshot (it is running)")
    snap = delete_snapshot(box, args.name)
    print(f"deleted snapshot {snap.display_name!r} (#{snap.uid})")
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    box = Box.open(args.box)
    control = _running_control(box)
    if control is None:
        raise BoxError(f"{box.vmx_path}: the box is not running; there is nothing to suspend")
    reply = _vmm_request(control, {"cmd": "suspend"})
    print(f"suspended to {reply.get('file', box.name + '.vmss')}")
    return 0
