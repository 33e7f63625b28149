import subprocess
import sys

from boite.cli import build_parser, main


def test_version_and_help_from_a_real_process():
    out = subprocess.run(
        [sys.executable, "-m", "boite", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("boite ")
    assert "VERB" in build_parser().format_help()


def test_unknown_verb_is_a_usage_error(capsys):
    assert main(["no-such-verb"]) == 2
    assert "unknown verb 'no-such-verb'" in capsys.readouterr().err


def test_a_typo_gets_a_suggestion(capsys):
    assert main(["strat", "box"]) == 2
    assert "did you mean 'start'" in capsys.readouterr().err


def test_plain_boite_lists_the_verbs(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in ("create", "start", "stop", "exec", "cp", "shell", "snapshot"):
        assert f"\n  {verb} " in out


def test_output_survives_a_closed_pipe(tmp_path):
    """`boite info BOX | head -1`: no BrokenPipeError traceback."""
    subprocess.run([sys.executable, "-m", "boite", "create", str(tmp_path / "b"), "--disk", "0"],
                   check=True, capture_output=True)  # fmt: skip
    proc = subprocess.run(
        f"{sys.executable} -m boite info {tmp_path / 'b'} | head -c 1",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_errors_are_json_under_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "boite", "info", str(tmp_path / "none"), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    import json

    reply = json.loads(proc.stdout)
    assert "no such box" in reply["error"]["message"]


def test_readme_cli_reference_matches_help():
    from pathlib import Path

    from boite.cli._reference import BEGIN, END, render

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README lacks the CLI reference block"
    block = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert block == render(), (
        "README's CLI reference is stale: python -m boite.cli._reference --write README.md"
    )


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


# Verbs that change a box, a disk, the kit or a guest, and so answer in JSON under --json;
# the rest only read (their --json, where they have one, is their output format).
STATE_CHANGING = (
    "create", "start", "stop", "reset", "pause", "unpause", "clone", "snapshot", "revert",
    "delete-snapshot", "suspend", "cp", "kit build", "disk create", "disk grow",
    "disk compact", "disk convert", "disk check",
)  # fmt: skip


def test_every_verb_that_changes_state_takes_json():
    verbs = _subparsers(build_parser())
    missing = []
    for name in STATE_CHANGING:
        words = name.split()
        parser = verbs.get(words[0])
        if parser is not None and len(words) > 1:
            parser = _subparsers(parser).get(words[1])
        assert parser is not None, f"no verb {name!r}"
        if "--json" not in parser._option_string_actions:
            missing.append(name)
    assert not missing, f"no --json on: {missing}"
