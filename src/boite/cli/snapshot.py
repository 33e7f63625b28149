"""Verbs about snapshots: snapshot, snapshots, revert, delete-snapshot, suspend.

A running box's VMM does the work (its operation lock serializes requests); a stopped
box's operation holds the box lock, and a second command waits for it (bounded, saying
so) instead of failing or interleaving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from boite.box import Box
from boite.errors import BoxError, LockError

# How long an offline operation waits for another boite command holding the box.
OFFLINE_WAIT_S = 120.0


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
    # Another boite command's operation on the stopped box (or a VMM still starting):
    # the caller waits for the lock.
    return None


def _vmm_request(control: str, request: dict) -> dict:
    from pathlib import Path

    from boite.vmm import OPERATION_WAIT_S, control_request

    path = Path(control)
    busy = control_request(path, {"cmd": "status"}).get("status", {}).get("operation")
    if busy:
        print(f"boite: waiting for {busy} to finish first", file=sys.stderr, flush=True)
    # Saving RAM takes seconds per GiB, and the VMM may first wait for a running
    # operation: wait for both rather than the default 10 s.
    return control_request(path, request, timeout=600 + OPERATION_WAIT_S)


def _offline(box: Box, what: str, operation: Callable[[Box], Any]) -> Any:
    """Run `operation(box)` on a stopped box holding its lock. Another boite command
    holding it (an operation in progress) is waited for, up to OFFLINE_WAIT_S."""
    from boite.box.lock import BoxLock

    lock = BoxLock(box.vmx_path)
    deadline = time.monotonic() + OFFLINE_WAIT_S
    told = False
    while True:
        try:
            lock.acquire()
            break
        except LockError as exc:
            if _running_control(box) is not None:
                raise BoxError(
                    f"{box.vmx_path}: the box was started meanwhile; try again"
                ) from None
            if time.monotonic() > deadline:
                raise BoxError(
                    f"{box.vmx_path}: {what}: gave up after {OFFLINE_WAIT_S:g} s waiting ({exc})"
                ) from None
            if not told:
                print(f"boite: {box.name} is busy ({exc}); waiting", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.05)
    try:
        return operation(Box.open(box.vmx_path))  # as the previous holder left it
    finally:
        lock.release()


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
        snap = _offline(
            box, "snapshot",
            lambda b: take_snapshot(b, args.name, args.description, lock_held=True),
        )  # fmt: skip
        uid, name = snap.uid, snap.display_name
    if args.json:
        print(json.dumps({"uid": uid, "name": name}))
    else:
        print(f"snapshot {name!r} (#{uid}) taken")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from boite.snapshot import recover, render_tree, tree_as_dict

    box = Box.open(args.box)
    if _live_holder(box) is None:
        note = recover(box)
        if note and not args.json:
            print(f"note: {note}")
    data = tree_as_dict(box)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_tree(data))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from boite.snapshot import revert_snapshot

    box = Box.open(args.box)
    control = _running_control(box)
    if control is not None:
        reply = _vmm_request(control, {"cmd": "revert", "name": args.name})
        uid, name = reply.get("uid"), reply.get("name")
        how = "resumed from its memory" if reply.get("memory") else "restarted"
        result = {"uid": uid, "name": name, "running": True, "memory": bool(reply.get("memory"))}
        text = f"reverted to {name!r} (#{uid}); the box {how}"
    else:
        snap = _offline(box, "revert", lambda b: revert_snapshot(b, args.name, lock_held=True))
        result = {"uid": snap.uid, "name": snap.display_name, "running": False}
        text = f"reverted to {snap.display_name!r} (#{snap.uid})"
    print(json.dumps(result) if args.json else text)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from boite.snapshot import delete_snapshot

    box = Box.open(args.box)
    control = _running_control(box)
    if control is not None:
        reply = _vmm_request(control, {"cmd": "delete-snapshot", "name": args.name})
        uid, name = reply.get("uid"), reply.get("name")
    else:
        snap = _offline(
            box, "delete-snapshot", lambda b: delete_snapshot(b, args.name, lock_held=True)
        )
        uid, name = snap.uid, snap.display_name
    print(
        json.dumps({"uid": uid, "name": name})
        if args.json
        else f"deleted snapshot {name!r} (#{uid})"
    )
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    box = Box.open(args.box)
    control = _running_control(box)
    if control is None:
        raise BoxError(f"{box.vmx_path}: the box is not running; there is nothing to suspend")
    reply = _vmm_request(control, {"cmd": "suspend"})
    print(f"suspended to {reply.get('file', box.name + '.vmss')}")
    return 0
