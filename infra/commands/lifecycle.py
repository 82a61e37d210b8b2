"""The commands of an instance's life: stop, start, autostop, and down, which ends it (status, ls: in
status.py)."""

from __future__ import annotations

import argparse

from infra.commands.options import cloud_command, confirm, machine_name, names, say, session, target_for
from infra.errors import UserError
from runspec import ExitCode


def status_regions(args, state) -> dict:
    """The sessions `status` looks through: NAME's region, or the configured one plus every region the
    state knows; every enabled region with --all-regions."""
    from infra.ec2.regions import every_region, sessions

    first = session(args, args.name)
    if args.all_regions:
        return every_region(first, getattr(args, "profile", None))
    known = [] if args.name or getattr(args, "region", None) else [h.region for h in state.all() if h.kind == "ec2"]
    return sessions(first, known, getattr(args, "profile", None))


def running_machines(args) -> tuple[list[tuple[str, str | None]], list[str], list[str]]:
    """`pull --every-machine`: ([(name, its region; None for an SSH host)] of every machine of yours that
    is running: the state's SSH hosts, and your EC2 names live from EC2 where `status` looks), [one
    line per name skipped: stopped, or gone], [one line if EC2 could not be asked while the state
    knows EC2 names]. The SSH hosts are pulled even then."""
    from infra.state import State

    state = State()
    machines = [(h.name, None) for h in state.all() if h.kind == "ssh"]
    try:
        mine, seen, regions = ec2_machines(args, state)
    except UserError as e:
        if not any(h.kind == "ec2" for h in state.all()):
            return machines, [], []  # no EC2 here at all: the SSH hosts are every machine
        return machines, [], [f"EC2: not asked ({e})"]
    skipped = []
    for name in sorted({i.name for i, _ in mine}):
        nodes = [(i, region) for i, region in mine if i.name == name]
        stopped = [i for i, _ in nodes if i.state != "running"]
        if stopped:
            skipped.append(f"{name} is {stopped[0].state}: skipped (`mnist-cloud start {name}`, then pull it)")
        else:
            machines.append((name, nodes[0][1]))
    for h in state.all():
        if h.kind == "ec2" and h.name not in seen and (h.region in regions or not h.region):
            skipped.append(f"{h.name}: no instance in EC2 (gone): skipped")
    return sorted(machines), skipped, []


def ec2_machines(args, state) -> tuple[list, set[str], list[str]]:
    """([(instance, region)] of yours, where `status` looks; every name found there, anyone's; the regions
    looked in)."""
    from infra.ec2 import caller_identity, find_instances, others_instances
    from infra.ec2.regions import in_each

    regions = status_regions(argparse.Namespace(**{**vars(args), "name": None, "all_regions": False}), state)
    found = in_each(regions, lambda aws: find_instances(aws))
    every = [(i, region) for region in found for i in found[region]]
    theirs = set()
    if every:
        theirs = {i.instance_id for i in others_instances([i for i, _ in every],
                                                          caller_identity(next(iter(regions.values()))))}
    mine = [(i, region) for i, region in every if i.instance_id not in theirs]
    return mine, {i.name for i, _ in every}, list(regions)


def add_stop(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    p.set_defaults(handler=cmd_stop)


def cmd_stop(args) -> int:
    from infra.ec2 import stop

    inst = stop(session(args, args.name), args.name, log=say)
    paused = "; its spot request waits, and EC2 does not start it by itself" if inst.lifecycle == "spot" else ""
    say(f"{args.name} ({inst.instance_id}) is {inst.state}; its disk is kept{paused}. `mnist-cloud start {args.name}` "
        f"resumes it, `mnist-cloud down {args.name}` deletes it")
    return ExitCode.OK


def add_start(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    p.add_argument("--ssh-cidr", metavar="CIDR", help="who may SSH in (default: your public IP as a /32)")
    p.set_defaults(handler=cmd_start)


def cmd_start(args) -> int:
    from infra.ec2 import start

    aws = session(args, args.name)
    inst = start(aws, args.name, args.ssh_cidr, log=say)
    say(f"{args.name} ({inst.instance_id}) is {inst.state} at {inst.public_ip}")
    from infra.ec2.tags import TAG_BUDGET

    if TAG_BUDGET in inst.tags:  # raised, or removed, while it was stopped: the machine must hear of it
        from infra.commands.budget import give_budget

        give_budget(args, args.name, inst.budget)
    return ExitCode.OK


def add_autostop(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Idle = no trainer running, no interactive SSH session used within the idle "
                                  "time, no pull or sync, and no JupyterLab use (a busy kernel, or activity within "
                                  "the idle time); an open tunnel alone is not activity. The check runs on the "
                                  "instance every minute.")
    machine_name(p)
    p.add_argument("-i", "--idle", type=float, metavar="MIN", help="idle minutes before stopping")
    p.add_argument("--down", action="store_true", help="terminate instead of stop (stop while runs are not pulled)")
    p.add_argument("--after-train", action="store_true", help="stop when a run ends, after the grace period")
    p.add_argument("--grace", type=float, default=3, metavar="MIN",
                   help="--after-train: minutes to wait after a run ends, 3 at least (default: %(default)s)")
    p.add_argument("--cancel", action="store_true", help="turn autostop off")
    p.set_defaults(handler=cmd_autostop)


def cmd_autostop(args) -> int:
    from infra.state import State
    from infra.watchdog import AutostopConfig, install_over_ssh

    if args.cancel and (args.idle is not None or args.down or args.after_train):
        raise UserError("--cancel turns autostop off; it takes no other option")
    if args.idle is not None and args.idle < 0:
        raise UserError("-i/--idle is minutes, 0 or more")
    if not args.cancel and args.idle is None and not args.after_train:
        raise UserError("give -i MIN, --after-train, or --cancel")
    if args.grace < 3:
        raise UserError("--grace is minutes after a run ends, 3 or more (time to pull the run)")
    config = AutostopConfig(idle_minutes=args.idle or 0, action="terminate" if args.down else "stop",
                            after_train=args.after_train, enabled=not args.cancel, grace_minutes=args.grace)
    host = State().get(args.name)
    if host is not None and host.kind == "ec2":
        from infra.ec2 import autostop_for, set_autostop

        config = autostop_for(set_autostop(session(args, args.name), args.name, config, log=say), config)
    target = target_for(args)
    with target.remote:
        line = install_over_ssh(target.remote, config)
        if target.shutdown is not None and target.shutdown.instance.budget is not None:
            target.push_budget(target.shutdown.instance.budget)  # the new config must keep it
        if config.enabled:  # terminate: EC2 stops it instead while runs are not pulled
            target.keep_runs_on_shutdown(unpulled=bool(target.unpulled_runs()))
    say(line or f"autostop on {args.name}: {config.tag}")
    return ExitCode.OK


def add_down(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Terminate (not just stop) every instance of NAME, then delete its security group "
                                  "and any key pair mnist-cloud created for it. NAME is found in the region it was "
                                  "launched in. --all sweeps every name you own, in the configured region, every "
                                  "region the state knows and those --region lists (R1,R2); --all --all-regions "
                                  "sweeps every region enabled for the account.")
    machine_name(p, default=None)
    p.add_argument("--all", action="store_true", help="every resource tagged as yours (an assumed role's "
                   "earlier sessions count as you)")
    p.add_argument("--all-regions", action="store_true",
                   help="with --all: every region enabled for the account, not only the ones the state knows")
    p.add_argument("--any-owner", action="store_true",
                   help="also machines tagged by OTHER people or roles of this account (NAME: one of theirs; "
                        "--all: everyone's)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-pull", action="store_true",
                   help="refuse (exit 2, naming them) instead of pulling unpulled runs into runs/ first")
    p.add_argument("--discard-runs", action="store_true",
                   help="terminate even if the machine holds runs not pulled yet (they are deleted with it)")
    p.set_defaults(handler=cmd_down)


def down_regions(args) -> dict:
    """Where `down` looks: NAME's region; for --all, the configured region, every region the state knows
    and those --region lists, or every enabled region with --all-regions."""
    from infra.ec2.regions import every_region, sessions
    from infra.state import State

    if not args.all:
        aws = session(args, args.name)
        return {aws.region: aws}
    asked = names(getattr(args, "region", None), "--region")
    first = session(argparse.Namespace(region=asked[0] if asked else None, profile=getattr(args, "profile", None)))
    if args.all_regions:
        return every_region(first, getattr(args, "profile", None))
    return sessions(first, [*asked, *(h.region for h in State().all() if h.kind == "ec2")],
                    getattr(args, "profile", None))


def cmd_down(args) -> int:
    from infra.ec2 import DownIncomplete, DownReport, down, down_all, instances_to_terminate, owner_label
    from infra.ec2.regions import in_each

    if args.all == bool(args.name):
        raise UserError("give a NAME, or --all")
    if args.all_regions and not args.all:
        raise UserError("--all-regions goes with --all; a NAME is found in its own region")
    if args.no_pull and args.discard_runs:
        raise UserError("--no-pull refuses when runs are unpulled, --discard-runs deletes them: give one")
    regions = down_regions(args)
    found_in = in_each(regions, lambda aws: instances_to_terminate(aws, None if args.all else args.name,
                                                                   any_owner=args.any_owner))
    alive = [i for region in found_in for i in found_in[region]]
    where = f" in {', '.join(regions)}" if len(regions) > 1 else f" in {next(iter(regions))}"
    if args.all and args.any_owner:
        confirm(f"Terminate every mnist-cloud instance in this account{where}, INCLUDING OTHER PEOPLE'S, "
                "and delete their groups and keys?", args.yes)
    elif args.all:
        confirm(f"Terminate every mnist-cloud instance you own{where} and delete their groups and keys?", args.yes)
    elif alive:
        whose = {owner_label(i.owner) for i in alive if i.owner} if args.any_owner else set()
        confirm(f"Terminate {', '.join(i.instance_id for i in alive)} ({args.name}"
                f"{', owned by ' + ', '.join(sorted(whose)) if whose else ''})?", args.yes)
    found = keep_runs(args, alive, {i.name: region for region in found_in for i in found_in[region]})
    if found:
        from pathlib import Path

        from infra.unpulled import pull_all

        pull_all(found, Path("runs"), log=say)
    report, left = DownReport(), []
    for aws in regions.values():
        try:
            part = down_all(aws, log=say, any_owner=args.any_owner) if args.all else down(aws, args.name, log=say)
        except DownIncomplete as e:  # what was deleted is said first, then the one line of what is left
            part = e.report
            left.extend(part.left)
        for key in ("terminated", "security_groups", "key_pairs", "volumes", "placement_groups"):
            getattr(report, key).extend(getattr(part, key))
    if not (report.terminated or report.security_groups or report.key_pairs or report.volumes
            or report.placement_groups or left):
        say(f"nothing to delete{'' if args.all else f' for {args.name!r}'}{where if args.all else ''}")
        return ExitCode.OK
    say(f"deleted: {len(report.terminated)} instance(s) {' '.join(report.terminated)}; "
        f"{len(report.security_groups)} security group(s); {len(report.key_pairs)} key pair(s); "
        f"{len(report.volumes)} detached volume(s); {len(report.placement_groups)} placement group(s)")
    if left:
        report.left = left
        raise DownIncomplete(report)
    return ExitCode.OK


def keep_runs(args, alive, regions: dict[str, str]) -> list:
    """The unpulled runs on the instances `down` is about to terminate (to pull them), or a one-line
    refusal; nothing with --discard-runs. `regions`: each name's region."""
    from infra.unpulled import check, refuse

    if args.discard_runs or not alive:
        return []
    found, problems = check(alive, None, getattr(args, "profile", None), regions)
    refuse(found, problems, pull=not args.no_pull)
    return found
