"""ACPI tables for the firmware, handed over through fw_cfg's table loader as QEMU does
(hw/acpi/bios-linker-loader.c: the firmware allocates the blobs, patches the pointers
between them with the addresses it chose, then fixes the checksums).

Blobs:
- `etc/acpi/tables` (allocated high, 64-byte aligned): FACS, DSDT, FADT, MADT, RSDT.
- `etc/acpi/rsdp` (allocated in the F segment, where an OS looks for it): the ACPI 1.0
  RSDP pointing at the RSDT.
- `etc/table-loader`: 128-byte commands: ALLOCATE (1), ADD_POINTER (2), ADD_CHECKSUM (3).

The tables:
- FADT revision 3: the PIIX4 PM block (PM1a event/control, PM timer, GPE0) at `pm_base`,
  SCI on IRQ 9, SMI_CMD 0 (the hardware is in ACPI mode from reset), the power button as
  a fixed feature (PWR_BUTTON clear), no sleep button, the reset register 0xCF9 = 6,
  IAPC_BOOT_ARCH: legacy devices and an 8042.
- MADT: one processor local APIC per vCPU (APIC IDs 0..n-1), the IOAPIC (ID 0, GSI base
  0), interrupt source overrides ISA IRQ 0 -> GSI 2 and IRQs 5, 9, 10, 11 level-triggered
  active high (the PCI interrupts and the SCI, routed by the PIIX3 as QEMU's board does),
  and LINT1 as NMI on every processor.
- DSDT (AML generated in `dsdt_aml`): `\\_SB.PCI0` (PNP0A03, the host bridge, so Linux scans
  bus 0 through ACPI) with `KBD` (PNP0303 at ports 0x60/0x64, IRQ 1: SeaBIOS sets up the
  PS/2 keyboard only when the DSDT names one, Linux's i8042 finds it through PnP) and
  `\\_S5` = {0, 0, 0, 0} (SLP_TYP 0 is soft-off on the PIIX4 block). PCI0's `_CRS` names the
  windows the bridge forwards, as QEMU's i440FX board does: buses 0-255, its own
  0xCF8-0xCFF, I/O 0x0000-0x0CF7 and 0x0D00-0xFFFF, the VGA memory 0xA0000-0xBFFFF, and the
  32-bit PCI hole from the top of low RAM to below the IOAPIC. Linux takes a root bus's
  resources from _CRS alone: without one the bus has no windows and no BAR can be claimed,
  not even the IDE function's legacy 0x1F0 ("BAR 0: not assigned; can't enable device" from
  ata_piix). There is no _PRT: an OS then takes a PCI function's IRQ from its Interrupt Line
  register, which SeaBIOS writes from the PIRQ routing it programs, and the overrides above
  make those IRQs level-triggered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from boite.machine.firmware import aml

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

OEM_ID = b"BOITE "
OEM_TABLE_ID = b"BOITEPC "
CREATOR_ID = b"BOIT"

LOADER_ALLOCATE, LOADER_ADD_POINTER, LOADER_ADD_CHECKSUM = 1, 2, 3
ZONE_HIGH, ZONE_FSEG = 1, 2
LOADER_ENTRY_SIZE = 128

LAPIC_BASE = 0xFEE0_0000
IOAPIC_BASE = 0xFEC0_0000
SCI_IRQ = 9
LEVEL_HIGH = 0x000D  # MPS INTI flags: active high (01), level (11)
PCI_IRQS = (5, 9, 10, 11)
PCI_CONFIG_PORT = 0xCF8
VGA_WINDOW = (0xA_0000, 0xB_FFFF)
PCI_HOLE_END = IOAPIC_BASE - 1  # the IOAPIC, HPET and LAPIC pages above are not PCI's
DEFAULT_PCI_HOLE_START = 0xC000_0000

# FADT flags
F_WBINVD, F_PROC_C1, F_SLP_BUTTON, F_RTC_S4, F_RESET_REG_SUP = 1, 1 << 2, 1 << 5, 1 << 7, 1 << 10
BOOT_ARCH_LEGACY_DEVICES, BOOT_ARCH_8042 = 1, 2


def header(signature: bytes, length: int, revision: int) -> bytes:
    """The 36-byte system description table header (checksum 0: the loader fixes it)."""
    return struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
        CREATOR_ID, 1,
    )  # fmt: skip


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    return header(signature, 36 + len(body), revision) + body


def checksum_byte(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def pci0_crs(pci_hole_start: int) -> bytes:
    """The host bridge's windows (see the module doc); the config ports are its own."""
    if not VGA_WINDOW[1] < pci_hole_start <= PCI_HOLE_END:
        raise ValueError(f"PCI hole start {pci_hole_start:#x}")
    return aml.resource_template(
        aml.word_bus_numbers(0, 0xFF),
        aml.io_port(PCI_CONFIG_PORT, 8),
        aml.word_io(0, PCI_CONFIG_PORT - 1),
        aml.word_io(PCI_CONFIG_PORT + 8, 0xFFFF),
        aml.dword_memory(*VGA_WINDOW, cacheable=True),
        aml.dword_memory(pci_hole_start, PCI_HOLE_END, cacheable=False),
    )


def dsdt_aml(pci_hole_start: int = DEFAULT_PCI_HOLE_START) -> bytes:
    """The DSDT's AML: the PCI root bridge and the S5 sleep type (see the module doc)."""
    return aml.scope(
        "\\_SB",
        aml.device(
            "PCI0",
            aml.name("_HID", aml.eisa_id("PNP0A03")),
            aml.name("_ADR", aml.integer(0)),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", pci0_crs(pci_hole_start)),
            # The i8042's keyboard: SeaBIOS (and Linux's PNP probe) look for it here.
            aml.device(
                "KBD",
                aml.name("_HID", aml.eisa_id("PNP0303")),
                aml.name(
                    "_CRS",
                    aml.resource_template(
                        aml.io_port(0x60, 1), aml.io_port(0x64, 1), aml.irq_no_flags(1)
                    ),
                ),
            ),
        ),
    ) + aml.name("\\_S5", aml.package(*(aml.integer(0),) * 4))


def madt(num_cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, 1)  # PCAT_COMPAT: there are 8259s too
    for i in range(num_cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)  # ISA IRQ 0 -> GSI 2
    for irq in PCI_IRQS:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, LEVEL_HIGH)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # LINT1 is NMI on every processor
    return table(b"APIC", 1, body)


def gas(space: int, bits: int, address: int, access: int) -> bytes:
    """A Generic Address Structure."""
    return struct.pack("<BBBBQ", space, bits, 0, access, address)


def fadt(pm_base: int) -> bytes:
    """FADT revision 3 (244 bytes); FACS and DSDT addresses are patched by the loader."""
    f = bytearray(244)
    f[0:36] = header(b"FACP", 244, 3)
    struct.pack_into("<H", f, 46, SCI_IRQ)
    struct.pack_into("<I", f, 48, 0)  # SMI_CMD: none, already in ACPI mode
    struct.pack_into("<I", f, 56, pm_base)  # PM1a_EVT_BLK
    struct.pack_into("<I", f, 64, pm_base + 4)  # PM1a_CNT_BLK
    struct.pack_into("<I", f, 76, pm_base + 8)  # PM_TMR_BLK
    struct.pack_into("<I", f, 80, pm_base + 0xC)  # GPE0_BLK
    f[88], f[89], f[91], f[92] = 4, 2, 4, 4  # PM1_EVT, PM1_CNT, PM_TMR, GPE0 lengths
    struct.pack_into("<HH", f, 96, 0xFFF, 0xFFF)  # no C2, no C3
    f[108] = 0x32  # CENTURY in CMOS
    struct.pack_into("<H", f, 109, BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042)
    flags = F_WBINVD | F_PROC_C1 | F_SLP_BUTTON | F_RTC_S4 | F_RESET_REG_SUP
    struct.pack_into("<I", f, 112, flags)
    f[116:128] = gas(1, 8, 0xCF9, 1)  # RESET_REG: system I/O byte at 0xCF9
    f[128] = 0x06  # RESET_VALUE: CPU reset + system reset
    return bytes(f)


def facs() -> bytes:
    f = bytearray(64)
    f[0:4] = b"FACS"
    struct.pack_into("<I", f, 4, 64)
    f[32] = 1  # version
    return bytes(f)


@dataclass
class TableLoader:
    """The commands of `etc/table-loader`, in the order the firmware runs them."""

    commands: list[bytes] = field(default_factory=list)

    @staticmethod
    def _name(file: str) -> bytes:
        raw = file.encode()
        if len(raw) >= 56:
            raise ValueError(f"loader file name {file!r} is too long")
        return raw.ljust(56, b"\0")

    def _add(self, body: bytes) -> None:
        self.commands.append(body.ljust(LOADER_ENTRY_SIZE, b"\0"))

    def allocate(self, file: str, align: int, zone: int) -> None:
        self._add(struct.pack("<I56sIB", LOADER_ALLOCATE, self._name(file), align, zone))

    def add_pointer(self, dest: str, src: str, offset: int, size: int) -> None:
        """The `size`-byte little-endian value at dest+offset (an offset into src) gets
        src's address added."""
        self._add(
            struct.pack("<I56s56sIB", LOADER_ADD_POINTER, self._name(dest), self._name(src),
                        offset, size)
        )  # fmt: skip

    def add_checksum(self, file: str, offset: int, start: int, length: int) -> None:
        self._add(
            struct.pack("<I56sIII", LOADER_ADD_CHECKSUM, self._name(file), offset, start, length)
        )

    def blob(self) -> bytes:
        return b"".join(self.commands)


@dataclass
class AcpiBlobs:
    tables: bytes
    rsdp: bytes
    loader: bytes
    offsets: dict[str, int]  # table signature -> offset in `tables`


def build_acpi(
    num_cpus: int, pm_base: int, pci_hole_start: int = DEFAULT_PCI_HOLE_START
) -> AcpiBlobs:
    """The three fw_cfg files for a PC with `num_cpus` vCPUs, its PM block at `pm_base`
    and its 32-bit PCI memory from `pci_hole_start` (the top of low RAM) up."""
    blob = bytearray()
    offsets: dict[str, int] = {}

    def put(sig: str, data: bytes, align: int = 8) -> int:
        while len(blob) % align:
            blob.append(0)
        offsets[sig] = len(blob)
        blob.extend(data)
        return offsets[sig]

    put("FACS", facs(), 64)
    put("DSDT", table(b"DSDT", 2, dsdt_aml(pci_hole_start)))
    f = bytearray(fadt(pm_base))
    struct.pack_into("<II", f, 36, offsets["FACS"], offsets["DSDT"])
    put("FACP", bytes(f))
    put("APIC", madt(num_cpus))
    entries = [offsets["FACP"], offsets["APIC"]]
    put("RSDT", table(b"RSDT", 1, struct.pack(f"<{len(entries)}I", *entries)))
    rsdp = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, offsets["RSDT"])

    loader = TableLoader()
    loader.allocate(TABLES_FILE, 64, ZONE_HIGH)
    loader.allocate(RSDP_FILE, 16, ZONE_FSEG)
    loader.add_pointer(TABLES_FILE, TABLES_FILE, offsets["FACP"] + 36, 4)  # FIRMWARE_CTRL
    loader.add_pointer(TABLES_FILE, TABLES_FILE, offsets["FACP"] + 40, 4)  # DSDT
    for i in range(len(entries)):
        loader.add_pointer(TABLES_FILE, TABLES_FILE, offsets["RSDT"] + 36 + 4 * i, 4)
    loader.add_pointer(RSDP_FILE, TABLES_FILE, 16, 4)
    for sig in ("DSDT", "FACP", "APIC", "RSDT"):
        start = offsets[sig]
        length = struct.unpack_from("<I", blob, start + 4)[0]
        loader.add_checksum(TABLES_FILE, start + 9, start, length)
    loader.add_checksum(RSDP_FILE, 8, 0, len(rsdp))
    return AcpiBlobs(bytes(blob), rsdp, loader.blob(), offsets)


def link(blobs: dict[str, bytes], loader: bytes, addresses: dict[str, int]) -> dict[str, bytes]:
    """Run a table-loader script as firmware would, with each file placed at
    `addresses[file]`: for tests and for reading the tables as an OS sees them."""
    files = {k: bytearray(v) for k, v in blobs.items()}
    for i in range(0, len(loader), LOADER_ENTRY_SIZE):
        entry = loader[i : i + LOADER_ENTRY_SIZE]
        (cmd,) = struct.unpack_from("<I", entry)
        if cmd == LOADER_ADD_POINTER:
            dest, src = (entry[4:60].rstrip(b"\0").decode(), entry[60:116].rstrip(b"\0").decode())
            offset, size = struct.unpack_from("<IB", entry, 116)
            value = int.from_bytes(files[dest][offset : offset + size], "little")
            value = (value + addresses[src]) & ((1 << (8 * size)) - 1)
            files[dest][offset : offset + size] = value.to_bytes(size, "little")
        elif cmd == LOADER_ADD_CHECKSUM:
            file = entry[4:60].rstrip(b"\0").decode()
            offset, start, length = struct.unpack_from("<III", entry, 60)
            data = files[file]
            data[offset] = 0
            data[offset] = checksum_byte(bytes(data[start : start + length]))
    return {k: bytes(v) for k, v in files.items()}
