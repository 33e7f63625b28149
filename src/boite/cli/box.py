"""Verbs about boxes: create, info, check, list, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from boite.box import Box, list_running
from boite.box.box import (
    DEFAULT_CPUS,
    DEFAULT_DISK_TYPE,
    DEFAULT_GUEST_OS,
    DEFAULT_MEMSIZE_MB,
    DISK_TYPES,
)
from boite.box.paths import external_paths
from boite.box.sizes import format_size, parse_size
from boite.errors import BoiteError, BoxError

DEMO_DIR = "boite-demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="make a new box directory (NAME/NAME.vmx, .vmdk, ...)")
    p.add_argument("name", metavar="NAME", help="the box directory to make")
    p.add_argument("--memsize", type=int, default=DEFAULT_MEMSIZE_MB, metavar="MB")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N")
    p.add_argument(
        "--disk", default="1G", metavar="SIZE", help="disk capacity like 1G, 512M (0: no disk)"
    )
    p.add_argument("--disk-type", choices=DISK_TYPES, default=DEFAULT_DISK_TYPE)
    p.add_argument("--guest-os", default=DEFAULT_GUEST_OS, metavar="ID")
    p.add_argument("--kernel", metavar="FILE", help="kernel the box boots (boite.kernel)")
    p.add_argument("--initrd", metavar="FILE", help="its initial ramdisk (boite.initrd)")
    p.add_argument("--append", metavar="CMDLINE", help="its command line (boite.cmdline)")
    p.add_argument(
        "--forward", action="append", default=[], metavar="PROTO:HOST:GUEST",
        help="forward a host port to the guest through NAT, e.g. tcp:2222:22 (repeatable; "
        "ethernet0.boite.forward)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the new box's info as JSON")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("info", help="show a box's configuration")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="list every hardware limit or file problem of a box")
    p.add_argument("box", metavar="BOX", help="box directory or .vmx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("list", help="boxes running on this host (--all: every box in a directory)")
    p.add_argument(
        "--all", nargs="?", const=".", default=None, metavar="DIR",
        help="every box under DIR (default: the current directory, or $BOITE_INVENTORY) "
        "with its state: running, paused, suspended or off",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "demo",
        help="build the guest kit, make (or reuse) the default box ./boite-demo and boot it",
    )
    p.add_argument(
        "--accel", choices=("kvm", "emu", "auto"), default="auto",
        help="how to run it (auto: KVM where it can boot Linux, else the emulator)",
    )  # fmt: skip
    p.add_argument(
        "--shell", action="store_true", help="leave a busybox shell on the console afterwards"
    )
    p.add_argument("--no-boot", action="store_true", help="only make the box and show it")
    p.add_argument("--json", action="store_true", help="with --no-boot: the box's info as JSON")
    p.set_defaults(func=cmd_demo)


def cmd_create(args: argparse.Namespace) -> int:
    # Direct kernel boot settings, checked before anything is made.
    boot: dict[str, str] = {}
    for key, value in (("boite.kernel", args.kernel), ("boite.initrd", args.initrd)):
        if value is not None:
            path = Path(value).resolve()
            if not path.is_file():
                raise BoxError(f"--{key.split('.')[1]} {value}: no such file")
            boot[key] = str(path)
    if args.append is not None:
        boot["boite.cmdline"] = args.append
    if args.forward:
        from boite.machine.netback.passt import parse_forwards

        try:
            boot["ethernet0.boite.forward"] = ", ".join(
                parse_forwards(", ".join(args.forward), "--forward")
            )
        except BoiteError as exc:
            raise BoxError(str(exc)) from None
    box = Box.create(
        args.name,
        memsize_mb=args.memsize,
        cpus=args.cpus,
        disk_size=parse_size(args.disk),
        disk_type=args.disk_type,
        guest_os=args.guest_os,
    )
    if boot:
        for key, value in boot.items():
            box.vmx[key] = value
        box.save()
    if args.json:
        print(json.dumps(box.info(), indent=2))
    else:
        print(f"created {box.dir}/ ({box.vmx_path.name})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    box = Box.open(args.box)
    info = box.info()
    info.update(live_state(box))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_info(info)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from boite.box.limits import Problem
    from boite.machine.substitutes import boot_problems, hardware_notes
    from boite.snapshot import check_snapshot_tree

    box = Box.open(args.box)
    # The box's own rules, then its snapshot tree (files, CID chains, .vmsd vs .vmx),
    # what this host cannot attach, and whether anything can boot it.
    from boite.launch import startup_problems

    problems = box.check() + check_snapshot_tree(box) + startup_problems(box)
    problems += [
        Problem("boite.kernel", "", "a kernel, or a bootable disk or CD-ROM", why)
        for why in boot_problems(box)
    ]
    if not args.json:
        # Devices boite replaces: not problems, the box starts; said once, here and in
        # vmware.log at power-on.
        for note in hardware_notes(box.config):
            print(f"note: {note}")
    if args.json:
        print(json.dumps([vars(p) for p in problems], indent=2))
        return 1 if problems else 0
    if problems:
        print(f"{box.vmx_path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
        for p in problems:
            print(f"  {p.key} = {p.value}\n      {p.message}\n      limit: {p.limit}")
    else:
        print(f"{box.vmx_path}: ok")
    # Every path that leaves the box, allowed or not (docs/security.md).
    outside = external_paths(box)
    if outside:
        print(
            f"{len(outside)} path{'s' if len(outside) > 1 else ''} leave{'' if len(outside) > 1 else 's'} the box:"
        )
        for p in outside:
            print(f"  {p}")
    return 1 if problems else 0


def _boxes_under(root: Path) -> list[Path]:
    """.vmx files in ROOT and its subdirectories, two levels down (a box directory, or a
    directory of them)."""
    found = (
        sorted(root.glob("*.vmx")) + sorted(root.glob("*/*.vmx")) + sorted(root.glob("*/*/*.vmx"))
    )
    return list(dict.fromkeys(p.resolve() for p in found))


def cmd_list_all(args: argparse.Namespace) -> int:
    import os

    from boite import launch

    root = Path(os.environ.get("BOITE_INVENTORY", ".") if args.all == "." else args.all)
    if not root.is_dir():
        raise BoxError(f"list --all {root}: not a directory")
    rows = []
    for vmx in _boxes_under(root):
        try:
            box = Box.open(vmx)
        except BoxError as exc:
            rows.append(
                {"vmx": str(vmx), "name": vmx.stem, "state": "unreadable", "error": str(exc)}
            )
            continue
        state = live_state(box)
        holder = box.lock_holder
        row = {
            "vmx": str(vmx),
            "name": box.name,
            "state": state["state"],
            "accelerator": state.get("accelerator") or box.config.virtual_exec,
            "ip": None,
            "tools": bool((state.get("tools") or {}).get("running")),
            "stale_lock": holder is not None and holder.is_dead_here(),
        }
        if row["tools"]:
            try:
                ips = launch.guest_addresses(box, wait_s=2)
                row["ip"] = ips[0]["address"].partition("/")[0] if ips else None
            except BoxError:
                pass
            except Exception:  # noqa: BLE001 - a listing must not die on one box
                pass
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no box under {root}")
        return 0
    print(f"{'NAME':20} {'STATE':10} {'ACCEL':9} {'IP':15} {'TOOLS':6} VMX")
    for r in rows:
        print(
            f"{r['name']:20} {r['state']:10} {str(r.get('accelerator') or '-'):9} "
            f"{r.get('ip') or '-':15} {'yes' if r.get('tools') else 'no':6} {r['vmx']}"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.all is not None:
        return cmd_list_all(args)
    boxes = list_running()
    if args.json:
        print(json.dumps([vars(b) for b in boxes], indent=2))
        return 0
    if not boxes:
        print("no box is running on this host")
        return 0
    print(f"{'NAME':20} {'PID':>8}  {'SINCE':19}  VMX")
    for b in boxes:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.started))
        print(f"{b.name:20} {b.pid:>8}  {since}  {b.vmx}")
    return 0


# What the demo guest does once its init is up: show it is a real Linux on boite's devices.
DEMO_COMMAND = "uname -a; cat /proc/cpuinfo | head -8; cat /proc/meminfo | head -2; ls /dev"


def cmd_demo(args: argparse.Namespace) -> int:
    from boite import guestkit
    from boite.cli.kit import _progress_printer
    from boite.cli.run import run_box

    where = Path(DEMO_DIR)
    if where.exists():
        box = Box.open(where)
        note = f"reusing {where}/"
    else:
        box = Box.create(where)
        note = f"created {where}/"
    print(f"boite: {note}", file=sys.stderr)
    if args.no_boot:
        info = box.info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_info(info)
        return 0

    kit = guestkit.ensure_kit(("i386", "initrd"), progress=_progress_printer())
    assert kit.i386_vmlinux is not None and kit.initrd_i386 is not None
    cmdline = f'console=ttyS0 boite.run="{DEMO_COMMAND}"'
    if args.shell:
        cmdline += " boite.shell=1"
    # The kit lives in the cache, keyed by its inputs: point the box at this build of it.
    # vmlinux through its PVH entry: the bzImage's decompressor would cost the emulated CPU
    # about a fifth of the boot.
    wanted = {
        "boite.kernel": str(kit.i386_vmlinux),
        "boite.initrd": str(kit.initrd_i386),
        "boite.cmdline": cmdline,
    }
    if any(box.vmx.get(k) != v for k, v in wanted.items()):
        for key, value in wanted.items():
            box.vmx[key] = value
        box.save()
        box = Box.open(where)
    print(f"boite: booting {where}/ (the guest's console follows)", file=sys.stderr)
    return run_box(box, args.accel)


def live_state(box: Box) -> dict:
    """What the running VMM says: state (running, paused, ...), accelerator, tools; for a
    box that is off, whether it is suspended; a dead VMM's box is off."""
    from boite import launch

    try:
        status = launch.status(box)
    except BoxError:
        status = None  # its VMM does not answer: a dead or wedged process
    if status is None:
        suspended = box.vmx.get("checkpoint.vmState", "").lower().endswith(".vmss")
        return {"state": "suspended" if suspended else "off"}
    try:
        nics = launch.request(box, {"cmd": "nics"}).get("nics")
    except BoxError:
        nics = None
    return {
        "state": status.get("state", "running"),
        "accelerator": status.get("accelerator"),
        "emu_tier_running": status.get("emu_tier"),
        "tools": launch.tools_status(box),
        "host_nics": nics,
    }


def _tier_line(info: dict) -> str:
    """The emulator's tier: what the running VMM says (and how much ran natively), else
    the box's boite.emuTier, which is weighed at the next start (accel/emu/tiers.py)."""
    running = info.get("emu_tier_running")
    if isinstance(running, dict):
        return (f"{running.get('tier')} ({running.get('why')}); "
                f"{running.get('native_instructions')} of {running.get('instructions')} "
                "instructions so far ran as native code")  # fmt: skip
    if info.get("accelerator") == "kvm":
        return f"{info.get('emu_tier')} (not used: KVM runs this box)"
    return f"{info.get('emu_tier')} (boite.emuTier; chosen at power-on)"


def print_info(info: dict) -> None:
    # An unreadable value is None in the data; `check` (and the problems below) say why.
    info = {k: ("?" if v is None else v) for k, v in info.items()}
    rows = [
        ("box", info["vmx"]),
        ("name", info["displayName"]),
        ("guest OS", info["guestOS"]),
        ("memory", f"{info['memsize']} MB"),
        ("vCPUs", f"{info['numvcpus']} ({info['coresPerSocket']} per socket)"),
        ("firmware", info["firmware"]),
        ("execution", info["virtual_exec"]),
        ("emulator tier", _tier_line(info)),
        ("uuid.bios", info["uuid.bios"]),
        ("boot order", ", ".join(info["boot_order"]) if info["boot_order"] != "?" else "?"),
    ]
    for disk in info["disks"]:
        size = format_size(disk["capacity"]) if disk["capacity"] is not None else "?"
        kind = disk["device_type"] or "disk"
        rows.append((f"disk {disk['key']}", f"{disk['file_name']} ({kind}, {size})"))
    for nic in info["nics"]:
        rows.append(
            (
                f"nic ethernet{nic['index']}",
                f"{nic['virtual_dev']} {nic['connection_type']} {nic['mac']}",
            )
        )
    for nic in info.get("host_nics") or []:
        side = (
            f"passt pid {nic.get('pid')}"
            + (f" ({nic['passt']}, {nic.get('passt_version')})" if nic.get("passt") else "")
            + (f", forwards {', '.join(nic['forwards'])}" if nic.get("forwards") else "")
            if nic.get("backend") == "passt"
            else f"TAP {nic.get('tap')}"
        )
        rows.append((f"{nic['key']} host side", f"{side} (MAC {nic['mac']})"))
    for serial in info["serials"]:
        rows.append((f"serial{serial['index']}", f"{serial['file_type']} {serial['file_name']}"))
    usb = [k for k, on in info["usb"].items() if on]
    rows.append(("usb", ", ".join(usb) or "none"))
    if info.get("encrypted") is True:
        rows.append(("encrypted", "yes (by VMware: boite cannot start it)"))
    for p in info.get("external_paths") or []:
        verdict = "allowed" if p["allowed"] else "refused"
        rows.append(("outside the box", f"{p['key']} -> {p['path']} ({p['kind']}, {verdict})"))
    running = info["running"]
    rows.append(
        ("running", "no" if running == "?" else f"pid {running['pid']} on {running['host']}")
    )
    if "state" in info:
        rows.append(("state", info["state"]))
    tools = info.get("tools")
    if isinstance(tools, dict):
        rows.append(
            ("tools", f"running ({tools['agent']})" if tools.get("running") else "not running")
        )
    problems = info["problems"]
    rows.append(("problems", str(len(problems)) if problems else "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for p in problems:
        print(f"  ! {p}")
