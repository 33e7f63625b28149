"""A box: one virtual machine as a directory in VMware Workstation's layout.

NAME/
  NAME.vmx        the configuration (VMware dictionary syntax)
  NAME.vmdk       the disk(s) named by `scsi0:0.fileName` and friends
  NAME.nvram      CMOS and firmware settings (boite's layout, see nvram.py)
  NAME.vmsd       the snapshot tree (empty until the first snapshot)
  NAME.vmx.lck    present while the box runs (see lock.py)
  vmware.log      this power-on's log; vmware-0.log .. older ones
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
import socket
import stat
import struct
from pathlib import Path

from boite import __version__
from boite.box import paths
from boite.box.atomic import fsync_dir
from boite.box.config import BoxConfig, format_vmware_uuid, generated_mac
from boite.box.limits import (
    Problem,
    check_disk_size,
    check_limits,
    require_within_limits,
)
from boite.box.lock import (
    BoxLock,
    LockHolder,
    RunningBox,
    register_running,
    unregister_running,
)
from boite.box.log import VmwareLog
from boite.box.nvram import Nvram
from boite.box.sizes import parse_size
from boite.box.vmxdict import VmxDict
from boite.errors import BoiteError, BoxError, ConfigError, LimitError, LockError

DEFAULT_MEMSIZE_MB = 256
DEFAULT_CPUS = 1
DEFAULT_DISK_BYTES = 1 << 30
DEFAULT_DISK_TYPE = "thin"
DEFAULT_GUEST_OS = "other5xlinux-64"
DISK_TYPES = ("thin", "flat")
# The hardware version VMware Workstation 17.5 writes; VMware reads older and newer ones.
VIRTUAL_HW_VERSION = "21"
# VMware's encrypted .vmx keeps only these in the clear; every other setting is sealed.
ENCRYPTION_KEYS = ("encryption.keySafe", "encryption.data")
ENCRYPTED_MESSAGE = (
    "the box is encrypted by VMware (encryption.keySafe, encryption.data): its settings and "
    "disks cannot be read without its key; remove the encryption in VMware first"
)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\- ]{0,127}")


class Box:
    """An opened box directory. Nothing runs until a VMM takes the lock."""

    def __init__(self, vmx_path: Path) -> None:
        self.vmx_path = vmx_path
        self.dir = vmx_path.parent
        self.name = vmx_path.stem
        self.vmx = VmxDict.load(vmx_path)
        self.config = BoxConfig(self.vmx)
        self._lock = BoxLock(vmx_path)
        self._log: VmwareLog | None = None
        self._nvram: Nvram | None = None
        self._vmsd: VmxDict | None = None
        self.recovered: str | None = None  # what recover_interrupted() finished or undid

    # -- finding a box -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, recover: bool = True) -> Box:
        """Open a box from its directory or its `.vmx` file; a snapshot operation that a
        crash interrupted is finished or undone first (`recover_interrupted`), so every
        verb sees the box as after (or before) it, never half-way."""
        box = cls(find_vmx(path))
        if recover:
            box.recover_interrupted()
        return box

    def recover_interrupted(self) -> str | None:
        """Finish or undo an interrupted snapshot operation (its journal is checked before
        it is replayed), under the box lock. A box whose lock a live process holds is left
        alone: its operation is running, not interrupted. Returns what was done, or None."""
        from boite.snapshot import needs_recovery, recover

        if not needs_recovery(self):
            return None
        lock = BoxLock(self.vmx_path)
        try:
            lock.acquire()
        except LockError:
            return None
        try:
            self.recovered = recover(self)
        finally:
            lock.release()
        return self.recovered

    @classmethod
    def create(
        cls,
        name_or_path: str | Path,
        memsize_mb: int = DEFAULT_MEMSIZE_MB,
        cpus: int = DEFAULT_CPUS,
        disk_size: int | str | None = DEFAULT_DISK_BYTES,
        disk_type: str = DEFAULT_DISK_TYPE,
        guest_os: str = DEFAULT_GUEST_OS,
        *,
        disk_bus: str = "scsi",
    ) -> Box:
        """Make a new box directory, all at once: built in a hidden directory beside the
        target and renamed into place, so a failed create leaves nothing behind.

        `disk_size` is bytes or a size like "1G"; None (or 0) makes a box without a disk
        (boot from a kernel or CD).
        """
        target = Path(name_or_path)
        if target.suffix.lower() == ".vmx":
            target = target.parent if target.parent.name == target.stem else target.with_suffix("")
        name = target.name
        if not _NAME.fullmatch(name):
            raise BoxError(
                f"{name!r} is not a usable box name: use letters, digits, '_', '-', '.', "
                "'+' or spaces, starting with a letter, digit or '_'"
            )
        if disk_type not in DISK_TYPES:
            raise BoxError(f"disk type {disk_type!r}: expected one of {', '.join(DISK_TYPES)}")
        if disk_bus not in ("ide", "scsi", "sata", "nvme"):
            raise BoxError(f"disk bus {disk_bus!r}: expected ide, scsi, sata or nvme")
        if target.exists() or target.is_symlink():
            raise BoxError(f"{target} already exists; choose another name or remove it")
        parent = target.parent
        if not parent.is_dir():
            raise BoxError(f"{parent} is not a directory; cannot create {name} there")

        if isinstance(disk_size, str):
            disk_size = parse_size(disk_size)
        disk_size = disk_size or None
        uuid_bios = secrets.token_bytes(16)
        vmx = default_vmx(name, memsize_mb, cpus, guest_os, uuid_bios, disk_bus, disk_size)
        config = BoxConfig(vmx)
        vmx.source = str(target / f"{name}.vmx")
        require_within_limits(config, "the new box")
        if disk_size is not None:
            if disk_size < 512 or disk_size % 512:
                raise BoxError(f"disk size {disk_size}: expected a positive multiple of 512 bytes")
            problems = check_disk_size(f"{disk_bus}0:0", disk_size)
            if problems:
                raise BoxError(f"cannot create {name}: {problems[0]}")

        staging = parent / f".{name}.creating-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except OSError as exc:
            # Name the directory the user chose, not the hidden staging one.
            raise OSError(exc.errno, f"cannot create {name} in {parent}: {exc.strerror}") from exc
        try:
            vmx.save(staging / f"{name}.vmx")
            VmxDict.new().save(staging / f"{name}.vmsd")
            Nvram().save(staging / f"{name}.nvram")
            if disk_size is not None:
                _create_disk(staging / f"{name}.vmdk", disk_size, disk_type, disk_bus)
            fsync_dir(staging)
            if target.exists():
                raise BoxError(f"{target} appeared while the box was being made; not replacing")
            try:
                os.rename(staging, target)
            except OSError as exc:
                # Another `create` of the same name won the race (ENOTEMPTY/EEXIST).
                raise BoxError(f"{target} already exists; choose another name") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(parent)
        return cls.open(target)

    # -- the files -----------------------------------------------------------------------

    @property
    def nvram_path(self) -> Path:
        """Where `nvram` really is; BoxPathError when it leaves the box (boite writes it)."""
        return paths.inside(self.dir, self.config.nvram, source=str(self.vmx_path), key="nvram")

    @property
    def nvram(self) -> Nvram:
        """The box's NVRAM; a fresh default one if the file is missing (saved by save())."""
        if self._nvram is None:
            path = self.nvram_path
            self._nvram = Nvram.load(path) if path.exists() else Nvram()
        return self._nvram

    @property
    def vmsd_path(self) -> Path:
        """NAME.vmsd; BoxPathError when it is a link that leaves the box."""
        return paths.inside(
            self.dir, f"{self.name}.vmsd", source=str(self.vmx_path), key="the snapshot tree"
        )

    @property
    def encrypted(self) -> bool:
        """Encrypted by VMware: the real settings are sealed in `encryption.data`."""
        return any(k in self.vmx for k in ENCRYPTION_KEYS)

    @property
    def vmsd(self) -> VmxDict:
        if self._vmsd is None:
            if self.vmsd_path.exists():
                self._vmsd = VmxDict.load(self.vmsd_path)
            else:
                self._vmsd = VmxDict.new()
                self._vmsd.source = str(self.vmsd_path)
        return self._vmsd

    @property
    def log(self) -> VmwareLog:
        """This power-on's `vmware.log`; the first access rotates the old logs, so take
        the lock (`acquire_lock`) before the first log line of a start."""
        if self._log is None:
            self._log = VmwareLog.open(self.dir, self.config.log_keep_old)
            # VMware opens each log with who wrote it; so does boite.
            self._log.info(
                f"Log for boite {__version__} pid={os.getpid()} host={socket.gethostname()} "
                f"python={platform.python_version()}"
            )
            self._log.info(f"Configuration file: {self.vmx_path.resolve()}")
        return self._log

    def disk_path(self, file_name: str) -> Path | str:
        """A disk's `fileName` resolved against the box directory (URLs stay as they are)."""
        if "://" in file_name:
            return file_name
        path = Path(file_name)
        return path if path.is_absolute() else self.dir / path

    def save(self) -> None:
        """Write the `.vmx`, and the `.nvram` / `.vmsd` if they were loaded, atomically."""
        self.vmx.save(self.vmx_path)
        if self._nvram is not None:
            self._nvram.save(self.nvram_path)
        if self._vmsd is not None:
            self._vmsd.save(self.vmsd_path)

    # -- limits --------------------------------------------------------------------------

    def check(self) -> list[Problem]:
        """Every problem of this box: hardware limits, missing or oversized disks, a
        damaged `.nvram`. Empty when the box can start."""
        capacities: dict[str, int] = {}
        problems: list[Problem] = []
        if self.encrypted:
            problems.append(
                Problem("encryption.keySafe", "(set)", "an unencrypted box", ENCRYPTED_MESSAGE)
            )
        refused = paths.refused_paths(self)
        for p in refused:
            problems.append(Problem(p.key, p.value, "inside the box", p.problem))
        refused_keys = {p.key for p in refused}
        try:
            disks = self.config.disks
        except ConfigError as exc:
            disks = []
            problems.append(Problem("(disks)", "", "readable disk keys", str(exc)))
        for slot in disks:
            assert slot.file_name is not None
            if f"{slot.key}.fileName" in refused_keys:
                continue  # not opened: the policy refuses it (above)
            where = self.disk_path(slot.file_name)
            unusable = _unusable_disk(where)
            if unusable is not None:
                problems.append(
                    Problem(f"{slot.key}.fileName", slot.file_name, "a disk file", unusable)
                )
                continue
            if isinstance(where, Path) and not where.exists():
                problems.append(
                    Problem(
                        f"{slot.key}.fileName",
                        slot.file_name,
                        "an existing file",
                        f"the disk file {where} does not exist",
                    )
                )
                continue
            try:
                capacities[slot.key] = disk_capacity(where)
            except BoiteError as exc:
                problems.append(
                    Problem(f"{slot.key}.fileName", slot.file_name, "a readable disk", str(exc))
                )
        problems[:0] = check_limits(self.config, capacities)
        try:
            nvram = self.nvram_path
        except ConfigError:
            nvram = None  # refused above
        if nvram is not None and (nvram.exists() or nvram.is_symlink()):
            try:
                Nvram.load(nvram)
            except ConfigError as exc:
                problems.append(Problem("nvram", self.config.nvram, "a valid .nvram", str(exc)))
        problems += self._boot_file_problems()
        try:
            self.config.kernel_unpack  # noqa: B018 - read to check it
        except ConfigError as exc:
            raw = self.vmx.get("boite.kernelUnpack") or ""
            problems.append(Problem("boite.kernelUnpack", raw, '"auto", TRUE or FALSE', str(exc)))
        try:
            self.config.emu_tier  # noqa: B018 - read to check it
        except ConfigError as exc:
            raw = self.vmx.get("boite.emuTier") or ""
            problems.append(Problem("boite.emuTier", raw, '"auto", "python" or "native"', str(exc)))
        return problems

    def _boot_file_problems(self) -> list[Problem]:
        """`boite.kernel` / `boite.initrd`: regular files that fit guest RAM (they are read
        whole into it)."""
        problems = []
        try:
            ram = self.config.memsize << 20
        except ConfigError:
            ram = None
        for key in ("boite.kernel", "boite.initrd"):
            value = self.vmx.get(key)
            if not value:
                continue
            try:
                real = paths.locate(self.dir, value, source=str(self.vmx_path), key=key)
                st = os.stat(real)
            except ConfigError as exc:
                problems.append(Problem(key, value, "a file name", str(exc)))
                continue
            except OSError as exc:
                problems.append(Problem(key, value, "an existing file", f"{real}: {exc.strerror}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(
                    Problem(key, value, "a regular file",
                            f"{real} is {paths.kind_of(st.st_mode)}, expected a regular file")
                )  # fmt: skip
            elif ram is not None and st.st_size > ram:
                problems.append(
                    Problem(key, value, f"at most guest RAM ({ram} bytes)",
                            f"{real} is {st.st_size} bytes, more than guest RAM ({ram} bytes)")
                )  # fmt: skip
        return problems

    def require_within_limits(self) -> None:
        """Raise LimitError listing every hardware limit the `.vmx` breaks."""
        require_within_limits(self.config)

    def ensure_startable(self) -> None:
        """What `start` calls: raise one error listing every problem `check()` finds
        (LimitError when a hardware limit is among them)."""
        problems = self.check()
        if not problems:
            return
        lines = "\n  ".join(str(p) for p in problems)
        message = f"{self.vmx_path}: cannot start, {len(problems)} problem(s):\n  {lines}"
        limit_keys = {p.key for p in check_limits(self.config)}
        if any(p.key in limit_keys or p.limit == "8 TiB" for p in problems):
            raise LimitError(message)
        raise ConfigError(message)

    # -- running -------------------------------------------------------------------------

    def acquire_lock(self, *, register: bool = True) -> HeldLock:
        """Take `NAME.vmx.lck` or raise LockError naming the holder. A stale lock of a dead
        process on this host is taken over and the log says so. Usable as a context
        manager: `with box.acquire_lock(): ...` releases on exit."""
        holder = self._lock.acquire()
        stale = self._lock.taken_over
        try:
            if stale is not None:
                self.log.warning(
                    f"Took over the lock {self._lock.path.name} left by {stale.describe()}, "
                    "which is no longer running."
                )
            self.log.info(
                f"Lock {self._lock.path.name} taken by pid {holder.pid} on {holder.host}."
            )
            self._before_power_on()
        except BaseException:
            self._lock.release()  # never leave a lock behind for a box that did not start
            raise
        if register:
            try:
                register_running(
                    RunningBox(
                        vmx=holder.vmx,
                        name=self.config.display_name,
                        pid=holder.pid,
                        host=holder.host,
                        started=holder.started,
                        nonce=holder.nonce,
                    )
                )
            except BaseException:
                self._lock.release()  # never leave a lock behind for a box that did not start
                raise
        return HeldLock(self)

    def _before_power_on(self) -> None:
        """Under the lock: finish an interrupted snapshot operation, then refuse what must
        not run (an encrypted box, paths the policy refuses, unusable boot files) and log
        every path that leaves the box."""
        from boite.snapshot import needs_recovery, recover

        if needs_recovery(self):
            self.recovered = recover(self)
            if self.recovered:
                self.log.warning(f"Snapshot journal: {self.recovered}.")
        if self.encrypted:
            raise BoxError(f"{self.vmx_path}: cannot start: {ENCRYPTED_MESSAGE}")
        for p in paths.require_allowed_paths(self):
            self.log.info(f"Outside the box: {p}")
        problems = self._boot_file_problems()
        if problems:
            raise ConfigError(f"{self.vmx_path}: cannot start: {problems[0]}")

    def release_lock(self) -> None:
        holder = self._lock.holder
        if holder is None:
            return
        unregister_running(holder.vmx, holder.nonce)
        self._lock.release()
        if self._log is not None:
            self._log.info("Lock released.")

    @property
    def lock_holder(self) -> LockHolder | None:
        """Who runs this box now (any host), or None."""
        return self._lock.read_holder()

    def set_control_socket(self, path: str) -> None:
        """Record the VMM's control socket in the running-box registry (`boite list`)."""
        holder = self._lock.holder
        if holder is None:
            raise BoxError(f"{self.vmx_path}: not running in this process")
        register_running(
            RunningBox(
                vmx=holder.vmx,
                name=self.config.display_name,
                pid=holder.pid,
                host=holder.host,
                started=holder.started,
                nonce=holder.nonce,
                control=path,
            )
        )

    def close(self) -> None:
        self.release_lock()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reporting -----------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        data: dict[str, object] = {
            "name": self.name,
            "dir": str(self.dir),
            "vmx": str(self.vmx_path),
        }
        data.update(self.config.summary())
        outside = paths.external_paths(self)
        refused = {p.key for p in outside if not p.allowed}
        for disk in data["disks"]:  # type: ignore[union-attr]
            where = self.disk_path(disk["file_name"]) if disk["file_name"] else None
            disk["path"] = str(where) if where is not None else None
            disk["capacity"] = None
            if f"{disk['key']}.fileName" in refused or _unusable_disk(where) is not None:
                continue  # never opened: check() says why
            if isinstance(where, str) or (where is not None and where.exists()):
                try:
                    disk["capacity"] = disk_capacity(where)
                except BoiteError:
                    pass
        try:
            holder = self.lock_holder
        except BoiteError:
            holder = None
        data["running"] = (
            None
            if holder is None
            else {"pid": holder.pid, "host": holder.host, "since": holder.started}
        )
        data["boot_order"] = self._boot_order()
        data["encrypted"] = self.encrypted
        data["external_paths"] = [vars(p) for p in outside]
        data["problems"] = [str(p) for p in self.check()]
        return data

    def _boot_order(self) -> list[str] | None:
        try:
            return self.nvram.boot_order
        except ConfigError:
            return None

    def __repr__(self) -> str:
        return f"Box({str(self.vmx_path)!r})"


class HeldLock:
    """The lock of a running box; leaving the `with` block releases it."""

    def __init__(self, box: Box) -> None:
        self.box = box

    @property
    def holder(self) -> LockHolder | None:
        return self.box._lock.holder

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.box.release_lock()


def _unusable_disk(where: Path | str | None) -> str | None:
    """Why a disk path must not be opened (a FIFO would hang the open), or None."""
    if where is None or isinstance(where, str):
        return None
    try:
        mode = os.stat(where).st_mode
    except OSError:
        return None  # missing: check() says so
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return None
    return f"{where} is {paths.kind_of(mode)}, expected a disk file or a device"


def find_vmx(path: str | Path) -> Path:
    """The `.vmx` of a box given as its directory or as the file itself."""
    path = Path(path)
    if path.is_dir():
        named = path / f"{path.resolve().name}.vmx"
        if named.is_file():
            return named
        found = sorted(p for p in path.glob("*.vmx") if p.is_file())
        if len(found) == 1:
            return found[0]
        if not found:
            raise BoxError(f"{path}: no .vmx file in this directory; is it a box?")
        raise BoxError(
            f"{path}: {len(found)} .vmx files ({', '.join(p.name for p in found)}); "
            "name the one you mean"
        )
    if path.is_file():
        if path.suffix.lower() != ".vmx":
            raise BoxError(f"{path}: expected a box directory or a .vmx file")
        return path
    if path.exists():
        kind = paths.kind_of(path.stat().st_mode)
        raise BoxError(f"{path}: is {kind}, expected a box directory or a .vmx file")
    raise BoxError(f"{path}: no such box (expected a box directory or a .vmx file)")


def default_vmx(
    name: str,
    memsize_mb: int,
    cpus: int,
    guest_os: str,
    uuid_bios: bytes,
    disk_bus: str = "scsi",
    disk_size: int | None = DEFAULT_DISK_BYTES,
) -> VmxDict:
    """The `.vmx` of a new box, written with VMware's own keys and spellings."""
    vmx = VmxDict.new()
    settings = {
        "config.version": "8",
        "virtualHW.version": VIRTUAL_HW_VERSION,
        "displayName": name,
        "guestOS": guest_os,
        "memsize": str(memsize_mb),
        "numvcpus": str(cpus),
        "cpuid.coresPerSocket": "1",
        "firmware": "bios",
        "nvram": f"{name}.nvram",
        "monitor.virtual_exec": "automatic",
        "uuid.bios": format_vmware_uuid(uuid_bios),
        # VMware derives uuid.location from the path; a fresh random one marks "not moved".
        "uuid.location": format_vmware_uuid(secrets.token_bytes(16)),
    }
    if disk_size is not None:
        disk = f"{disk_bus}0:0"
        settings[f"{disk_bus}0.present"] = "TRUE"
        if disk_bus == "scsi":
            settings["scsi0.virtualDev"] = "pvscsi"
        settings[f"{disk}.present"] = "TRUE"
        settings[f"{disk}.fileName"] = f"{name}.vmdk"
        settings[f"{disk}.deviceType"] = {"ide": "ata-hardDisk", "scsi": "scsi-hardDisk"}.get(
            disk_bus, "disk"
        )
    settings.update(
        {
            "ethernet0.present": "TRUE",
            "ethernet0.virtualDev": "vmxnet3",
            "ethernet0.connectionType": "nat",
            "ethernet0.addressType": "generated",
            "ethernet0.generatedAddress": generated_mac(uuid_bios),
            "ethernet0.generatedAddressOffset": "0",
            "serial0.present": "TRUE",
            "serial0.fileType": "file",
            "serial0.fileName": "serial0.log",
            "floppy0.present": "FALSE",
            "log.keepOld": "3",
            "cleanShutdown": "TRUE",
        }
    )
    for key, value in settings.items():
        vmx[key] = value
    return vmx


def _create_disk(path: Path, capacity: int, disk_type: str, bus: str = "scsi") -> None:
    try:
        from boite.disk import create_disk  # the disk layer (issue 3)
    except ImportError:
        raise BoxError(
            "this boite's disk layer cannot create VMDKs yet (boite.disk.create_disk is "
            "missing); create the box with a disk size of 0 to make it without a disk"
        ) from None
    # ddb.adapterType: "ide" for IDE disks, VMware writes "lsilogic" for the others.
    create_disk(str(path), capacity, disk_type, adapter="ide" if bus == "ide" else "lsilogic")


# How long `check` and `info` wait for a remote disk's server.
REMOTE_DISK_TIMEOUT = 5.0


def disk_capacity(path: Path | str) -> int:
    """A disk's size in bytes, through the disk layer (which checks the file); a checkout
    without it reads the VMDK header or descriptor (enough for the 8 TiB limit). A URL
    disk (`nbd://...`) is asked over the network, with a short timeout."""
    if isinstance(path, str):
        if not path.startswith(("nbd://", "nbd+unix://")):
            raise BoxError(f"{path}: boite reaches remote disks only over NBD (nbd://HOST/EXPORT)")
        from boite.disk.nbd import open_nbd

        with open_nbd(path, read_only=True, timeout=REMOTE_DISK_TIMEOUT) as image:
            return image.size
    try:
        from boite.disk import open_disk  # type: ignore[attr-defined]
    except ImportError:
        open_disk = None
    if open_disk is not None:
        with open_disk(str(path), read_only=True) as image:
            return int(image.size)
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError as exc:
        raise BoxError(f"{path}: cannot read: {exc.strerror}") from exc
    if head[:4] == b"KDMV" and len(head) >= 20:
        (sectors,) = struct.unpack_from("<Q", head, 12)
        return sectors * 512
    if b"# Disk DescriptorFile" in head[:1024]:
        total = 0
        for line in head.decode("utf-8", "replace").splitlines():
            m = re.match(r"\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+", line)
            if m:
                total += int(m.group(2)) * 512
        return total
    return os.path.getsize(path)
