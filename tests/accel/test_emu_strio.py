"""`rep insw` / `rep outsw` on an ATA data register under the emulator: runs of a page
go to the device in one call (Bus.read_string / write_string), with the same result as
one access per element: the data, the count of accesses the device sees, ECX/EDI/ESI
left by a fault at a segment limit inside the run, words read past the transfer's end,
and a port whose device has no string methods. Both the interpreter and the block
translator run each program."""

from __future__ import annotations

import pytest
from test_emu_segchecks import GP, NO_FAULT, _nasm, _protected_cpu, _run

from boite.disk.raw import RawImage
from boite.machine.bus import Bus
from boite.machine.devices.ata import AtaChannel, AtaDrive
from boite.machine.irq import IrqLine

SECTORS = 16


def _pattern() -> bytes:
    return bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SECTORS * 512))


def _ata(tmp_path, data: bytes) -> tuple[Bus, AtaChannel, RawImage]:
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    image = RawImage(path)
    channel = AtaChannel(IrqLine(14), AtaDrive(image))
    bus = Bus("pio")
    channel.register(bus)
    return bus, channel, image


def _command(cmd: int, count: int, lba: int) -> str:
    """Program the primary channel's task file (interrupts off) and issue `cmd`."""
    regs = [(0x3F6, 0x02), (0x1F2, count), (0x1F3, lba), (0x1F4, 0), (0x1F5, 0),
            (0x1F6, 0xE0), (0x1F7, cmd)]  # fmt: skip
    return "\n".join(f"    mov dx, {p:#x}\n    mov al, {v:#x}\n    out dx, al" for p, v in regs)


def _program(tmp_path, name: str, body: str) -> bytes:
    return _nasm(f"bits 32\norg 0x100000\n    cld\n{body}\n    hlt\n", tmp_path, name)


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
def test_rep_insw_across_pages_and_past_the_transfer(tmp_path, translate: bool) -> None:
    data = _pattern()
    bus, channel, image = _ata(tmp_path, data)
    # 4 sectors from LBA 2 into an odd address that spans two pages, then 8 words more:
    # the transfer has ended, so they read as all ones (one access each, as before).
    image_src = _program(
        tmp_path,
        "insw",
        _command(0x20, 4, 2)
        + """
    mov edi, 0x200f01
    mov ecx, 1024 + 8
    mov dx, 0x1f0
    rep insw""",
    )
    cpu = _protected_cpu(image_src, translate)
    cpu.pio = bus
    before = channel.accesses
    assert _run(cpu) == NO_FAULT
    got = bytes(cpu.ram[0x200F01 : 0x200F01 + 2048 + 16])
    assert got == data[1024 : 1024 + 2048] + b"\xff" * 16
    assert cpu.r[1] == 0 and cpu.r[7] == 0x200F01 + 2048 + 16
    assert channel.accesses - before == 7 + 1024 + 8  # the task file, then one per word
    assert channel.xfer != "read"
    image.close()


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
def test_rep_insw_faults_at_the_es_limit_with_the_words_before_it_stored(tmp_path,
                                                                         translate: bool) -> None:  # fmt: skip
    data = _pattern()
    bus, channel, image = _ata(tmp_path, data)
    # ES limit 0xfff (selector 0x20): 0xd00 bytes fit from 0x300, then #GP(0) with ECX
    # and EDI at the word that did not go; the device has handed over exactly those.
    image_src = _program(
        tmp_path,
        "insgp",
        _command(0x20, 8, 0)
        + """
    mov ax, 0x20
    mov es, ax
    mov edi, 0x300
    mov ecx, 2048
    mov dx, 0x1f0
    rep insw""",
    )
    cpu = _protected_cpu(image_src, translate)
    cpu.pio = bus
    assert _run(cpu) == GP
    assert cpu.r[7] == 0x1000 and cpu.r[1] == 2048 - 0xD00 // 2
    assert bytes(cpu.ram[0x300:0x1000]) == data[:0xD00]
    assert channel.xfer == "read" and channel.xfer_pos == 0xD00 % 512  # mid-sector 6
    image.close()


@pytest.mark.parametrize("translate", [False, True], ids=["interpreted", "translated"])
def test_rep_outsw_writes_the_sectors(tmp_path, translate: bool) -> None:
    bus, channel, image = _ata(tmp_path, bytes(SECTORS * 512))
    payload = bytes(range(256)) * 6  # 3 sectors
    image_src = _program(
        tmp_path,
        "outsw",
        _command(0x30, 3, 5)
        + """
    mov esi, 0x200f80
    mov ecx, 768
    mov dx, 0x1f0
    rep outsw""",
    )
    cpu = _protected_cpu(image_src, translate)
    cpu.ram[0x200F80 : 0x200F80 + len(payload)] = payload
    cpu.pio = bus
    assert _run(cpu) == NO_FAULT
    assert cpu.r[1] == 0 and cpu.r[6] == 0x200F80 + 1536
    image.flush()
    assert image.read(5 * 512, 1536) == payload
    assert image.read(4 * 512, 512) == bytes(512) and image.read(8 * 512, 512) == bytes(512)
    image.close()


class WordCounter:
    """A port device without string methods: each read answers the next number."""

    def __init__(self) -> None:
        self.n = 0
        self.written: list[int] = []

    def bus_read(self, offset: int, size: int) -> int:
        self.n += 1
        return self.n

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.written.append(value)


def test_a_device_without_string_methods_gets_one_access_per_element(tmp_path) -> None:
    bus = Bus("pio")
    dev = WordCounter()
    bus.register(0x520, 4, dev)
    image_src = _program(
        tmp_path,
        "counter",
        """
    mov edi, 0x200ff8
    mov ecx, 8
    mov dx, 0x520
    rep insw
    mov esi, 0x200ff8
    mov ecx, 4
    mov dx, 0x522
    rep outsd""",
    )
    cpu = _protected_cpu(image_src, True)
    cpu.pio = bus
    assert _run(cpu) == NO_FAULT
    words = [int.from_bytes(cpu.ram[0x200FF8 + 2 * i : 0x200FFA + 2 * i], "little")
             for i in range(8)]  # fmt: skip
    assert words == list(range(1, 9))
    assert dev.written == [(2 * i + 2) << 16 | (2 * i + 1) for i in range(4)]
