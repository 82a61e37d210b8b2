"""The README's quick start stays true: two commands, and CI runs the second one verbatim. The README and
the manual in docs/ keep no placeholder where a figure belongs, and no link that leads nowhere."""

import re
from pathlib import Path

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


def pages() -> list[Path]:
    """The README and the manual it links to."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_no_placeholder_is_left_where_a_measured_table_belongs():
    """Every figure in the README and docs/ comes from a command in the repo: no template token survives."""
    for page in pages():
        leftovers = re.findall(r"\b[A-Z]{3,}_(?:SECTION|TABLE|RESULTS?|TODO)\b|\bTODO\b|\bTBD\b", page.read_text())
        assert not leftovers, (page.name, leftovers)


def test_the_scripts_that_measured_the_figures_are_in_the_repo():
    """A figure names the command that produced it: every scripts/... that a page names exists."""
    for page in pages():
        for script in set(re.findall(r"\bscripts/[\w.-]+\.(?:py|sh)\b", page.read_text())):
            assert (REPO / script).is_file(), f"{page.relative_to(REPO)} names {script}, which is not in the repo"


def heading_slugs(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercase, spaces to '-', punctuation other than '-'
    and '_' dropped, and a repeated heading's anchor numbered (-1, -2, ...). Code blocks hold no headings."""
    slugs: set[str] = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in slugs:
            n += 1
            unique = f"{slug}-{n}"
        slugs.add(unique)
    return slugs


def relative_links(page: Path) -> list[str]:
    """Every markdown link target on the page that is not a URL: `path`, `path#anchor` or `#anchor`."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto:


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_slugs(file):
            broken.append(f"{target}: {file.name} has no heading with that anchor")
    return broken


def test_every_relative_link_resolves_to_a_file_and_heading():
    """A page moved, a file renamed or a heading reworded must not leave a dead link behind."""
    broken = {str(page.relative_to(REPO)): broken_links(page) for page in pages()}
    assert not any(broken.values()), {page: links for page, links in broken.items() if links}


def named_pages(text: str) -> list[str]:
    """`docs/PAGE.md` or `docs/PAGE.md#anchor` named in plain text, as a message or a comment names it."""
    return re.findall(r"(?<![\w/.-])docs/[\w-]+\.md(?:#[\w-]+)?", text)


def test_every_docs_page_that_the_code_and_the_pages_name_exists():
    """An error message that sends the user to docs/cloud.md#iam-permissions must find that heading."""
    files = [*pages(), *(f for room in ("infra", "trainer", "runspec", "scripts") for f in (REPO / room).rglob("*.py"))]
    broken = []
    for file in files:
        for named in set(named_pages(file.read_text())):
            path, _, anchor = named.partition("#")
            if not (REPO / path).is_file():
                broken.append(f"{file.relative_to(REPO)}: {named}: no such page")
            elif anchor and anchor not in heading_slugs(REPO / path):
                broken.append(f"{file.relative_to(REPO)}: {named}: no heading with that anchor")
    assert not broken, broken


def test_the_link_check_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    """The checker itself: a missing file and a missing heading are both reported, GitHub's slugs are not."""
    (tmp_path / "other.md").write_text("# Other\n\n## IAM permissions\n\n## What it costs (roughly)!\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#iam-permissions) [ok](other.md#what-it-costs-roughly) [ok](#top-heading)\n"
                    "[no file](missing.md) [no anchor](other.md#iam) [web](https://example.com/x.md)\n"
                    "`[not a link](nowhere.md)`\n\n# Top heading\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#iam: other.md has no heading with that anchor"]
    assert named_pages("see docs/cloud.md#iam-permissions, docs/gpu.md, not mydocs/x.md") == [
        "docs/cloud.md#iam-permissions", "docs/gpu.md"]


def test_the_exit_code_table_is_the_enum():
    """docs/reference.md's table of exit codes lists runspec.ExitCode, member for member."""
    from runspec import ExitCode

    page = (REPO / "docs" / "reference.md").read_text()
    section = page.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {int(code): name for code, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
    assert rows == {member.value: member.name for member in ExitCode}
