"""Boot loaders: put a kernel in guest RAM and give the machine its initial CPU state.

`load_kernel` finds the format the way QEMU's `-kernel` does: a Linux bzImage (boot
protocol header), else a multiboot kernel (header in the first 8 KiB), else an ELF with a
PVH note; anything else is a KernelFormatError naming the file.
"""

from __future__ import annotations

import os

from boite.accel.cpustate import CpuState
from boite.machine.loader.elf import is_elf, parse_elf
from boite.machine.loader.errors import KernelFormatError
from boite.machine.loader.linux import (
    UNPACK_SETTINGS,
    UnpackChoice,
    choose_unpack,
    extract_payload,
    is_bzimage,
    load_linux,
    parse_setup_header,
)
from boite.machine.loader.multiboot import MultibootModule, find_header, load_multiboot
from boite.machine.loader.pvh import load_pvh, pvh_entry
from boite.machine.machine import Machine

PROTOCOLS = ("auto", "linux", "linux32", "linux64", "linux-unpacked", "multiboot", "pvh")

__all__ = [
    "KernelFormatError",
    "MultibootModule",
    "PROTOCOLS",
    "UNPACK_SETTINGS",
    "UnpackChoice",
    "choose_unpack",
    "detect_protocol",
    "extract_payload",
    "load_kernel",
    "load_linux",
    "load_multiboot",
    "load_pvh",
    "multiboot_modules",
    "parse_setup_header",
]


def _read(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """The whole file, if it is a regular file that fits guest RAM (`limit`): a FIFO, a
    device or a 6 GiB file is refused before it is read."""
    from boite.box.paths import FileKindError, read_regular

    try:
        size = os.stat(path).st_size
        if size > limit:
            raise KernelFormatError(f"{path}: the {what} is {size} bytes, more than guest RAM "
                                    f"({limit} bytes)")  # fmt: skip
        return read_regular(path, limit, what=what)
    except FileKindError as e:
        raise KernelFormatError(f"{e} (guest RAM is {limit} bytes)") from None
    except OSError as e:
        raise KernelFormatError(f"{path}: cannot read the {what}: {e.strerror}") from e


def detect_protocol(data: bytes, path: str) -> str:
    """ "linux", "multiboot" or "pvh" for a kernel image, or a KernelFormatError."""
    if is_bzimage(data):
        return "linux"
    if find_header(data) is not None:
        return "multiboot"
    if is_elf(data) and pvh_entry(parse_elf(data, path)) is not None:
        return "pvh"
    # Never quote the file's bytes: it may be any file the box names.
    what = "an ELF file without a PVH entry note" if is_elf(data) else "none of them"
    raise KernelFormatError(
        f"{path}: not a kernel boite can boot: no Linux boot protocol header ('HdrS' at "
        f"0x202), no multiboot header in the first 8 KiB and no PVH ELF note; found {what}"
    )


def multiboot_modules(spec: str) -> list[MultibootModule]:
    """QEMU's `-initrd` for multiboot: comma-separated modules, each "FILE [ARGS]" (the whole
    item is the module's command line; ",," is a literal comma)."""
    items, cur, i = [], "", 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += spec[i]
        i += 1
    items.append(cur)
    modules = []
    for item in items:
        item = item.strip()
        if not item:
            raise KernelFormatError(f"multiboot module list {spec!r} has an empty item")
        modules.append(MultibootModule(item.split(" ", 1)[0], item))
    return modules


def load_kernel(
    machine: Machine,
    kernel: str | os.PathLike[str],
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str = "",
    protocol: str = "auto",
) -> CpuState:
    """Load `kernel` (and `initrd`) into `machine`, set `machine.boot_state` to the boot
    vCPU's state and return it."""
    if protocol not in PROTOCOLS:
        raise KernelFormatError(f"boot protocol {protocol!r}: expected one of {PROTOCOLS}")
    path = str(kernel)
    data = _read(kernel, "kernel", machine.memory.size)
    proto = detect_protocol(data, path) if protocol == "auto" else protocol
    if proto == "multiboot":
        modules = multiboot_modules(str(initrd)) if initrd is not None else []
        state = load_multiboot(machine, path, data, cmdline, modules)
    else:
        initrd_data = _read(initrd, "initrd", machine.memory.size) if initrd is not None else None
        if proto in ("linux", "linux32", "linux64", "linux-unpacked"):
            entry = {"linux": "auto", "linux32": "32", "linux64": "64"}.get(proto, "32")
            unpack = proto == "linux-unpacked"
            state = load_linux(machine, path, data, cmdline, initrd_data, entry, unpack)
        else:
            state = load_pvh(machine, path, data, cmdline, initrd_data)
    machine.boot_state = [state]
    return state
