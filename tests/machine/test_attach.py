"""Machine.attach: one call names every role of a device."""

import pytest

from boite.machine.builder import build_machine
from boite.machine.devices.i8042 import STATUS_OBF
from boite.machine.machine import IoRange, Machine
from boite.machine.memory import GuestMemory


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def bus_read(self, offset: int, size: int) -> int:
        self.seen.append(("r", offset))
        return offset

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.seen.append(("w", offset))


def test_attach_registers_ranges_with_their_offsets() -> None:
    m = Machine(GuestMemory.with_ram(1 << 20))
    dev = Recorder()
    m.attach(
        "rec", dev, ports=[(0x60, 1), IoRange(0x64, 1, offset=4)], mmio=[(0xE000_0000, 16)], irq=7
    )
    assert m.pio.read(0x60, 1) == 0
    assert m.pio.read(0x64, 1) == 4  # the lone register sees the offset it has in the device
    m.mmio.write(0xE000_0008, 4, 1)
    assert dev.seen == [("r", 0), ("r", 4), ("w", 8)]
    assert m.irq_users(7) == ["rec"]
    assert m.wiring[0].ports == (IoRange(0x60, 1), IoRange(0x64, 1, offset=4))


def test_attach_refuses_a_used_name_and_a_second_interrupt_controller() -> None:
    m = Machine(GuestMemory.with_ram(1 << 20))
    m.attach("a", Recorder(), interrupt_controller=True)
    with pytest.raises(ValueError, match="already used"):
        m.attach("a", Recorder())
    with pytest.raises(ValueError, match="interrupt controller"):
        m.attach("b", Recorder(), interrupt_controller=True)
    with pytest.raises(ValueError, match="PCI host bridge"):
        Machine(GuestMemory.with_ram(1 << 20)).attach("c", Recorder(), pci=(3, 0))


def test_builder_names_roles_instead_of_scanning() -> None:
    m = build_machine(16)
    try:
        assert m.interrupt_controller is m.devices["pic"]
        assert {id(t) for t in m.timers} == {id(m.devices["pit"]), id(m.devices["rtc"])}
        # the i8042's status port 0x64 reaches the controller's status register
        assert m.pio.read(0x64, 1) & ~STATUS_OBF == m.devices["i8042"].bus_read(4, 1) & ~STATUS_OBF
        assert m.irq_users(8) == ["rtc"]
    finally:
        m.memory.close()
