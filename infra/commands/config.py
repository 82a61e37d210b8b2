"""`mnist-cloud config`: each setting, its value and where it comes from (infra/settings.py)."""

from __future__ import annotations

import json

import runspec
from infra.commands.options import say
from runspec import ExitCode


def add_config(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary,
                       description="Settings come from the flag, else the environment, else the project's "
                                   "mnist-cloud.toml or [tool.mnist-cloud] in pyproject.toml, else the user's "
                                   "config.toml in mnist-cloud's config directory, else the default.")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object: each setting's value and source, and the two files")
    p.set_defaults(handler=cmd_config)


def cmd_config(args) -> int:
    """Each setting, its value and where it came from."""
    from infra import settings
    from infra.notify import shown_all

    found = settings.resolve({})
    # a webhook's URL is its secret: notify is shown as `config` shows it, in JSON too
    shown = {key: shown_all(v.value.split(",")) if key == "notify" and v.value is not None else v.value
             for key, v in found.items()}
    project, user = settings.project_file(), settings.user_file()
    if args.json:
        say(json.dumps({"settings": {key: {"value": shown[key], "source": v.source} for key, v in found.items()},
                        "project_file": None if project is None else str(project), "user_file": str(user),
                        "user_file_exists": user.is_file()}, indent=2))
        return ExitCode.OK
    rows = [[key, "-" if shown[key] is None else json.dumps(shown[key]) if isinstance(shown[key], bool)  # as TOML
             else str(shown[key]), v.source] for key, v in found.items()]
    for line in runspec.table(["KEY", "VALUE", "FROM"], rows):
        say(line)
    say(f"project file: {project or 'none (mnist-cloud.toml, or [tool.mnist-cloud] in pyproject.toml)'}; "
        f"user file: {user}{'' if user.is_file() else ' (none)'}")
    return ExitCode.OK
