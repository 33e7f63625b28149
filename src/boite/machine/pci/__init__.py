"""PCI: bus 0 behind an i440FX-like host bridge, the PIIX south bridge functions.

`function.py`: a PCI function's configuration space, BARs, INTx. `bus.py`: the bus, the
host bridge and configuration mechanism #1 (0xCF8/0xCFC). `piix.py`: the PIIX3 ISA
bridge (PIRQ routing) and the PIIX4 power-management function (ACPI PM block).
"""

from boite.machine.pci.bus import PciBus, PciHostBridge
from boite.machine.pci.function import BAR_IO, BAR_MEM, Bar, PciFunction
from boite.machine.pci.piix import Piix3IsaBridge, Piix4Pm

__all__ = [
    "BAR_IO",
    "BAR_MEM",
    "Bar",
    "PciBus",
    "PciFunction",
    "PciHostBridge",
    "Piix3IsaBridge",
    "Piix4Pm",
]
