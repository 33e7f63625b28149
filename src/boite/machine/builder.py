"""Build a PC-like Machine: RAM with its e820 map, the platform devices on their buses,
IRQ lines, and a kernel loaded by the boot loaders.

Port map (everything on `machine.pio` unless said otherwise):

  0x020-0x021  8259 master      0x0a0-0x0a1  8259 slave      0x4d0-0x4d1  ELCR
  0x040-0x043  8254 PIT         0x061        port B (speaker gate, OUT2)
  0x060, 0x064 i8042            0x092        system control port A (fast A20/reset)
  0x070-0x071  CMOS RTC         0x0f4-0x0f7  isa-debug-exit
  0x3f8/0x2f8/0x3e8/0x2e8 (+8)  COM1-COM4 (IRQ 4/3/4/3)
  0x505-0x508  boite power-off port        0xcf9 reset control register
  0x510-0x511, 0x514-0x51b  QEMU fw_cfg (legacy items, named files, DMA)
  0xcf8, 0xcfc-0xcff  PCI configuration mechanism #1 (bus 0: 00:00.0 i440FX host bridge,
               00:01.0 PIIX3 ISA bridge with PIRQ routing, 00:01.3 PIIX4 ACPI PM whose
               I/O block the firmware places, SCI on IRQ 9); BARs go where the firmware
               or the OS writes them
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
from boite.machine.devices.debugcon import DEBUGCON_PORT, DebugCon
from boite.machine.devices.debugexit import DEBUG_EXIT_PORT, IsaDebugExit
from boite.machine.devices.fwcfg import FW_CFG_DMA_PORT, FW_CFG_PORT, FW_CFG_UUID, FwCfg
from boite.machine.devices.i8042 import (
    DATA_PORT,
    I8042,
    PORT_A,
    STATUS_PORT,
    SystemControlPortA,
)
from boite.machine.devices.ioapic import IOAPIC_BASE, IOAPIC_SIZE, IoApic
from boite.machine.devices.pic import ELCR_PORT, MASTER_PORT, SLAVE_PORT, DualPic
from boite.machine.devices.pit import PIT_PORT, SPEAKER_PORT, Pit8254, PitSpeakerPort
from boite.machine.devices.poweroff import (
    POWEROFF_PORT,
    RESET_CONTROL_PORT,
    PowerOffPort,
    ResetControl,
)
from boite.machine.devices.rtc import RTC_IRQ, RTC_PORT, CmosRtc
from boite.machine.devices.uart import (
    COM_PORTS,
    FileBackend,
    PipeBackend,
    SerialBackend,
    TeeBackend,
    Uart16550,
)
from boite.machine.firmware.pc import fill_fw_cfg, order_boot_devices, parse_boot_order
from boite.machine.firmware.seabios import map_bios, read_bios
from boite.machine.loader import choose_unpack, load_kernel
from boite.machine.loader.mptable import write_mp_table
from boite.machine.machine import E820_RAM, E820_RESERVED, E820Entry, IoRange, Machine
from boite.machine.memory import GuestMemory
from boite.machine.pci import PciBus, PciHostBridge, Piix3IsaBridge, Piix4Pm
from boite.machine.pci.piix import DEFAULT_PM_BASE, SCI_IRQ

MIN_MEMSIZE_MB = 4
NVRAM_SAVE_DELAY_S = 0.5  # a box's .nvram is rewritten at most this often
PCI_HOLE_START = 0xC000_0000
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000

if TYPE_CHECKING:
    from typing import TypeAlias  # 3.10+; PyPy 3.9 runs the emulator

ExtraDevice: TypeAlias = "Callable[[Machine], str | None]"


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
    firmware: bool = False,
    bios: str | os.PathLike[str] | None = None,
    boot_order: Sequence[str] = (),
    hdd_order: Sequence[str] = (),
    uuid: bytes | None = None,
) -> Machine:
    """A PC with `memsize_mb` MiB of RAM and `num_vcpus` vCPUs (`cpus` is the same).

    With `firmware` (and no `kernel`) the machine boots through SeaBIOS (`bios`, default
    Debian's bios-256k.bin) from the devices the extra-device hooks registered, in
    `boot_order` ("cdrom", "hdd") and `hdd_order` (disk keys); `uuid` is the SMBIOS UUID.

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
        # A directly loaded kernel learns of virtio devices from its command line
        # (virtio-mmio); the BIOS and a kernel it boots find them on PCI.
        machine.virtio_transport = "pci" if firmware and kernel is None else "mmio"
        for hook in extra_devices:
            frag = hook(machine)
            if frag:
                fragments.append(frag)
        if kernel is not None:
            if protocol == "auto":
                protocol = _unpack_protocol(machine, str(kernel), kernel_unpack, emulated_irqchip)
            load_kernel(machine, kernel, initrd, " ".join(fragments), protocol)
            if num_vcpus > 1:  # no firmware to tell the kernel of the other vCPUs
                write_mp_table(machine)
        elif firmware:
            _add_firmware(machine, bios, boot_order, hdd_order, uuid or bytes(16))
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
    irqs = machine.irqs
    for n, backend in sorted(serials.items()):
        base, irq = COM_PORTS[n - 1]
        uart = Uart16550(irqs.line(irq), backend)
        machine.attach(f"com{n}", uart, ports=[(base, 8)], irq=irq)

    rtc = CmosRtc(
        irqs.line(RTC_IRQ), ram, cmos_bytes=cmos_bytes, persist=persist_cmos,
        persist_delay=persist_delay, base_time=rtc_base_time, clock_ns=clock_ns,
        below_4g_ram=min(ram, PCI_HOLE_START), num_cpus=machine.num_vcpus,
    )  # fmt: skip
    machine.attach("rtc", rtc, ports=[(RTC_PORT, 2)], irq=RTC_IRQ, timer=True)

    kbc = I8042(irqs.line(1), machine)
    machine.attach("i8042", kbc, ports=[(DATA_PORT, 1), IoRange(STATUS_PORT, 1, offset=4)], irq=1)
    machine.attach("port92", SystemControlPortA(machine), ports=[(PORT_A, 1)])
    machine.attach("debug-exit", IsaDebugExit(machine, 4), ports=[(DEBUG_EXIT_PORT, 4)])
    machine.attach("poweroff", PowerOffPort(machine), ports=[(POWEROFF_PORT, 4)])
    machine.attach("reset-control", ResetControl(machine), ports=[(RESET_CONTROL_PORT, 1)])
    fw_cfg = FwCfg(ram, machine.num_vcpus, memory=machine.memory)
    machine.attach(
        "fw_cfg", fw_cfg, ports=[(FW_CFG_PORT, 2), IoRange(FW_CFG_DMA_PORT, 8, offset=4)]
    )
    _add_pci(machine, clock_ns)

    if not emulated_irqchip:
        return
    pic = DualPic()
    machine.attach(
        "pic", pic, interrupt_controller=True,
        ports=[
            IoRange(MASTER_PORT, 2, handler=pic.bus_view("master")),
            IoRange(SLAVE_PORT, 2, handler=pic.bus_view("slave")),
            IoRange(ELCR_PORT, 2, handler=pic.bus_view("elcr")),
        ],
    )  # fmt: skip
    pit = Pit8254(irqs.line(0), clock_ns)
    machine.attach("pit", pit, ports=[(PIT_PORT, 4)], irq=0, timer=True)
    machine.attach("port61", PitSpeakerPort(pit), ports=[(SPEAKER_PORT, 1)])
    ioapic = IoApic()
    machine.attach("ioapic", ioapic, mmio=[(IOAPIC_BASE, IOAPIC_SIZE)])

    def route(gsi: int, level: bool) -> None:
        pic.set_irq(gsi, level)
        # ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, as on every PC since the MP spec.
        ioapic.set_irq(2 if gsi == 0 else (0 if gsi == 2 else gsi), level)

    irqs.attach(route)


def _add_firmware(
    machine: Machine,
    bios: str | os.PathLike[str] | None,
    boot_order: Sequence[str],
    hdd_order: Sequence[str],
    uuid: bytes,
) -> None:
    """SeaBIOS mapped, its debug port, and fw_cfg's files (see machine/firmware/pc.py)."""
    image = read_bios(bios)
    ram_ranges = [
        (r.gpa, r.size) for r in machine.memory.regions
        if r.gpa < PCI_HOLE_START or r.gpa >= 1 << 32
    ]  # fmt: skip
    map_bios(machine.memory, image)
    machine.attach("debugcon", DebugCon(), ports=[(DEBUGCON_PORT, 1)])
    fw_cfg = machine.devices["fw_cfg"]
    assert isinstance(fw_cfg, FwCfg)
    fw_cfg.items[FW_CFG_UUID] = bytes(uuid)
    fill_fw_cfg(
        fw_cfg, ram_ranges=ram_ranges, num_cpus=machine.num_vcpus, pm_base=DEFAULT_PM_BASE,
        boot=order_boot_devices(machine.boot_devices, boot_order, hdd_order), uuid=uuid,
        sercon_port=COM_PORTS[0][0] if "com1" in machine.devices else None,
    )  # fmt: skip
    machine.firmware = "seabios"


def _add_pci(machine: Machine, clock_ns: Callable[[], int]) -> None:
    """PCI bus 0: the i440FX host bridge (00:00.0), the PIIX3 ISA bridge (00:01.0) with
    the PIRQ routing, and the PIIX4 power management function (00:01.3, ACPI)."""
    machine.pci = pci = PciBus(machine.pio, machine.mmio)
    host = PciHostBridge(pci)
    machine.attach("pci-host", host, pci=(0, 0), ports=host.port_ranges())
    isa = Piix3IsaBridge(machine.irqs.line)
    machine.attach("piix3-isa", isa, pci=(1, 0))
    pci.intx_sink = isa.intx
    pm = Piix4Pm(
        machine.irqs.line(SCI_IRQ),
        clock_ns=clock_ns,
        on_poweroff=lambda: machine.request_poweroff(0, "ACPI S5 via PM1a_CNT"),
    )
    pm.io_bus = machine.pio
    machine.attach("piix4-pm", pm, pci=(1, 3), irq=SCI_IRQ)
    machine.power_button = pm.press_power_button


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
    given: a serial0 file or pipe then gets the same output), the CMOS bytes of
    `NAME.nvram` (saved back whenever the guest changes them), and `boite.kernel` /
    `boite.initrd` / `boite.cmdline` (relative to the box). Without `boite.kernel` the
    box boots through SeaBIOS, in `bios.bootOrder` / `bios.hddOrder`, with `uuid.bios`
    as its SMBIOS UUID. `boite.kernelUnpack` unless `kernel_unpack` overrides it."""
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

    kernel = box_path("boite.kernel")
    try:
        return build_machine(
            config.memsize, config.numvcpus, serials,
            kernel=kernel, initrd=box_path("boite.initrd"),
            cmdline=config.get_str("boite.cmdline") or "",
            emulated_irqchip=emulated_irqchip, cmos_bytes=bytes(nvram.cmos),
            persist_cmos=persist, persist_delay=NVRAM_SAVE_DELAY_S, clock_ns=clock_ns,
            extra_devices=extra_devices, firmware=kernel is None,
            boot_order=parse_boot_order(
                config.get_str("bios.bootOrder"), f"{config.source}: bios.bootOrder"
            ),
            hdd_order=[k for k in (config.get_str("bios.hddOrder") or "").split(",") if k.strip()],
            uuid=config.uuid_bios,
            protocol=protocol, kernel_unpack=kernel_unpack or config.kernel_unpack,
        )  # fmt: skip
    except BaseException:
        for b in opened:
            b.close()
        raise
