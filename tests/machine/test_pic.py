"""8259A pair: initialisation, priority, EOI, masks, ELCR and the INTA cycle."""

from __future__ import annotations

from boite.machine.devices.pic import DualPic


def init_pc(pic: DualPic, master_icw4: int = 0x01, slave_icw4: int = 0x01) -> None:
    """The classic PC sequence (as Linux's init_8259A): vectors 0x20/0x28, cascade on 2."""
    m, s = pic.bus_view("master"), pic.bus_view("slave")
    m.bus_write(0, 1, 0x11)
    m.bus_write(1, 1, 0x20)
    m.bus_write(1, 1, 0x04)
    m.bus_write(1, 1, master_icw4)
    s.bus_write(0, 1, 0x11)
    s.bus_write(1, 1, 0x28)
    s.bus_write(1, 1, 0x02)
    s.bus_write(1, 1, slave_icw4)
    m.bus_write(1, 1, 0x00)
    s.bus_write(1, 1, 0x00)


def eoi(pic: DualPic, which: str = "master") -> None:
    pic.bus_view(which).bus_write(0, 1, 0x20)


def read_isr(pic: DualPic, which: str = "master") -> int:
    v = pic.bus_view(which)
    v.bus_write(0, 1, 0x0B)
    isr = v.bus_read(0, 1)
    v.bus_write(0, 1, 0x0A)
    return isr


def test_edge_irq_gives_vector_and_sets_isr():
    intr: list[bool] = []
    pic = DualPic(on_intr=intr.append)
    init_pc(pic)
    assert not pic.pending()
    pic.set_irq(1, True)
    assert pic.pending() and intr == [True]
    assert pic.bus_view("master").bus_read(0, 1) == 0x02  # IRR
    assert pic.acknowledge() == 0x21
    assert read_isr(pic) == 0x02 and not pic.pending()
    pic.set_irq(1, False)
    pic.set_irq(1, True)  # another edge while in service: waits for EOI
    assert not pic.pending()
    eoi(pic)
    assert pic.pending() and pic.acknowledge() == 0x21


def test_priority_and_nesting():
    pic = DualPic()
    init_pc(pic)
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x24
    pic.set_irq(3, True)  # higher priority than 4: nests
    pic.set_irq(5, True)  # lower: waits
    assert pic.pending() and pic.acknowledge() == 0x23
    assert read_isr(pic) == 0x18
    assert not pic.pending()
    eoi(pic)  # non-specific EOI clears the highest in-service (3)
    assert read_isr(pic) == 0x10 and not pic.pending()
    eoi(pic)
    assert pic.acknowledge() == 0x25


def test_mask_and_specific_eoi():
    pic = DualPic()
    init_pc(pic)
    m = pic.bus_view("master")
    m.bus_write(1, 1, 0x01)  # mask IRQ 0
    pic.set_irq(0, True)
    assert not pic.pending()
    assert m.bus_read(1, 1) == 0x01
    m.bus_write(1, 1, 0x00)
    assert pic.pending() and pic.acknowledge() == 0x20
    m.bus_write(0, 1, 0x60)  # specific EOI for IRQ 0
    assert read_isr(pic) == 0


def test_cascade_through_irq2():
    pic = DualPic()
    init_pc(pic)
    pic.set_irq(12, True)
    assert pic.pending()
    assert pic.acknowledge() == 0x2C
    assert read_isr(pic, "master") == 0x04 and read_isr(pic, "slave") == 0x10
    eoi(pic, "slave")
    eoi(pic, "master")
    assert read_isr(pic, "master") == 0 and read_isr(pic, "slave") == 0


def test_spurious_irq7_and_irq15():
    pic = DualPic()
    init_pc(pic)
    pic.bus_view("elcr").bus_write(0, 1, 0x20)  # IRQ 5 level-triggered
    pic.set_irq(5, True)
    assert pic.pending()
    pic.set_irq(5, False)  # withdrawn before INTA
    assert pic.acknowledge() == 0x27  # spurious IRQ 7, ISR untouched
    assert read_isr(pic) == 0
    pic.bus_view("elcr").bus_write(1, 1, 0x08)  # IRQ 11 level
    pic.set_irq(11, True)
    # the slave's request reaches the master; withdraw it at the slave only
    pic.chips[1].set_input(3, False)
    assert pic.acknowledge() == 0x2F  # spurious IRQ 15: master ISR bit 2 is set
    assert read_isr(pic, "slave") == 0 and read_isr(pic, "master") == 0x04


def test_level_triggered_stays_until_device_drops_it():
    pic = DualPic()
    init_pc(pic)
    elcr = pic.bus_view("elcr")
    elcr.bus_write(0, 2, 0xFFFF)
    assert elcr.bus_read(0, 2) == 0xDEF8  # IRQ 0-2, 8, 13 cannot be level
    pic.set_irq(10, True)
    assert pic.acknowledge() == 0x2A
    eoi(pic, "slave")
    eoi(pic, "master")
    assert pic.pending()  # still asserted: requested again
    pic.set_irq(10, False)
    # The master latched the cascade edge; the slave has nothing left: spurious IRQ 15.
    assert pic.acknowledge() == 0x2F
    assert not pic.pending()


def test_auto_eoi_and_rotation():
    pic = DualPic()
    init_pc(pic, master_icw4=0x03)  # 8086 mode, AEOI
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x26
    assert read_isr(pic) == 0  # auto-EOI never sets ISR
    m = pic.bus_view("master")
    m.bus_write(0, 1, 0x80)  # rotate in AEOI mode
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x21
    assert pic.chips[0].priority_add == 2  # IRQ 1 became the lowest priority
    pic.set_irq(0, True)
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23  # 3 now outranks 0


def test_set_priority_and_rotate_on_eoi():
    pic = DualPic()
    init_pc(pic)
    m = pic.bus_view("master")
    m.bus_write(0, 1, 0xC0 | 4)  # IRQ 4 lowest, so 5 is highest
    pic.set_irq(3, True)
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x25
    m.bus_write(0, 1, 0xA0)  # rotate on non-specific EOI: 5 becomes lowest
    assert pic.chips[0].priority_add == 6
    assert pic.acknowledge() == 0x23


def test_special_mask_mode_lets_lower_priorities_in():
    pic = DualPic()
    init_pc(pic)
    m = pic.bus_view("master")
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    pic.set_irq(5, True)
    assert not pic.pending()  # blocked by 3 in service
    m.bus_write(1, 1, 0x08)  # mask 3
    m.bus_write(0, 1, 0x68)  # set special mask mode
    assert pic.pending() and pic.acknowledge() == 0x25


def test_poll_mode():
    pic = DualPic()
    init_pc(pic)
    m = pic.bus_view("master")
    m.bus_write(0, 1, 0x0C)  # OCW3 poll
    assert m.bus_read(0, 1) == 0x00
    pic.set_irq(4, True)
    m.bus_write(0, 1, 0x0C)
    assert m.bus_read(0, 1) == 0x84
    assert read_isr(pic) == 0x10  # polling acknowledges


def test_icw1_resets_mask_and_state_round_trips():
    pic = DualPic()
    init_pc(pic)
    m = pic.bus_view("master")
    m.bus_write(1, 1, 0xFB)
    pic.set_irq(2 + 8, True)
    state = pic.save_state()
    other = DualPic()
    other.load_state(state)
    assert other.save_state() == state and other.pending() == pic.pending()
    m.bus_write(0, 1, 0x11)
    assert m.bus_read(1, 1) == 0
    pic.reset()
    assert pic.save_state()["master"]["imr"] == 0
