"""`mnist-cloud`: the laptop-side command line.

It parses arguments and hands off to the layers below it. It never imports torch: training,
evaluation and the model zoo run in `python -m trainer`, locally as a subprocess.
"""

from __future__ import annotations

import argparse
import sys

from infra import __version__
from infra.errors import UserError
from infra.targets import LocalTarget

# Commands that are `python -m trainer <command> ...` run here, flags passed through untouched.
TRAINER_COMMANDS = {
    "models": "list the model zoo: params and MACs counted from code, BN/Dropout/GAP/FC",
    "evaluate": "test accuracy of a checkpoint or run directory: mnist-cloud evaluate runs/<id>/best.pt",
    "predict": "classify digit images: mnist-cloud predict WEIGHTS IMAGE.png [...]",
    "data": "find or fetch MNIST into the user cache, verify it, and print where it is",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mnist-cloud",
        description="Train small MNIST CNNs on this machine or on an EC2 GPU instance, with the same trainer.",
        epilog="Run `mnist-cloud COMMAND --help` for a command's options. Quick start: `mnist-cloud train`.",
    )
    parser.add_argument("--version", action="version", version=f"mnist-cloud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    sub.add_parser(
        "train", add_help=False,
        help="train a model (locally by default); any `python -m trainer train` flag is accepted",
        description="Train with `python -m trainer train`. All trainer flags pass through; "
                    "`mnist-cloud train --help` lists them.",
    )
    for name, help_text in TRAINER_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=help_text)
    return parser


def cmd_train(rest: list[str]) -> int:
    if "-h" in rest or "--help" in rest:
        print("usage: mnist-cloud train [TRAINER FLAGS]\n\n"
              "Runs `python -m trainer train` here, with this interpreter. Trainer flags:\n", flush=True)
        return LocalTarget().run(["train", "--help"])
    return LocalTarget().run(["train", *rest])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "train":
            return cmd_train(rest)
        if args.command in TRAINER_COMMANDS:
            return LocalTarget().run([args.command, *rest])
        raise UserError(f"unknown command {args.command!r}")
    except UserError as e:
        print(f"mnist-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnist-cloud: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
