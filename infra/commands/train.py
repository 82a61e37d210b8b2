"""`mnist-cloud train`: `python -m trainer train` here, or the same run on a named machine with --on NAME
(infra/runner.py). mnist-cloud's own flags are taken out; every other flag is the trainer's."""

from __future__ import annotations

import argparse

from infra.commands.options import Parser, aws_options, code_option, global_aws, python_option, say
from infra.errors import UserError

TRAIN_HELP = """usage: mnist-cloud train [--on NAME [--detach] [--python PATH] [--code DIR]] [TRAINER FLAGS]

Without --on, runs `python -m trainer train` here, with this interpreter.
With --on NAME, syncs the code to that machine, sets it up if needed, starts the same
`python -m trainer train` there detached (setsid nohup), streams its log, and when it ends pulls
runs/<run-id>/ back here. Ctrl-C stops the streaming, not the training.

  --on NAME       a machine from `mnist-cloud launch` or `mnist-cloud attach`
  --detach        return as soon as the run has started
  --gpus N|all    torchrun --nproc_per_node N on the machine (DDP; N CPU processes where there is no GPU)
  --nodes K       torchrun across the K machines of a cluster (`launch --nodes K`), rendezvous at node 0
  --env K=V       environment for the remote job, e.g. --env NCCL_DEBUG=INFO (repeatable)
  --no-desktop-notify   no desktop notification (notify-send / osascript) when the run ends
  --notify URL    the machine POSTs the run's end (test accuracy, cost), a spot interruption, autostop and
                  the budget there, laptop closed or not (repeatable; default: the config's notify); slack:URL,
                  discord:URL, ntfy:URL in those services' formats
  --budget USD          set or raise what the machine may cost from launch on (compute only); none removes it
  --resume RUN    continue RUN from its last checkpoint (pushed from here if the machine lacks it)
  --python PATH   interpreter on the machine (default: $MNIST_CLOUD_REMOTE_PYTHON, else setup's choice)
  --code DIR      checkout to sync (default: the current directory)
  --region R, --profile P   AWS settings for an EC2 machine

Trainer flags (where `mnist-cloud config` sets a model, epochs or tensorboard, those win over the defaults below):
"""


def add_train(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, add_help=False, help=summary,
                       description="Train with `python -m trainer train`. All trainer flags pass through; "
                                   "`mnist-cloud train --help` lists them.")
    p.set_defaults(handler=cmd_train, trainer_flags=True)


def cmd_train(args, rest: list[str]) -> int:
    from infra.targets import run_trainer

    opts, rest = train_options().parse_known_args(global_aws(rest, args))
    rest = with_defaults(rest)
    if "-h" in rest or "--help" in rest:
        print(TRAIN_HELP, flush=True)
        return run_trainer(["train", "--help"])
    if not opts.on:
        if opts.detach or opts.python or opts.code or opts.gpus or opts.nodes or opts.env or opts.no_desktop_notify \
                or opts.budget or opts.notify:
            raise UserError("--detach, --python, --code, --gpus, --nodes, --env, --no-desktop-notify, --budget and "
                            "--notify need --on NAME")
        return run_trainer(["train", *rest])
    from infra import settings
    from infra.notify import launched_urls, notify_urls
    from infra.runner import plan_remote_train, train_remote

    if opts.budget is not None:
        from infra.commands.budget import set_budget_before_a_run

        set_budget_before_a_run(opts, opts.on, opts.budget)

    job = plan_remote_train(opts.on, rest, detach=opts.detach, python=opts.python, code=opts.code, gpus=opts.gpus,
                            nodes=opts.nodes, env=opts.env, region=opts.region, profile=opts.profile)
    job.desktop_notify = not opts.no_desktop_notify
    job.notify = notify_urls(opts.notify, settings.value("notify")) or launched_urls(opts.on)
    return train_remote(job, log=say)


def train_options() -> Parser:
    """`mnist-cloud train`'s own flags (TRAIN_HELP); every other flag is the trainer's."""
    p = Parser(prog="mnist-cloud train", add_help=False)
    p.add_argument("--on", metavar="NAME")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--gpus", metavar="N|all")
    p.add_argument("--nodes", metavar="K")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--no-desktop-notify", action="store_true")
    p.add_argument("--budget", metavar="USD|none")
    p.add_argument("--notify", action="append", default=[], metavar="URL")
    python_option(p, metavar="PATH")
    code_option(p, help=None)
    aws_options(p, region_help=None, profile_help=None, default=None)
    return p


def with_defaults(rest: list[str]) -> list[str]:
    """Trainer flags with the config's model, epochs and tensorboard added where not typed (never to a
    resume: its flags are its config.json's)."""
    from infra import settings
    from infra.targets import has_option

    probe = argparse.ArgumentParser(add_help=False)  # abbreviated as the trainer allows it: --res RUN
    probe.add_argument("--resume")
    if probe.parse_known_args(rest)[0].resume or "-h" in rest or "--help" in rest:
        return rest
    found = settings.resolve()
    for key in ("model", "epochs"):
        if found[key].value is not None and not has_option(rest, f"--{key}"):
            rest = [f"--{key}", str(found[key].value), *rest]
    return with_tensorboard(rest, found["tensorboard"].value)


def with_tensorboard(rest: list[str], setting: bool) -> list[str]:
    """The config's tensorboard = true, unless --tensorboard or --no-tensorboard was typed."""
    from infra.targets import has_option

    if setting and not has_option(rest, "--tensorboard") and not has_option(rest, "--no-tensorboard"):
        return ["--tensorboard", *rest]
    return rest
