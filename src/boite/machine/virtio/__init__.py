"""Para-virtual devices: the virtio-mmio transport, split virtqueues, and the device types."""

from boite.machine.virtio.mmio import MMIO_SIZE, VirtioBackend, VirtioMmio, mmio_cmdline
from boite.machine.virtio.queue import DescChain, VirtQueue, VirtQueueError

__all__ = [
    "MMIO_SIZE",
    "DescChain",
    "VirtQueue",
    "VirtQueueError",
    "VirtioBackend",
    "VirtioMmio",
    "mmio_cmdline",
]
