"""Guest-to-host networking: boite's NAT (passt) against QEMU's user networking (slirp).

The same guest on every side: the kit's i386 kernel and initramfs, which takes its
address by DHCP from whichever NAT it has (10.0.2.15, gateway 10.0.2.2 on all of them),
then sends MIB mebibytes of zeroes to a host listener at the gateway (each NAT maps it
to the host's loopback; the listener sends one byte first, which keeps Debian 12's passt
from resetting the stream 24 s in) and echoes bytes back on a second connection, so the host times
ROUNDS one-byte round trips through the guest's TCP stack and user space.

Three runs:
- boite: `boite start` on a box with `connectionType = "nat"` (passt over a socketpair),
  with boite's accelerator choice (KVM where it boots Linux, else the emulator).
- qemu: `qemu-system-x86_64 -M microvm` with `-netdev user` (QEMU's slirp), the
  comparison the issue asks for.
- qemu_passt: the same QEMU with `-netdev stream` to a passt started with boite's own
  options: the same NAT as boite's, so qemu against qemu_passt is slirp against passt,
  and boite against qemu_passt is the VMM (its CPU, its virtio-net) alone.
QEMU runs under KVM where this host boots Linux with it, else TCG; boite's emulator and
QEMU's TCG are both software CPUs, and under them the guest's CPU, not the network,
sets the pace: say which accelerators the figures come from.

QEMU's machine: microvm (virtio-mmio, like boite's), `acpi=off` so that QEMU puts the
virtio-mmio devices on the kernel command line (the kit kernel has no ACPI), the bzImage
(microvm adds those devices to the command line of a Linux boot-protocol kernel, not of
a PVH ELF), and a CPU without a local APIC (`-apic`): the kit kernel is built without
APIC support and relies on the 8259 PIC, whose interrupts a CPU with a local APIC only
takes once firmware has set LINT0 to ExtINT, which microvm's does not. Under KVM that
means `kernel-irqchip=off`.

    python bench/net.py [--mib 4] [--rounds 50] [--timeout 900] [--only boite,qemu,qemu_passt]

Final line, JSON: throughput_mib_s and rtt_ms (median) for boite, the same with _qemu
and _qemu_passt suffixes, complete (all MIB arrived and every round came back: the rate
of a transfer cut short is over what arrived), and the accelerators used (accel,
accel_qemu).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

MEMSIZE_MB = 256
SIDES = ("boite", "qemu", "qemu_passt")


def guest_command(sink: int, echo: int, mib: int) -> str:
    # The lease first (udhcpc's script sets the default route last but one).
    return (
        "until ip route | grep -q ^default; do sleep 1; done; "
        f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | nc 10.0.2.2 {sink} >/dev/null; "
        f"mkfifo /tmp/f; nc 10.0.2.2 {echo} < /tmp/f | cat > /tmp/f"
    )


def kernel_cmdline(host: Host, mib: int) -> str:
    sink, echo = host.ports()
    return f'console=ttyS0 quiet boite.tools=0 boite.run="{guest_command(sink, echo, mib)}"'


class Host:
    """The host side: a sink timing the bulk transfer, an echo partner timing rounds."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.echo = socket.create_server(("127.0.0.1", 0))
        self.throughput: float | None = None
        self.received = 0
        self.rtts: list[float] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def ports(self) -> tuple[int, int]:
        return self.sink.getsockname()[1], self.echo.getsockname()[1]

    def _serve(self) -> None:
        conn, _ = self.sink.accept()
        first = None
        with conn:
            # One byte to the guest first: Debian 12's passt resets a guest-to-host
            # stream 24 s in while the guest has acknowledged nothing from the host side
            # (bench/RESULTS.md, net); boite's emulator needs longer than that for 1 MiB.
            conn.sendall(b"!")
            while chunk := conn.recv(1 << 16):
                first = first or time.perf_counter()
                self.received += len(chunk)
        if first is not None:
            self.throughput = self.received / (1 << 20) / max(time.perf_counter() - first, 1e-9)
        conn, _ = self.echo.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(self.rounds):
                t0 = time.perf_counter()
                conn.sendall(b"x")
                if not conn.recv(1):
                    break
                self.rtts.append(time.perf_counter() - t0)
        self.done.set()

    def result(self, accel: str, mib: int, console: Path | None = None) -> dict:
        rtt = statistics.median(self.rtts) * 1000 if self.rtts else None
        out = {"throughput_mib_s": self.throughput, "rtt_ms": rtt, "accel": accel}
        if self.received != mib << 20 or len(self.rtts) != self.rounds:
            out["incomplete"] = f"{self.received} bytes, {len(self.rtts)} rounds"
            if console is not None and console.exists():
                out["console_tail"] = console.read_text(errors="replace")[-1500:]
        return out


def run_boite(kit, mib: int, rounds: int, timeout: float) -> dict:
    from boite.box import Box

    host = Host(rounds)
    with tempfile.TemporaryDirectory() as tmp:
        box = Box.create(Path(tmp) / "netbench", disk_size=None, memsize_mb=MEMSIZE_MB)
        box.vmx["boite.kernel"] = str(kit.i386_vmlinux)
        box.vmx["boite.initrd"] = str(kit.initrd_i386)
        box.vmx["boite.cmdline"] = kernel_cmdline(host, mib)
        box.save()
        assert box.vmx["ethernet0.connectionType"] == "nat"
        console = Path(tmp) / "console.txt"
        with console.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "boite", "start", str(box.dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            host.done.wait(timeout)
            proc.kill()
            proc.wait()
        log = (box.dir / "vmware.log").read_text(errors="replace")
        accel = "emu" if "accelerator emu" in log else "kvm" if "accelerator kvm" in log else "?"
        out = host.result(accel, mib, console)
        if "incomplete" in out:
            out["log_tail"] = log[-3000:]
        return out


def qemu_kvm() -> bool:
    return os.access("/dev/kvm", os.W_OK) and not Path("/sys/module/kvm_pvm").exists()


@contextlib.contextmanager
def passt_socket(tmp: Path):
    """A passt with boite's NAT options, listening on a Unix socket for QEMU."""
    from boite.machine.netback.passt import find_passt, passt_options

    # passt run as root changes to nobody before it makes its socket: a folder it may
    # reach and write.
    tmp.chmod(0o755)
    folder = tmp / "passt"
    folder.mkdir()
    folder.chmod(0o777)
    path = folder / "passt.socket"
    proc = subprocess.Popen(
        [str(find_passt()), *passt_options(), "--socket", str(path)],  # boite's choice
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("passt did not make its socket")
            time.sleep(0.05)
        yield path
    finally:
        proc.kill()
        proc.wait()


def run_qemu(kit, mib: int, rounds: int, timeout: float, passt: bool) -> dict:
    if shutil.which("qemu-system-x86_64") is None:
        return {"throughput_mib_s": None, "rtt_ms": None, "accel": "missing"}
    kvm = qemu_kvm()
    host = Host(rounds)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if passt:
            path = stack.enter_context(passt_socket(Path(tmp)))
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={path}"
        else:
            netdev = "user,id=n0"
        console = Path(tmp) / "console.txt"
        accel = ["-accel", "kvm,kernel-irqchip=off", "-cpu", "host,-apic"] if kvm else [
            "-accel", "tcg", "-cpu", "pentium3,-apic"]  # fmt: skip
        with console.open("wb") as out:
            proc = subprocess.Popen(
                ["qemu-system-x86_64", "-M", "microvm,acpi=off", *accel, "-m", str(MEMSIZE_MB),
                 "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                 "-kernel", str(kit.i386_bzimage), "-initrd", str(kit.initrd_i386),
                 "-append", kernel_cmdline(host, mib),
                 "-netdev", netdev, "-device", "virtio-net-device,netdev=n0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            host.done.wait(timeout)
            proc.kill()
            proc.wait()
        return host.result("kvm" if kvm else "tcg", mib, console)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--only", default=",".join(SIDES), help="comma-separated sides")
    args = parser.parse_args()
    sides = [s for s in args.only.split(",") if s]
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown side(s) {', '.join(sorted(unknown))}: pick from {SIDES}")
    from boite.machine.netback.passt import find_passt

    if find_passt() is None:
        raise SystemExit("no passt: ./dev setup builds one (or apt-get install passt)")
    from boite.guestkit import ensure_kit

    kit = ensure_kit(("i386", "initrd"))
    results: dict[str, dict] = {}
    for side in sides:
        if side == "boite":
            out = run_boite(kit, args.mib, args.rounds, args.timeout)
        else:
            out = run_qemu(kit, args.mib, args.rounds, args.timeout, passt=side == "qemu_passt")
        results[side] = out
        print(f"{side} ({out['accel']}): {out['throughput_mib_s']} MiB/s, "
              f"median RTT {out['rtt_ms']} ms", flush=True)  # fmt: skip
        for key in ("incomplete", "console_tail", "log_tail"):
            if key in out:
                print(f"  {key}: {out[key]}", flush=True)

    def r(x):
        return None if x is None else round(x, 3)

    final: dict[str, object] = {"mib": args.mib, "rounds": args.rounds}
    for side, out in results.items():
        suffix = "" if side == "boite" else f"_{side}"
        final[f"throughput_mib_s{suffix}"] = r(out["throughput_mib_s"])
        final[f"rtt_ms{suffix}"] = r(out["rtt_ms"])
        # A transfer cut short still gives a rate (over what arrived): say it was cut.
        final[f"complete{suffix}"] = "incomplete" not in out
    if "boite" in results:
        final["accel"] = results["boite"]["accel"]
    if qemu := results.get("qemu") or results.get("qemu_passt"):
        final["accel_qemu"] = qemu["accel"]
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
