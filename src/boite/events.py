"""One logging path for what happens in a VM.

Every part logs through Python's `logging` under the `boite` logger: the VMM's events
(`boite.vmm`), device warnings (`boite.virtio`, `boite.ata`, ...), the snapshot part. While
a box runs, `to_box_log(box_log)` sends all of it to the box's `vmware.log` in VMware's
line format (the logger's last name part becomes the line's group: `vmx`, `virtio`, ...);
`-v` on the command line (or BOITE_VERBOSE=1) also shows it on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

LOGGER = logging.getLogger("boite")
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False  # never through Python's last-resort stderr handler
_LEVELS = {
    logging.DEBUG: "info",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}


class VmwareLogHandler(logging.Handler):
    """Writes records to a box's VmwareLog (boite.box.log)."""

    def __init__(self, box_log: Any) -> None:
        super().__init__(logging.INFO)
        self.box_log = box_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            group = record.name.rsplit(".", 1)[-1]
            group = "vmx" if group in ("boite", "vmm", "launch") else group
            self.box_log.write(record.getMessage(), _LEVELS.get(record.levelno, "info"), group)
        except Exception:  # noqa: BLE001 - a log line must never stop a VM
            self.handleError(record)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"boite: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - as above
            self.handleError(record)


_verbose_handler: logging.Handler | None = None


def set_verbose(on: bool = True) -> None:
    """Show every event on stderr too (`boite -v`, BOITE_VERBOSE=1)."""
    global _verbose_handler
    if on and _verbose_handler is None:
        _verbose_handler = _StderrHandler(logging.INFO)
        LOGGER.addHandler(_verbose_handler)
    elif not on and _verbose_handler is not None:
        LOGGER.removeHandler(_verbose_handler)
        _verbose_handler = None


if os.environ.get("BOITE_VERBOSE"):
    set_verbose(True)


@contextlib.contextmanager
def to_box_log(box_log: Any) -> Iterator[None]:
    """Send the `boite` logger's records to `box_log` (a VmwareLog) inside the block."""
    handler = VmwareLogHandler(box_log)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Show warnings and errors on stderr inside the block (a VM without a box, so without
    a vmware.log); with -v everything is shown already."""
    handler = None if _verbose_handler is not None else _StderrHandler(logging.WARNING)
    if handler is not None:
        LOGGER.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            LOGGER.removeHandler(handler)
