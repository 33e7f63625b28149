"""The seam between a machine and whatever runs its CPUs (KVM or the emulator)."""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from boite.machine.machine import Machine


class StopReason(enum.Enum):
    SHUTDOWN = "shutdown"  # guest powered off (init, ACPI-less poweroff port, debug-exit)
    RESET = "reset"  # guest asked for a reset (i8042 pulse, triple fault on hardware)
    PAUSED = "paused"  # the VMM asked the vCPUs to stop
    HALTED = "halted"  # every vCPU halted with interrupts off: nothing can wake it
    ERROR = "error"  # guest error: emulation failure, internal error


@dataclass
class RunResult:
    reason: StopReason
    exit_status: int = 0
    detail: str = ""


class Accelerator(abc.ABC):
    """Runs a Machine's vCPUs. Never holds device logic: every port and MMIO access goes
    to machine.pio / machine.mmio, every interrupt comes from machine IRQ lines."""

    name = "accel"

    @abc.abstractmethod
    def create(self, machine: Machine, config: Any) -> None: ...

    @abc.abstractmethod
    def run(self) -> RunResult:
        """Run until the machine stops, is paused, or the guest fails."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Ask the vCPUs to stop; run() returns with StopReason.PAUSED. Thread-safe."""

    @abc.abstractmethod
    def save_cpu_state(self) -> list[dict[str, Any]]:
        """One dict per vCPU in boite's accelerator-neutral CPU-state format."""

    @abc.abstractmethod
    def load_cpu_state(self, state: list[dict[str, Any]]) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional
        pass
