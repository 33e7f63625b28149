"""Run the counting guest in a box's VMM and take a memory snapshot or suspend it.

    python livebox.py BOX_DIR snapshot|suspend ACCEL

A child process for the live kill tests: it runs to the point where the guest has counted
to 300, then does the operation (which the test may SIGKILL at any moment) and exits 0.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent / "src")]

from boite.box import Box  # noqa: E402
from boite.snapshot import snapshot_running, suspend_running  # noqa: E402
from boite.vmm import Vmm  # noqa: E402
from guests.runner import build_guest_machine  # noqa: E402


class PauseAt:
    def __init__(self, value: int) -> None:
        self.value = value
        self.vmm: Vmm | None = None

    def bus_read(self, offset: int, size: int) -> int:
        return 0

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if value == self.value and self.vmm is not None:
            self.vmm.pause()


def main() -> int:
    box_dir, op, accel = sys.argv[1], sys.argv[2], sys.argv[3]
    box = Box.open(box_dir)
    port = PauseAt(300)

    def build():
        machine, _, _ = build_guest_machine("count32", "flat32", LIMIT=1_000_000_000)
        machine.pio.register(0x510, 4, port)
        return machine

    if accel == "kvm":
        from boite.accel.kvm import KvmAccelerator

        factory = lambda: KvmAccelerator(irqchip=False)  # noqa: E731
    else:
        from boite.accel.emu import EmuAccelerator

        factory = EmuAccelerator
    vmm = Vmm(build, factory, name=box.name)
    port.vmm = vmm
    with box.acquire_lock(register=False):
        t = threading.Thread(target=vmm.run, daemon=True)
        t.start()
        while vmm.state.value != "paused":
            time.sleep(0.002)
        print("paused", flush=True)  # the test starts its clock here
        if op == "snapshot":
            snapshot_running(vmm, box, "live", memory=True)
            vmm.stop()
        else:
            suspend_running(vmm, box)
        t.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
