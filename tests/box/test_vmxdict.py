"""The VMware dictionary syntax: round trips, escapes, unknown keys, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boite.box.vmxdict import VmxDict, escape_value, unescape_value
from boite.errors import ConfigError

DATA = Path(__file__).parent / "data"
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values: any text a person could store, without lone surrogates (not text in any file).
values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z0-9_:]{1,8}){0,3}", fullmatch=True)
comments = st.from_regex(r"#[ -~]{0,30}", fullmatch=True)
eols = st.sampled_from(["\n", "\r\n"])


@st.composite
def files(draw) -> bytes:
    """A well-formed file as VMware or a person might write it: settings with any spacing
    and quoting, comments, blanks, CRLF or LF, with or without a final newline."""
    lines = ['.encoding = "UTF-8"']
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["setting", "setting", "bare", "comment", "blank"]))
        if kind == "setting":
            pad = draw(st.sampled_from(["", " ", "  ", "\t"]))
            value = escape_value(draw(values))
            lines.append(f'{pad}{draw(keys)}{pad} ={pad}"{value}"{pad}')
        elif kind == "bare":
            lines.append(
                f"{draw(keys)} = {draw(st.from_regex(r'[A-Za-z0-9_.]{0,8}', fullmatch=True))}"
            )
        elif kind == "comment":
            lines.append(draw(st.sampled_from(["", "  "])) + draw(comments))
        else:
            lines.append(draw(st.sampled_from(["", "   ", "\t"])))
    eol = draw(eols)
    text = eol.join(lines) + (eol if draw(st.booleans()) else "")
    return text.encode("utf-8")


@given(values)
@FAST
def test_escape_then_unescape_gives_the_value_back(value):
    escaped = escape_value(value)
    assert '"' not in escaped and "\n" not in escaped and "\r" not in escaped
    assert unescape_value(escaped) == value


@given(values)
@FAST
def test_a_value_set_and_read_back_through_a_file_is_the_same(value):
    d = VmxDict.new()
    d["guestinfo.note"] = value
    again = VmxDict.parse(d.to_bytes())
    assert again["GUESTINFO.NOTE"] == value


@given(files())
@FAST
def test_unchanged_file_round_trips_byte_for_byte(data):
    assert VmxDict.parse(data).to_bytes() == data


@given(files(), keys, values)
@FAST
def test_changing_one_key_changes_at_most_one_line(data, key, value):
    d = VmxDict.parse(data)
    before = data.decode().splitlines()
    existed = key in d
    d[key] = value
    after = d.to_bytes().decode().splitlines()
    if existed:
        assert len(after) == len(before)
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert len(changed) <= 1
    else:
        assert after[: len(before)] == before
        assert len(after) == len(before) + 1
    assert VmxDict.parse(d.to_bytes())[key] == value


@given(files())
@FAST
def test_unknown_keys_survive_a_change_to_another_key(data):
    d = VmxDict.parse(data)
    expected = {k: d[k] for k in d}
    d["memsize"] = "1024"
    again = VmxDict.parse(d.to_bytes())
    for k, v in expected.items():
        if k.casefold() != "memsize":
            assert again[k] == v
            assert again.spelling(k) == k


def test_documented_escapes():
    assert escape_value('say "hi" | bye\n') == "say |22hi|22 |7C bye|0A"
    assert unescape_value("a|22b|7Cc|0Ad") == 'a"b|c\nd'
    # A '|' that starts no escape is literal, as in hand-edited files.
    assert unescape_value("pipe|zz") == "pipe|zz"
    # Escaped bytes are bytes of the file's encoding: UTF-8 'é' is C3 A9.
    assert unescape_value("caf|C3|A9") == "café"


def test_lookup_ignores_case_and_keeps_spelling():
    d = VmxDict.parse(b'.encoding = "UTF-8"\nmemSize = "512"\nDisplayName = "x"\n')
    assert d["memsize"] == d["MEMSIZE"] == "512"
    assert list(d) == ["memSize", "DisplayName"]
    d["MEMSIZE"] = "1024"
    assert d.to_bytes() == b'.encoding = "UTF-8"\nmemSize = "1024"\nDisplayName = "x"\n'


def test_last_duplicate_wins_and_is_the_one_changed():
    d = VmxDict.parse(b'a = "1"\nA = "2"\n')
    assert d["a"] == "2"
    d["a"] = "3"
    assert d.to_bytes() == b'a = "1"\nA = "3"\n'
    del d["a"]
    assert d.to_bytes() == b""


def test_new_key_after_a_file_without_final_newline():
    d = VmxDict.parse(b'.encoding = "UTF-8"\r\nx = "1"')
    d["y"] = "2"
    assert d.to_bytes() == b'.encoding = "UTF-8"\r\nx = "1"\r\ny = "2"\r\n'


def test_encoding_is_honoured():
    data = '.encoding = "windows-1252"\ndisplayName = "Café"\n'.encode("cp1252")
    d = VmxDict.parse(data)
    assert d["displayName"] == "Café"
    assert d.to_bytes() == data


def test_invalid_utf8_bytes_survive_a_round_trip():
    data = b'.encoding = "UTF-8"\nodd = "\xff\xfe"\n'
    assert VmxDict.parse(data).to_bytes() == data


@pytest.mark.parametrize(
    "line",
    [
        "no equals sign here",
        'key = "unterminated',
        'key = "two" "values"',
        'key = "value" trailing',
        '= "no key"',
        "key = value with spaces",
    ],
)
def test_malformed_line_names_file_line_and_text(tmp_path, line):
    path = tmp_path / "bad.vmx"
    path.write_text(f'.encoding = "UTF-8"\n# fine\nmemsize = "4"\n{line}\n')
    with pytest.raises(ConfigError) as err:
        VmxDict.load(path)
    message = str(err.value)
    assert f"{path}:4:" in message
    assert line in message


def test_unknown_encoding_is_a_config_error():
    with pytest.raises(ConfigError, match="not a character set"):
        VmxDict.parse(b'.encoding = "klingon-8"\n')


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.vmx"
    d = VmxDict.new()
    d["a"] = "1"
    d.save(path)
    assert path.read_bytes() == b'.encoding = "UTF-8"\na = "1"\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.vmx"]


@pytest.mark.parametrize("path", sorted(DATA.glob("*.vmsd")), ids=lambda p: p.name)
def test_realistic_vmsd_files_round_trip(path):
    data = path.read_bytes()
    d = VmxDict.load(path)
    assert d.to_bytes() == data
    assert d["snapshot0.description"].splitlines() == [
        "before updates",
        "root password is in the vault",
    ]


@pytest.mark.parametrize("path", sorted(DATA.glob("*.vmx")), ids=lambda p: p.name)
def test_realistic_vmx_files_round_trip(path):
    data = path.read_bytes()
    d = VmxDict.load(path)
    assert d.to_bytes() == data
    assert len(d) > 20
    d["memsize"] = "2048"
    changed = [
        (a, b) for a, b in zip(data.splitlines(), d.to_bytes().splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and changed[0][1].startswith(b"memsize")


@given(st.binary(max_size=300))
@FAST
def test_any_bytes_parse_or_give_config_error(data):
    try:
        d = VmxDict.parse(data)
    except ConfigError:
        return
    assert d.to_bytes() == data
