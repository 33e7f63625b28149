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
    try:
        main(["no-such-verb"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_readme_cli_reference_matches_help():
    from pathlib import Path

    from boite.cli._reference import BEGIN, END, render

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README lacks the CLI reference block"
    block = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert block == render(), (
        "README's CLI reference is stale: python -m boite.cli._reference --write README.md"
    )
