"""The assembled machine: port map, e820, IRQ wiring, hooks, state as plain data."""

from __future__ import annotations

import json

import pytest

from boite.errors import ConfigError
from boite.machine.builder import build_machine, machine_from_box, pc_e820
from boite.machine.devices.uart import ConsoleBackend
from boite.machine.machine import E820_RAM, E820_RESERVED

from .machine_kernels import *  # noqa: F403 - the fixtures


def test_e820_has_the_pc_holes():
    assert [(e.addr, e.size, e.type) for e in pc_e820(64 << 20)] == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x60400, E820_RESERVED),
        (0x100000, (64 << 20) - 0x100000, E820_RAM),
    ]
    big = pc_e820(4 << 30)
    assert (big[2].addr + big[2].size, big[3].addr, big[3].size) == (
        0xC000_0000, 1 << 32, 1 << 30,
    )  # fmt: skip


def test_devices_on_their_ports_and_uart_interrupt_reaches_the_pic():
    con = ConsoleBackend()
    m = build_machine(16, serial_backends=[con, None, None, ConsoleBackend()])
    pio = m.pio
    # COM1 present, COM2 absent (floating bus), COM4 present
    pio.write(0x3F8 + 7, 1, 0x5A)
    assert pio.read(0x3F8 + 7, 1) == 0x5A
    assert pio.read(0x2F8 + 5, 1) == 0xFF
    assert pio.read(0x2E8 + 5, 1) & 0x60 == 0x60
    # program the PICs as Linux does, then let COM1 interrupt on THRE
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01),
                        (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01),
                        (0x21, 0x00), (0xA1, 0x00)):  # fmt: skip
        pio.write(port, 1, value)
    pic = m.devices["pic"]
    assert not pic.pending()
    pio.write(0x3F9, 1, 0x02)  # IER: THRE
    assert pic.pending() and pic.acknowledge() == 0x34  # IRQ 4
    for b in b"ok":
        pio.write(0x3F8, 1, b)
    assert con.buffered() == b"ok"
    # the i8042 answers on 0x60/0x64 around port B at 0x61
    pio.write(0x64, 1, 0xAA)
    assert pio.read(0x64, 1) & 1 and pio.read(0x60, 1) == 0x55
    assert pio.read(0x61, 1) & 0x01 == 0
    # RTC memory size bytes from the RAM size
    pio.write(0x70, 1, 0x30)
    assert pio.read(0x71, 1) | 0 == (15 * 1024) & 0xFF
    assert m.mmio.read(0xFEC00010, 4) == 0  # IOAPIC ID through IOWIN
    m.memory.close()


def test_exits_through_the_bus():
    m = build_machine(8)
    m.pio.write(0xF4, 4, 0x10)
    assert m.exit_status == 0x21
    m = build_machine(8)
    assert m.pio.read(0x505, 4) == int.from_bytes(b"BOOT", "little")
    m.pio.write(0x505, 1, 0)
    assert m.exit_status == 0
    m = build_machine(8)
    m.pio.write(0x64, 1, 0xFE)
    assert m.reset_requested
    m = build_machine(8)
    m.pio.write(0xCF9, 1, 0x06)
    assert m.reset_requested


def test_pit_irq0_reaches_pic_and_ioapic_pin2():
    now = [0]
    m = build_machine(8, clock_ns=lambda: now[0])
    pio = m.pio
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        pio.write(port, 1, value)
    delivered = []
    ioapic = m.devices["ioapic"]
    ioapic.deliver = delivered.append
    m.mmio.write(0xFEC00000, 4, 0x14)  # pin 2 low word
    m.mmio.write(0xFEC00010, 4, 0x30)
    pio.write(0x43, 1, 0x34)
    pio.write(0x40, 1, 0x9C)
    pio.write(0x40, 1, 0x2E)  # 11932: 100 Hz
    pit = m.devices["pit"]
    delivered.clear()
    now[0] = pit.next_deadline_ns()
    assert pit.advance()
    assert m.devices["pic"].acknowledge() == 0x20
    assert [d.vector for d in delivered] == [0x30] and delivered[0].pin == 2


def test_without_emulated_irqchip_the_router_is_free():
    m = build_machine(8, emulated_irqchip=False)
    assert "pic" not in m.devices and "pit" not in m.devices
    seen = []
    m.irqs.attach(lambda gsi, level: seen.append((gsi, level)))
    m.devices["i8042"].inject_scancodes(b"\x1e")
    assert seen == [(1, True)]


def test_extra_devices_hook_adds_cmdline(multiboot_kernels):
    class Blob:
        def bus_read(self, offset, size):
            return 0x74726976

        def bus_write(self, offset, size, value):
            pass

    def add_virtio(machine):
        machine.mmio.register(0xD000_0000, 0x1000, Blob())
        return "virtio_mmio.device=4K@0xd0000000:5"

    m = build_machine(
        16, kernel=multiboot_kernels["aout"], cmdline="x=1", extra_devices=[add_virtio]
    )
    info = 0x9000
    addr = m.memory.read_u32(info + 16)
    text = m.memory.read(addr, 200).split(b"\0")[0].decode()
    assert text.endswith(" x=1 virtio_mmio.device=4K@0xd0000000:5")
    assert m.mmio.read(0xD000_0000, 4) == 0x74726976


def test_state_is_plain_data_and_round_trips():
    m = build_machine(16, serial_backends=[ConsoleBackend()])
    m.pio.write(0x3F8 + 7, 1, 0x77)
    m.pio.write(0x43, 1, 0x34)
    state = m.save_device_state()
    text = json.dumps(state)
    m2 = build_machine(16, serial_backends=[ConsoleBackend()])
    m2.load_device_state(json.loads(text))
    assert m2.pio.read(0x3F8 + 7, 1) == 0x77
    assert json.loads(json.dumps(m2.save_device_state()))["com1"] == state["com1"]
    m2.reset_devices()
    assert m2.pio.read(0x3F8 + 7, 1) == 0


def test_bad_configs():
    with pytest.raises(ConfigError, match="at least 4 MB"):
        build_machine(1)
    with pytest.raises(ConfigError, match="COM5"):
        build_machine(8, serial_backends={5: ConsoleBackend()})
    with pytest.raises(ConfigError, match="without a kernel"):
        build_machine(8, initrd="/x")
    with pytest.raises(ConfigError, match="cannot map"):
        build_machine(1 << 40)  # an exabyte of RAM


def test_machine_from_box(tmp_path, multiboot_kernels):
    from boite.box.box import Box
    from boite.box.nvram import Nvram

    box = Box.create(tmp_path / "mb", memsize_mb=32, cpus=2, disk_size=None)
    vmx = box.config.vmx
    vmx["serial1.present"] = "TRUE"
    vmx["serial1.fileType"] = "file"
    vmx["serial1.fileName"] = "com2.log"
    vmx["boite.kernel"] = str(multiboot_kernels["aout"])
    vmx["boite.cmdline"] = "from=box"
    box.save()
    box = Box.open(tmp_path / "mb")
    con = ConsoleBackend()
    m = build_machine(box=box, console=con)
    assert m.num_vcpus == 2 and m.memory.size == 32 << 20
    com1 = m.devices["com1"].backend
    assert con in com1.backends  # the console, teed with the default box's serial0.log
    m.pio.write(0x3F8, 1, ord("!"))
    assert con.buffered() == b"!"
    con.send(b"i")
    assert m.pio.read(0x3F8, 1) == ord("i")
    com1.close()
    assert (box.dir / "serial0.log").read_bytes() == b"!"
    for b in b"two":
        m.pio.write(0x2F8, 1, b)
    m.devices["com2"].backend.close()
    assert (box.dir / "com2.log").read_bytes() == b"two"
    cmd = m.memory.read_u32(0x9000 + 16)
    assert m.memory.read(cmd, 200).split(b"\0")[0].decode().endswith(" from=box")
    # a guest write to CMOS RAM lands in the box's .nvram
    m.pio.write(0x70, 1, 0x50)
    m.pio.write(0x71, 1, 0xAB)
    m.devices["rtc"].close()  # what the VMM does at power-off: pending changes are saved
    assert Nvram.load(box.nvram_path).cmos[0x50] == 0xAB
    m.memory.close()
    m2 = machine_from_box(Box.open(tmp_path / "mb"))
    m2.pio.write(0x70, 1, 0x50)
    assert m2.pio.read(0x71, 1) == 0xAB  # back from the .nvram at the next power-on
    m2.memory.close()


def test_box_serial_types_checked(tmp_path):
    from boite.box.box import Box

    box = Box.create(tmp_path / "s", memsize_mb=16, disk_size=None)
    box.config.vmx["serial0.present"] = "TRUE"
    box.config.vmx["serial0.fileType"] = "network"
    with pytest.raises(ConfigError, match="serial0.fileType = 'network'"):
        machine_from_box(box)
