"""`mnist-cloud config`: each setting, its value and where it comes from (infra/settings.py)."""

from __future__ import annotations

import runspec
from infra.commands.options import say
from runspec import ExitCode


def add_config(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary,
                       description="Settings come from the flag, else the environment, else the project's "
                                   "mnist-cloud.toml or [tool.mnist-cloud] in pyproject.toml, else the user's "
                                   "config.toml in mnist-cloud's config directory, else the default.")
    p.set_defaults(handler=cmd_config)


def cmd_config(args) -> int:
    """Each setting, its value and where it came from."""
    from infra import settings
    from infra.notify import shown_all

    found = settings.resolve({})
    rows = [[key, "-" if v.value is None else shown_all(v.value.split(",")) if key == "notify" else str(v.value),
             v.source] for key, v in found.items()]  # a webhook's URL is its secret
    for line in runspec.table(["KEY", "VALUE", "FROM"], rows):
        say(line)
    project = settings.project_file()
    say(f"project file: {project or 'none (mnist-cloud.toml, or [tool.mnist-cloud] in pyproject.toml)'}; "
        f"user file: {settings.user_file()}{'' if settings.user_file().is_file() else ' (none)'}")
    return ExitCode.OK
