"""Build a PC-like Machine: RAM with its e820 map, the platform devices on their buses,
IRQ lines, and a kernel loaded by the boot loaders.

Port map (everything on `machine.pio` unless said otherwise):

  0x020-0x021  8259 master      0x0a0-0x0a1  8259 slave      0x4d0-0x4d1  ELCR
  0x040-0x043  8254 PIT         0x061        port B (speaker gate, OUT2)
  0x060, 0x064 i8042            0x092        system control port A (fast A20/reset)
  0x070-0x071  CMOS RTC         0x0f4-0x0f7  isa-debug-exit
  0x3f8/0x2f8/0x3e8/0x2e8 (+8)  COM1-COM4 (IRQ 4/3/4/3)
  0x505-0x508  boite power-off port        0xcf9 reset control register
  0x510-0x511  QEMU fw_cfg (legacy items: CPU count, RAM size; for x86 test kernels)
  0xfec00000 (mmio, 4 KiB)      IOAPIC

With `emulated_irqchip=False` (KVM's in-kernel irqchip and PIT) the PIC, PIT, port B and
IOAPIC are left out and the IrqRouter is left for the accelerator to attach.

Other packages add their devices through `extra_devices`: callables that receive the
machine once the platform devices are in, register what they need, and may return a
kernel command line fragment (for example `virtio_mmio.device=4K@0xd0000000:5`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boite.box.paths import inside, open_output
from boite.errors import ConfigError
from boite.machine.device import Device
from boite.machine.devices.debugexit import DEBUG_EXIT_PORT, IsaDebugExit
from boite.machine.devices.fwcfg import FW_CFG_PORT, FwCfg
from boite.machine.devices.i8042 import I8042, SystemControlPortA
from boite.machine.devices.ioapic import IOAPIC_BASE, IOAPIC_SIZE, IoApic
from boite.machine.devices.pic import ELCR_PORT, MASTER_PORT, SLAVE_PORT, DualPic
from boite.machine.devices.pit import PIT_PORT, SPEAKER_PORT, Pit8254, PitSpeakerPort
from boite.machine.devices.poweroff import (
    POWEROFF_PORT,
    RESET_CONTROL_PORT,
    PowerOffPort,
    ResetControl,
)
from boite.machine.devices.rtc import CmosRtc
from boite.machine.devices.uart import (
    COM_PORTS,
    FileBackend,
    PipeBackend,
    SerialBackend,
    TeeBackend,
    Uart16550,
)
from boite.machine.loader import choose_unpack, load_kernel
from boite.machine.machine import E820_RAM, E820_RESERVED, E820Entry, Machine
from boite.machine.memory import GuestMemory

MIN_MEMSIZE_MB = 4
NVRAM_SAVE_DELAY_S = 0.5  # a box's .nvram is rewritten at most this often
PCI_HOLE_START = 0xC000_0000
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000

if TYPE_CHECKING:
    from typing import TypeAlias  # 3.10+; PyPy 3.9 runs the emulator

ExtraDevice: TypeAlias = "Callable[[Machine], str | None]"


class PortAlias:
    """A device's register at a port that is not next to its others (the i8042's 0x64):
    the bus offset is shifted by `delta` before the device sees it."""

    def __init__(self, device: Any, delta: int) -> None:
        self.device = device
        self.delta = delta

    def bus_read(self, offset: int, size: int) -> int:
        return self.device.bus_read(offset + self.delta, size)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        self.device.bus_write(offset + self.delta, size, value)


def pc_e820(ram_size: int) -> list[E820Entry]:
    """The usual PC map: base memory up to the EBDA, the EBDA/VGA/BIOS area reserved, RAM
    from 1 MiB to the 32-bit PCI hole, and the rest above 4 GiB."""
    low = min(ram_size, PCI_HOLE_START)
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
    ]
    if low > HIGH_MEMORY:
        entries.append(E820Entry(HIGH_MEMORY, low - HIGH_MEMORY, E820_RAM))
    if ram_size > low:
        entries.append(E820Entry(1 << 32, ram_size - low, E820_RAM))
    return entries


def _serial_map(
    serial_backends: Sequence[SerialBackend | None] | Mapping[int, SerialBackend] | None,
) -> dict[int, SerialBackend]:
    """COM port number (1-4) -> backend; a sequence starts at COM1."""
    if serial_backends is None:
        return {}
    if isinstance(serial_backends, Mapping):
        items = dict(serial_backends)
    else:
        items = {i + 1: b for i, b in enumerate(serial_backends) if b is not None}
    for n in items:
        if not 1 <= n <= 4:
            raise ConfigError(f"serial port COM{n}: boite has COM1 to COM4")
    return items


def build_machine(
    memsize_mb: int | None = None,
    num_vcpus: int = 1,
    serial_backends: Sequence[SerialBackend | None] | Mapping[int, SerialBackend] | None = None,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str = "",
    *,
    console: SerialBackend | None = None,
    cpus: int | None = None,
    box: Any = None,
    protocol: str = "auto",
    kernel_unpack: str | None = None,
    emulated_irqchip: bool = True,
    cmos_bytes: bytes | None = None,
    persist_cmos: Callable[[bytes], None] | None = None,
    persist_delay: float = 0.0,
    rtc_base_time: float | None = None,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    extra_devices: Sequence[ExtraDevice] = (),
) -> Machine:
    """A PC with `memsize_mb` MiB of RAM and `num_vcpus` vCPUs (`cpus` is the same).

    `serial_backends` gives COM1..COM4 (a sequence from COM1, or {port number: backend});
    `console` is COM1's backend when `serial_backends` does not name COM1. With `box`
    (a boite.box.Box) everything comes from the box instead: see `machine_from_box`.
    `kernel_unpack` ("auto" when None, "true", "false"; see loader.choose_unpack) picks
    protocol "linux-unpacked" for a bzImage when `protocol` is "auto".
    """
    if box is not None:
        return machine_from_box(
            box, console=console, emulated_irqchip=emulated_irqchip, clock_ns=clock_ns,
            extra_devices=extra_devices, protocol=protocol, kernel_unpack=kernel_unpack,
        )  # fmt: skip
    if cpus is not None:
        num_vcpus = cpus
    if memsize_mb is None:
        raise ConfigError("build_machine: memsize_mb (or box) is required")
    serials = _serial_map(serial_backends)
    if console is not None:
        serials.setdefault(1, console)
    if memsize_mb < MIN_MEMSIZE_MB:
        raise ConfigError(f"memsize {memsize_mb} MB: boite needs at least {MIN_MEMSIZE_MB} MB")
    if num_vcpus < 1:
        raise ConfigError(f"numvcpus {num_vcpus}: a machine needs at least one vCPU")
    if initrd is not None and kernel is None:
        raise ConfigError("an initrd was given without a kernel")
    ram = memsize_mb << 20
    try:
        memory = GuestMemory.with_ram(ram, hole_start=PCI_HOLE_START)
    except (OSError, OverflowError) as e:
        raise ConfigError(f"memsize {memsize_mb} MB: the host cannot map that much: {e}") from e
    machine = Machine(memory, num_vcpus=num_vcpus)
    machine.e820 = pc_e820(ram)
    try:
        _add_platform(
            machine, ram, serials, emulated_irqchip, cmos_bytes,
            persist_cmos, persist_delay, rtc_base_time, clock_ns,
        )  # fmt: skip
        fragments = [cmdline] if cmdline else []
        for hook in extra_devices:
            frag = hook(machine)
            if frag:
                fragments.append(frag)
        if kernel is not None:
            if protocol == "auto":
                protocol = _unpack_protocol(machine, str(kernel), kernel_unpack, emulated_irqchip)
            load_kernel(machine, kernel, initrd, " ".join(fragments), protocol)
    except BaseException:
        machine.memory.close()
        raise
    return machine


def _unpack_protocol(machine: Machine, kernel: str, setting: str | None, emulator: bool) -> str:
    """ "linux-unpacked" where boite unpacks the bzImage itself (`choose_unpack`; the
    emulator's machine is the one with `emulated_irqchip`), else "auto"; the reason goes
    to `machine.kernel_note` for the log."""
    choice = choose_unpack(kernel, setting or "auto", emulator)
    if "not a Linux bzImage" not in choice.reason:
        machine.kernel_note = choice.reason
    return "linux-unpacked" if choice.unpack else "auto"


def _add(machine: Machine, name: str, device: Device) -> Any:
    return machine.add_device(name, device)


def _add_platform(
    machine: Machine,
    ram: int,
    serials: dict[int, SerialBackend],
    emulated_irqchip: bool,
    cmos_bytes: bytes | None,
    persist_cmos: Callable[[bytes], None] | None,
    persist_delay: float,
    rtc_base_time: float | None,
    clock_ns: Callable[[], int],
) -> None:
    pio, irqs = machine.pio, machine.irqs
    for n, backend in sorted(serials.items()):
        base, irq = COM_PORTS[n - 1]
        uart = _add(machine, f"com{n}", Uart16550(irqs.line(irq), backend))
        pio.register(base, 8, uart)

    rtc = _add(
        machine, "rtc",
        CmosRtc(
            irqs.line(8), ram, cmos_bytes=cmos_bytes, persist=persist_cmos,
            persist_delay=persist_delay, base_time=rtc_base_time, clock_ns=clock_ns,
            below_4g_ram=min(ram, PCI_HOLE_START),
        ),
    )  # fmt: skip
    pio.register(0x70, 2, rtc)

    kbc = _add(machine, "i8042", I8042(irqs.line(1), machine))
    pio.register(0x60, 1, kbc)
    pio.register(0x64, 1, PortAlias(kbc, 4))
    pio.register(0x92, 1, _add(machine, "port92", SystemControlPortA(machine)))
    pio.register(DEBUG_EXIT_PORT, 4, _add(machine, "debug-exit", IsaDebugExit(machine, 4)))
    pio.register(POWEROFF_PORT, 4, _add(machine, "poweroff", PowerOffPort(machine)))
    pio.register(RESET_CONTROL_PORT, 1, _add(machine, "reset-control", ResetControl(machine)))
    fw_cfg = FwCfg(ram, machine.num_vcpus)
    pio.register(FW_CFG_PORT, 2, _add(machine, "fw_cfg", fw_cfg))

    if not emulated_irqchip:
        return
    pic = _add(machine, "pic", DualPic())
    pio.register(MASTER_PORT, 2, pic.bus_view("master"))
    pio.register(SLAVE_PORT, 2, pic.bus_view("slave"))
    pio.register(ELCR_PORT, 2, pic.bus_view("elcr"))
    pit = _add(machine, "pit", Pit8254(irqs.line(0), clock_ns))
    pio.register(PIT_PORT, 4, pit)
    pio.register(SPEAKER_PORT, 1, _add(machine, "port61", PitSpeakerPort(pit)))
    ioapic = _add(machine, "ioapic", IoApic())
    machine.mmio.register(IOAPIC_BASE, IOAPIC_SIZE, ioapic)

    def route(gsi: int, level: bool) -> None:
        pic.set_irq(gsi, level)
        # ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, as on every PC since the MP spec.
        ioapic.set_irq(2 if gsi == 0 else (0 if gsi == 2 else gsi), level)

    irqs.attach(route)


def serial_backend_for(
    file_type: str | None, file_name: str | None, base_dir: Path, where: str
) -> SerialBackend | None:
    """A `.vmx` serial port's backend: fileType "file" or "pipe"; None for the console."""
    kind = (file_type or "").lower()
    if kind in ("", "console"):
        return None
    if kind not in ("file", "pipe"):
        raise ConfigError(
            f'{where}.fileType = {file_type!r}: boite supports "file" and "pipe" (and the '
            f"attachable console on COM1)"
        )
    if not file_name:
        raise ConfigError(f"{where}.fileName is missing for fileType {file_type!r}")
    # What the VMM writes stays inside the box, never through a link (box/paths.py).
    source, _, port = where.rpartition(": ")
    key = f"{port}.fileName"
    if kind == "file":
        fd = open_output(base_dir, file_name, source=source, key=key)
        return FileBackend(inside(base_dir, file_name, source=source, key=key), fd=fd)
    return PipeBackend(inside(base_dir, file_name, source=source, key=key))


def machine_from_box(
    box: Any,
    *,
    console: SerialBackend | None = None,
    emulated_irqchip: bool = True,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    extra_devices: Sequence[ExtraDevice] = (),
    protocol: str = "auto",
    kernel_unpack: str | None = None,
) -> Machine:
    """Build the machine a box describes (a boite.box.Box): `memsize`, `numvcpus`,
    `serialN.fileType`/`fileName` (COM1 is also the attachable `console` when one is
    given: a serial0 file or pipe then gets the same output), the CMOS bytes of `NAME.nvram` (saved back whenever the guest changes
    them), and `boite.kernel` / `boite.initrd` / `boite.cmdline` (relative to the box),
    `boite.kernelUnpack` unless `kernel_unpack` overrides it."""
    config = box.config
    serials: dict[int, SerialBackend] = {}
    opened: list[SerialBackend] = []
    try:
        for port in config.serials:
            if not port.present:
                continue
            if not 0 <= port.index <= 3:
                raise ConfigError(f"{config.source}: serial{port.index}: boite has serial0-3")
            backend = serial_backend_for(
                port.file_type, port.file_name, box.dir, f"{config.source}: serial{port.index}"
            )
            if backend is not None:
                opened.append(backend)
                serials[port.index + 1] = backend
    except BaseException:
        for b in opened:
            b.close()
        raise
    if console is not None:
        # COM1 is the console; a serial0 file or pipe still gets everything it prints.
        serials[1] = TeeBackend(serials[1], console) if 1 in serials else console

    nvram = box.nvram

    def persist(cmos: bytes) -> None:
        nvram.cmos[: len(cmos)] = cmos
        nvram.save(box.nvram_path)

    def box_path(key: str) -> str | None:
        value = config.get_str(key)
        if not value:
            return None
        path = Path(value)
        return str(path if path.is_absolute() else box.dir / path)

    try:
        return build_machine(
            config.memsize, config.numvcpus, serials,
            kernel=box_path("boite.kernel"), initrd=box_path("boite.initrd"),
            cmdline=config.get_str("boite.cmdline") or "",
            emulated_irqchip=emulated_irqchip, cmos_bytes=bytes(nvram.cmos),
            persist_cmos=persist, persist_delay=NVRAM_SAVE_DELAY_S, clock_ns=clock_ns,
            extra_devices=extra_devices, protocol=protocol,
            kernel_unpack=kernel_unpack or config.kernel_unpack,
        )  # fmt: skip
    except BaseException:
        for b in opened:
            b.close()
        raise
