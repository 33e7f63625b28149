"""Typed, versioned device state records, checked field by field before anything is restored.

A device's saved state is a frozen dataclass deriving from `StateRecord`; each field names
its check (`uint(8)`, `bits(0x0F)`, `data(max_len=16)`, `flag()`, `choice(...)`,
`items(...)`, `record(...)`, `optional(...)`):

    @dataclass(frozen=True)
    class UartState(StateRecord):
        VERSION = 1
        ier: int = bits(0x0F)
        rx: bytes = data(max_len=FIFO_SIZE)

`record.to_dict()` is the plain data that goes into a checkpoint (`{"version": 1, ...}`);
`UartState.from_dict(data)` takes it back and raises `CheckpointError` naming the field
for anything else: a missing or unknown key, a wrong type, a value out of range, another
version. Checks that relate two fields go in `validate()`; checks against the machine
(guest RAM, disk sizes) go in the device's `check_state()`. A device restores in two
steps so that a machine restores all or nothing: `check_state(data) -> record` (pure) for
every device first, then `apply_state(record)` (see `Device` and `Machine`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar, Self

from boite.errors import CheckpointError

Plain = Any  # what JSON can hold
_HEX = re.compile("[0-9a-f]*")


def _show(value: Any) -> str:
    """A hostile value, short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Check:
    """How one field is checked (`check`) and written back as plain data (`plain`)."""

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def plain(self, value: Any) -> Plain:
        return value

    @staticmethod
    def fail(path: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}")


class Int(Check):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any, path: str) -> int:
        if type(value) is not int:  # bool is an int subclass and not a number here
            raise self.fail(path, f"{_show(value)} is not an integer")
        if not self.lo <= value <= self.hi:
            raise self.fail(
                path, f"{_show(hex(value))[1:-1]} is outside {self.lo:#x}..{self.hi:#x}"
            )
        return value


class Bits(Int):
    def __init__(self, mask: int) -> None:
        super().__init__(0, mask)
        self.mask = mask

    def check(self, value: Any, path: str) -> int:
        if type(value) is not int or value < 0:
            raise self.fail(path, f"{_show(value)} is not a bit field within {self.mask:#x}")
        if value & ~self.mask:
            raise self.fail(
                path, f"{value:#x} has bits {value & ~self.mask:#x} outside {self.mask:#x}"
            )
        return value


class Flag(Check):
    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise self.fail(path, f"{_show(value)} is not true or false")
        return value


class Real(Check):
    def __init__(self, limit: float) -> None:
        self.limit = limit

    def check(self, value: Any, path: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.fail(path, f"{_show(value)} is not a finite number")
        if abs(value) > self.limit:
            raise self.fail(path, f"{_show(value)} is beyond +-{self.limit:g}")
        return float(value)


class Choice(Check):
    def __init__(self, *values: Any) -> None:
        self.values = values

    def check(self, value: Any, path: str) -> Any:
        # type() too: True == 1 must not pass for the number 1, nor 1 for "1".
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise self.fail(path, f"{_show(value)} is not one of {_show(self.values)}")
        return value


class Data(Check):
    """Bytes, saved as lowercase hex so that a state stays plain JSON."""

    def __init__(self, max_len: int, exact: int | None = None) -> None:
        self.max_len, self.exact = max_len, exact

    def check(self, value: Any, path: str) -> bytes:
        if type(value) is not str:
            raise self.fail(path, f"{_show(value)} is not a hex string")
        if len(value) > 2 * self.max_len:
            raise self.fail(path, f"{len(value) // 2} bytes, at most {self.max_len}")
        if len(value) % 2 or not _HEX.fullmatch(value):
            raise self.fail(path, f"{_show(value)} is not bytes in lowercase hex")
        if self.exact is not None and len(value) != 2 * self.exact:
            raise self.fail(path, f"{len(value) // 2} bytes, expected {self.exact}")
        return bytes.fromhex(value)

    def plain(self, value: Any) -> Plain:
        return bytes(value).hex()


class Text(Check):
    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def check(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise self.fail(path, f"{_show(value)} is not text")
        if len(value) > self.max_len:
            raise self.fail(path, f"{len(value)} characters, at most {self.max_len}")
        return value


class Optional(Check):
    def __init__(self, inner: Check) -> None:
        self.inner = inner

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def plain(self, value: Any) -> Plain:
        return None if value is None else self.inner.plain(value)


class Items(Check):
    """A list (kept as a tuple in the record) of values that each pass `inner`."""

    def __init__(self, inner: Check, max_len: int, exact: int | None = None) -> None:
        self.inner, self.max_len, self.exact = inner, max_len, exact

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise self.fail(path, f"{_show(value)} is not a list")
        if self.exact is not None and len(value) != self.exact:
            raise self.fail(path, f"{len(value)} items, expected {self.exact}")
        if len(value) > self.max_len:
            raise self.fail(path, f"{len(value)} items, at most {self.max_len}")
        return tuple(self.inner.check(v, f"{path}[{i}]") for i, v in enumerate(value))

    def plain(self, value: Any) -> Plain:
        return [self.inner.plain(v) for v in value]


class Nested(Check):
    def __init__(self, cls: type[StateRecord]) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> StateRecord:
        return self.cls.from_dict(value, path, versioned=False)

    def plain(self, value: Any) -> Plain:
        return value.to_dict(versioned=False)


class Opaque(Check):
    """A dictionary checked elsewhere (another record's, e.g. a virtio backend's)."""

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"{_show(value)} is not a dictionary")
        return value

    def plain(self, value: Any) -> Plain:
        return value.to_dict() if isinstance(value, StateRecord) else value


# -- field declarations: `name: type = uint(8)` in a record -------------------------------


def checked(check: Check, **kw: Any) -> Any:
    return dataclasses.field(metadata={"check": check}, **kw)


def uint(bits_: int) -> Any:
    return checked(Int(0, (1 << bits_) - 1))


def span(lo: int, hi: int) -> Any:
    return checked(Int(lo, hi))


def bits(mask: int) -> Any:
    return checked(Bits(mask))


def flag() -> Any:
    return checked(Flag())


def real(limit: float) -> Any:
    return checked(Real(limit))


def choice(*values: Any) -> Any:
    return checked(Choice(*values))


def data(max_len: int, exact: int | None = None) -> Any:
    return checked(Data(max_len, exact))


def text(max_len: int) -> Any:
    return checked(Text(max_len))


def optional(check: Check) -> Any:
    return checked(Optional(check))


def items(check: Check, max_len: int, exact: int | None = None) -> Any:
    return checked(Items(check, max_len, exact))


def record(cls: type[StateRecord]) -> Any:
    return checked(Nested(cls))


# Checks to nest inside items()/optional().
U8, U16, U32, U64 = (Int(0, (1 << n) - 1) for n in (8, 16, 32, 64))
I64 = Int(-(1 << 63), (1 << 63) - 1)


class StateRecord:
    """Base of a device's saved state. Subclasses are frozen dataclasses whose fields are
    declared with the helpers above; VERSION changes whenever a field does."""

    VERSION: ClassVar[int] = 1

    def validate(self) -> None:
        """Rules between fields; raise `self.invalid(field, problem)`."""

    def invalid(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{name}: {problem}")

    @classmethod
    def _checks(cls) -> tuple[tuple[str, Check, bool], ...]:
        """(name, check, may be absent) per field; looked up once per class."""
        cached = cls.__dict__.get("_checks_cache")
        if cached is None:
            cached = tuple(
                (f.name, f.metadata["check"], f.default is not dataclasses.MISSING)
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
            cls._checks_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def _known(cls) -> frozenset[str]:
        cached = cls.__dict__.get("_known_cache")
        if cached is None:
            cached = frozenset(name for name, _, _ in cls._checks()) | {"version"}
            cls._known_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def of(cls, obj: Any, **given: Any) -> Self:
        """The record of `obj`'s attributes of the same names; `given` for the others (a
        deque kept as bytes, a list of sub-records)."""
        return cls(
            **{
                name: given[name] if name in given else getattr(obj, name)
                for name, _, _ in cls._checks()
            }
        )

    def put(self, obj: Any, *skip: str) -> None:
        """Set `obj`'s attributes of the same names, but `skip` (set those yourself)."""
        for name, _, _ in self._checks():
            if name not in skip:
                setattr(obj, name, getattr(self, name))

    def to_dict(self, versioned: bool = True) -> dict[str, Plain]:
        out: dict[str, Plain] = {"version": self.VERSION} if versioned else {}
        for name, check, _ in self._checks():
            out[name] = check.plain(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, raw: Any, path: str = "", versioned: bool = True) -> Self:
        """The record `raw` describes, every field checked; CheckpointError otherwise."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path or cls.__name__}: {_show(raw)} is not a dictionary")
        prefix = f"{path}." if path else ""
        checks = cls._checks()
        known = cls._known()
        if not raw.keys() <= known or (not versioned and "version" in raw):
            unknown = sorted(str(k) for k in raw if k not in known or k == "version")
            raise CheckpointError(f"{prefix}{unknown[0]}: unknown field")
        if versioned:
            version = raw.get("version")
            if type(version) is not int or version != cls.VERSION:
                raise CheckpointError(
                    f"{prefix}version: {_show(version)}, this boite reads version "
                    f"{cls.VERSION} of {cls.__name__}"
                )
        values: dict[str, Any] = {}
        for name, check, optional in checks:
            if name not in raw:
                if optional:
                    continue
                raise CheckpointError(f"{prefix}{name}: missing")
            values[name] = check.check(raw[name], prefix + name)
        rec = cls(**values)
        try:
            rec.validate()
        except CheckpointError as exc:
            raise CheckpointError(f"{prefix}{exc}") from None
        return rec


@dataclasses.dataclass(frozen=True)
class NoState(StateRecord):
    """The record of a device that keeps nothing between register accesses."""


class KeepsNoState:
    """The state methods of something that keeps nothing between register accesses."""

    def save_state(self) -> dict[str, Any]:
        return NoState().to_dict()

    def check_state(self, state: Any) -> StateRecord:
        return NoState.from_dict(state)

    def apply_state(self, record: Any) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class RegisterState(StateRecord):
    """The record of a device that is one 8-bit register (subclasses narrow `value`)."""

    value: int = uint(8)


def check_all(checks: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run every (name -> check) and name the first one that fails: `device 'com1': ...`."""
    out = {}
    for name, fn in checks.items():
        try:
            out[name] = fn()
        except CheckpointError as exc:
            raise CheckpointError(f"device {name!r}: {exc}") from None
    return out
