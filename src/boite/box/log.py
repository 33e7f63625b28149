"""`vmware.log`: one line per event in VMware's modern format, rotated at each power-on.

    2026-10-08T13:54:39.211Z In(05) vmx Powering on.
    ^ UTC, milliseconds       ^level  ^thread group (vmx, vcpu-0, mks, ...)

At power-on the old logs shift: `vmware-1.log` -> `vmware-2.log`, `vmware-0.log` ->
`vmware-1.log`, `vmware.log` -> `vmware-0.log`, keeping `log.keepOld` old logs (VMware's
key, default 3); the oldest beyond that is removed.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import TextIO

# VMware's level tags: the two letters and the syslog-like number it prints.
LEVELS = {"notice": "No(00)", "error": "Er(02)", "warning": "Wa(03)", "info": "In(05)"}
LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z][a-z]\(\d\d\)) "
    r"(?P<group>\S+) (?P<message>.*)$"
)
LOG_NAME = "vmware.log"
_OLD_LOG = re.compile(r"vmware-(\d{1,9})\.log")


def timestamp(when: float | None = None) -> str:
    when = time.time() if when is None else when
    ms = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{ms:03d}Z"


def rotate(directory: str | Path, keep_old: int = 3) -> None:
    """Shift `vmware.log` into `vmware-0.log` and the older ones up, keeping `keep_old`.

    Works from the files that exist (oldest first), so a huge `log.keepOld` costs nothing
    and logs left by a larger `keepOld` before are removed.
    """
    directory = Path(directory)
    existing = sorted(
        (int(m.group(1)) for p in directory.iterdir() if (m := _OLD_LOG.fullmatch(p.name))),
        reverse=True,
    )
    for n in existing:
        old = directory / f"vmware-{n}.log"
        if n + 1 >= keep_old:
            old.unlink(missing_ok=True)
        else:
            os.replace(old, directory / f"vmware-{n + 1}.log")
    current = directory / LOG_NAME
    if current.exists():
        if keep_old > 0:
            os.replace(current, directory / "vmware-0.log")
        else:
            current.unlink()


class VmwareLog:
    """An open `vmware.log`. Thread-safe: vCPU threads and the VMM log through one object."""

    def __init__(self, path: str | Path, stream: TextIO) -> None:
        self.path = Path(path)
        self._stream = stream
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, directory: str | Path, keep_old: int = 3, *, rotate_first: bool = True):
        """Rotate the old logs (a power-on) and start a fresh `vmware.log`."""
        directory = Path(directory)
        if rotate_first:
            rotate(directory, keep_old)
        from boite.box.paths import open_output

        path = directory / LOG_NAME
        # Inside the box, never through a symbolic link, 0600; fresh after a rotation.
        fd = open_output(directory, LOG_NAME, source=str(directory), key="vmware.log",
                         exclusive=rotate_first)  # fmt: skip
        stream = open(fd, "a", encoding="utf-8", buffering=1, errors="backslashreplace")
        return cls(path, stream)

    def write(self, message: str, level: str = "info", group: str = "vmx") -> None:
        tag = LEVELS.get(level)
        if tag is None:
            raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
        stamp = timestamp()
        # One event may span lines; each gets its own prefix so the file stays greppable.
        lines = message.splitlines() or [""]
        text = "".join(f"{stamp} {tag} {group} {line}\n" for line in lines)
        with self._mutex:
            if self._stream.closed:
                return
            self._stream.write(text)

    def info(self, message: str, group: str = "vmx") -> None:
        self.write(message, "info", group)

    def warning(self, message: str, group: str = "vmx") -> None:
        self.write(message, "warning", group)

    def error(self, message: str, group: str = "vmx") -> None:
        self.write(message, "error", group)

    def close(self) -> None:
        with self._mutex:
            if not self._stream.closed:
                self._stream.flush()
                self._stream.close()

    def __enter__(self) -> VmwareLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
