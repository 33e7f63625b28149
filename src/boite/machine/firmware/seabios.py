"""SeaBIOS, from Debian's `seabios` package, as the PC's BIOS.

The image (`bios-256k.bin`) is mapped as on a PC: at the top of the 32-bit space
(0xFFFC0000, where the reset vector F000:FFF0 with CS base 0xFFFF0000 lands) and copied
below 1 MiB (0xC0000-0xFFFFF, its link addresses). On QEMU the low copy appears when
SeaBIOS turns the i440FX's PAM registers to RAM and copies itself there from the high
alias; here 0xC0000-0xFFFFF is plain RAM that already holds the copy and PAM0 reads
"RAM", so SeaBIOS skips the copy (its `make_bios_writable` takes that path after a warm
reboot too). PAM's read-only setting is not enforced: the guest could write over its
BIOS, which only hurts itself.

`BOITE_SEABIOS` names another image (for tests and for hosts without the package).
"""

from __future__ import annotations

import os
from pathlib import Path

from boite.errors import ConfigError

DEFAULT_BIOS = Path("/usr/share/seabios/bios-256k.bin")
TOP_OF_4G = 1 << 32
LOW_END = 0x10_0000


def bios_path() -> Path:
    return Path(os.environ.get("BOITE_SEABIOS") or DEFAULT_BIOS)


def read_bios(path: str | os.PathLike[str] | None = None) -> bytes:
    """The BIOS image, checked: a whole number of 64 KiB, at most 256 KiB (it must fit
    below 1 MiB from 0xC0000)."""
    p = Path(path) if path is not None else bios_path()
    try:
        with open(p, "rb") as f:
            data = f.read(256 * 1024 + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no BIOS image; a box without boite.kernel boots through SeaBIOS "
            "(install Debian's `seabios` package, or set BOITE_SEABIOS)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the BIOS image: {e.strerror}") from None
    if not data or len(data) % 0x10000 or len(data) > 256 * 1024:
        raise ConfigError(f"{p}: a BIOS image is 64, 128 or 256 KiB, this is {len(data)} bytes")
    return data


def map_bios(memory: object, image: bytes) -> None:
    """Put `image` at the top of 4 GiB and its copy below 1 MiB (see the module doc)."""
    high = TOP_OF_4G - len(image)
    region = memory.add_region(high, len(image))  # type: ignore[attr-defined]
    region.view[:] = image
    memory.write(LOW_END - len(image), image)  # type: ignore[attr-defined]
