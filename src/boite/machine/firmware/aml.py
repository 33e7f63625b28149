"""Just enough ACPI Machine Language (ACPI 6.4, chapter 20) to write boite's DSDT.

Each function returns the encoded bytes of one term; they nest as the ASL they stand
for. Only what the DSDT uses is here: Scope, Device, Name, Package, Buffer, integers,
strings, EISA IDs, and the resource descriptors of a host bridge's _CRS (6.4: a
ResourceTemplate is a Buffer of descriptors closed by an End Tag with its checksum).
"""

from __future__ import annotations

import struct

ZERO_OP, ONE_OP, ONES_OP = b"\x00", b"\x01", b"\xff"
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F


def pkg_length(body_len: int) -> bytes:
    """PkgLength: the length of itself plus `body_len`, in 1-4 bytes (20.2.4)."""
    for n in range(1, 5):
        total = body_len + n
        if n == 1 and total < 0x40:
            return bytes([total])
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0xF)]
            rest = total >> 4
            for _ in range(n - 1):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg, padded with '_' as ASL does."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """`\\_SB.PCI0`, `_HID`, `\\_S5`: root prefix, then one, two or more segments."""
    out = b""
    if path.startswith("\\"):
        out += bytes([ROOT_CHAR])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if len(segs) == 1:
        return out + segs[0]
    if len(segs) == 2:
        return out + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if not segs:
        return out + b"\x00"
    return out + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of a constant (Zero, One, Ones, Byte...QWord)."""
    if value == 0:
        return ZERO_OP
    if value == 1:
        return ONE_OP
    if value < 0:
        raise ValueError("AML integers are unsigned")
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 0xFF), (WORD_PREFIX, "<H", 0xFFFF),
        (DWORD_PREFIX, "<I", 0xFFFF_FFFF), (QWORD_PREFIX, "<Q", (1 << 64) - 1),
    ):  # fmt: skip
        if value <= limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value:#x} does not fit 64 bits")


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0A03"): three letters in 5 bits each, then four hex digits, as a DWord."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"EISA ID {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    code = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    value = struct.unpack("<I", struct.pack(">HH", code, product))[0]
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def name(path: str, data: bytes) -> bytes:
    """Name(path, data)."""
    return bytes([NAME_OP]) + name_string(path) + data


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """Buffer(len) {data}."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.4, 6.4.2 small and 6.4.3 large items).
RES_IRQ, RES_IO, RES_WORD_ADDRESS, RES_DWORD_ADDRESS, RES_END_TAG = 0x22, 0x47, 0x88, 0x87, 0x79
SPACE_MEMORY, SPACE_IO, SPACE_BUS = 0, 1, 2
# General flags of an address space descriptor: a bridge produces the range (bit 0 clear),
# positive decode (bit 1 clear), minimum and maximum fixed (bits 2 and 3).
PRODUCER_FIXED = 0x0C
IO_ENTIRE_RANGE = 0x03  # _RNG: ISA and non-ISA ranges
MEM_READ_WRITE, MEM_CACHEABLE = 0x01, 0x02


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed range the device itself decodes."""
    return bytes([RES_IO, 0x01]) + struct.pack("<HHBB", base, base, 1, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: edge-triggered, active-high ISA interrupts."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq}")
        mask |= 1 << irq
    return bytes([RES_IRQ]) + struct.pack("<H", mask)


def _address(large: int, fmt: str, space: int, type_flags: int, lo: int, hi: int) -> bytes:
    """Word/DWord address space descriptor: granularity 0, [lo, hi], no translation."""
    body = bytes([space, PRODUCER_FIXED, type_flags]) + struct.pack(
        f"<5{fmt}", 0, lo, hi, 0, hi - lo + 1
    )
    return bytes([large]) + struct.pack("<H", len(body)) + body


def word_bus_numbers(first: int, last: int) -> bytes:
    return _address(RES_WORD_ADDRESS, "H", SPACE_BUS, 0, first, last)


def word_io(lo: int, hi: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address(RES_WORD_ADDRESS, "H", SPACE_IO, IO_ENTIRE_RANGE, lo, hi)


def dword_memory(lo: int, hi: int, cacheable: bool) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, [Non]Cacheable,
    ReadWrite, ...)."""
    flags = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else 0)
    return _address(RES_DWORD_ADDRESS, "I", SPACE_MEMORY, flags, lo, hi)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: the descriptors and an End Tag (checksum 0: "assume the
    sum is right", as iasl writes it)."""
    return buffer(b"".join(descriptors) + bytes([RES_END_TAG, 0]))
