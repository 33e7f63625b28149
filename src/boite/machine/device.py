"""What every device is: registers on a bus, and its state as a checked record."""

from __future__ import annotations

from typing import Any

from boite.machine.state import KeepsNoState, StateRecord


class Device:
    """Base for devices. State is a `StateRecord` (machine/state.py) saved as plain data;
    `load_state(save_state())` must give back an identical device.

    Restoring is two steps, so that a machine restores all or nothing:
    `check_state(data)` checks everything (raising CheckpointError naming the field) and
    changes nothing; `apply_state(record)` then puts the checked record in place."""

    name = "device"

    def reset(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}.reset")

    def save_state(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.save_state")

    def check_state(self, state: Any) -> StateRecord:
        raise NotImplementedError(f"{type(self).__name__}.check_state")

    def apply_state(self, record: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}.apply_state")

    def load_state(self, state: Any) -> None:
        self.apply_state(self.check_state(state))

    def bus_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bus_write(self, offset: int, size: int, value: int) -> None:
        pass


class StatelessDevice(KeepsNoState, Device):
    """A device whose behaviour depends on nothing but its configuration (a port that
    powers off, the debug exit): its record is empty, but still versioned and checked."""

    def reset(self) -> None:
        pass
