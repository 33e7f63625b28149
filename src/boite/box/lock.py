"""`NAME.vmx.lck`: who runs a box, safe on a shared (NFS) directory; and the host's list of
running boxes.

The lock is a file that exists only while a box runs. It is made the NFS-safe way: the
holder writes its record (host, pid, process start time, a random nonce) to a unique temp
file and hard-links it to `NAME.vmx.lck`. `link()` is atomic on every NFS version, where
`flock()` is advisory and `O_EXCL` was not atomic before NFSv3, so exactly one of two
racing starters gets the name, even from different hosts.

A lock whose holder is a dead process on this host is stale: it is taken over, and the
caller logs it. Taking over is serialized on this host with a `flock()` on a host-local
file (only processes on the holder's own host may judge it dead), and the takeover checks
that the lock still holds the stale record before removing it, so two processes that find
the same stale lock cannot both win. A lock from another host is never broken: that
host's boite may still run the box.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from boite.errors import LockError

MAX_LOCK_BYTES = 64 << 10  # a lock record is a few hundred bytes


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the process holding it."""

    host: str
    pid: int
    started: float  # when the lock was taken (Unix time)
    proc_start: int | None  # /proc/PID/stat start time, to tell a reused pid apart
    nonce: str
    vmx: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} (since {since})"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockHolder:
        record = json.loads(data.decode("utf-8"))
        return cls(
            host=str(record["host"]),
            pid=int(record["pid"]),
            started=float(record["started"]),
            proc_start=None if record.get("proc_start") is None else int(record["proc_start"]),
            nonce=str(record["nonce"]),
            vmx=str(record.get("vmx", "")),
        )

    def is_dead_here(self) -> bool:
        """True when this host can prove the holder is gone (its pid no longer runs it)."""
        if self.host != hostname():
            return False
        if not pid_alive(self.pid):
            return True
        # The pid runs, but maybe as another process: compare start times.
        return self.proc_start is not None and process_start(self.pid) != self.proc_start


def hostname() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    # A zombie has exited: its lock is as dead as the process.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def runtime_dir() -> Path:
    """Where this host keeps boite's running-box registry and lock helpers.

    `$BOITE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/boite`, else `~/.local/state/boite`.
    """
    explicit = os.environ.get("BOITE_RUNTIME_DIR")
    if explicit:
        base = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "boite"
    else:
        base = Path.home() / ".local" / "state" / "boite"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


class BoxLock:
    """The lock of one box: `acquire()` or raise `LockError` naming the holder."""

    def __init__(self, vmx_path: str | Path) -> None:
        self.vmx_path = Path(vmx_path)
        self.path = self.vmx_path.with_name(self.vmx_path.name + ".lck")
        self.holder: LockHolder | None = None  # ours, while held
        self.taken_over: LockHolder | None = None  # the stale holder we replaced, if any

    @property
    def held(self) -> bool:
        return self.holder is not None

    def acquire(self) -> LockHolder:
        if self.holder is not None:
            raise LockError(f"{self.vmx_path}: this process already holds the lock")
        me = LockHolder(
            host=hostname(),
            pid=os.getpid(),
            started=time.time(),
            proc_start=process_start(os.getpid()),
            nonce=secrets.token_hex(8),
            vmx=str(self.vmx_path.resolve()),
        )
        for _attempt in range(20):
            if self._link_create(me):
                self.holder = me
                return me
            current = self.read_holder()
            if current is None:
                continue  # released between our link and our read: try again
            if current.is_dead_here():
                if self._remove_stale(current):
                    self.taken_over = current
                continue
            raise LockError(
                f"{self.vmx_path} is in use: locked by {current.describe()} (lock file {self.path})"
            )
        raise LockError(f"{self.path}: the lock kept changing hands; try again")

    def _link_create(self, me: LockHolder) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{me.host}.{me.pid}.{me.nonce}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise LockError(
                f"{self.path}: cannot write in the box directory to lock it: {exc.strerror}"
            ) from exc
        try:
            os.write(fd, me.to_bytes())
            os.fsync(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LockError(f"{self.path}: cannot write the lock record: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            # NFS may lose the reply to a link that succeeded: the link count tells.
            if exc.errno in (errno.EIO, errno.ETIMEDOUT) and os.stat(tmp).st_nlink == 2:
                return True
            raise LockError(f"{self.path}: cannot create the lock file: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def read_holder(self) -> LockHolder | None:
        """Who holds the lock now, or None when nobody does."""
        from boite.box.paths import FileKindError, read_regular

        try:
            data = read_regular(self.path, MAX_LOCK_BYTES, what="lock file")
        except FileNotFoundError:
            return None
        except FileKindError as exc:
            raise LockError(f"{exc}; if no boite runs this box, remove it") from None
        except OSError as exc:
            raise LockError(f"{self.path}: cannot read the lock file: {exc.strerror}") from exc
        try:
            return LockHolder.from_bytes(data)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            # Never quote the bytes: the file may be a link to anything.
            raise LockError(
                f"{self.path}: the lock file ({len(data)} bytes) does not say who holds it; "
                "if no boite runs this box, remove the file"
            ) from None

    def _remove_stale(self, stale: LockHolder) -> bool:
        """Remove the lock if it still holds `stale`; serialized with every other process
        on this host that may be doing the same."""
        with _host_mutex(self.path):
            try:
                now = self.read_holder()
            except LockError:
                return False
            if now is None or now.nonce != stale.nonce:
                return False  # someone else already took it over
            self.path.unlink(missing_ok=True)
            return True

    def release(self) -> None:
        if self.holder is None:
            return
        try:
            current = self.read_holder()
        except LockError:
            current = None
        if current is not None and current.nonce == self.holder.nonce:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> BoxLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def _host_mutex(lock_path: Path):
    """A flock on a host-local file named after the box directory's identity, so two paths
    to the same directory (bind mounts, symlinks) share it."""
    st = os.stat(lock_path.parent)
    key = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{lock_path.name}".encode()).hexdigest()[:24]
    path = runtime_dir() / f"takeover-{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the host's list of running boxes ---------------------------------------------------


@dataclass(frozen=True)
class RunningBox:
    vmx: str
    name: str
    pid: int
    host: str
    started: float
    nonce: str
    control: str | None = None  # the control socket, once the VMM has one


def _registry() -> Path:
    path = runtime_dir() / "running"
    path.mkdir(exist_ok=True, mode=0o700)
    return path


def _entry_path(vmx: str) -> Path:
    return _registry() / (hashlib.sha256(vmx.encode()).hexdigest()[:24] + ".json")


def register_running(entry: RunningBox) -> None:
    path = _entry_path(entry.vmx)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(entry), sort_keys=True))
    os.replace(tmp, path)


def unregister_running(vmx: str, nonce: str) -> None:
    path = _entry_path(vmx)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("nonce") == nonce:
        path.unlink(missing_ok=True)


def list_running() -> list[RunningBox]:
    """Boxes running on this host, oldest first; entries of dead processes are removed."""
    boxes: list[RunningBox] = []
    for path in sorted(_registry().glob("*.json")):
        try:
            entry = RunningBox(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if not pid_alive(entry.pid) or not _lock_still_ours(entry):
            path.unlink(missing_ok=True)
            continue
        boxes.append(entry)
    return sorted(boxes, key=lambda b: b.started)


def _lock_still_ours(entry: RunningBox) -> bool:
    lock = BoxLock(entry.vmx)
    try:
        holder = lock.read_holder()
    except LockError:
        return False
    return holder is not None and holder.nonce == entry.nonce
