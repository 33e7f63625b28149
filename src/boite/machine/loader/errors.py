"""The loaders' typed error."""

from __future__ import annotations

from boite.errors import ConfigError


class KernelFormatError(ConfigError):
    """The file given as `boite.kernel` (or `--kernel`) is not a kernel boite can boot, or
    it does not fit the machine. Says the file, the offset, what was found and expected."""
