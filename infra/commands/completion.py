"""`mnist-cloud completion bash|zsh|fish`: the shell code that makes TAB complete mnist-cloud's commands,
flags, machine names and run directories, through argcomplete.

The script is small and fixed: at each TAB the shell runs `mnist-cloud` with argcomplete's environment
(_ARGCOMPLETE), and main() hands the parser tree to complete() instead of running a command. So a new
command or flag completes as soon as its parser has it, and the machine names and runs are the ones there
at that moment: the state file's names (wherever MNIST_CLOUD_HOME or XDG_CONFIG_HOME put it), the run
directories under runs/.

Which argument completes to what is read off the tree, by the names the parsers already use (see
add_completers): a machine NAME (`name`, `names`, `--on`), a local run directory (`run`, `runs`,
`weights`, `--resume`). A RUN beside a NAME (logs, pull) is a run on that machine, which only an SSH
connection could list; it gets no suggestions.
"""

from __future__ import annotations

import argparse
import os

import runspec
from runspec import ExitCode

SHELLS = ("bash", "zsh", "fish")
PROG = "mnist-cloud"
MACHINE_POSITIONALS = ("name", "names")
MACHINE_OPTIONS = ("--on",)
RUN_POSITIONALS = ("run", "runs", "weights")
RUN_OPTIONS = ("--resume",)
# the trainer's commands take their flags from `python -m trainer`, whose parser infra/ does not import;
# these are the run directories they take as positionals, for completion only
TRAINER_RUN_POSITIONALS = {"evaluate": ("weights", None), "predict": ("weights", None), "compare": ("runs", "+"),
                           "export-tb": ("runs", "+")}


def add_completion(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary,
                       description="Print the shell code that completes mnist-cloud's commands, flags, machine "
                                   "names and run directories. bash: eval \"$(mnist-cloud completion bash)\" in "
                                   "~/.bashrc; zsh: the same in ~/.zshrc, after compinit; fish: mnist-cloud "
                                   "completion fish > ~/.config/fish/completions/mnist-cloud.fish")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in: %(choices)s")
    p.set_defaults(handler=cmd_completion)


def cmd_completion(args) -> int:
    import argcomplete

    print(argcomplete.shellcode([PROG], shell=args.shell), end="", flush=True)
    return ExitCode.OK


def typed(action=None, parsed_args=None, **_) -> set[str]:
    """What an argument of several values (ssh-config A B, compare R1 R2) already holds."""
    values = getattr(parsed_args, action.dest, None) if action is not None else None
    return set(values) if isinstance(values, list) else set()


def machine_names(prefix: str = "", **kwargs) -> list[str]:
    """The state's names not typed yet; after a comma (--on a,b), as the whole list so far."""
    from infra.errors import UserError
    from infra.state import State

    try:
        known = sorted(h.name for h in State().all())
    except (UserError, OSError, TypeError, ValueError):  # a damaged state file: no suggestions, not a trace
        return []
    head, _, last = prefix.rpartition(",")
    skip = typed(**kwargs) | (set(head.split(",")) if head else set())
    lead = f"{head}," if head else ""
    return [lead + n for n in known if n.startswith(last) and n not in skip]


def run_dirs(prefix: str = "", **kwargs) -> list[str]:
    """The run directories (those with a config.json) under the directory typed so far, else runs/."""
    base = os.path.dirname(prefix) or "runs"
    try:
        children = sorted(os.listdir(base))
    except OSError:
        return []
    found = [os.path.join(base, c) for c in children if os.path.isfile(os.path.join(base, c, runspec.CONFIG))]
    skip = typed(**kwargs)
    return [d for d in found if d.startswith(prefix) and d not in skip]


def nothing(**_) -> list[str]:
    """An argument with nothing to offer from here (a run on a machine, a command for ssh to run)."""
    return []


def add_completers(parser: argparse.ArgumentParser) -> None:
    """Every parser of the tree: its arguments' completers, by the names the parsers give them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_completers(sub)
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    for action in parser._actions:
        if getattr(action, "completer", None) is not None:
            continue
        options = set(action.option_strings)
        if options & set(MACHINE_OPTIONS) or not options and action.dest in MACHINE_POSITIONALS:
            action.completer = machine_names
        elif options & set(RUN_OPTIONS) or not options and action.dest in RUN_POSITIONALS and "name" not in positionals:
            action.completer = run_dirs
        elif not options and (action.dest in RUN_POSITIONALS or action.nargs == argparse.REMAINDER):
            action.completer = nothing


def with_pass_through_flags(parser: argparse.ArgumentParser) -> None:
    """The commands whose flags argparse does not see, given them for completion: train and sweep their own
    (train_options, sweep_parser) and every TrainConfig flag, which they pass to the trainer; evaluate,
    predict, compare and export-tb their run directories."""
    from infra.commands.sweep import sweep_parser
    from infra.commands.train import train_options
    from runspec.config import add_arguments

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, own in (("train", train_options), ("sweep", sweep_parser)):
        if command in sub.choices:
            full = argparse.ArgumentParser(prog=f"{PROG} {command}", parents=[own()], add_help=False,
                                           conflict_handler="resolve")
            add_arguments(full)
            sub.choices[command] = full
    for command, (dest, nargs) in TRAINER_RUN_POSITIONALS.items():
        if command in sub.choices:
            sub.choices[command].add_argument(dest, nargs=nargs)


def complete(parser: argparse.ArgumentParser) -> None:
    """At a TAB: print the completions for argcomplete's COMP_LINE and exit (argcomplete exits the process).
    Flags are offered once a `-` is typed, so a NAME or RUN is not lost among them."""
    import argcomplete

    with_pass_through_flags(parser)
    add_completers(parser)
    argcomplete.autocomplete(parser, always_complete_options=False)
