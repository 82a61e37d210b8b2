"""`mnist-cloud completion SHELL`: the script it prints, sourced in a real bash, completes a command, a
machine name from the state file and a run directory under runs/, as a TAB would (the function the script
registers, called with COMP_WORDS/COMP_LINE set, which runs mnist-cloud under argcomplete)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import runspec
from fixtures import REPO
from infra.commands import main
from infra.state import Host, State

# source the script, find the function it registered for mnist-cloud, and call it once per line of input,
# as bash does at a TAB at the end of that line: one line of output each, the completions joined by tabs
_TABS = r"""
source "$1"
func=$(complete -p mnist-cloud | sed -E 's/.* -F ([^ ]+) .*/\1/')
while IFS= read -r line; do
    COMP_LINE=$line COMP_POINT=${#line} COMP_TYPE=9
    read -ra COMP_WORDS <<< "$line"
    [[ $line == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMPREPLY=()
    "$func" mnist-cloud "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    (IFS=$'\t'; echo "${COMPREPLY[*]}")
done
"""


def script(shell: str, capsys) -> str:
    assert main(["completion", shell]) == runspec.ExitCode.OK
    return capsys.readouterr().out


def tab(lines: list[str], tmp_path, capsys) -> list[list[str]]:
    """What a TAB at the end of each line offers, in a bash that sourced `mnist-cloud completion bash`."""
    (tmp_path / "completion.bash").write_text(script("bash", capsys))
    bin_dir = tmp_path / "bin"  # `mnist-cloud` on PATH, as a TAB runs it: this checkout's
    bin_dir.mkdir()
    (bin_dir / "mnist-cloud").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m infra.commands "$@"\n')
    (bin_dir / "mnist-cloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run(["bash", "-c", _TABS, "tab", str(tmp_path / "completion.bash")], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=True)
    offered = out.stdout.split("\n")[:len(lines)]
    assert len(offered) == len(lines), out
    return [sorted(w.strip() for w in row.split("\t") if w.strip()) for row in offered]


def test_bash_completes_commands_machine_names_and_runs(tmp_path, capsys):
    for name in ("gpu1", "box"):
        State().put(Host(name=name, kind="ssh", host="127.0.0.1"))
    for run in ("20261205-010000-gpu1-net8k", "20261205-020000-box"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / runspec.CONFIG).write_text("{}")
    (tmp_path / "runs" / "not-a-run").mkdir()  # no config.json
    assert tab(["mnist-cloud sta",
                "mnist-cloud ssh ",
                "mnist-cloud train --on g",
                "mnist-cloud report ",
                "mnist-cloud compare runs/20261205-020000-box runs/",
                "mnist-cloud export-tb ",
                "mnist-cloud completion "], tmp_path, capsys) == [
        ["start", "status"],
        ["box", "gpu1"],
        ["gpu1"],
        ["runs/20261205-010000-gpu1-net8k", "runs/20261205-020000-box"],
        ["runs/20261205-010000-gpu1-net8k"],
        ["runs/20261205-010000-gpu1-net8k", "runs/20261205-020000-box"],
        ["bash", "fish", "zsh"],
    ]


@pytest.mark.parametrize("shell, check", [("zsh", "compdef"), ("fish", "complete --command mnist-cloud")])
def test_zsh_and_fish_get_a_script_their_shell_parses(shell, check, tmp_path, capsys):
    text = script(shell, capsys)
    assert check in text
    if shutil.which(shell) is None:
        return  # the script is there; the shell to read it is not, here
    (tmp_path / f"completion.{shell}").write_text(text)
    subprocess.run([shell, "-n", str(tmp_path / f"completion.{shell}")], check=True, timeout=30)


def test_an_unknown_shell_is_one_line_and_exit_2(capsys):
    assert main(["completion", "ksh"]) == runspec.ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'ksh'" in err and "bash" in err
