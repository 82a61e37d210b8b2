"""The README's quick start stays true: two commands, and CI runs the second one verbatim."""

import re

from fixtures import REPO


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section.group(1), re.S)
    assert block, "the quick start has no code block"
    return [l for l in block.group(1).splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_quick_start_is_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "pip install" in commands[0] and "mnist-cloud train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert quick_start_commands()[1] in ci.splitlines()


def test_no_placeholder_is_left_where_a_measured_table_belongs():
    """Every figure in the README comes from a command in the repo: no template token survives."""
    text = (REPO / "README.md").read_text()
    leftovers = re.findall(r"\b[A-Z]{3,}_(?:SECTION|TABLE|RESULTS?|TODO)\b|\bTODO\b|\bTBD\b", text)
    assert not leftovers, leftovers
