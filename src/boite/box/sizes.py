"""Sizes as people write them: `1G`, `512M`, `10GiB`, `4096` (bytes)."""

from __future__ import annotations

import re

from boite.errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.I)


def parse_size(text: str) -> int:
    """Bytes in `text`. Units are powers of 1024 (qemu-img and VMware do the same); a bare
    number is bytes."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ConfigError(
            f"size {text!r}: expected a number with an optional unit, like 1G or 512M"
        )
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]} {unit}iB"
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit]:
            return f"{size / _UNITS[unit]:.1f} {unit}iB"
    return f"{size} B"
