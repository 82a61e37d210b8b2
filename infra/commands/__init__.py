"""`mnist-cloud`: the laptop-side command line. It parses arguments and hands off to the layers below it.

COMMANDS is the table of contents: each command, the module under infra/commands/ that holds it, the
function there that adds its parser (written directly above its handler, which it sets with
set_defaults(handler=...)), and the one line `mnist-cloud --help` shows. main() turns what a handler
raises into an exit code: bad input (UserError) is one line on stderr and 2, Ctrl-C is 130.

Every command module is cheap to import: boto3, fabric, paramiko (and never torch) load inside a
handler, when it runs, so `mnist-cloud --help` and a typo answer at once.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from infra import __version__
from infra.commands.options import Parser, aws_group
from infra.errors import UserError
from runspec import ExitCode


@dataclass(frozen=True)
class CommandInfo:
    module: str  # under infra.commands
    parser: str  # the module's function (sub, name, summary) that adds the command's parser
    summary: str  # its line in `mnist-cloud --help`


COMMANDS: dict[str, CommandInfo] = {  # in the order `mnist-cloud --help` lists them
    "train": CommandInfo("train", "add_train",
                         "train a model (locally by default); any `python -m trainer train` flag is accepted"),
    "models": CommandInfo("local", "add_trainer_command",
                          "list the model zoo: params and MACs counted from code, BN/Dropout/GAP/FC"),
    "check": CommandInfo("local", "add_trainer_command",
                         "count a model and check its claims (params, BN, Dropout, GAP, no FC): "
                         "mnist-cloud check mynet.py:Net --max-params 8000 --require bn,dropout,gap --no-fc"),
    "evaluate": CommandInfo("local", "add_trainer_command",
                            "test accuracy of the weights a run delivers (its model.pt), or of a checkpoint: "
                            "mnist-cloud evaluate runs/<id>"),
    "predict": CommandInfo("local", "add_trainer_command",
                           "classify digit images: mnist-cloud predict WEIGHTS IMAGE.png [...]"),
    "data": CommandInfo("local", "add_trainer_command",
                        "find or fetch MNIST into the user cache, verify it, and print where it is"),
    "compare": CommandInfo("local", "add_trainer_command",
                           "compare runs: table here, overlaid curves in compare.html: mnist-cloud compare RUN RUN..."),
    "export-tb": CommandInfo("local", "add_trainer_command",
                             "write TensorBoard event files for runs made without --tensorboard: "
                             "mnist-cloud export-tb RUN..."),
    "sweep": CommandInfo("sweep", "add_sweep",
                         "run a grid of models x seeds x --set values, locally or across machines, and summarize"),
    "report": CommandInfo("local", "add_report", "(re)generate a run's report.html; --open shows it"),
    "plan": CommandInfo("plan", "add_plan",
                        "what a launch would meet: quota, zones, live price, permission, cost"),
    "launch": CommandInfo("launch", "add_launch", "launch (or reuse) a named EC2 GPU instance"),
    "attach": CommandInfo("launch", "add_attach", "adopt an existing EC2 instance or any SSH host under a name"),
    "status": CommandInfo("status", "add_status", "show instances: state, price, cost so far, runs to pull, budget"),
    "ls": CommandInfo("status", "add_status", "same as status"),
    "stop": CommandInfo("lifecycle", "add_stop", "stop an instance (disk kept, compute billing stops)"),
    "start": CommandInfo("lifecycle", "add_start", "start a stopped instance; picks up its new IP"),
    "autostop": CommandInfo("lifecycle", "add_autostop",
                            "change when an instance stops itself (runs on the instance)"),
    "budget": CommandInfo("budget", "add_budget",
                          "set, raise or remove what a machine may cost (USD, compute only); it stops itself there"),
    "setup": CommandInfo("machine", "add_setup",
                         "sync the code and run setup_ec2.sh on a machine (idempotent)"),
    "sync": CommandInfo("machine", "add_sync",
                        "copy the code to a machine (rsync --checksum; secrets never leave)"),
    "logs": CommandInfo("machine", "add_logs", "show a remote run's console log; -f follows a live run"),
    "runs": CommandInfo("machine", "add_runs", "list a machine's runs and their state"),
    "pull": CommandInfo("machine", "add_pull",
                        "fetch a remote run directory into runs/ (incremental, atomic, verified)"),
    "jupyter": CommandInfo("machine", "add_jupyter", "JupyterLab on the machine, through an SSH tunnel"),
    "tensorboard": CommandInfo("machine", "add_tensorboard",
                               "TensorBoard on the machine's runs/, through an SSH tunnel (here: tensorboard "
                               "--logdir runs)"),
    "ssh": CommandInfo("machine", "add_ssh", "a shell on the machine, or `mnist-cloud ssh NAME -- CMD`"),
    "ssh-config": CommandInfo("machine", "add_ssh_config", "write `Host mnist-NAME` entries for ssh and VS Code"),
    "config": CommandInfo("config", "add_config",
                          "show each setting (region, profile, instance, autostop, model, epochs) "
                          "and where it comes from"),
    "forget-host": CommandInfo("machine", "add_forget_host",
                               "drop a machine's pinned host key (after you verified a rebuild)"),
    "down": CommandInfo("lifecycle", "add_down",
                        "terminate a name's instances and delete its security group and key"),
    "completion": CommandInfo("completion", "add_completion",
                              "TAB completion (bash, zsh, fish): eval \"$(mnist-cloud completion bash)\""),
}


def build_parser() -> Parser:
    parser = Parser(
        prog="mnist-cloud",
        description="Train small MNIST CNNs on this machine or on an EC2 GPU instance, with the same trainer.",
        epilog="Run `mnist-cloud COMMAND --help` for a command's options. Quick start: `mnist-cloud train`.",
        parents=[aws_group()],
    )
    parser.add_argument("--version", action="version", version=f"mnist-cloud {__version__}")
    # trainer_flags: the command takes the flags mnist-cloud does not know (train, sweep, the trainer's own
    # commands) and its handler gets them as a second argument
    parser.set_defaults(handler=None, trainer_flags=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, info in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{info.module}")
        getattr(module, info.parser)(sub, name, info.summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a TAB in a shell that sourced `mnist-cloud completion SHELL`
        from infra.commands.completion import complete

        complete(parser)  # prints the completions and exits
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return ExitCode.BAD_INPUT
        if args.trainer_flags:
            return args.handler(args, rest)
        if rest:
            raise UserError(f"unrecognized arguments: {' '.join(rest)} (see `mnist-cloud {args.command} --help`)")
        return args.handler(args)
    except UserError as e:
        print(f"mnist-cloud: error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("mnist-cloud: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
