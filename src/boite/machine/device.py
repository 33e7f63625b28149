"""What every device is: registers on a bus, and its state as plain data."""

from __future__ import annotations

from typing import Any


class Device:
    """Base for devices. State is plain data (dict of ints/bytes/lists) so snapshots can
    store it; `load_state(save_state())` must give back an identical device."""

    name = "device"

    def reset(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}.reset")

    def save_state(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.save_state")

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.load_state")

    def bus_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bus_write(self, offset: int, size: int, value: int) -> None:
        pass
