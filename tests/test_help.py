"""Every `mnist-cloud ... --help` text, compared with the copy saved in tests/help/.

The house step (issue 24) moves the parsers into infra/commands/ and must not change a word a user
sees. A deliberate change to a help text is made by regenerating the copies and reviewing the diff:

    MNIST_CLOUD_UPDATE_HELP=1 python -m pytest tests/test_help.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.commands import build_parser, main

SAVED = Path(__file__).resolve().parent / "help"
COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def help_text(argv: list[str], capfd, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal; the copies are for 100 columns
    with pytest.raises(SystemExit) as done:
        code = main(argv)  # the trainer's own commands print their help in a `python -m trainer` child
        raise SystemExit(code)
    out, err = capfd.readouterr()
    assert done.value.code == 0, err
    return out


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_text_is_unchanged(command, capfd, monkeypatch):
    text = help_text([command, "--help"] if command else ["--help"], capfd, monkeypatch)
    saved = SAVED / f"{command or 'mnist-cloud'}.txt"
    if os.environ.get("MNIST_CLOUD_UPDATE_HELP"):
        saved.write_text(text)
    assert saved.exists(), f"no saved help for {command!r}: regenerate with MNIST_CLOUD_UPDATE_HELP=1"
    assert text == saved.read_text(), f"`mnist-cloud {command} --help` changed; see tests/test_help.py"


def test_every_saved_help_belongs_to_a_command():
    names = {p.stem for p in SAVED.glob("*.txt")}
    assert names == {"mnist-cloud", *COMMANDS}
