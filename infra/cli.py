"""`mnist-cloud`: the laptop-side command line.

It parses arguments and hands off to the layers below it: trainer commands run `python -m trainer`
(never importing torch here), cloud commands call infra.provision, remote commands infra.remote.
Bad input is one line on stderr and exit code 2.
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
DEFAULT_NAME = "mnist"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def say(message: str) -> None:
    print(message, flush=True)


def aws_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("AWS")
    g.add_argument("--region", default=argparse.SUPPRESS, help="AWS region (default: the AWS config / AWS_DEFAULT_REGION)")
    g.add_argument("--profile", default=argparse.SUPPRESS, help="AWS profile from ~/.aws/config (default: AWS_PROFILE)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mnist-cloud",
        description="Train small MNIST CNNs on this machine or on an EC2 GPU instance, with the same trainer.",
        epilog="Run `mnist-cloud COMMAND --help` for a command's options. Quick start: `mnist-cloud train`.",
        parents=[aws_options()],
    )
    parser.add_argument("--version", action="version", version=f"mnist-cloud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    aws = [aws_options()]

    sub.add_parser(
        "train", add_help=False,
        help="train a model (locally by default); any `python -m trainer train` flag is accepted",
        description="Train with `python -m trainer train`. All trainer flags pass through; "
                    "`mnist-cloud train --help` lists them.",
    )
    for name, help_text in TRAINER_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=help_text)

    p = sub.add_parser("launch", parents=aws, help="launch (or reuse) a named EC2 GPU instance",
                       description="Launch an EC2 instance from the newest PyTorch Deep Learning AMI, or reuse the "
                                   "instance already called NAME (starting it if stopped). SSH is opened only to "
                                   "your address; IMDSv2 is required; the root volume is encrypted gp3.")
    p.add_argument("--instance", required=True, metavar="TYPE", help="instance type, e.g. g4dn.xlarge")
    p.add_argument("--name", default=DEFAULT_NAME, help="name for the instance and its resources (default: %(default)s)")
    p.add_argument("--spot", action="store_true", help="one-time spot instance; other zones, then on-demand, if none")
    p.add_argument("--ami", help="AMI id (default: the newest PyTorch DLAMI, from SSM)")
    p.add_argument("--disk-gb", type=int, default=100, help="root volume size in GB (default: %(default)s)")
    p.add_argument("--key-name", help="use this existing EC2 key pair (default: create one for the name)")
    p.add_argument("--key", metavar="PATH", help="private key file for --key-name")
    p.add_argument("--public-key", metavar="PATH", help="import this public key (e.g. ~/.ssh/id_ed25519.pub) instead")
    p.add_argument("--ssh-cidr", metavar="CIDR", help="who may SSH in (default: your public IP as a /32)")
    p.add_argument("--autostop", type=int, default=30, metavar="MIN",
                   help="stop after this many idle minutes; 0 = never (default: %(default)s)")
    p.add_argument("--down", action="store_true", help="autostop terminates instead of stopping")
    p.add_argument("--no-wait-checks", action="store_true", help="return once running, before the EC2 status checks")

    p = sub.add_parser("attach", parents=aws, help="adopt an existing EC2 instance or any SSH host under a name",
                       description="`attach i-0123...` adopts an EC2 instance; `attach --host USER@HOST[:PORT] --key "
                                   "PATH --name NAME` adopts any SSH machine. Remote commands then work the same.")
    p.add_argument("instance_id", nargs="?", help="EC2 instance id")
    p.add_argument("--host", metavar="USER@HOST[:PORT]", help="a machine that is not on EC2")
    p.add_argument("--key", metavar="PATH", help="private key (required with --host)")
    p.add_argument("--name", default=DEFAULT_NAME, help="name to use (default: %(default)s)")
    p.add_argument("--user", default="ubuntu", help="SSH user for an EC2 instance (default: %(default)s)")

    for cmd, help_text in (("status", "show instances: state, lifecycle, IP, uptime, cost so far"),
                           ("ls", "same as status")):
        p = sub.add_parser(cmd, parents=aws, help=help_text)
        p.add_argument("name", nargs="?", help="only this name")

    p = sub.add_parser("stop", parents=aws, help="stop an instance (disk kept, compute billing stops)")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p = sub.add_parser("start", parents=aws, help="start a stopped instance; picks up its new IP")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("--ssh-cidr", metavar="CIDR", help="who may SSH in (default: your public IP as a /32)")
    p = sub.add_parser("down", parents=aws, help="terminate a name's instances and delete its security group and key",
                       description="Terminate (not just stop) every instance of NAME, then delete its security group "
                                   "and any key pair mnist-cloud created for it. --all sweeps every name you own.")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="every resource tagged as yours")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return parser


# ---------------------------------------------------------------------------------- trainer commands
def cmd_train(rest: list[str]) -> int:
    if "-h" in rest or "--help" in rest:
        print("usage: mnist-cloud train [TRAINER FLAGS]\n\n"
              "Runs `python -m trainer train` here, with this interpreter. Trainer flags:\n", flush=True)
        return LocalTarget().run(["train", "--help"])
    return LocalTarget().run(["train", *rest])


# ---------------------------------------------------------------------------------- cloud commands
def session(args):
    from infra.aws import Aws

    return Aws(region=getattr(args, "region", None), profile=getattr(args, "profile", None))


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"{question} needs --yes when not run from a terminal")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("cancelled; nothing was changed")


def cmd_launch(args) -> int:
    from infra.pricing import hourly_price
    from infra.provision import LaunchSpec, launch

    spec = LaunchSpec(name=args.name, instance_type=args.instance, spot=args.spot, ami=args.ami,
                      disk_gb=args.disk_gb, key_name=args.key_name, key_path=args.key, public_key=args.public_key,
                      ssh_cidr=args.ssh_cidr, autostop_minutes=args.autostop,
                      autostop_action="terminate" if args.down else "stop",
                      wait_status_checks=not args.no_wait_checks)
    if args.autostop < 0:
        raise UserError("--autostop is minutes of idle time, 0 or more")
    inst = launch(session(args), spec, log=say)
    per_hour = hourly_price(inst.instance_type)
    price = f", ${per_hour:.3f}/h on demand" if per_hour is not None else ""
    say(f"ready: {args.name} = {inst.instance_id} ({inst.instance_type}, {inst.lifecycle}) at "
        f"{inst.public_ip or 'no public IP'}{price}")
    say(f"next: mnist-cloud train --on {args.name}   |   pause: mnist-cloud stop {args.name}   |   "
        f"delete: mnist-cloud down {args.name}")
    return 0


def cmd_attach(args) -> int:
    from infra.provision import attach_host, attach_instance

    if args.host:
        if args.instance_id:
            raise UserError("give either an instance id or --host, not both")
        if not args.key:
            raise UserError("--host needs --key PATH (the private key to log in with)")
        attach_host(args.host, args.name, args.key, log=say)
        return 0
    if not args.instance_id:
        raise UserError("give an EC2 instance id (i-...) or --host USER@HOST --key PATH")
    attach_instance(session(args), args.instance_id, args.name, args.user, args.key, log=say)
    return 0


def _age(hours: float) -> str:
    minutes = int(hours * 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if hours else "-"


def cmd_status(args) -> int:
    from infra.provision import find_instances
    from infra.state import State

    state = State()
    ssh_hosts = [h for h in state.all() if h.kind == "ssh" and (not args.name or h.name == args.name)]
    needs_aws = not (args.name and ssh_hosts)
    instances = find_instances(session(args), args.name) if needs_aws else []
    rows = []
    for i in instances:
        cost = i.cost_so_far
        rows.append([i.name, i.instance_id, i.instance_type, i.state, i.lifecycle, i.public_ip or "-",
                     _age(i.uptime_hours), "?" if cost is None else f"${cost:.2f}", i.autostop])
    for h in ssh_hosts:
        rows.append([h.name, "-", "ssh host", "-", "-", f"{h.user}@{h.host}:{h.port}", "-", "-", "-"])
    known = {i.name for i in instances} | {h.name for h in ssh_hosts}
    for h in state.all():  # cached names whose instance is gone: say so, EC2 is the truth
        if h.kind == "ec2" and h.name not in known and (not args.name or h.name == args.name):
            rows.append([h.name, h.instance_id or "-", "?", "gone", "-", "-", "-", "-", "-"])
    if not rows:
        say(f"no instances{f' named {args.name!r}' if args.name else ''}. Launch one: "
            "mnist-cloud launch --instance g4dn.xlarge")
        return 0
    header = ["NAME", "ID", "TYPE", "STATE", "LIFECYCLE", "ADDRESS", "UPTIME", "COST SO FAR", "AUTOSTOP"]
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    for r in [header] + rows:
        say("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    if any(r[3] == "gone" for r in rows):
        say("'gone': the instance no longer exists in EC2 (terminated outside mnist-cloud?); "
            "`mnist-cloud down NAME` tidies up")
    return 0


def cmd_stop(args) -> int:
    from infra.provision import stop

    inst = stop(session(args), args.name, log=say)
    say(f"{args.name} ({inst.instance_id}) is {inst.state}; its disk is kept. `mnist-cloud start {args.name}` "
        f"resumes it, `mnist-cloud down {args.name}` deletes it")
    return 0


def cmd_start(args) -> int:
    from infra.provision import start

    inst = start(session(args), args.name, args.ssh_cidr, log=say)
    say(f"{args.name} ({inst.instance_id}) is {inst.state} at {inst.public_ip}")
    return 0


def cmd_down(args) -> int:
    from infra.provision import down, down_all, find_instances

    if args.all == bool(args.name):
        raise UserError("give a NAME, or --all")
    aws = session(args)
    if args.all:
        confirm("Terminate every mnist-cloud instance you own and delete their groups and keys?", args.yes)
        report = down_all(aws, log=say)
    else:
        alive = find_instances(aws, args.name)
        if alive:
            confirm(f"Terminate {', '.join(i.instance_id for i in alive)} ({args.name})?", args.yes)
        report = down(aws, args.name, log=say)
    if not (report.terminated or report.security_groups or report.key_pairs):
        say(f"nothing to delete{'' if args.all else f' for {args.name!r}'}")
        return 0
    say(f"deleted: {len(report.terminated)} instance(s) {' '.join(report.terminated)}; "
        f"{len(report.security_groups)} security group(s); {len(report.key_pairs)} key pair(s); "
        f"{len(report.volumes)} detached volume(s)")
    return 0


CLOUD_COMMANDS = {"launch": cmd_launch, "attach": cmd_attach, "status": cmd_status, "ls": cmd_status,
                  "stop": cmd_stop, "start": cmd_start, "down": cmd_down}


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
        if rest:
            raise UserError(f"unrecognized arguments: {' '.join(rest)} (see `mnist-cloud {args.command} --help`)")
        return CLOUD_COMMANDS[args.command](args)
    except UserError as e:
        print(f"mnist-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnist-cloud: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
