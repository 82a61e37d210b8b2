"""The commands that run here, in a `python -m trainer` child with this interpreter: the trainer's own
(models, check, evaluate, predict, data, compare), their flags passed through untouched, and report."""

from __future__ import annotations

import runspec
from infra.commands.options import say
from runspec import ExitCode


def add_trainer_command(sub, name: str, summary: str) -> None:
    """`mnist-cloud NAME ...` is `python -m trainer NAME ...`: the trainer parses (and explains) the flags."""
    p = sub.add_parser(name, add_help=False, help=summary)
    p.set_defaults(handler=run_in_trainer, trainer_flags=True)


def run_in_trainer(args, rest: list[str]) -> int:
    from infra.targets import run_trainer

    return run_trainer([args.command, *rest])


def add_report(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary)
    p.add_argument("run", help="run directory, runs/<run-id>")
    p.add_argument("--open", action="store_true", help="open it in the system browser, if there is one")
    p.add_argument("--no-predictions", action="store_true", help="skip the confusion matrix and mistakes")
    p.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    import webbrowser
    from pathlib import Path

    from infra.targets import run_trainer

    code = run_trainer(["report", args.run] + (["--no-predictions"] if args.no_predictions else []))
    if code == ExitCode.OK and args.open:
        url = (Path(args.run).resolve() / runspec.REPORT).as_uri()
        if not webbrowser.open(url):
            say(f"no browser found here; open {url}")
    return code
