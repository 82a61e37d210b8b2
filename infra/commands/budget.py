"""`budget NAME USD|none`: what a machine may cost from launch on, compute only (EBS storage is not counted).
The watchdog on the machine keeps it (infra/agent/autostop.py), laptop closed or not; `train --on NAME
--budget`, `sweep --on A,B --budget` and `launch --budget` set it too."""

from __future__ import annotations

from infra.commands.options import cloud_command, machine_name, say, session
from infra.errors import UserError
from runspec import ExitCode

def add_budget(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Set, raise or remove the budget of a machine: the total it may cost from launch "
                                  "on, compute only (EBS storage is not counted). The watchdog on the machine adds "
                                  "up its uptime at the price mnist-cloud last saw; at 80% it warns in the logs of "
                                  "live runs, at 100% it checkpoints them and stops the machine (never terminates "
                                  "it). Kept as the instance tag mnist-cloud:budget, so it can change while the "
                                  "machine is stopped; `start` gives it to the machine.")
    machine_name(p)
    p.add_argument("usd", metavar="USD|none", help="the budget in USD, or none to remove it")
    p.set_defaults(handler=cmd_budget)


def budget_arg(text: str | None, flag: str = "the budget") -> float | None:
    """A budget as typed: USD above 0, or none. UserError otherwise."""
    from infra.ec2.tags import parse_budget

    try:
        return parse_budget(text)
    except ValueError:
        raise UserError(f"{flag} is USD above 0 (e.g. 5 or 12.50), or none; not {text!r}") from None


def cmd_budget(args) -> int:
    apply_budget(args, args.name, budget_arg(args.usd))
    return ExitCode.OK


def apply_budget(args, name: str, budget: float | None) -> list[dict]:
    """Tag every instance of the name and, where it runs, write the budget into its watchdog's config."""
    from infra.ec2 import set_budget
    from infra.resolve import known_host
    from infra.targets import SSHTarget

    if known_host(name).kind != "ec2":
        raise UserError(f"{name} is not an EC2 instance: a budget needs its price (its uptime is not billed here)")
    insts = set_budget(session(args, name), name, budget)
    what = "no budget" if budget is None else f"a ${budget:g} budget"
    if any(i.state != "running" for i in insts):
        say(f"{name} ({insts[0].state}) has {what} now; `mnist-cloud start {name}` gives it to the machine")
        return []
    seen = []
    for target in SSHTarget.resolve_cluster(name, getattr(args, "region", None), getattr(args, "profile", None)):
        with target.remote:
            seen.append(target.push_budget(budget))
        spent = seen[-1]["spent_usd"]
        say(f"{target.label} has {what} now; it has cost ${spent:.2f} so far at "
            f"${seen[-1]['usd_per_hour']:.4f}/h (compute only)")
    return seen


def set_budget_before_a_run(args, name: str, text: str) -> None:
    """The tag now; the run's connection writes it into the watchdog's config (SSHTarget.prepare). `none`
    is written at once: prepare pushes only a budget there is."""
    from infra.ec2 import set_budget
    from infra.resolve import known_host

    budget = budget_arg(text, "--budget")
    if budget is None or known_host(name).kind != "ec2":
        apply_budget(args, name, budget)  # a machine not on EC2: says why not
        return
    set_budget(session(args, name), name, budget)
    say(f"{name} has a ${budget:g} budget now (compute only, from launch on)")


def give_budget(args, name: str, budget: float | None) -> None:
    """The budget and the price now into the watchdog's config of a machine just up (`start`: its tag, maybe
    raised while it was stopped, before the watchdog's first minutes after a budget stop are up, see
    infra/agent/autostop.py START_GRACE_S; `launch`: the live price). Says so where SSH fails."""
    from infra.targets import SSHTarget

    try:
        region, profile = getattr(args, "region", None), getattr(args, "profile", None)
        for target in SSHTarget.resolve_cluster(name, region, profile):
            with target.remote:
                target.remote.wait_ready(timeout=240, log=say)
                seen = target.push_budget(budget)
            what = "no budget" if budget is None else f"budget ${budget:g}"
            say(f"{target.label}: {what}, ${seen['spent_usd']:.2f} spent so far (compute only)")
    except (UserError, OSError) as e:
        say(f"note: could not give {name} its budget over SSH ({e}); the last one it was given holds. "
            f"`mnist-cloud budget {name} {'none' if budget is None else f'{budget:g}'}` tries again")
