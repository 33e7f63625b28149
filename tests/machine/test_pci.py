"""PCI bus 0 through configuration mechanism #1, BAR sizing and mapping, PIRQ routing and
the PIIX4 ACPI PM block, driven through the machine's ports as a firmware would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from boite.machine.builder import build_machine
from boite.machine.machine import Machine
from boite.machine.pci import BAR_IO, BAR_MEM, Bar, PciFunction


def cfg_addr(slot: int, fn: int, reg: int) -> int:
    return 0x8000_0000 | (slot << 11) | (fn << 8) | (reg & 0xFC)


def cfg_read(m: Machine, slot: int, fn: int, reg: int, size: int = 4) -> int:
    m.pio.write(0xCF8, 4, cfg_addr(slot, fn, reg))
    return m.pio.read(0xCFC + (reg & 3), size)


def cfg_write(m: Machine, slot: int, fn: int, reg: int, value: int, size: int = 4) -> None:
    m.pio.write(0xCF8, 4, cfg_addr(slot, fn, reg))
    m.pio.write(0xCFC + (reg & 3), size, value)


class Regs:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def bus_read(self, offset: int, size: int) -> int:
        return 0xA0 + offset

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, value))


class Probe(PciFunction):
    def __init__(self) -> None:
        self.io, self.mem = Regs(), Regs()
        super().__init__(
            0x1234, 0x5678, 0xFF0000, interrupt_pin=1,
            bars={0: Bar(BAR_IO, 32, self.io), 1: Bar(BAR_MEM, 4096, self.mem)},
        )  # fmt: skip


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = build_machine(32)
    yield m
    m.memory.close()


def test_the_board_enumerates_as_qemus_i440fx(machine: Machine) -> None:
    assert cfg_read(machine, 0, 0, 0) == 0x1237_8086
    assert cfg_read(machine, 0, 0, 0x2C) == 0x1100_1AF4  # SeaBIOS checks these
    assert cfg_read(machine, 1, 0, 0) == 0x7000_8086
    assert cfg_read(machine, 1, 0, 0x0E, 1) & 0x80  # multi-function
    assert cfg_read(machine, 1, 3, 0) == 0x7113_8086
    assert cfg_read(machine, 5, 0, 0) == 0xFFFF_FFFF  # empty slot
    machine.pio.write(0xCF8, 4, 0x8001_0000)  # bus 1 does not exist
    assert machine.pio.read(0xCFC, 4) == 0xFFFF_FFFF
    # 0xCF9 is still the reset control register beside the address port
    machine.pio.write(0xCF9, 1, 0x06)
    assert machine.reset_requested


def test_bars_are_sized_and_mapped_only_where_the_firmware_puts_them(machine: Machine) -> None:
    dev = Probe()
    machine.attach("probe", dev, pci=(3, 0))
    cfg_write(machine, 3, 0, 0x10, 0xFFFF_FFFF)
    assert cfg_read(machine, 3, 0, 0x10) == 0xFFFF_FFE1  # 32 bytes of I/O
    cfg_write(machine, 3, 0, 0x14, 0xFFFF_FFFF)
    assert cfg_read(machine, 3, 0, 0x14) == 0xFFFF_F000  # 4 KiB of memory
    cfg_write(machine, 3, 0, 0x10, 0xC000)
    cfg_write(machine, 3, 0, 0x14, 0xE000_0000)
    assert machine.pio.read(0xC004, 1) == 0xFF  # not decoded until the command enables it
    cfg_write(machine, 3, 0, 0x04, 0x3, size=2)
    assert machine.pio.read(0xC004, 1) == 0xA4
    assert machine.mmio.read(0xE000_0010, 4) == 0xB0
    cfg_write(machine, 3, 0, 0x10, 0xD000)  # moved
    assert machine.pio.read(0xC004, 1) == 0xFF and machine.pio.read(0xD000, 1) == 0xA0
    cfg_write(machine, 3, 0, 0x14, 0xFEC0_0000)  # onto the IOAPIC: left unmapped, no crash
    assert machine.mmio.read(0xE000_0010, 4) == 0xFFFF_FFFF
    assert machine.devices["ioapic"] is machine.mmio.find(0xFEC0_0000)[1]  # type: ignore[index]


def test_intx_goes_through_the_pirq_route_to_the_isa_irq(machine: Machine) -> None:
    dev = Probe()
    machine.attach("probe", dev, pci=(3, 0))
    seen: list[tuple[int, bool]] = []
    machine.irqs.attach(lambda gsi, level: seen.append((gsi, level)) if gsi == 11 else None)
    dev.set_intx(True)
    assert seen == []  # PIRQ not routed yet
    pirq = (3 - 1 + 0) & 3  # slot 3, INTA -> PIRQC
    cfg_write(machine, 1, 0, 0x60 + pirq, 11, size=1)
    assert seen == [(11, True)]
    other = Probe()
    machine.attach("probe2", other, pci=(7, 0))  # slot 7 INTA -> PIRQC too: shared
    other.set_intx(True)
    dev.set_intx(False)
    assert seen == [(11, True)]  # still held by the other device
    cfg_write(machine, 3, 0, 0x04, 0x400, size=2)
    other.set_intx(False)
    assert seen[-1] == (11, False)


def test_acpi_pm_block_timer_power_button_and_s5(machine: Machine) -> None:
    cfg_write(machine, 1, 3, 0x40, 0xB001)
    assert machine.pio.read(0xB008, 4) == 0xFFFF_FFFF  # not enabled yet
    cfg_write(machine, 1, 3, 0x80, 1, size=1)
    t1 = machine.pio.read(0xB008, 4)
    assert t1 < 1 << 24
    assert machine.pio.read(0xB004, 2) & 1  # SCI_EN: ACPI mode from reset
    sci: list[bool] = []
    machine.irqs.attach(lambda gsi, level: sci.append(level) if gsi == 9 else None)
    assert machine.press_power_button() is False  # nobody listening yet
    machine.pio.write(0xB000, 2, 0x100)  # clear PWRBTN_STS
    machine.pio.write(0xB002, 2, 0x100)  # the OS enables the button event
    assert machine.press_power_button() is True
    assert sci == [True] and machine.pio.read(0xB000, 2) & 0x100
    machine.pio.write(0xB000, 2, 0x100)
    assert sci == [True, False]
    assert machine.exit_status is None
    machine.pio.write(0xB004, 2, (0 << 10) | (1 << 13))  # SLP_TYP 0 (\_S5) + SLP_EN
    assert machine.exit_status == 0
    assert machine.poweroff_route == "ACPI S5 via PM1a_CNT"  # for the log and `boite stop`


def test_pci_state_round_trips_and_refuses_another_function(machine: Machine) -> None:
    cfg_write(machine, 1, 0, 0x60, 0x0B0A0B0A)
    state = machine.save_device_state()
    other = build_machine(32)
    try:
        other.load_device_state(state)
        assert cfg_read(other, 1, 0, 0x60) == 0x0B0A0B0A
        bad = dict(state["piix3-isa"], config="00" * 256)
        with pytest.raises(Exception, match="another function"):
            other.devices["piix3-isa"].load_state(bad)
    finally:
        other.memory.close()
