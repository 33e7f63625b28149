"""VMware's dictionary syntax, shared by `.vmx`, `.vmsd` and the VMDK descriptor database.

A dictionary file is a list of lines, each one of:

    .encoding = "UTF-8"          the file's character set; written first
    key = "value"                a setting; keys compare case-insensitively
    # comment                    a full-line comment
                                 a blank line

Values are quoted and use VMware's `|XX` escapes: two hex digits give one byte of the
encoded value, so `"` is written `|22`, `|` is `|7C` and a newline `|0A`. A bare
(unquoted) value without spaces is read too, since hand-written files have them.

The file is kept as its lines, not as a dict: reading and writing an unchanged file gives
back the same bytes, changing one key rewrites only that key's line, and keys boite does
not know are kept where they were. A key that appears twice is read as its last value, as
VMware does.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from boite.box.atomic import write_atomic
from boite.errors import ConfigError

DEFAULT_ENCODING = "UTF-8"
# A real .vmx is a few KiB; anything this big is not one (and must not fill memory).
MAX_FILE_BYTES = 16 << 20

# A key is a run of anything that cannot start a value or a comment.
_KEY = r"[^\s=\"#|]+"
_LINE = re.compile(
    rf"""^[ \t]*(?P<key>{_KEY})[ \t]*=[ \t]*
         (?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s"#]*))
         [ \t]*$""",
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_ENCODING_LINE = re.compile(
    rb'^[ \t]*\.encoding[ \t]*=[ \t]*"?([A-Za-z0-9_.:\-]+)"?[ \t]*\r?$', re.I
)


def escape_value(value: str, encoding: str = DEFAULT_ENCODING) -> str:
    """Write `value` the way VMware quotes it (without the surrounding quotes).

    Control characters, line separators, `"` and `|` are written as `|XX` of their encoded bytes, so the
    result is one printable line that no reader can mistake for the end of the value.
    """
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if (
            ch in '"|'
            or code < 0x20
            or 0x7F <= code <= 0x9F  # DEL and the C1 controls (NEL breaks lines)
            or code in (0x2028, 0x2029)  # Unicode line and paragraph separators
            or 0xD800 <= code <= 0xDFFF  # bytes the file's encoding could not decode
        ):
            raw = ch.encode(encoding, "surrogateescape")
            out.append("".join(f"|{b:02X}" for b in raw))
        else:
            out.append(ch)
    return "".join(out)


def unescape_value(text: str, encoding: str = DEFAULT_ENCODING) -> str:
    """Read a quoted value's text: `|XX` escapes are bytes in the file's encoding.

    A `|` that is not followed by two hex digits is kept as it is (VMware does the same
    with hand-edited files).
    """
    if "|" not in text:
        return text
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        raw += text[pos : m.start()].encode(encoding, "surrogateescape")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode(encoding, "surrogateescape")
    return raw.decode(encoding, "surrogateescape")


@dataclass
class _Line:
    """One line of the file as read: `text` without its line ending, `eol` the ending."""

    text: str
    eol: str
    key: str | None = None  # the key as spelled, for setting lines
    value: str | None = None  # the decoded value, for setting lines


class VmxDict(MutableMapping[str, str]):
    """A VMware dictionary file that keeps every byte it does not change.

    Lookups ignore case (`dict["memSize"]` finds `memsize = "256"`); iteration gives keys
    as they are spelled in the file. New keys are appended at the end.
    """

    def __init__(self, *, encoding: str = DEFAULT_ENCODING, source: str = "<new>") -> None:
        self.source = source
        self.encoding = _check_encoding(encoding, source, 0)
        self._lines: list[_Line] = []
        self._eol = "\n"
        if source == "<new>":
            self._lines.append(_Line(f'.encoding = "{encoding}"', "\n", ".encoding", encoding))

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def new(cls, encoding: str = DEFAULT_ENCODING) -> VmxDict:
        """An empty file holding only `.encoding`."""
        return cls(encoding=encoding)

    @classmethod
    def load(cls, path: str | Path) -> VmxDict:
        from boite.box.paths import read_regular

        path = Path(path)
        try:
            # A FIFO, a device or a huge file is refused before one byte is read.
            data = read_regular(path, MAX_FILE_BYTES, what="VMware dictionary file")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: bytes | str, source: str = "<memory>") -> VmxDict:
        if isinstance(data, str):
            data = data.encode(DEFAULT_ENCODING, "surrogateescape")
        encoding = DEFAULT_ENCODING
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            stripped = raw.strip()
            if not stripped or stripped.startswith(b"#"):
                continue
            m = _ENCODING_LINE.match(raw)
            if m:
                encoding = _check_encoding(m.group(1).decode("ascii"), source, lineno)
            break  # only the first setting may name the encoding
        self = cls(encoding=encoding, source=source)
        text = data.decode(encoding, "surrogateescape")
        pieces = text.split("\n")
        last = pieces.pop()  # text after the final newline ("" when the file ends with one)
        crlf = 0
        for lineno, piece in enumerate(pieces, 1):
            eol = "\n"
            if piece.endswith("\r"):
                piece, eol = piece[:-1], "\r\n"
                crlf += 1
            self._lines.append(self._parse_line(piece, eol, lineno))
        if last:
            self._lines.append(self._parse_line(last, "", len(pieces) + 1))
        if pieces and crlf * 2 > len(pieces):
            self._eol = "\r\n"
        return self

    def _parse_line(self, text: str, eol: str, lineno: int) -> _Line:
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            return _Line(text, eol)
        m = _LINE.match(text)
        if m is None:
            raise ConfigError(
                f"{self.source}:{lineno}: malformed line {text!r}: expected "
                f'`key = "value"`, a `#` comment or a blank line'
            )
        quoted = m.group("quoted")
        value = unescape_value(quoted, self.encoding) if quoted is not None else m.group("bare")
        return _Line(text, eol, m.group("key"), value)

    # -- writing -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        text = "".join(line.text + line.eol for line in self._lines)
        return text.encode(self.encoding, "surrogateescape")

    def save(self, path: str | Path | None = None) -> None:
        """Write the file atomically (temp file, fsync, rename, fsync the directory)."""
        target = Path(path if path is not None else self.source)
        write_atomic(target, self.to_bytes())
        self.source = str(target)

    # -- the mapping ---------------------------------------------------------------------

    def _find(self, key: str) -> list[int]:
        folded = key.casefold()
        return [
            i
            for i, line in enumerate(self._lines)
            if line.key is not None and line.key.casefold() == folded
        ]

    def __getitem__(self, key: str) -> str:
        found = self._find(key)
        if not found:
            raise KeyError(key)
        value = self._lines[found[-1]].value
        assert value is not None
        return value

    def __setitem__(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{key}: dictionary values are strings, got {type(value).__name__}")
        if not re.fullmatch(_KEY, key):
            raise ConfigError(f"{self.source}: {key!r} is not a valid key")
        if key.casefold() == ".encoding":
            raise ConfigError(f"{self.source}: .encoding is fixed when the file is made")
        found = self._find(key)
        if found:
            line = self._lines[found[-1]]
            if line.value == value:
                return  # unchanged: keep the line exactly as it was written
            line.text = f'{line.key} = "{escape_value(value, self.encoding)}"'
            line.value = value
            return
        if self._lines and self._lines[-1].eol == "":
            self._lines[-1].eol = self._eol  # the old last line gets its missing newline
        self._lines.append(
            _Line(f'{key} = "{escape_value(value, self.encoding)}"', self._eol, key, value)
        )

    def __delitem__(self, key: str) -> None:
        found = self._find(key)
        if not found:
            raise KeyError(key)
        for i in reversed(found):
            del self._lines[i]

    def __iter__(self) -> Iterator[str]:
        # First appearance fixes the order; the last line (the one that wins, as in
        # VMware) gives the spelling, so iteration agrees with spelling() and [].
        seen: dict[str, str] = {}
        for line in self._lines:
            if line.key is not None and line.key.casefold() != ".encoding":
                seen[line.key.casefold()] = line.key
        return iter(seen.values())

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._find(key))

    def duplicates(self) -> dict[str, int]:
        """Keys set on more than one line (as spelled last), with their line counts."""
        counts: dict[str, list] = {}
        for line in self._lines:
            if line.key is not None:
                entry = counts.setdefault(line.key.casefold(), [line.key, 0])
                entry[0], entry[1] = line.key, entry[1] + 1
        return {spelled: n for spelled, n in counts.values() if n > 1}

    def spelling(self, key: str) -> str | None:
        """The key as the file spells it, or None when absent."""
        found = self._find(key)
        return self._lines[found[-1]].key if found else None

    def with_prefix(self, prefix: str) -> dict[str, str]:
        """Every setting whose key starts with `prefix` (case-insensitive), keyed as spelled."""
        folded = prefix.casefold()
        return {k: self[k] for k in self if k.casefold().startswith(folded)}

    def __repr__(self) -> str:
        return f"VmxDict({self.source!r}, {len(self)} keys)"


def _check_encoding(name: str, source: str, lineno: int) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        where = f"{source}:{lineno}" if lineno else source
        raise ConfigError(
            f"{where}: .encoding names {name!r}, which is not a character set boite knows "
            "(expected e.g. UTF-8, windows-1252, Shift_JIS)"
        ) from None
    return name
