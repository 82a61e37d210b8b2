"""`mnist-cloud plan`: what a launch would meet in each region, for each type and market, before anything
is spent (the rows are built in infra/plan.py)."""

from __future__ import annotations

from infra.commands.options import cloud_command, names, say
from infra.errors import UserError
from runspec import ExitCode


def add_plan(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="One row per (region, instance type, market), filled concurrently: the vCPU "
                                  "quota left (Service Quotas, minus what the account runs), the zones that offer "
                                  "the type, the live hourly price, the Deep Learning AMI, a DryRun of the launch, "
                                  "the default VPC, a verdict with the exact next step, and what the default run "
                                  "would cost. --region takes a list (us-east-1,us-west-2) or `all` (every region "
                                  "enabled for the account). Exit 0 when some row can launch, 1 when none can.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--instance", metavar="TYPE[,TYPE]",
                       help="instance types, e.g. g4dn.xlarge,g6.xlarge (default: the config's instance)")
    which.add_argument("--gpu-type", metavar="GPU[,GPU]",
                       help="the smallest instance type with this GPU, as AWS names it: T4, L4, A10G, T4g, ...")
    p.add_argument("--spot", action="store_true", help="spot rows too, before the on-demand ones")
    p.add_argument("--nodes", type=int, default=1, metavar="K", help="vCPUs for K instances (default: 1)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args) -> int:
    from infra import settings
    from infra.plan import DEFAULT_EPOCHS, as_json, plan, table

    if args.nodes < 1:
        raise UserError("--nodes is a number of instances, 1 or more")
    found = settings.resolve({"region": None, "profile": getattr(args, "profile", None),
                              "instance": args.instance, "epochs": None})
    regions = names(getattr(args, "region", None), "--region") or [found["region"].value]
    gpus = names(args.gpu_type, "--gpu-type") if args.gpu_type else []
    instance_types = [] if gpus else names(found["instance"].value, "--instance")
    if not instance_types and not gpus:
        raise UserError("give --instance TYPE[,TYPE] or --gpu-type GPU[,GPU] (e.g. T4), or set instance in the "
                        "config (`mnist-cloud config`)")
    rows = plan(regions, found["profile"].value, instance_types, gpus, args.spot, args.nodes,
                found["epochs"].value or DEFAULT_EPOCHS)
    say(as_json(rows) if args.json else table(rows))
    return ExitCode.OK if any(r.ok for r in rows) else ExitCode.FAILED
