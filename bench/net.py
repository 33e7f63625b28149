"""Guest-to-host networking: boite's NAT (passt) against QEMU's user networking (slirp).

The same guest on both (the kit's i386 kernel and initramfs, `boite.ip=10.0.2.15/24`,
which is also what both NATs hand out): it sends MIB mebibytes of zeroes to a host
listener at the gateway 10.0.2.2 (each NAT maps it to the host's loopback), then echoes
bytes back on a second connection so the host can time ROUNDS round trips through the
guest's TCP stack and user space. boite runs the box with its accelerator choice (auto:
KVM where it boots Linux, else the emulator); QEMU runs `-M microvm` with KVM where
usable, else TCG: say which in the results, since under emulation the guest CPU, not the
network, sets the pace.

    python bench/net.py [--mib 4] [--rounds 50]

Final line, JSON: throughput_mib_s, rtt_ms (median), the same with _qemu, and the
accelerators used (accel, accel_qemu).
"""

from __future__ import annotations

import argparse
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

IP_PARAM = "boite.ip=10.0.2.15/24,10.0.2.2,10.0.2.3"


def guest_command(sink: int, echo: int, mib: int) -> str:
    return (
        f"sleep 2; dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | nc 10.0.2.2 {sink}; "
        f"mkfifo /tmp/f; nc 10.0.2.2 {echo} < /tmp/f | cat > /tmp/f"
    )


class Host:
    """The host side: a sink timing the bulk transfer, an echo partner timing rounds."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.echo = socket.create_server(("127.0.0.1", 0))
        self.throughput: float | None = None
        self.rtts: list[float] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def ports(self) -> tuple[int, int]:
        return self.sink.getsockname()[1], self.echo.getsockname()[1]

    def _serve(self) -> None:
        conn, _ = self.sink.accept()
        total, first = 0, None
        with conn:
            while chunk := conn.recv(1 << 16):
                first = first or time.perf_counter()
                total += len(chunk)
        if first is not None:
            self.throughput = total / (1 << 20) / max(time.perf_counter() - first, 1e-9)
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


def run_boite(kit, mib: int, rounds: int, timeout: float) -> tuple[float | None, float | None, str]:
    from boite.box import Box

    host = Host(rounds)
    sink, echo = host.ports()
    with tempfile.TemporaryDirectory() as tmp:
        box = Box.create(Path(tmp) / "netbench", disk_size=None)
        box.vmx["boite.kernel"] = str(kit.i386_vmlinux)
        box.vmx["boite.initrd"] = str(kit.initrd_i386)
        box.vmx["boite.cmdline"] = (
            f'console=ttyS0 quiet boite.tools=0 boite.run="{guest_command(sink, echo, mib)}"'
        )
        box.save()
        proc = subprocess.Popen(
            [sys.executable, "-m", "boite", "start", str(box.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        host.done.wait(timeout)
        proc.kill()
        proc.wait()
        log = (box.dir / "vmware.log").read_text(errors="replace")
        accel = "emu" if "accelerator emu" in log else "kvm" if "accelerator kvm" in log else "?"
    rtt = statistics.median(host.rtts) * 1000 if host.rtts else None
    return host.throughput, rtt, accel


def run_qemu(kit, mib: int, rounds: int, timeout: float) -> tuple[float | None, float | None, str]:
    if shutil.which("qemu-system-x86_64") is None:
        return None, None, "missing"
    kvm = os.access("/dev/kvm", os.W_OK) and not Path("/sys/module/kvm_pvm").exists()
    host = Host(rounds)
    sink, echo = host.ports()
    append = (
        f'console=ttyS0 quiet boite.tools=0 {IP_PARAM} boite.run="{guest_command(sink, echo, mib)}"'
    )
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm" if kvm else "tcg", "-m", "256",
         "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
         "-kernel", str(kit.i386_vmlinux), "-initrd", str(kit.initrd_i386), "-append", append,
         "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    host.done.wait(timeout)
    proc.kill()
    proc.wait()
    rtt = statistics.median(host.rtts) * 1000 if host.rtts else None
    return host.throughput, rtt, "kvm" if kvm else "tcg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if shutil.which("passt") is None:
        raise SystemExit("passt is not installed (Debian package passt)")
    from boite.guestkit import ensure_kit

    kit = ensure_kit(("i386", "initrd"))
    tp, rtt, accel = run_boite(kit, args.mib, args.rounds, args.timeout)
    print(f"boite ({accel}): {tp} MiB/s, median RTT {rtt} ms", flush=True)
    tpq, rttq, accelq = run_qemu(kit, args.mib, args.rounds, args.timeout)
    print(f"qemu ({accelq}): {tpq} MiB/s, median RTT {rttq} ms", flush=True)

    def r(x):
        return None if x is None else round(x, 3)

    print(json.dumps({
        "throughput_mib_s": r(tp), "rtt_ms": r(rtt), "accel": accel,
        "throughput_mib_s_qemu": r(tpq), "rtt_ms_qemu": r(rttq), "accel_qemu": accelq,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
