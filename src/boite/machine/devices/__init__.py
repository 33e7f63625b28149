"""PC platform devices shared by every accelerator.

Each device is a plain object: `bus_read`/`bus_write` on the offsets of its bus range,
`reset()`, and `save_state()`/`load_state()` as plain data. Interrupts go out through
`IrqLine`s; which controller is behind a line (KVM's irqchip or our PIC/IOAPIC) is the
builder's business.
"""

from boite.machine.devices.debugexit import IsaDebugExit
from boite.machine.devices.fwcfg import FwCfg
from boite.machine.devices.i8042 import I8042, SystemControlPortA
from boite.machine.devices.ioapic import IoApic
from boite.machine.devices.pic import DualPic
from boite.machine.devices.pit import Pit8254, PitSpeakerPort
from boite.machine.devices.poweroff import PowerOffPort, ResetControl
from boite.machine.devices.rtc import CmosRtc
from boite.machine.devices.uart import (
    ConsoleBackend,
    FileBackend,
    NullBackend,
    PipeBackend,
    SerialBackend,
    TeeBackend,
    Uart16550,
)

__all__ = [
    "CmosRtc",
    "ConsoleBackend",
    "DualPic",
    "FileBackend",
    "FwCfg",
    "I8042",
    "IoApic",
    "IsaDebugExit",
    "NullBackend",
    "PipeBackend",
    "Pit8254",
    "PitSpeakerPort",
    "PowerOffPort",
    "ResetControl",
    "SerialBackend",
    "SystemControlPortA",
    "TeeBackend",
    "Uart16550",
]
