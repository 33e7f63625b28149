"""The Intel MultiProcessor Specification 1.4 table for a directly booted kernel.

With no firmware there is no ACPI MADT, and a kernel booted directly would count one
CPU whatever `numvcpus` says. The loader then plays the BIOS's part and leaves an MP
table in the reserved F segment, where an OS scans for the floating pointer ("_MP_",
16-byte aligned, 0xF0000-0xFFFFF): one processor entry per vCPU (APIC IDs 0..n-1, vCPU 0
the bootstrap processor), the IOAPIC at 0xFEC00000 (ID 0, as its register reads and as
the firmware's MADT says), the ISA bus with its IRQs on the IOAPIC's pins (IRQ 0 on pin
2) and LINT0 as ExtINT (the 8259's virtual wire), LINT1 as NMI on every processor; no
ExtINT entry on an IOAPIC pin, which nothing programs before the OS does. IRQs 5, 9, 10
and 11 are level-triggered active high, as the MADT's overrides make them (acpi.py).

Only the base table (no extended entries): the IMCR bit is clear (virtual wire mode).
"""

from __future__ import annotations

import struct

from boite.machine.firmware.acpi import IOAPIC_BASE, LAPIC_BASE, PCI_IRQS
from boite.machine.machine import Machine

FLOATING_ADDR = 0xF0000  # the floating pointer, then the configuration table after it
CONFIG_ADDR = FLOATING_ADDR + 16
APIC_VERSION = 0x14  # the emulator's local APIC (machine/devices/lapic.py)
IOAPIC_VERSION = 0x20
CPU_SIGNATURE = 0x6D8  # family 6, model 13, stepping 8: CPUID.1 (accel/emu/cpumodel.py)
CPU_FEATURES = 1 | (1 << 9)  # FPU, APIC
ISA_BUS = 0
INT, NMI, EXTINT = 0, 1, 3
CONFORMING, LEVEL_HIGH = 0, 0x000D  # flags: polarity (bits 0-1), trigger (bits 2-3)


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def mp_table(num_cpus: int, config_addr: int = CONFIG_ADDR) -> tuple[bytes, bytes]:
    """(floating pointer, configuration table) for `num_cpus` vCPUs, the table to be
    placed at `config_addr`."""
    entries = []
    for i in range(num_cpus):
        flags = 1 | (2 if i == 0 else 0)  # enabled, bootstrap processor
        entries.append(
            struct.pack("<BBBBII8x", 0, i, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
        )
    entries.append(struct.pack("<BB6s", 1, ISA_BUS, b"ISA   "))
    ioapic_id = 0
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_BASE))
    for irq in range(16):
        if irq == 2:
            continue  # the 8259 cascade: no IOAPIC pin (pin 2 is the timer's)
        flags = LEVEL_HIGH if irq in PCI_IRQS else CONFORMING
        pin = 2 if irq == 0 else irq
        entries.append(struct.pack("<BBHBBBB", 3, INT, flags, ISA_BUS, irq, ioapic_id, pin))
    entries.append(struct.pack("<BBHBBBB", 4, EXTINT, CONFORMING, ISA_BUS, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, NMI, CONFORMING, ISA_BUS, 0, 0xFF, 1))
    body = b"".join(entries)
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0, b"BOITE   ", b"BOITEPC     ",
        0, 0, len(entries), LAPIC_BASE, 0, 0, 0,
    )  # fmt: skip
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", config_addr, 1, 4, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating), bytes(table)


def write_mp_table(machine: Machine) -> None:
    """Put the MP table for the machine's vCPUs in its F segment (reserved in the e820
    map the loader hands over)."""
    floating, table = mp_table(machine.num_vcpus)
    machine.memory.write(FLOATING_ADDR, floating)
    machine.memory.write(CONFIG_ADDR, table)
