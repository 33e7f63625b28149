"""The typed view of a `.vmx`: what boite reads from VMware's documented keys.

`BoxConfig` wraps a `VmxDict` and never copies it: reading a property parses the current
text, setting one rewrites one line. A value that cannot be read (`memsize = "lots"`)
raises `ConfigError` naming the file, key and value; `limits.check_limits` turns those
into problems so `boite check` can list them all.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from boite.box.vmxdict import VmxDict
from boite.errors import ConfigError

# monitor.virtual_exec: VMware's key for how the CPU is virtualized.
VIRTUAL_EXEC = ("hardware", "software", "automatic")
FIRMWARES = ("bios", "efi")
DISK_BUSES = ("ide", "scsi", "sata", "nvme")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class DiskSlot:
    """A device on a disk controller: `scsi0:1.fileName`, `ide1:0.deviceType`, ..."""

    bus: str  # ide, scsi, sata, nvme
    controller: int
    unit: int
    present: bool
    file_name: str | None
    device_type: str | None
    mode: str | None  # persistent, independent-persistent, ...

    @property
    def key(self) -> str:
        return f"{self.bus}{self.controller}:{self.unit}"

    @property
    def is_cdrom(self) -> bool:
        return (self.device_type or "").startswith(("cdrom", "atapi"))

    @property
    def is_disk(self) -> bool:
        return not self.is_cdrom


@dataclass(frozen=True)
class Controller:
    bus: str
    index: int
    present: bool
    virtual_dev: str | None  # lsilogic, pvscsi, ahci, ...

    @property
    def key(self) -> str:
        return f"{self.bus}{self.index}"


@dataclass(frozen=True)
class Nic:
    """`ethernetN.*`: a virtual network adapter."""

    index: int
    present: bool
    virtual_dev: str | None  # e1000, e1000e, vmxnet3
    connection_type: str | None  # nat, bridged, hostonly, custom
    address_type: str  # generated, static, vpx
    generated_address: str | None
    address: str | None

    @property
    def mac(self) -> str | None:
        """The MAC the guest sees: static `address` or the generated one."""
        if self.address_type.lower() == "static":
            return self.address
        return self.generated_address


@dataclass(frozen=True)
class SerialPort:
    """`serialN.*`: a COM port; fileType is file, pipe, device or network."""

    index: int
    present: bool
    file_type: str | None
    file_name: str | None


@dataclass(frozen=True)
class UsbControllers:
    """One controller of each USB kind: UHCI (`usb`), EHCI (`ehci`), xHCI (`usb_xhci`)."""

    uhci: bool
    ehci: bool
    xhci: bool


class BoxConfig:
    """Typed access to a box's `.vmx` settings."""

    def __init__(self, vmx: VmxDict) -> None:
        self.vmx = vmx

    @property
    def source(self) -> str:
        return self.vmx.source

    # -- typed readers -------------------------------------------------------------------

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self.vmx.get(key, default)

    def get_bool(self, key: str, default: bool = False) -> bool:
        raw = self.vmx.get(key)
        if raw is None:
            return default
        folded = raw.strip().lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
        raise ConfigError(
            f"{self.source}: {self.vmx.spelling(key)} = {raw!r}: expected TRUE or FALSE"
        )

    @property
    def kernel_unpack(self) -> str:
        """`boite.kernelUnpack`: "auto" (the default), "true" or "false" (see
        boite.machine.loader.linux.choose_unpack)."""
        raw = self.vmx.get("boite.kernelUnpack")
        folded = "auto" if raw is None else raw.strip().lower()
        if folded == "auto":
            return "auto"
        if folded in _TRUE or folded in _FALSE:
            return "true" if folded in _TRUE else "false"
        raise ConfigError(
            f"{self.source}: {self.vmx.spelling('boite.kernelUnpack')} = {raw!r}: expected "
            '"auto", TRUE or FALSE'
        )

    @property
    def emu_tier(self) -> str:
        """`boite.emuTier`: the emulator's tier for hot code, "auto" (the default),
        "python" or "native" (see boite.accel.emu.tiers)."""
        return self._choice("boite.emuTier", ("auto", "python", "native"), "auto")

    def get_int(self, key: str, default: int | None = None) -> int | None:
        raw = self.vmx.get(key)
        if raw is None:
            return default
        try:
            return int(raw.strip(), 0)
        except ValueError:
            raise ConfigError(
                f"{self.source}: {self.vmx.spelling(key)} = {raw!r}: expected a whole number"
            ) from None

    def _choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        raw = self.vmx.get(key)
        if raw is None:
            return default
        folded = raw.strip().lower()
        if folded not in choices:
            raise ConfigError(
                f"{self.source}: {self.vmx.spelling(key)} = {raw!r}: expected one of "
                + ", ".join(choices)
            )
        return folded

    # -- the documented keys -------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return self.vmx.get("displayName") or Path(self.source).stem

    @property
    def guest_os(self) -> str:
        return self.vmx.get("guestOS", "other")

    @property
    def memsize(self) -> int:
        """Guest RAM in MiB (VMware's default is 32 when the key is absent)."""
        value = self.get_int("memsize", 32)
        assert value is not None
        return value

    @memsize.setter
    def memsize(self, mib: int) -> None:
        self.vmx["memsize"] = str(mib)

    @property
    def numvcpus(self) -> int:
        value = self.get_int("numvcpus", 1)
        assert value is not None
        return value

    @numvcpus.setter
    def numvcpus(self, count: int) -> None:
        self.vmx["numvcpus"] = str(count)

    @property
    def cores_per_socket(self) -> int:
        value = self.get_int("cpuid.coresPerSocket", 1)
        assert value is not None
        return value

    @property
    def firmware(self) -> str:
        return self._choice("firmware", FIRMWARES, "bios")

    @property
    def nvram(self) -> str:
        """The `.nvram` file name, relative to the box directory."""
        return self.vmx.get("nvram") or f"{Path(self.source).stem}.nvram"

    @property
    def virtual_exec(self) -> str:
        """hardware = KVM, software = full emulation, automatic = KVM when it works."""
        return self._choice("monitor.virtual_exec", VIRTUAL_EXEC, "automatic")

    @virtual_exec.setter
    def virtual_exec(self, mode: str) -> None:
        if mode not in VIRTUAL_EXEC:
            raise ConfigError(f"monitor.virtual_exec: {mode!r} is not one of {VIRTUAL_EXEC}")
        self.vmx["monitor.virtual_exec"] = mode

    @property
    def uuid_bios(self) -> bytes | None:
        return self._uuid("uuid.bios")

    @property
    def uuid_location(self) -> bytes | None:
        return self._uuid("uuid.location")

    def _uuid(self, key: str) -> bytes | None:
        raw = self.vmx.get(key)
        if raw is None:
            return None
        try:
            return parse_vmware_uuid(raw)
        except ValueError:
            raise ConfigError(
                f"{self.source}: {self.vmx.spelling(key)} = {raw!r}: expected 16 hex bytes "
                'like "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"'
            ) from None

    @property
    def log_keep_old(self) -> int:
        """How many rotated `vmware-N.log` files to keep (VMware's `log.keepOld`, default 3)."""
        value = self.get_int("log.keepOld", 3)
        assert value is not None
        if value < 0:
            raise ConfigError(f"{self.source}: log.keepOld = {value}: expected 0 or more")
        return value

    # -- devices -------------------------------------------------------------------------

    def _indexed(self, pattern: re.Pattern[str]) -> dict[tuple[int, ...], dict[str, str]]:
        """Group keys like `ethernet0.virtualDev` by their numbers, sub-keys lower-cased."""
        groups: dict[tuple[int, ...], dict[str, str]] = {}
        for key in self.vmx:
            m = pattern.fullmatch(key)
            if m:
                nums = tuple(int(g) for g in m.groups()[:-1])
                groups.setdefault(nums, {})[m.groups()[-1].lower()] = self.vmx[key]
        return groups

    def _present(self, key: str) -> bool:
        return self.get_bool(f"{key}.present", False)

    def disk_slots(self, bus: str | None = None) -> list[DiskSlot]:
        """Every `BUSc:u.*` device named in the file, present or not, in bus order."""
        slots: list[DiskSlot] = []
        for b in DISK_BUSES if bus is None else (bus,):
            pattern = re.compile(rf"{b}(\d+):(\d+)\.(\w+)", re.I)
            for (ctl, unit), keys in sorted(self._indexed(pattern).items()):
                key = f"{b}{ctl}:{unit}"
                slots.append(
                    DiskSlot(
                        bus=b,
                        controller=ctl,
                        unit=unit,
                        present=self._present(key),
                        file_name=keys.get("filename"),
                        device_type=keys.get("devicetype"),
                        mode=keys.get("mode"),
                    )
                )
        return slots

    @property
    def disks(self) -> list[DiskSlot]:
        """Present hard disks (not CD-ROMs)."""
        return [s for s in self.disk_slots() if s.present and s.is_disk and s.file_name]

    def controllers(self, bus: str | None = None) -> list[Controller]:
        result: list[Controller] = []
        for b in DISK_BUSES if bus is None else (bus,):
            pattern = re.compile(rf"{b}(\d+)\.(\w+)", re.I)
            for (index,), keys in sorted(self._indexed(pattern).items()):
                result.append(
                    Controller(b, index, self._present(f"{b}{index}"), keys.get("virtualdev"))
                )
        return result

    @property
    def nics(self) -> list[Nic]:
        result: list[Nic] = []
        pattern = re.compile(r"ethernet(\d+)\.(\w+)", re.I)
        for (index,), keys in sorted(self._indexed(pattern).items()):
            result.append(
                Nic(
                    index=index,
                    present=self._present(f"ethernet{index}"),
                    virtual_dev=keys.get("virtualdev"),
                    connection_type=keys.get("connectiontype"),
                    address_type=keys.get("addresstype", "generated"),
                    generated_address=keys.get("generatedaddress"),
                    address=keys.get("address"),
                )
            )
        return result

    def _ports(self, kind: str) -> dict[int, dict[str, str]]:
        pattern = re.compile(rf"{kind}(\d+)\.(\w+)", re.I)
        return {nums[0]: keys for nums, keys in sorted(self._indexed(pattern).items())}

    @property
    def serials(self) -> list[SerialPort]:
        return [
            SerialPort(i, self._present(f"serial{i}"), k.get("filetype"), k.get("filename"))
            for i, k in self._ports("serial").items()
        ]

    @property
    def usb(self) -> UsbControllers:
        return UsbControllers(
            uhci=self._present("usb"), ehci=self._present("ehci"), xhci=self._present("usb_xhci")
        )

    def summary(self) -> dict[str, object]:
        """Everything above as plain data (for `boite info --json`). An unreadable value
        shows as None; `check` says what is wrong with it."""

        def field(read):
            try:
                return read()
            except ConfigError:
                return None

        ub = field(lambda: self.uuid_bios)
        ul = field(lambda: self.uuid_location)
        return {
            "displayName": self.display_name,
            "guestOS": self.guest_os,
            "memsize": field(lambda: self.memsize),
            "numvcpus": field(lambda: self.numvcpus),
            "coresPerSocket": field(lambda: self.cores_per_socket),
            "firmware": field(lambda: self.firmware),
            "nvram": self.nvram,
            "virtual_exec": field(lambda: self.virtual_exec),
            "emu_tier": field(lambda: self.emu_tier),
            "uuid.bios": format_vmware_uuid(ub) if ub else None,
            "uuid.location": format_vmware_uuid(ul) if ul else None,
            "disks": field(
                lambda: [asdict(d) | {"key": d.key} for d in self.disk_slots() if d.present]
            )
            or [],
            "nics": field(lambda: [asdict(n) | {"mac": n.mac} for n in self.nics if n.present])
            or [],
            "serials": field(lambda: [asdict(s) for s in self.serials if s.present]) or [],
            "usb": field(lambda: asdict(self.usb)) or {},
        }


def parse_vmware_uuid(text: str) -> bytes:
    """`"56 4d ... bc-de f0 ..."` -> 16 bytes (VMware writes 8 bytes, a dash, 8 bytes)."""
    digits = re.sub(r"[\s\-]", "", text)
    if not re.fullmatch(r"[0-9A-Fa-f]{32}", digits):
        raise ValueError(text)
    return bytes.fromhex(digits)


def format_vmware_uuid(raw: bytes) -> str:
    if len(raw) != 16:
        raise ValueError("a VMware UUID is 16 bytes")
    first = " ".join(f"{b:02x}" for b in raw[:8])
    second = " ".join(f"{b:02x}" for b in raw[8:])
    return f"{first}-{second}"


def generated_mac(uuid_bios: bytes, offset: int = 0) -> str:
    """VMware's generated MAC: its OUI 00:0c:29 and the last three bytes of uuid.bios
    (plus `ethernetN.generatedAddressOffset`, which VMware steps by 10 per extra NIC)."""
    tail = (int.from_bytes(uuid_bios[-3:], "big") + offset) & 0xFFFFFF
    return "00:0c:29:" + ":".join(f"{b:02x}" for b in tail.to_bytes(3, "big"))
