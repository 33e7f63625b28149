"""virtio-rng (virtio 1.x, section 5.4): entropy from the host's urandom."""

from __future__ import annotations

import os

from boite.machine.virtio.mmio import VIRTIO_ID_RNG, VirtioBackend
from boite.machine.virtio.queue import VirtQueue

MAX_PER_REQUEST = 64 << 10  # Linux asks for at most a page or so at a time


class VirtioRng(VirtioBackend):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"
    queue_sizes = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.bytes_served = 0

    def notify(self, queue: VirtQueue) -> None:
        done = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            written = 0
            for v in chain.writable:
                n = min(len(v), MAX_PER_REQUEST - written)
                if n <= 0:
                    break
                v[:n] = os.urandom(n)
                written += n
            self.bytes_served += written
            self.used(queue, chain.head, written)
            done = True
        if done:
            self.signal(queue)
