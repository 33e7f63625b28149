"""i8042, port 0x92, power-off port, 0xCF9, isa-debug-exit and the IOAPIC."""

from __future__ import annotations

from boite.machine.devices.debugexit import IsaDebugExit
from boite.machine.devices.i8042 import I8042, SystemControlPortA
from boite.machine.devices.ioapic import IoApic, IoApicMessage
from boite.machine.devices.poweroff import POWEROFF_SIGNATURE, PowerOffPort, ResetControl
from boite.machine.irq import IrqLine
from boite.machine.machine import Machine
from boite.machine.memory import GuestMemory


def machine() -> Machine:
    return Machine(GuestMemory())


def kbc() -> tuple[I8042, Machine, IrqLine]:
    m = machine()
    line = IrqLine(1)
    return I8042(line, m), m, line


def command(dev: I8042, cmd: int, data: int | None = None) -> list[int]:
    dev.bus_write(4, 1, cmd)
    if data is not None:
        dev.bus_write(0, 1, data)
    out = []
    while dev.bus_read(4, 1) & 0x01:
        out.append(dev.bus_read(0, 1))
    return out


def test_i8042_linux_probe_sequence():
    dev, _, line = kbc()
    assert command(dev, 0xAA) == [0x55]  # self-test
    ctr = command(dev, 0x20)[0]
    assert ctr & 0x01 and ctr & 0x40  # kbd interrupt, translation
    assert command(dev, 0x60, 0x00) == []  # interrupts off while probing
    assert command(dev, 0x20) == [0x00]
    assert command(dev, 0xAB) == [0x00]  # keyboard interface test
    # no AUX port: the loopback answer lacks the AUX flag, the interface test fails fast
    dev.bus_write(4, 1, 0xD3)
    dev.bus_write(0, 1, 0x5A)
    assert dev.bus_read(4, 1) & 0x21 == 0x01
    assert dev.bus_read(0, 1) == 0x5A
    assert command(dev, 0xA9) == [0x01]
    assert command(dev, 0x60, 0x45) == []
    assert not line.level
    dev.bus_write(0, 1, 0xFF)  # keyboard reset
    assert line.level  # IRQ 1 for the ACK
    assert dev.bus_read(0, 1) == 0xFA
    assert dev.bus_read(0, 1) == 0xAA
    assert not line.level and not dev.bus_read(4, 1) & 1
    dev.bus_write(0, 1, 0xF2)  # identify
    assert [dev.bus_read(0, 1) for _ in range(3)] == [0xFA, 0xAB, 0x83]
    dev.bus_write(0, 1, 0xED)  # LEDs
    dev.bus_write(0, 1, 0x07)
    assert [dev.bus_read(0, 1) for _ in range(2)] == [0xFA, 0xFA]
    dev.bus_write(0, 1, 0xF0)  # get scan code set
    dev.bus_write(0, 1, 0x00)
    assert [dev.bus_read(0, 1) for _ in range(3)] == [0xFA, 0xFA, 0x02]
    dev.bus_write(0, 1, 0x12)
    assert dev.bus_read(0, 1) == 0xFE  # unknown: resend


def test_i8042_status_command_flag_and_scancodes():
    dev, _, line = kbc()
    dev.bus_write(4, 1, 0xAE)
    assert dev.bus_read(4, 1) & 0x08
    dev.inject_scancodes(b"\x1e\x9e")  # 'a' make and break in set 1
    assert line.level
    assert dev.bus_read(0, 1) == 0x1E and dev.bus_read(0, 1) == 0x9E
    command(dev, 0xAD)  # disable keyboard: bytes wait
    dev.inject_scancodes(b"\x30")
    assert not dev.bus_read(4, 1) & 1
    assert command(dev, 0xAE) == [0x30]
    state = dev.save_state()
    other = I8042(IrqLine(1))
    other.load_state(state)
    assert other.save_state() == state


def test_i8042_reset_pulse_and_output_port():
    dev, m, _ = kbc()
    a20: list[bool] = []
    dev.on_a20 = a20.append
    assert command(dev, 0xD0) == [0x03]
    command(dev, 0xD1, 0x01)  # A20 off
    assert a20 == [False] and not dev.a20_enabled and not m.reset_requested
    command(dev, 0xFE)
    assert m.reset_requested
    m2 = machine()
    dev2 = I8042(IrqLine(1), m2)
    command(dev2, 0xD1, 0x02)  # output port bit 0 low: reset
    assert m2.reset_requested


def test_port92_fast_a20_and_reset():
    m = machine()
    p = SystemControlPortA(m)
    assert p.bus_read(0, 1) == 0x02 and p.a20_enabled
    p.bus_write(0, 1, 0x00)
    assert not p.a20_enabled and not m.reset_requested
    p.bus_write(0, 1, 0x03)
    assert m.reset_requested and p.a20_enabled


def test_poweroff_port_and_reset_control():
    m = machine()
    port = PowerOffPort(m)
    assert port.bus_read(0, 4) == POWEROFF_SIGNATURE
    assert port.bus_read(0, 1) == ord("B")
    port.bus_write(0, 1, 0)
    assert m.exit_status == 0
    m2 = machine()
    rcr = ResetControl(m2)
    rcr.bus_write(0, 1, 0x02)  # select hard reset (Linux reboot=pci)
    assert not m2.reset_requested and rcr.bus_read(0, 1) == 0x02
    rcr.bus_write(0, 1, 0x06)
    assert m2.reset_requested


def test_debug_exit_status_is_value_shifted_or_one():
    for value, size, status in ((0, 1, 1), (0x10, 1, 0x21), (0x1234, 2, 0x2469)):
        m = machine()
        IsaDebugExit(m, iosize=size).bus_write(0, size, value)
        assert m.exit_status == status
    m = machine()
    dev = IsaDebugExit(m)
    dev.bus_write(0, 1, 1)
    dev.bus_write(0, 1, 5)  # the first exit wins
    assert m.exit_status == 3


def ioapic_write(io: IoApic, index: int, value: int) -> None:
    io.bus_write(0x00, 4, index)
    io.bus_write(0x10, 4, value)


def ioapic_read(io: IoApic, index: int) -> int:
    io.bus_write(0x00, 4, index)
    return io.bus_read(0x10, 4)


def test_ioapic_registers_and_edge_delivery():
    got: list[IoApicMessage] = []
    io = IoApic(got.append)
    assert ioapic_read(io, 0x01) == 0x00170020  # 24 entries, version 0x20
    assert ioapic_read(io, 0x10) & (1 << 16)  # masked at reset
    io.set_irq(4, True)
    assert got == []  # masked edge is lost
    io.set_irq(4, False)
    ioapic_write(io, 0x19, 0x03 << 24)  # pin 4: entry at 0x18/0x19
    ioapic_write(io, 0x18, 0x31)
    assert ioapic_read(io, 0x19) == 0x03 << 24
    io.set_irq(4, True)
    assert got == [IoApicMessage(0x31, 0, 3, False, False, 4)]
    io.set_irq(4, True)  # no new edge
    assert len(got) == 1


def test_ioapic_level_remote_irr_and_eoi():
    got: list[IoApicMessage] = []
    io = IoApic(got.append)
    # Level, active low (what Linux gives a PCI INTx without a _PRT entry): the lines
    # carry "asserted", so the polarity is read back but never inverts the pin (an idle
    # line seen as asserted was an endless interrupt storm), as in QEMU and KVM.
    ioapic_write(io, 0x10 + 2 * 10, 0x41 | (1 << 15) | (1 << 13))
    assert got == [] and ioapic_read(io, 0x10 + 2 * 10) & (1 << 13)
    io.set_irq(10, True)
    assert len(got) == 1 and got[0].level_triggered
    assert ioapic_read(io, 0x10 + 2 * 10) & (1 << 14)  # remote IRR
    io.eoi(0x41)
    assert len(got) == 2  # still asserted: delivered again
    io.set_irq(10, False)
    io.bus_write(0x40, 4, 0x41)  # EOI register
    assert len(got) == 2
    assert not ioapic_read(io, 0x10 + 2 * 10) & (1 << 14)
    state = io.save_state()
    other = IoApic()
    other.load_state(state)
    assert other.save_state() == state


def test_fw_cfg_items_and_rewind():
    from boite.machine.devices.fwcfg import FwCfg

    fw = FwCfg(ram_size=96 << 20, num_cpus=3)
    fw.bus_write(0, 2, 0x0000)
    assert bytes(fw.bus_read(1, 1) for _ in range(6)) == b"QEMU\0\0"  # zeros past the end
    fw.bus_write(0, 2, 0x0003)
    assert fw.bus_read(1, 4) == 96 << 20 and fw.bus_read(1, 4) == 0
    fw.bus_write(0, 2, 0x0005)
    first = fw.bus_read(1, 1)
    state = fw.save_state()
    fw.bus_write(0, 2, 0x0005)  # selecting rewinds
    assert fw.bus_read(1, 2) == 3 and first == 3
    fw.bus_write(1, 1, 0xAA)  # data writes are ignored
    fw.bus_write(0, 2, 0x0019)
    assert fw.bus_read(1, 4) == 0  # empty file directory
    fw.load_state(state)
    assert fw.bus_read(1, 1) == 0  # second byte of NB_CPUS
    fw.bus_write(0, 2, 0x1234)
    assert fw.bus_read(1, 4) == 0  # unknown item


def test_i8042_replies_are_bounded():
    dev, _, _ = kbc()
    for _ in range(10_000):
        dev.bus_write(4, 1, 0x20)  # read command byte, never read back
    assert len(dev.out) <= 256
