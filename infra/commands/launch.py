"""The commands that give a name a machine: launch (a new EC2 instance, or the one already called NAME)
and attach (an EC2 instance or any SSH host that exists already)."""

from __future__ import annotations

from infra.commands.options import DEFAULT_NAME, cloud_command, names, say, session, state_region
from infra.errors import UserError
from runspec import ExitCode


def add_launch(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Launch an EC2 instance from the newest PyTorch Deep Learning AMI, or reuse the "
                                  "instance already called NAME (starting it if stopped). SSH is opened only to "
                                  "your address; IMDSv2 is required; the root volume is encrypted gp3. Given "
                                  "several types (--instance A,B or --gpu-type T4,L4) or regions (--region R1,R2 "
                                  "or all), it checks each as `mnist-cloud plan` does, skips those that cannot "
                                  "launch, and tries the rest cheapest first (spot ones first with --spot), zone "
                                  "by zone, until one has capacity.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--instance", metavar="TYPE[,TYPE]",
                       help="instance type(s), e.g. g4dn.xlarge or g4dn.xlarge,g6.xlarge (default: the config's "
                            "instance)")
    which.add_argument("--gpu-type", metavar="GPU[,GPU]",
                       help="the smallest instance type with this GPU, as AWS names it: T4, L4, A10G, T4g, ...")
    p.add_argument("--name", default=DEFAULT_NAME, help="name for the instance and its resources (default: %(default)s)")
    p.add_argument("--spot", action="store_true",
                   help="spot instance: stops on interruption, and its runs resume when EC2 starts it again; "
                        "other zones, then on-demand, if none")
    p.add_argument("--ami", help="AMI id (default: the newest PyTorch DLAMI, from SSM)")
    p.add_argument("--disk-gb", type=int, default=100, help="root volume size in GB (default: %(default)s)")
    p.add_argument("--key-name", help="use this existing EC2 key pair (default: create one for the name)")
    p.add_argument("--key", metavar="PATH", help="private key file for --key-name")
    p.add_argument("--public-key", metavar="PATH", help="import this public key (e.g. ~/.ssh/id_ed25519.pub) instead")
    p.add_argument("--ssh-cidr", metavar="CIDR", help="who may SSH in (default: your public IP as a /32)")
    p.add_argument("--autostop", type=float, metavar="MIN",
                   help="stop after this many idle minutes (no trainer, no SSH terminal); 0 = never (default: the "
                        "config's autostop, else 30)")
    p.add_argument("--autostop-after-train", action="store_true",
                   help="also stop 3 minutes after a run ends (time to pull it)")
    p.add_argument("--down", action="store_true",
                   help="autostop terminates instead of stopping (it stops while runs are not pulled)")
    p.add_argument("--budget", metavar="USD",
                   help="what the machine may cost from launch on, compute only: at 80%% its live runs are warned, "
                        "at 100%% they checkpoint and it stops itself, laptop closed or not (default: the "
                        "config's budget, else none)")
    p.add_argument("--notify", action="append", default=[], metavar="URL",
                   help="the machine POSTs autostop, the budget's warning and stop there, laptop closed or not "
                        "(repeatable; slack:URL, discord:URL, ntfy:URL in those services' formats; default: the "
                        "config's notify); its runs' ends too, unless `train --on --notify` names others")
    p.add_argument("--no-wait-checks", action="store_true", help="return once running, before the EC2 status checks")
    p.add_argument("--no-wait-ssh", action="store_true", help="do not wait until SSH answers")
    p.add_argument("--nodes", type=int, default=1, metavar="K",
                   help="a cluster of K instances in a cluster placement group, open to each other only (default: 1)")
    p.set_defaults(handler=cmd_launch)


def cmd_launch(args) -> int:
    from infra import settings
    from infra.commands.budget import budget_arg
    from infra.ec2 import LaunchSpec, console_fingerprints, launch
    from infra.notify import notify_urls, shown_all
    from infra.watchdog import user_data

    typed = budget_arg(args.budget, "--budget") if args.budget else None
    found = settings.resolve({"autostop": args.autostop, "instance": args.instance, "profile":
                              getattr(args, "profile", None), "epochs": None, "budget": typed})  # the files, read once
    args.autostop, args.instance = found["autostop"].value, found["instance"].value
    budget = None if (args.budget or "").strip().lower() == "none" else found["budget"].value  # none: no default
    if budget is not None and not budget > 0:
        raise UserError(f"the budget is USD above 0, not {budget:g} ({found['budget'].source})")
    notify = notify_urls(args.notify, found["notify"].value)
    if not args.instance and not args.gpu_type:
        raise UserError("give --instance TYPE (e.g. g4dn.xlarge), or set instance in your project's "
                        "mnist-cloud.toml / [tool.mnist-cloud] or in the user config (`mnist-cloud config`)")
    if args.autostop < 0:
        raise UserError("--autostop is minutes of idle time, 0 or more")
    spec = LaunchSpec(name=args.name, instance_type=args.instance, spot=args.spot, ami=args.ami,
                      disk_gb=args.disk_gb, key_name=args.key_name, key_path=args.key, public_key=args.public_key,
                      ssh_cidr=args.ssh_cidr, autostop_minutes=args.autostop,
                      autostop_action="terminate" if args.down else "stop",
                      autostop_after_train=args.autostop_after_train,
                      wait_status_checks=not args.no_wait_checks, nodes=args.nodes, budget_usd=budget)
    if budget is not None:  # until a connection prices it live: on-demand, an upper bound for spot
        listed = names(args.instance, "--instance") if args.instance and not args.gpu_type else []
        spec.usd_per_hour = _launch_price(args, listed)
    # cloud-init installs the watchdog (and the agent that resumes interrupted spot runs at boot) at first
    # boot: both work with the laptop closed
    if spec.autostop.enabled or spec.spot or budget is not None or notify:
        spec.user_data = user_data(spec.autostop, notify)

    def wait_ssh(aws, inst):
        if args.no_wait_ssh:
            return
        from infra.targets import wait_for_ssh

        wait_for_ssh(args.name, inst.instance_id, inst.public_ip,
                     lambda: console_fingerprints(aws, inst.instance_id, log=say), log=say)
        say(f"SSH is up on {inst.public_ip}")

    regions = names(getattr(args, "region", None), "--region")
    gpus = names(args.gpu_type, "--gpu-type") if args.gpu_type else []
    types = [] if gpus else names(args.instance, "--instance")
    if gpus or len(types) > 1 or len(regions) > 1 or regions == ["all"]:
        from infra.landing import land
        from infra.plan import where

        if not spec.ssh_cidr:  # asked once, not once per region tried
            from infra.ec2.network import detect_public_ip

            spec.ssh_cidr = detect_public_ip()
        inst, row, aws = land(where(regions or [state_region(args.name) or session(args).region],
                                    found["profile"].value, types, gpus), spec, args.spot, log=say,
                              epochs=found["epochs"].value, wait_ready=wait_ssh)
        if row is not None:
            price = f", ${row.usd_per_hour:.4f}/h ({row.price_source})" if row.usd_per_hour is not None else ""
        else:
            price = _live_price(aws, inst)
    else:
        spec.instance_type = types[0]
        aws = session(args, args.name)
        inst = launch(aws, spec, log=say, wait_ready=lambda i: wait_ssh(aws, i))
        price = _live_price(aws, inst)
    if budget is not None and not args.no_wait_ssh:  # the price in force, spot's own, from now on
        from infra.commands.budget import give_budget

        give_budget(args, args.name, budget)
    say(f"ready: {args.name} = {inst.instance_id} ({inst.instance_type}, {inst.lifecycle}) in {inst.zone or aws.region} "
        f"at {inst.public_ip or 'no public IP'}{price}")
    nodes = f" --nodes {args.nodes}" if args.nodes > 1 else ""
    if args.nodes > 1:
        say(f"cluster: {args.nodes} nodes, node 0 = {inst.instance_id}")
    if notify:
        from infra.notify import remember_urls

        remember_urls(args.name, notify)
        say(f"it tells {shown_all(notify)} of autostop, its budget and spot interruptions, and of each run's end "
            "(`train --on` gives its runs these URLs unless it is given others)")
    say(f"next: mnist-cloud train --on {args.name}{nodes}   |   pause: mnist-cloud stop {args.name}   |   "
        f"delete: mnist-cloud down {args.name}")
    return ExitCode.OK


def _launch_price(args, types: list[str]) -> float | None:
    """The on-demand price of an hour of the type (the Price List, else the table); over several, the dearest
    in the table. None where none is known (--gpu-type): the first connection prices it."""
    from infra.aws import CloudError
    from infra.ec2.prices import on_demand_price, pricing_session
    from infra.pricing import fallback_price

    if len(types) == 1:
        aws = session(args, args.name)
        try:
            live = on_demand_price(pricing_session(aws), aws.region, types[0])
        except CloudError:
            live = None
        if live is not None:
            return live
    table = [p for p in (fallback_price(t).usd_per_hour for t in types) if p is not None]
    return max(table) if table else None


def _live_price(aws, inst) -> str:
    """", $X/h (where the figure comes from)": the Price List or the zone's spot history, else the table."""
    from infra.ec2.prices import machine_price, pricing_session

    price = machine_price(aws, pricing_session(aws), inst)
    return "" if price.usd_per_hour is None else f", ${price.usd_per_hour:.4f}/h ({price.source})"


def add_attach(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="`attach i-0123...` adopts an EC2 instance; `attach --host USER@HOST[:PORT] --key "
                                  "PATH --name NAME` adopts any SSH machine. Remote commands then work the same.")
    p.add_argument("instance_id", nargs="?", help="EC2 instance id")
    p.add_argument("--host", metavar="USER@HOST[:PORT]", help="a machine that is not on EC2")
    p.add_argument("--key", metavar="PATH", help="private key (required with --host)")
    p.add_argument("--name", default=DEFAULT_NAME, help="name to use (default: %(default)s)")
    p.add_argument("--user", default="ubuntu", help="SSH user for an EC2 instance (default: %(default)s)")
    p.set_defaults(handler=cmd_attach)


def cmd_attach(args) -> int:
    from infra.ec2 import attach_instance
    from infra.hosts import attach_host

    if args.host:
        if args.instance_id:
            raise UserError("give either an instance id or --host, not both")
        if not args.key:
            raise UserError("--host needs --key PATH (the private key to log in with)")

        def can_log_in(host):
            from infra.remote import Endpoint, Remote

            ep = Endpoint(name=host.name, host=host.host, user=host.user, key_path=host.key_path, port=host.port)
            with Remote(ep) as remote:
                remote.run("true", timeout=30)

        attach_host(args.host, args.name, args.key, log=say, verify=can_log_in)
        return ExitCode.OK
    if not args.instance_id:
        raise UserError("give an EC2 instance id (i-...) or --host USER@HOST --key PATH")
    attach_instance(session(args), args.instance_id, args.name, args.user, args.key, log=say)
    return ExitCode.OK
