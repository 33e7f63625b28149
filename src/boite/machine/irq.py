"""IRQ lines: a device raises and lowers a wire; the interrupt controller behind it decides.

Under KVM the controller is the in-kernel irqchip (KVM_IRQ_LINE); under the emulator it is
the emulated 8259 PIC / IOAPIC. Devices never know which.
"""

from __future__ import annotations

from collections.abc import Callable

# set_level(gsi, level) — the one call an interrupt controller backend must provide.
IrqSink = Callable[[int, bool], None]


class IrqLine:
    def __init__(self, gsi: int, sink: IrqSink | None = None) -> None:
        self.gsi = gsi
        self.sink = sink
        self.level = False

    def connect(self, sink: IrqSink) -> None:
        self.sink = sink
        if self.level:
            sink(self.gsi, True)

    def raise_(self) -> None:
        self.level = True
        if self.sink is not None:
            self.sink(self.gsi, True)

    def lower(self) -> None:
        self.level = False
        if self.sink is not None:
            self.sink(self.gsi, False)

    def set(self, level: bool) -> None:
        if level:
            self.raise_()
        else:
            self.lower()

    def pulse(self) -> None:
        self.raise_()
        self.lower()


class IrqRouter:
    """Owns the machine's IRQ lines and forwards them to whichever controller is attached."""

    def __init__(self) -> None:
        self.lines: dict[int, IrqLine] = {}
        self._sink: IrqSink | None = None

    def line(self, gsi: int) -> IrqLine:
        if gsi not in self.lines:
            self.lines[gsi] = IrqLine(gsi, self._sink)
        return self.lines[gsi]

    def attach(self, sink: IrqSink) -> None:
        self._sink = sink
        for line in self.lines.values():
            line.connect(sink)
