"""`mnist-cloud sweep`: a grid of models x seeds x --set values, run here or on machines (infra/sweep.py),
summarized. Its own flags are parsed here; every other flag goes to each run's trainer."""

from __future__ import annotations

import argparse

from infra.commands.options import Parser, aws_options, code_option, global_aws, python_option, say
from infra.errors import UserError
from runspec import ExitCode


def add_sweep(sub, name: str, summary: str) -> None:
    """The entry in `mnist-cloud --help`; the flags are sweep_parser()'s, parsed by the handler."""
    p = sub.add_parser(name, add_help=False, help=summary)
    p.set_defaults(handler=cmd_sweep, trainer_flags=True)


def sweep_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mnist-cloud sweep",
               description="Expand a grid (models x seeds x --set values), run it locally (--local) or on "
                           "machines (--on NAME[,NAME2]: a queue per machine, one run per GPU at a time), retry a "
                           "failed run once, pull every run, and print min/median/max test accuracy per "
                           "configuration. Any other flag goes to every run's trainer.",
               epilog="example: mnist-cloud sweep --local --seeds 1,2,3 --model net8k,seed001 --set lr=0.05,0.1 --epochs 15")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--on", metavar="NAME[,NAME2...]", help="machines to run on")
    where.add_argument("--local", action="store_true", help="run here, one after the other")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--model", help="comma-separated models (default: the config's model, else the trainer's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a trainer flag and its values, e.g. --set lr=0.05,0.1 (repeatable)")
    p.add_argument("--max-cost", type=float, metavar="USD", help="refuse to start if the estimate exceeds this")
    p.add_argument("--budget", metavar="USD|none",
                   help="give each machine of the sweep this budget (`mnist-cloud budget`): what it may cost from "
                        "launch on, compute only; at it, the machine checkpoints its runs and stops")
    p.add_argument("--notify", action="append", default=[], metavar="URL",
                   help="each machine POSTs each run's end (and its own events) there, as `train --on --notify` "
                        "(repeatable; default: the config's notify, else the URLs the machine was launched with)")
    p.add_argument("--epoch-seconds", type=float, default=6.0,
                   help="assumed seconds per epoch on a machine, for the estimate (default: %(default)s, a g4dn-class GPU)")
    p.add_argument("--name", default=None, help="sweep name, the prefix of its run ids (default: sweep-<time>)")
    p.add_argument("--to", default="runs", metavar="DIR", help="local runs directory (default: %(default)s)")
    python_option(p, help="interpreter on the machines")
    code_option(p)
    aws_options(p, region_help="AWS region", profile_help="AWS profile", default=None)
    return p


def cmd_sweep(args, rest: list[str]) -> int:
    from pathlib import Path

    from infra import settings, sweep
    from infra.commands.train import with_tensorboard
    from infra.targets import has_option

    args, trainer_args = sweep_parser().parse_known_args(global_aws(rest, args))  # the sweep's own, from here on
    found = settings.resolve()  # the config's model, epochs and tensorboard, where not typed
    if found["epochs"].value is not None and not has_option(trainer_args, "--epochs"):
        trainer_args = ["--epochs", str(found["epochs"].value), *trainer_args]
    trainer_args = with_tensorboard(trainer_args, found["tensorboard"].value)
    plan = sweep.plan(args.name, args.model or found["model"].value, args.seeds, args.set, trainer_args)
    runs = Path(args.to)
    say(plan.describe())
    if args.local:
        if args.max_cost is not None or args.budget is not None or args.notify:
            say("--max-cost, --budget, --notify: a local sweep costs nothing on AWS and has no machine to tell")
        slots = [sweep.LocalSlot()]
    else:
        names = sweep.parse_list(args.on, "--on")
        if args.max_cost is not None:
            check_cost(plan, names, args)
        if args.budget is not None:
            from infra.commands.budget import set_budget_before_a_run

            for name in names:  # before the slots connect: each connection gives it to its machine
                set_budget_before_a_run(args, name, args.budget)
        from infra.notify import notify_urls

        slots = sweep.machine_slots(names, say, python=args.python, code=args.code, region=args.region,
                                    profile=args.profile, notify=notify_urls(args.notify, found["notify"].value))
        say(f"sweep: {len(plan.points)} run(s) on {len(slots)} slot(s): " + ", ".join(s.where for s in slots))
    interrupted = sweep.run(plan.points, slots, trainer_args, runs, log=say)
    code = sweep.finish(plan, runs, log=say)
    return ExitCode.INTERRUPTED if interrupted else code


def check_cost(plan, names: list[str], args) -> None:
    """--max-cost: refuse, before anything starts, a sweep whose estimate is above it."""
    from infra import sweep
    from infra.targets import SSHTarget

    types = [SSHTarget.resolve(n, args.region, args.profile).instance_type or "?" for n in names]
    hours, usd = sweep.estimate(plan.points, plan.trainer_args, types, slots=len(names), epoch_seconds=args.epoch_seconds)
    say(f"estimate: {hours:.2f} h of {', '.join(types)} ~ ${usd:.2f} "
        f"({len(plan.points)} runs, {sweep.sweep_epochs(plan.points, plan.trainer_args)} epochs in all x "
        f"{args.epoch_seconds:g} s)")
    if usd > args.max_cost:
        raise UserError(f"the sweep's estimate ${usd:.2f} exceeds --max-cost ${args.max_cost:.2f}; "
                        "fewer seeds/configs, more machines, or a higher --max-cost")
