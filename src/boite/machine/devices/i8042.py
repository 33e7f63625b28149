"""Intel 8042 keyboard controller (ports 0x60 data, 0x64 status/command) with a PS/2
keyboard behind it and no mouse, and System Control Port A (0x92: fast A20 and reset).

Enough for Linux's i8042 and atkbd probes, the reset pulse (command 0xFE, or any 0xF0-0xFF
pulse with bit 0 clear), and a keyboard input path: `inject_scancodes(data)` queues bytes
exactly as the guest will read them from port 0x60 (with the command byte's translate bit
set, as firmware leaves it, that is scan code set 1).

The AUX port is absent, and says so quickly: the AUX loopback command (0xD3) answers
without the AUX flag and the AUX interface test (0xA9) reports "clock line stuck low", so
Linux gives up on a mouse without waiting for timeouts.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boite.machine.device import Device
from boite.machine.irq import IrqLine
from boite.machine.state import (
    U8,
    Choice,
    RegisterState,
    StateRecord,
    bits,
    choice,
    data,
    flag,
    optional,
    uint,
)

if TYPE_CHECKING:
    from boite.machine.machine import Machine

DATA_PORT = 0x60
STATUS_PORT = 0x64  # the device's offset 4
PORT_A = 0x92

STATUS_OBF = 0x01
STATUS_IBF = 0x02
STATUS_SYS = 0x04
STATUS_CMD = 0x08  # last write was to port 0x64
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX_OBF = 0x20

CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40

OUTPORT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUTPORT_A20 = 0x02

KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA

QUEUE_LIMIT = 256


# Controller commands that wait for a data byte, and keyboard commands that wait for an
# argument: what `pending_cmd` / `kbd_pending` can hold.
DATA_COMMANDS = (0x60, 0xD1, 0xD2, 0xD3, 0xD4, *range(0x61, 0x80))
KBD_ARG_COMMANDS = (0xED, 0xF0, 0xF3)


@dataclass(frozen=True)
class I8042State(StateRecord):
    VERSION = 1
    ctr: int = uint(8)
    outport: int = uint(8)
    status: int = uint(8)
    pending_cmd: int | None = optional(Choice(*DATA_COMMANDS))
    kbd_pending: int | None = optional(Choice(*KBD_ARG_COMMANDS))
    kbd_enabled: bool = flag()
    scancode_set: int = choice(1, 2, 3)
    out: bytes = data(max_len=QUEUE_LIMIT)  # controller replies not yet read
    kbd: bytes = data(max_len=QUEUE_LIMIT)  # keyboard bytes not yet read
    obf_byte: int | None = optional(U8)


class I8042(Device):
    name = "i8042"

    def __init__(
        self,
        kbd_irq: IrqLine,
        machine: Machine | None = None,
        *,
        on_a20: Callable[[bool], None] | None = None,
    ) -> None:
        self.kbd_irq = kbd_irq
        self.machine = machine
        self.on_a20 = on_a20
        self._lock = threading.RLock()
        self.reset()

    # -- state -------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.ctr = CTR_KBD_INT | CTR_SYS | CTR_XLATE
            self.outport = OUTPORT_RESET | OUTPORT_A20
            self.status = STATUS_SYS | STATUS_UNLOCKED
            self.pending_cmd: int | None = None  # controller command waiting for its data
            self.kbd_pending: int | None = None  # keyboard command waiting for its argument
            self.kbd_enabled = True
            self.scancode_set = 2
            self.out: collections.deque[int] = collections.deque()  # controller replies
            self.kbd: collections.deque[int] = collections.deque()  # keyboard bytes
            self.obf_byte: int | None = None
            self._update()

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return I8042State.of(self, out=bytes(self.out), kbd=bytes(self.kbd)).to_dict()

    def check_state(self, state: Any) -> I8042State:
        return I8042State.from_dict(state)

    def apply_state(self, rec: I8042State) -> None:
        with self._lock:
            rec.put(self, "out", "kbd")
            self.out = collections.deque(rec.out)
            self.kbd = collections.deque(rec.kbd)
            self._update()

    @property
    def a20_enabled(self) -> bool:
        return bool(self.outport & OUTPORT_A20)

    # -- output buffer -----------------------------------------------------------------

    def _update(self) -> None:
        """Fill the output buffer from the queues and drive IRQ 1."""
        if self.obf_byte is None:
            if self.out:
                self.obf_byte = self.out.popleft()
            elif self.kbd and not self.ctr & CTR_KBD_DISABLE:
                self.obf_byte = self.kbd.popleft()
        if self.obf_byte is not None:
            self.status |= STATUS_OBF
        else:
            self.status &= ~STATUS_OBF
        self.kbd_irq.set(self.obf_byte is not None and bool(self.ctr & CTR_KBD_INT))

    def _reply(self, *data: int) -> None:
        # A guest that issues commands without reading the answers must not grow this.
        room = QUEUE_LIMIT - len(self.out)
        self.out.extend(data[: max(room, 0)])

    def _kbd_reply(self, *data: int) -> None:
        self.kbd.extend(data)
        while len(self.kbd) > QUEUE_LIMIT:
            self.kbd.pop()

    def inject_scancodes(self, data: bytes) -> None:
        """Keys from the host: bytes as the guest reads them from port 0x60. Thread-safe."""
        with self._lock:
            if not self.kbd_enabled:
                return
            for b in data:
                if len(self.kbd) < QUEUE_LIMIT:
                    self.kbd.append(b)
            self._update()

    # -- bus ---------------------------------------------------------------------------

    def bus_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 4:
                return self.status
            value = self.obf_byte if self.obf_byte is not None else 0
            self.obf_byte = None
            self._update()
            return value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 4:
                self.status |= STATUS_CMD
                self._command(value)
            else:
                self.status &= ~STATUS_CMD
                self._data(value)
            self._update()

    def _set_outport(self, value: int) -> None:
        old = self.outport
        self.outport = value | OUTPORT_RESET  # the reset line comes back up by itself
        if (old ^ value) & OUTPORT_A20 and self.on_a20 is not None:
            self.on_a20(bool(value & OUTPORT_A20))
        if not value & OUTPORT_RESET:
            self._system_reset()

    def _system_reset(self) -> None:
        if self.machine is not None:
            self.machine.request_reset()

    def _command(self, cmd: int) -> None:
        self.pending_cmd = None
        if cmd == 0x20:  # read command byte (0x20-0x3f read internal RAM; byte 0 is it)
            self._reply(self.ctr)
        elif 0x21 <= cmd <= 0x3F:
            self._reply(0)
        elif cmd in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):  # commands followed by a data byte
            self.pending_cmd = cmd
        elif 0x61 <= cmd <= 0x7F:
            self.pending_cmd = cmd  # write internal RAM: swallowed
        elif cmd == 0xA7:
            self.ctr |= CTR_AUX_DISABLE
        elif cmd == 0xA8:
            self.ctr &= ~CTR_AUX_DISABLE
        elif cmd == 0xA9:
            self._reply(0x01)  # AUX interface test: clock line stuck low (no port)
        elif cmd == 0xAA:
            self._reply(0x55)  # controller self-test passed
            self.status |= STATUS_SYS
        elif cmd == 0xAB:
            self._reply(0x00)  # keyboard interface test passed
        elif cmd == 0xAD:
            self.ctr |= CTR_KBD_DISABLE
        elif cmd == 0xAE:
            self.ctr &= ~CTR_KBD_DISABLE
        elif cmd == 0xC0:
            self._reply(0x80)  # input port: keyboard not inhibited
        elif cmd == 0xD0:
            self._reply(self.outport)
        elif cmd == 0xDD:
            self._set_outport(self.outport & ~OUTPORT_A20)
        elif cmd == 0xDF:
            self._set_outport(self.outport | OUTPORT_A20)
        elif cmd == 0xE0:
            self._reply(0x00)  # test inputs
        elif cmd >= 0xF0:
            if not cmd & 0x01:  # pulse output port bit 0 low: CPU reset
                self._system_reset()
        # other commands are ignored, as an 8042 ignores what it does not know

    def _data(self, value: int) -> None:
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd == 0x60:
            self.ctr = value
            if value & CTR_SYS:
                self.status |= STATUS_SYS
            else:
                self.status &= ~STATUS_SYS
        elif cmd == 0xD1:
            self._set_outport(value)
        elif cmd == 0xD2:
            self._kbd_reply(value)  # as if the keyboard had sent it
        elif cmd == 0xD3:
            self._reply(value)  # AUX loopback, but without the AUX flag: no AUX port
        elif cmd == 0xD4:
            pass  # to the (absent) mouse
        elif cmd is not None and 0x61 <= cmd <= 0x7F:
            pass
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        """A byte for the PS/2 keyboard (port 0x60 without a pending controller command)."""
        self.ctr &= ~CTR_KBD_DISABLE  # writing to the keyboard enables its interface
        arg_cmd, self.kbd_pending = self.kbd_pending, None
        if arg_cmd is not None:
            if arg_cmd == 0xF0 and value == 0:
                self._kbd_reply(KBD_ACK, self.scancode_set)
                return
            if arg_cmd == 0xF0 and value in (1, 2, 3):
                self.scancode_set = value
            self._kbd_reply(KBD_ACK)
            return
        if value in (0xED, 0xF0, 0xF3):  # set LEDs / scan code set / typematic: arg follows
            self.kbd_pending = value
            self._kbd_reply(KBD_ACK)
        elif value == 0xEE:
            self._kbd_reply(0xEE)  # echo
        elif value == 0xF2:
            self._kbd_reply(KBD_ACK, 0xAB, 0x83)  # identify: MF2 keyboard
        elif value == 0xF4:
            self.kbd_enabled = True
            self._kbd_reply(KBD_ACK)
        elif value == 0xF5:
            self.kbd_enabled = False
            self.kbd.clear()
            self._kbd_reply(KBD_ACK)
        elif value == 0xF6:
            self.kbd_enabled = True
            self.scancode_set = 2
            self._kbd_reply(KBD_ACK)
        elif value == 0xFF:
            self.kbd.clear()
            self.kbd_enabled = True
            self.scancode_set = 2
            self._kbd_reply(KBD_ACK, KBD_BAT_OK)
        elif 0xF7 <= value <= 0xFD:
            self._kbd_reply(KBD_ACK)  # scan-code-set-3 key type commands: accepted
        else:
            self._kbd_reply(KBD_RESEND)


@dataclass(frozen=True)
class Port92State(RegisterState):
    value: int = bits(0x03)  # fast A20 and the reset bit, as written


class SystemControlPortA(Device):
    """Port 0x92: bit 1 gates A20, a 0 -> 1 change of bit 0 resets the CPUs."""

    name = "port92"

    def __init__(
        self, machine: Machine | None = None, *, on_a20: Callable[[bool], None] | None = None
    ) -> None:
        self.machine = machine
        self.on_a20 = on_a20
        self.reset()

    def reset(self) -> None:
        self.value = 0x02  # A20 on, as firmware leaves it

    def save_state(self) -> dict[str, Any]:
        return Port92State(self.value).to_dict()

    def check_state(self, state: Any) -> Port92State:
        return Port92State.from_dict(state)

    def apply_state(self, rec: Port92State) -> None:
        self.value = rec.value

    @property
    def a20_enabled(self) -> bool:
        return bool(self.value & 0x02)

    def bus_read(self, offset: int, size: int) -> int:
        return self.value

    def bus_write(self, offset: int, size: int, value: int) -> None:
        old, self.value = self.value, value & 0x03
        if (old ^ value) & 0x02 and self.on_a20 is not None:
            self.on_a20(bool(value & 0x02))
        if value & 0x01 and not old & 0x01 and self.machine is not None:
            self.machine.request_reset()
