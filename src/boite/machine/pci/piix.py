"""The PIIX south bridge functions in slot 1, as on QEMU's i440FX board.

- 00:01.0 `Piix3IsaBridge` (8086:7000): PIRQ routing. Registers 0x60-0x63 (PIRQRC[A:D])
  route PCI interrupt wires A-D to an ISA IRQ (bit 7 set: not routed). The ISA IRQ goes
  to the 8259 and, by the same number, to the IOAPIC pin (the ACPI MADT says those pins
  are level-triggered, active high, as QEMU's does). A device in slot S raising pin P
  (1=INTA) drives PIRQ (S - 1 + P - 1) mod 4, SeaBIOS's and QEMU's swizzle. Several
  devices share a PIRQ and several PIRQs an IRQ: the IRQ is the OR of its wires.
- 00:01.3 `Piix4Pm` (8086:7113): the ACPI power-management block at the I/O base the
  firmware writes to PMBA (0x40) once PMREGMISC (0x80) bit 0 enables it: PM1a event
  (status 0x00, enable 0x02), PM1a control 0x04, the 24-bit PM timer 0x08 (3.579545 MHz),
  GPE0 status/enable 0x0C/0x0E. The SCI is ISA IRQ 9. PWRBTN_STS is set by
  `press_power_button()`; SLP_EN with SLP_TYP 0 (the DSDT's \\_S5) powers the machine off.
  SMI_CMD is 0 in the FADT, so the block is in ACPI mode from reset (SCI_EN set), and
  DEVACTB's APMC_EN (0x5B bit 1) reads set, which tells SeaBIOS that SMM needs no setup
  (there is no SMM), as QEMU does with SMM off.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from boite.machine.bus import BusWindow
from boite.machine.irq import IrqLine
from boite.machine.pci.function import PciFunction
from boite.machine.state import Int, StateRecord, items, uint

PIIX_PIRQRC = 0x60
PIRQ_DISABLED = 0x80

PM_BASE_REG = 0x40  # PMBA
PM_MISC_REG = 0x80  # PMREGMISC: bit 0 enables the PM I/O space
PM_DEVACTB = 0x58
PM_SIZE = 0x40
DEFAULT_PM_BASE = 0x600  # what SeaBIOS writes to PMBA on an i440FX; the FADT names it
SCI_IRQ = 9
PM_TIMER_HZ = 3_579_545

PM1_STS, PM1_EN, PM1_CNT, PM_TMR, GPE0_STS, GPE0_EN = 0x00, 0x02, 0x04, 0x08, 0x0C, 0x0E
TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8
WAK_STS = 1 << 15
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_EN = 1 << 13
S5_SLP_TYP = 0


class Piix3IsaBridge(PciFunction):
    name = "piix3-isa"

    def __init__(self, isa_irq: Callable[[int], IrqLine]) -> None:
        super().__init__(0x8086, 0x7000, 0x060100, header_type=0x80)  # multi-function
        self.isa_irq = isa_irq
        self._lock = threading.Lock()
        # Asserted INTx wires: (slot, pin) per PIRQ.
        self.asserted: list[set[tuple[int, int]]] = [set(), set(), set(), set()]
        self._driven: set[int] = set()  # ISA IRQs we hold high

    def _defaults(self) -> None:
        super()._defaults()
        self.config[PIIX_PIRQRC : PIIX_PIRQRC + 4] = bytes([PIRQ_DISABLED] * 4)
        self.writable(PIIX_PIRQRC, b"\x8f" * 4)

    def route(self, pirq: int) -> int | None:
        v = self.config[PIIX_PIRQRC + pirq]
        return None if v & PIRQ_DISABLED or v & 0xF in (0, 1, 2, 8, 13) else v & 0xF

    def intx(self, slot: int, pin: int, level: bool) -> None:
        """PciBus.intx_sink: the INTx wire `pin` (1-4) of the device in `slot`."""
        if not 1 <= pin <= 4:
            return
        pirq = (slot - 1 + pin - 1) & 3
        with self._lock:
            if level:
                self.asserted[pirq].add((slot, pin))
            else:
                self.asserted[pirq].discard((slot, pin))
        self._update()

    def _update(self) -> None:
        with self._lock:
            want = {self.route(p) for p in range(4) if self.asserted[p]} - {None}
            raise_ = want - self._driven
            lower = self._driven - want
            self._driven = {irq for irq in want if irq is not None}
        for irq in lower:
            if irq is not None:
                self.isa_irq(irq).lower()
        for irq in raise_:
            if irq is not None:
                self.isa_irq(irq).raise_()

    def config_written(self, offset: int, size: int) -> None:
        if offset < PIIX_PIRQRC + 4 and offset + size > PIIX_PIRQRC:
            self._update()

    def reset(self) -> None:
        super().reset()
        self._update()

    def apply_state(self, rec: Any) -> None:
        super().apply_state(rec)
        self._update()


class Piix4Pm(PciFunction):
    name = "piix4-pm"

    def __init__(
        self,
        sci: IrqLine,
        *,
        on_poweroff: Callable[[], None],
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.sci = sci
        self.on_poweroff = on_poweroff
        self.clock_ns = clock_ns
        self.registers = BusWindow(self.pm_read, self.pm_write)
        self.mapped_at: int | None = None
        self.io_bus: Any = None  # the machine's port bus, set by the builder
        self._lock = threading.Lock()
        self.pm1_sts = self.pm1_en = self.pm1_cnt = self.gpe_sts = self.gpe_en = 0
        self._timer_origin = clock_ns()
        self._sci_level: bool | None = False
        super().__init__(0x8086, 0x7113, 0x068000, revision=0x03, interrupt_pin=1)

    def _defaults(self) -> None:
        super()._defaults()
        struct.pack_into("<I", self.config, PM_BASE_REG, 1)  # an I/O base, not yet set
        self.writable(PM_BASE_REG, b"\xc0\xff\x00\x00")
        self.writable(PM_MISC_REG, b"\x01")
        self.writable(0x90, b"\xf0\xff\x00\x00")  # SMBus base: kept, nothing behind it
        self.writable(0xD2, b"\x0f")
        self.config[PM_DEVACTB + 3] = 0x02  # APMC_EN: "SMM is set up" (there is none)
        self.config[0x3C] = SCI_IRQ
        self.pm1_sts = self.pm1_en = self.gpe_sts = self.gpe_en = 0
        self.pm1_cnt = SCI_EN

    # -- where the block is ---------------------------------------------------------------
    @property
    def pm_base(self) -> int | None:
        if not self.config[PM_MISC_REG] & 1:
            return None
        base = int(struct.unpack_from("<I", self.config, PM_BASE_REG)[0]) & 0xFFC0
        return base or None

    def _map(self) -> None:
        want = self.pm_base
        if self.io_bus is None or want == self.mapped_at:
            return
        if self.mapped_at is not None:
            self.io_bus.unregister(self.mapped_at)
            self.mapped_at = None
        if want is not None:
            try:
                self.io_bus.register(want, PM_SIZE, self.registers)
            except ValueError:
                return  # a clash with another device: the block stays unreachable
            self.mapped_at = want

    def config_written(self, offset: int, size: int) -> None:
        if offset < PM_MISC_REG + 1 and offset + size > PM_BASE_REG:
            self._map()

    # -- the PM block -------------------------------------------------------------------------
    def timer(self) -> int:
        ticks = (self.clock_ns() - self._timer_origin) * PM_TIMER_HZ // 1_000_000_000
        return ticks & 0xFFFFFF

    def pm_read(self, offset: int, size: int) -> int:
        with self._lock:
            regs = struct.pack(
                "<HHHHIHH", self.pm1_sts, self.pm1_en, self.pm1_cnt, 0, self.timer(),
                self.gpe_sts, self.gpe_en,
            )  # fmt: skip
        if offset + size > len(regs):
            return (1 << (8 * size)) - 1 if offset >= len(regs) else 0
        return int.from_bytes(regs[offset : offset + size], "little")

    def pm_write(self, offset: int, size: int, value: int) -> None:
        poweroff = False
        with self._lock:
            for reg, width in (
                (PM1_STS, 2),
                (PM1_EN, 2),
                (PM1_CNT, 2),
                (GPE0_STS, 2),
                (GPE0_EN, 2),
            ):
                if offset + size <= reg or offset >= reg + width:
                    continue
                # the bytes of `value` that land on this register
                shift = 8 * (reg - offset)
                v = value >> shift if shift >= 0 else value << -shift
                lo = max(offset, reg) - reg
                hi = min(offset + size, reg + width) - reg
                mask = ((1 << (8 * (hi - lo))) - 1) << (8 * lo)
                v &= mask
                if reg == PM1_STS:
                    self.pm1_sts &= ~v  # write 1 to clear
                elif reg == PM1_EN:
                    self.pm1_en = (self.pm1_en & ~mask) | v
                elif reg == PM1_CNT:
                    cnt = (self.pm1_cnt & ~mask) | v
                    if cnt & SLP_EN and (cnt >> SLP_TYP_SHIFT) & 7 == S5_SLP_TYP:
                        poweroff = True
                    self.pm1_cnt = (cnt & ~SLP_EN) | SCI_EN
                elif reg == GPE0_STS:
                    self.gpe_sts &= ~v
                else:
                    self.gpe_en = (self.gpe_en & ~mask) | v
        self._update_sci()
        if poweroff:
            self.on_poweroff()

    def _update_sci(self) -> None:
        with self._lock:
            level = bool(self.pm1_sts & self.pm1_en & (TMR_STS | PWRBTN_STS)) or bool(
                self.gpe_sts & self.gpe_en
            )
            changed = level != self._sci_level
            self._sci_level = level
        if changed:  # IRQ 9 may be shared (virtio-mmio): drive it only on a change
            self.sci.set(level)

    def press_power_button(self) -> bool:
        """Set PWRBTN_STS (raising the SCI if enabled). True when the guest's OS has
        enabled the power button event, i.e. something is there to act on it."""
        with self._lock:
            self.pm1_sts |= PWRBTN_STS
            listening = bool(self.pm1_en & PWRBTN_STS)
        self._update_sci()
        return listening

    # -- Device ---------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._map()
        self._update_sci()

    def extra_state(self) -> StateRecord:
        return PmState(
            (self.pm1_sts, self.pm1_en, self.pm1_cnt, self.gpe_sts, self.gpe_en), self.timer()
        )

    def apply_extra(self, rec: Any) -> None:
        self.pm1_sts, self.pm1_en, self.pm1_cnt, self.gpe_sts, self.gpe_en = rec.pm1
        # rounded up, so that the count reads back exactly as saved
        self._timer_origin = self.clock_ns() + (-rec.timer * 1_000_000_000 // PM_TIMER_HZ)

    def apply_state(self, rec: Any) -> None:
        super().apply_state(rec)
        self._map()
        self._sci_level = None  # drive the line to the restored level whatever it was
        self._update_sci()


@dataclass(frozen=True)
class PmState(StateRecord):
    """PM1 status, enable, control, GPE0 status, enable; the PM timer's count."""

    pm1: tuple[int, ...] = items(Int(0, 0xFFFF), max_len=5, exact=5)
    timer: int = uint(24)


Piix4Pm.extra_record = PmState
