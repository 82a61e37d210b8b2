"""`mnist-cloud`: the laptop-side command line.

It parses arguments and hands off to the layers below it: trainer commands run `python -m trainer`
(never importing torch here), cloud commands call infra.ec2, remote commands infra.remote.
Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import runspec
from infra import __version__
from infra.errors import UserError
from infra.targets import run_trainer

# Commands that are `python -m trainer <command> ...` run here, flags passed through untouched.
TRAINER_COMMANDS = {
    "models": "list the model zoo: params and MACs counted from code, BN/Dropout/GAP/FC",
    "check": "count a model and check its claims (params, BN, Dropout, GAP, no FC): "
             "mnist-cloud check mynet.py:Net --max-params 8000 --require bn,dropout,gap --no-fc",
    "evaluate": "test accuracy of the weights a run delivers (its model.pt), or of a checkpoint: "
                "mnist-cloud evaluate runs/<id>",
    "predict": "classify digit images: mnist-cloud predict WEIGHTS IMAGE.png [...]",
    "data": "find or fetch MNIST into the user cache, verify it, and print where it is",
    "compare": "compare runs: table here, overlaid curves in compare.html: mnist-cloud compare RUN RUN...",
}
DEFAULT_NAME = "mnist"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviations: unknown flags go on to the trainer, so `--seed` must never become `--seeds`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    add_local_commands(sub)
    add_launch_commands(sub, [aws_options()])
    add_machine_commands(sub, [aws_options()])
    add_down_command(sub, [aws_options()])
    return parser


def add_local_commands(sub) -> None:
    """Commands that run here: the trainer's, passed through, and the report."""
    sub.add_parser(
        "train", add_help=False,
        help="train a model (locally by default); any `python -m trainer train` flag is accepted",
        description="Train with `python -m trainer train`. All trainer flags pass through; "
                    "`mnist-cloud train --help` lists them.",
    )
    for name, help_text in TRAINER_COMMANDS.items():
        sub.add_parser(name, add_help=False, help=help_text)
    sub.add_parser("sweep", add_help=False,
                   help="run a grid of models x seeds x --set values, locally or across machines, and summarize")
    p = sub.add_parser("report", help="(re)generate a run's report.html; --open shows it")
    p.add_argument("run", help="run directory, runs/<run-id>")
    p.add_argument("--open", action="store_true", help="open it in the system browser, if there is one")
    p.add_argument("--no-predictions", action="store_true", help="skip the confusion matrix and mistakes")


def add_launch_commands(sub, aws: list[argparse.ArgumentParser]) -> None:
    """Commands that give a name a machine: launch, attach, and the instance's life (status, stop, start,
    autostop)."""
    p = sub.add_parser("launch", parents=aws, help="launch (or reuse) a named EC2 GPU instance",
                       description="Launch an EC2 instance from the newest PyTorch Deep Learning AMI, or reuse the "
                                   "instance already called NAME (starting it if stopped). SSH is opened only to "
                                   "your address; IMDSv2 is required; the root volume is encrypted gp3.")
    p.add_argument("--instance", metavar="TYPE", help="instance type, e.g. g4dn.xlarge (default: the config's instance)")
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
    p.add_argument("--no-wait-checks", action="store_true", help="return once running, before the EC2 status checks")
    p.add_argument("--no-wait-ssh", action="store_true", help="do not wait until SSH answers")
    p.add_argument("--nodes", type=int, default=1, metavar="K",
                   help="a cluster of K instances in a cluster placement group, open to each other only (default: 1)")

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
        p.add_argument("--any-owner", action="store_true",
                       help="also the instances other people of this account launched, with an OWNER column")

    p = sub.add_parser("stop", parents=aws, help="stop an instance (disk kept, compute billing stops)")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p = sub.add_parser("start", parents=aws, help="start a stopped instance; picks up its new IP")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("--ssh-cidr", metavar="CIDR", help="who may SSH in (default: your public IP as a /32)")
    p = sub.add_parser("autostop", parents=aws, help="change when an instance stops itself (runs on the instance)",
                       description="Idle = no trainer running, no interactive SSH session used within the idle "
                                   "time, no pull or sync, and no JupyterLab use (a busy kernel, or activity within "
                                   "the idle time); an open tunnel alone is not activity. The check runs on the "
                                   "instance every minute.")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("-i", "--idle", type=float, metavar="MIN", help="idle minutes before stopping")
    p.add_argument("--down", action="store_true", help="terminate instead of stop (stop while runs are not pulled)")
    p.add_argument("--after-train", action="store_true", help="stop when a run ends, after the grace period")
    p.add_argument("--grace", type=float, default=3, metavar="MIN",
                   help="--after-train: minutes to wait after a run ends, 3 at least (default: %(default)s)")
    p.add_argument("--cancel", action="store_true", help="turn autostop off")


def add_machine_commands(sub, aws: list[argparse.ArgumentParser]) -> None:
    """Commands that work on a named machine over SSH."""
    p = sub.add_parser("setup", parents=aws, help="sync the code and run setup_ec2.sh on a machine (idempotent)")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("--python", help="interpreter to use there (default: $MNIST_CLOUD_REMOTE_PYTHON, the DLAMI's, a venv)")
    p.add_argument("--code", metavar="DIR", help="checkout to sync (default: the current directory)")
    p = sub.add_parser("sync", parents=aws, help="copy the code to a machine (rsync --checksum; secrets never leave)")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("--code", metavar="DIR", help="checkout to sync (default: the current directory)")
    p = sub.add_parser("logs", parents=aws, help="show a remote run's console log; -f follows a live run")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the run ends (Ctrl-C detaches)")
    p = sub.add_parser("runs", parents=aws, help="list a machine's runs and their state")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p = sub.add_parser("pull", parents=aws, help="fetch a remote run directory into runs/ (incremental, atomic, verified)")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("--to", default="runs", metavar="DIR", help="local runs directory (default: %(default)s)")
    p = sub.add_parser("jupyter", parents=aws, help="JupyterLab on the machine, through an SSH tunnel",
                       description="Start JupyterLab on the machine bound to 127.0.0.1 with a random token, forward a "
                                   "local port to it over SSH and print the URL. Ctrl-C closes the tunnel and stops "
                                   "the server (--keep leaves it running). No port is opened in the security group.")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("--port", type=int, help="local port (default: 8888, or a free one if 8888 is taken)")
    p.add_argument("--keep", action="store_true", help="leave the server running after the tunnel closes")
    p.add_argument("--python", help="interpreter on the machine (default: the one setup chose)")
    p.add_argument("--code", metavar="DIR", help="checkout to sync first (default: the current directory)")
    p = sub.add_parser("ssh", parents=aws, help="a shell on the machine, or `mnist-cloud ssh NAME -- CMD`")
    p.add_argument("name", nargs="?", default=DEFAULT_NAME)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run instead of a shell (after --)")
    p = sub.add_parser("ssh-config", parents=aws, help="write `Host mnist-NAME` entries for ssh and VS Code")
    p.add_argument("names", nargs="*", help="names to include (default: all)")
    p = sub.add_parser("config", help="show each setting (region, profile, instance, autostop, model, epochs) "
                                      "and where it comes from",
                       description="Settings come from the flag, else the environment, else the project's "
                                   "mnist-cloud.toml or [tool.mnist-cloud] in pyproject.toml, else the user's "
                                   "config.toml in mnist-cloud's config directory, else the default.")
    p = sub.add_parser("forget-host", help="drop a machine's pinned host key (after you verified a rebuild)")
    p.add_argument("name")


def add_down_command(sub, aws: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("down", parents=aws, help="terminate a name's instances and delete its security group and key",
                       description="Terminate (not just stop) every instance of NAME, then delete its security group "
                                   "and any key pair mnist-cloud created for it. --all sweeps every name you own.")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="every resource tagged as yours (an assumed role's "
                   "earlier sessions count as you)")
    p.add_argument("--any-owner", action="store_true",
                   help="also machines tagged by OTHER people or roles of this account (NAME: one of theirs; "
                        "--all: everyone's)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-pull", action="store_true",
                   help="refuse (exit 2, naming them) instead of pulling unpulled runs into runs/ first")
    p.add_argument("--discard-runs", action="store_true",
                   help="terminate even if the machine holds runs not pulled yet (they are deleted with it)")


# ---------------------------------------------------------------------------------- trainer commands
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
  --resume RUN    continue RUN from its last checkpoint (pushed from here if the machine lacks it)
  --python PATH   interpreter on the machine (default: $MNIST_CLOUD_REMOTE_PYTHON, else setup's choice)
  --code DIR      checkout to sync (default: the current directory)
  --region R, --profile P   AWS settings for an EC2 machine

Trainer flags:
"""


def global_aws(rest: list[str], args) -> list[str]:
    """`mnist-cloud --region R --profile P train ...`: the global options, handed to a pass-through
    command as if typed after it (one typed after it wins)."""
    from infra.targets import has_option

    for key in ("region", "profile"):
        value = getattr(args, key, None)
        if value is not None and not has_option(rest, f"--{key}"):
            rest = [f"--{key}", value, *rest]
    return rest


def train_options() -> Parser:
    """`mnist-cloud train`'s own flags (TRAIN_HELP); every other flag is the trainer's."""
    p = Parser(prog="mnist-cloud train", add_help=False)
    p.add_argument("--on", metavar="NAME")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--gpus", metavar="N|all")
    p.add_argument("--nodes", metavar="K")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--python", metavar="PATH")
    p.add_argument("--code", metavar="DIR")
    p.add_argument("--region")
    p.add_argument("--profile")
    return p


def cmd_train(rest: list[str]) -> int:
    opts, rest = train_options().parse_known_args(rest)
    rest = with_defaults(rest)
    if "-h" in rest or "--help" in rest:
        print(TRAIN_HELP, flush=True)
        return run_trainer(["train", "--help"])
    if not opts.on:
        if opts.detach or opts.python or opts.code or opts.gpus or opts.nodes or opts.env:
            raise UserError("--detach, --python, --code, --gpus, --nodes and --env need --on NAME")
        return run_trainer(["train", *rest])
    return remote_train(opts, rest)


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
    p.add_argument("--model", help="comma-separated models (default: the trainer's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a trainer flag and its values, e.g. --set lr=0.05,0.1 (repeatable)")
    p.add_argument("--max-cost", type=float, metavar="USD", help="refuse to start if the estimate exceeds this")
    p.add_argument("--epoch-seconds", type=float, default=6.0,
                   help="assumed seconds per epoch on a machine, for the estimate (default: %(default)s, a g4dn-class GPU)")
    p.add_argument("--name", default=None, help="sweep name, the prefix of its run ids (default: sweep-<time>)")
    p.add_argument("--to", default="runs", metavar="DIR", help="local runs directory (default: %(default)s)")
    p.add_argument("--python", help="interpreter on the machines")
    p.add_argument("--code", metavar="DIR", help="checkout to sync (default: the current directory)")
    p.add_argument("--region", help="AWS region")
    p.add_argument("--profile", help="AWS profile")
    return p


def cmd_sweep(rest: list[str]) -> int:
    from pathlib import Path

    from infra import sweep

    from infra import settings
    from infra.targets import has_option

    args, trainer_args = sweep_parser().parse_known_args(rest)
    found = settings.resolve()  # the config's model and epochs, where not typed
    if found["epochs"].value is not None and not has_option(trainer_args, "--epochs"):
        trainer_args = ["--epochs", str(found["epochs"].value), *trainer_args]
    plan = sweep.plan(args.name, args.model or found["model"].value, args.seeds, args.set, trainer_args)
    runs = Path(args.to)
    say(plan.describe())
    if args.local:
        if args.max_cost is not None:
            say("--max-cost: a local sweep costs nothing on AWS")
        slots = [sweep.LocalSlot()]
    else:
        names = sweep.parse_list(args.on, "--on")
        if args.max_cost is not None:
            check_cost(plan, names, args)
        slots = sweep.machine_slots(names, say, python=args.python, code=args.code, region=args.region,
                                    profile=args.profile)
        say(f"sweep: {len(plan.points)} run(s) on {len(slots)} slot(s): " + ", ".join(s.where for s in slots))
    interrupted = sweep.run(plan.points, slots, trainer_args, runs, log=say)
    code = sweep.finish(plan, runs, log=say)
    return sweep.INTERRUPTED if interrupted else code


def check_cost(plan, names: list[str], args) -> None:
    """--max-cost: refuse, before anything starts, a sweep whose estimate is above it."""
    from infra import sweep
    from infra.targets import SSHTarget

    types = [SSHTarget.resolve(n, args.region, args.profile).instance_type or "?" for n in names]
    hours, usd = sweep.estimate(plan.points, plan.trainer_args, types, slots=len(names), epoch_seconds=args.epoch_seconds)
    say(f"estimate: {hours:.2f} h of {', '.join(types)} ~ ${usd:.2f} "
        f"({len(plan.points)} runs x {sweep.epochs_of(plan.trainer_args)} epochs x {args.epoch_seconds:g} s)")
    if usd > args.max_cost:
        raise UserError(f"the sweep's estimate ${usd:.2f} exceeds --max-cost ${args.max_cost:.2f}; "
                        "fewer seeds/configs, more machines, or a higher --max-cost")


# The trainer flags that say where a run lives: on a machine, the laptop decides them (the run is
# runs/RUN there, and pulled into --out-dir here).
PLACEMENT = ("out_dir", "run_id", "resume")


def model_for_machine(model: str | None, code) -> str | None:
    """`--model FILE.py:Name` on a machine: the file travels with the synced code, so it must lie in
    that directory, and the machine names it relative to its work dir. Other specs pass as typed."""
    from pathlib import Path

    from infra.transfer import local_files

    target, _, attr = (model or "").rpartition(":")
    if not target or not (target.endswith(".py") or "/" in target):
        return model
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--model {model}: {target} does not exist")
    try:
        rel = path.relative_to(code).as_posix()
    except ValueError:
        raise UserError(f"--model {model}: {path} is outside {code}, the directory synced to the machine; "
                        "move it into your project, or pass --code DIR") from None
    if rel not in set(local_files(code)):
        raise UserError(f"--model {model}: {rel} is not synced (ignored by .gitignore, or a name mnist-cloud "
                        "never syncs); move or rename it")
    return f"{rel}:{attr}"


def placement_and_flags(rest: list[str], check: bool, code=None) -> tuple[dict[str, str | None], list[str]]:
    """({out_dir, run_id, resume, model}: what was typed, else None; the other trainer flags).

    check: the flags are parsed and checked with the trainer's own definition (runspec.config), so a
    typo fails here in one line, before any sync or setup, and the machine gets them as parsed.
    Otherwise (a resume, whose flags are its config.json's, or --code, whose trainer may know other
    flags) they pass through as typed."""
    from runspec.config import parse_train_args, to_argv

    if check:
        _, typed = parse_train_args(rest)
        where = {key: typed.pop(key, None) for key in PLACEMENT}
        if "model" in typed and code is not None:
            typed["model"] = model_for_machine(typed["model"], code)
        return {**where, "model": typed.get("model")}, to_argv(typed)
    p = Parser(prog="mnist-cloud train", add_help=False)
    for key in (*PLACEMENT, "model"):
        p.add_argument("--" + key.replace("_", "-"))
    where, other = p.parse_known_args(rest)
    model = ["--model", model_for_machine(where.model, code) if code is not None else where.model] if where.model else []
    return vars(where), model + other


def remote_train(opts: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from infra.runner import RemoteTrain, parse_env, train_remote
    from infra.targets import new_run_id

    from infra.targets import code_dir

    resumed = placement_and_flags(rest, check=False)[0]["resume"]
    checked = not resumed and not opts.code
    where, trainer_args = placement_and_flags(rest, check=checked, code=None if resumed else code_dir(opts.code))
    if where["resume"] and where["run_id"]:
        raise UserError("--resume continues an existing run; it takes no --run-id")
    nodes = opts.nodes
    if nodes is not None and (not nodes.isdigit() or int(nodes) < 1):
        raise UserError(f"--nodes {nodes!r}: give the number of machines, e.g. --nodes 2")
    resume = where["resume"]
    run_id = Path(resume).name if resume else where["run_id"] or new_run_id(opts.on, where["model"])
    job = RemoteTrain(name=opts.on, trainer_args=trainer_args, run_id=run_id, resume=resume, detach=opts.detach,
                      python=opts.python, code=opts.code, gpus=opts.gpus, nodes=int(nodes) if nodes else None,
                      env=parse_env(opts.env), local_runs=Path(where["out_dir"] or "runs"), region=opts.region,
                      profile=opts.profile)
    return train_remote(job, log=say)


# ---------------------------------------------------------------------------------- cloud commands
def session(args):
    from infra import settings
    from infra.aws import Aws

    found = settings.resolve({"region": getattr(args, "region", None), "profile": getattr(args, "profile", None)})
    return Aws(region=found["region"].value, profile=found["profile"].value)


def with_defaults(rest: list[str]) -> list[str]:
    """Trainer flags with the config's model and epochs added where not typed (never to a resume:
    its flags are its config.json's)."""
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
    return rest


def cmd_config(args) -> int:
    """Each setting, its value and where it came from."""
    from infra import settings

    found = settings.resolve({})
    rows = [[key, "-" if v.value is None else str(v.value), v.source] for key, v in found.items()]
    for line in runspec.table(["KEY", "VALUE", "FROM"], rows):
        say(line)
    project = settings.project_file()
    say(f"project file: {project or 'none (mnist-cloud.toml, or [tool.mnist-cloud] in pyproject.toml)'}; "
        f"user file: {settings.user_file()}{'' if settings.user_file().is_file() else ' (none)'}")
    return 0


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"{question} needs --yes when not run from a terminal")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("cancelled; nothing was changed")


def cmd_report(args) -> int:
    import webbrowser
    from pathlib import Path

    code = run_trainer(["report", args.run] + (["--no-predictions"] if args.no_predictions else []))
    if code == 0 and args.open:
        url = (Path(args.run).resolve() / runspec.REPORT).as_uri()
        if not webbrowser.open(url):
            say(f"no browser found here; open {url}")
    return code


def cmd_launch(args) -> int:
    from infra.ec2 import LaunchSpec, console_fingerprints, launch
    from infra.pricing import hourly_price
    from infra.watchdog import installer

    from infra import settings

    found = settings.resolve({"autostop": args.autostop, "instance": args.instance})  # the files, read once
    args.autostop, args.instance = found["autostop"].value, found["instance"].value
    if not args.instance:
        raise UserError("give --instance TYPE (e.g. g4dn.xlarge), or set instance in your project's "
                        "mnist-cloud.toml / [tool.mnist-cloud] or in the user config (`mnist-cloud config`)")
    if args.autostop < 0:
        raise UserError("--autostop is minutes of idle time, 0 or more")
    spec = LaunchSpec(name=args.name, instance_type=args.instance, spot=args.spot, ami=args.ami,
                      disk_gb=args.disk_gb, key_name=args.key_name, key_path=args.key, public_key=args.public_key,
                      ssh_cidr=args.ssh_cidr, autostop_minutes=args.autostop,
                      autostop_action="terminate" if args.down else "stop",
                      autostop_after_train=args.autostop_after_train,
                      wait_status_checks=not args.no_wait_checks, nodes=args.nodes)
    # cloud-init installs the watchdog (and the agent that resumes interrupted spot runs at boot) at first
    # boot: both work with the laptop closed
    if spec.autostop.enabled or spec.spot:
        spec.user_data = installer(spec.autostop)
    def wait_ssh(inst):
        if args.no_wait_ssh:
            return
        from infra.remote import Endpoint, Remote, pinned_keys
        from infra.state import State

        host = State().get(args.name)
        ep = Endpoint(name=args.name, host=inst.public_ip, user=host.user, key_path=host.key_path,
                      alias=inst.instance_id)
        # the first connection is checked against the fingerprints the instance printed at boot (polled for,
        # since cloud-init prints them late); a key pinned by an earlier connection is checked instead
        expected = None if pinned_keys(inst.instance_id) else console_fingerprints(aws, inst.instance_id, log=say)
        with Remote(ep, expected_fingerprints=expected or None) as remote:
            remote.wait_ready(timeout=600, log=say)
        say(f"SSH is up on {inst.public_ip}")

    aws = session(args)
    inst = launch(aws, spec, log=say, wait_ready=wait_ssh)
    per_hour = hourly_price(inst.instance_type)
    price = f", ${per_hour:.3f}/h on demand" if per_hour is not None else ""
    say(f"ready: {args.name} = {inst.instance_id} ({inst.instance_type}, {inst.lifecycle}) at "
        f"{inst.public_ip or 'no public IP'}{price}")
    nodes = f" --nodes {args.nodes}" if args.nodes > 1 else ""
    if args.nodes > 1:
        say(f"cluster: {args.nodes} nodes, node 0 = {inst.instance_id}")
    say(f"next: mnist-cloud train --on {args.name}{nodes}   |   pause: mnist-cloud stop {args.name}   |   "
        f"delete: mnist-cloud down {args.name}")
    return 0


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
        return 0
    if not args.instance_id:
        raise UserError("give an EC2 instance id (i-...) or --host USER@HOST --key PATH")
    attach_instance(session(args), args.instance_id, args.name, args.user, args.key, log=say)
    return 0


def _age(hours: float) -> str:
    minutes = int(hours * 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if hours else "-"


def cmd_status(args) -> int:
    from infra.ec2 import caller_identity, find_instances, others_instances, owner_label, spot_interruptions
    from infra.state import State

    state = State()
    ssh_hosts = [h for h in state.all() if h.kind == "ssh" and (not args.name or h.name == args.name)]
    needs_aws = not (args.name and ssh_hosts)
    aws = session(args) if needs_aws else None
    every = find_instances(aws, args.name) if needs_aws else []
    theirs = set()
    if every and not args.any_owner:  # yours only: a team account holds everyone's
        theirs = {i.instance_id for i in others_instances(every, caller_identity(aws))}
    instances = [i for i in every if i.instance_id not in theirs]
    interrupted = spot_interruptions(aws, instances) if needs_aws else {}
    owner = [lambda i: owner_label(i.owner)] if args.any_owner else []
    rows = []
    for i in instances:
        cost = i.cost_so_far
        shown = i.state
        if i.instance_id in interrupted:  # stopped (or about to be) by EC2, not by anyone here
            shown = "interrupting" if i.state == "running" else "interrupted"
        rows.append([i.name, i.instance_id, i.instance_type, shown, i.lifecycle, i.public_ip or "-",
                     _age(i.uptime_hours), "?" if cost is None else f"${cost:.2f}", i.autostop,
                     *(f(i) for f in owner)])
    blank = ["-"] * len(owner)
    for h in ssh_hosts:
        rows.append([h.name, "-", "ssh host", "-", "-", f"{h.user}@{h.host}:{h.port}", "-", "-", "-", *blank])
    known = {i.name for i in every} | {h.name for h in ssh_hosts}
    for h in state.all():  # cached names whose instance is gone: say so, EC2 is the truth
        if h.kind == "ec2" and h.name not in known and (not args.name or h.name == args.name):
            rows.append([h.name, h.instance_id or "-", "?", "gone", "-", "-", "-", "-", "-", *blank])
    if theirs:
        say(f"{len(theirs)} instance(s) of other people in this account are not shown: `mnist-cloud status --any-owner`")
    if not rows:
        say(f"no instances{f' named {args.name!r}' if args.name else ''}. Launch one: "
            "mnist-cloud launch --instance g4dn.xlarge")
        return 0
    header = ["NAME", "ID", "TYPE", "STATE", "LIFECYCLE", "ADDRESS", "UPTIME", "COST SO FAR", "AUTOSTOP",
              *(["OWNER"] if owner else [])]
    for line in runspec.table(header, rows):
        say(line)
    for i in instances:
        if i.instance_id in interrupted:
            say(f"{i.name}: spot interruption ({interrupted[i.instance_id]}); EC2 starts it again when capacity "
                f"returns, and its interrupted runs resume by themselves: `mnist-cloud logs {i.name} -f` follows them. "
                f"Until then only its disk bills")
    if any(r[3] == "gone" for r in rows):
        say("'gone': the instance no longer exists in EC2 (terminated outside mnist-cloud?); "
            "`mnist-cloud down NAME` tidies up")
    return 0


def cmd_stop(args) -> int:
    from infra.ec2 import stop

    inst = stop(session(args), args.name, log=say)
    paused = "; its spot request waits, and EC2 does not start it by itself" if inst.lifecycle == "spot" else ""
    say(f"{args.name} ({inst.instance_id}) is {inst.state}; its disk is kept{paused}. `mnist-cloud start {args.name}` "
        f"resumes it, `mnist-cloud down {args.name}` deletes it")
    return 0


def cmd_start(args) -> int:
    from infra.ec2 import start

    inst = start(session(args), args.name, args.ssh_cidr, log=say)
    say(f"{args.name} ({inst.instance_id}) is {inst.state} at {inst.public_ip}")
    return 0


def cmd_down(args) -> int:
    from infra.ec2 import (
        TAG_OWNER,
        DownIncomplete,
        caller_identity,
        down,
        down_all,
        find_instances,
        others_instances,
        owner_label,
        same_owner,
    )

    if args.all == bool(args.name):
        raise UserError("give a NAME, or --all")
    if args.no_pull and args.discard_runs:
        raise UserError("--no-pull refuses when runs are unpulled, --discard-runs deletes them: give one")
    aws = session(args)
    alive = [i for i in find_instances(aws, None if args.all else args.name)
             if i.state not in ("terminated", "shutting-down")]
    if args.all and not args.any_owner:
        me = caller_identity(aws)
        alive = [i for i in alive if same_owner(i.tags.get(TAG_OWNER), me)]
    elif not args.any_owner and alive:
        theirs = others_instances(alive, caller_identity(aws))
        if theirs:
            raise UserError(f"{args.name} is {owner_label(theirs[0].owner)}'s ({theirs[0].instance_id}), not yours: "
                            f"`mnist-cloud down {args.name} --any-owner` terminates it anyway")
    if args.all and args.any_owner:
        confirm("Terminate every mnist-cloud instance in this account and region, INCLUDING OTHER PEOPLE'S, "
                "and delete their groups and keys?", args.yes)
    elif args.all:
        confirm("Terminate every mnist-cloud instance you own and delete their groups and keys?", args.yes)
    elif alive:
        whose = {owner_label(i.owner) for i in alive if i.owner} if args.any_owner else set()
        confirm(f"Terminate {', '.join(i.instance_id for i in alive)} ({args.name}"
                f"{', owned by ' + ', '.join(sorted(whose)) if whose else ''})?", args.yes)
    found = keep_runs(args, alive)
    if found:
        from pathlib import Path

        from infra.unpulled import pull_all

        pull_all(found, Path("runs"), log=say)
    incomplete = None
    try:
        report = down_all(aws, log=say, any_owner=args.any_owner) if args.all else down(aws, args.name, log=say)
    except DownIncomplete as e:  # what was deleted is said first, then the one line of what is left
        report, incomplete = e.report, e
    if not (report.terminated or report.security_groups or report.key_pairs or report.volumes
            or report.placement_groups or incomplete):
        say(f"nothing to delete{'' if args.all else f' for {args.name!r}'}")
        return 0
    say(f"deleted: {len(report.terminated)} instance(s) {' '.join(report.terminated)}; "
        f"{len(report.security_groups)} security group(s); {len(report.key_pairs)} key pair(s); "
        f"{len(report.volumes)} detached volume(s); {len(report.placement_groups)} placement group(s)")
    if incomplete:
        raise incomplete
    return 0


def keep_runs(args, alive) -> list:
    """The unpulled runs on the instances `down` is about to terminate (to pull them), or a one-line
    refusal; nothing with --discard-runs."""
    from infra.unpulled import check, refuse

    if args.discard_runs or not alive:
        return []
    found, problems = check(alive, getattr(args, "region", None), getattr(args, "profile", None))
    refuse(found, problems, pull=not args.no_pull)
    return found


def target_for(args):
    from infra.targets import SSHTarget

    return SSHTarget.resolve(args.name, getattr(args, "region", None), getattr(args, "profile", None))


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

        config = autostop_for(set_autostop(session(args), args.name, config, log=say), config)
    target = target_for(args)
    with target.remote:
        line = install_over_ssh(target.remote, config)
        if config.enabled:  # terminate: EC2 stops it instead while runs are not pulled
            target.keep_runs_on_shutdown(unpulled=bool(target.unpulled_runs()))
    say(line or f"autostop on {args.name}: {config.tag}")
    return 0


def cmd_setup(args) -> int:
    from infra.targets import code_dir

    target = target_for(args)
    with target.remote:
        py = target.prepare(code_dir(args.code), args.python, log=say, setup=True)
    say(f"{args.name} is set up: python {py}")
    return 0


def cmd_sync(args) -> int:
    from infra.targets import code_dir

    target = target_for(args)
    with target.remote:
        synced = target.sync(code_dir(args.code), log=say)
    say(f"synced {synced.files} file(s), {synced.bytes:,} bytes ({synced.method}) to "
        f"{args.name}:~/{target.remote.ep.workdir}")
    for rel in synced.changed[:20]:
        say(f"  {rel}")
    return 0


def cmd_logs(args) -> int:
    target = target_for(args)
    with target.remote:
        run_id = args.run or target.latest_run()
        if args.run:
            target.check_run(run_id)
        if args.follow:  # to the end of the run, then pull it: what an attached `train --on` does
            from pathlib import Path

            from infra.runner import RemoteTrain, _follow

            job = RemoteTrain(name=args.name, trainer_args=[], run_id=run_id, local_runs=Path("runs"))
            code = _follow(target, job, log=say)
            if code in (130, 255):  # detached from a run that goes on (Ctrl-C, lost connection)
                return code
            say(f"{run_id} finished with exit {code}")
            return code
        target.logs(run_id, follow=False)
    return 0


def cmd_runs(args) -> int:
    target = target_for(args)
    with target.remote:
        runs = target.runs()
    if not runs:
        say(f"no runs on {args.name} yet")
        return 0
    for line in runs_table(runs):
        say(line)
    return 0


def runs_table(runs: list[dict]) -> list[str]:
    """`mnist-cloud runs`: TEST ACC is result.json's, the weights the run delivers (WEIGHTS: final or ema)."""
    rows = []
    for r in runs:
        status = "running" if r["alive"] else (r["status"] or "?")
        if not r["alive"] and status == "running":
            status = "died"  # config says running but no process: killed, or the machine rebooted
        acc = f"{r['test_acc']:.2f}%" if isinstance(r.get("test_acc"), (int, float)) else "-"
        rows.append([r["run_id"], status, r["epochs"], acc, r.get("weights") or "-"])
    return runspec.table(["RUN", "STATUS", "EPOCHS", "TEST ACC", "WEIGHTS"], rows, right=(2, 3))


def cmd_pull(args) -> int:
    from pathlib import Path

    target = target_for(args)
    with target.remote:
        run_id = args.run or target.latest_run()
        target.check_run(run_id)
        res = target.pull(run_id, Path(args.to), log=say)
    say(f"pulled {res.files} file(s), {res.bytes:,} bytes ({res.method}) into {Path(args.to) / run_id}")
    return 0


def cmd_jupyter(args) -> int:
    from infra.jupyter import check_port_free, serve
    from infra.targets import code_dir

    if args.port is not None:
        check_port_free(args.port)
    target = target_for(args)
    with target.remote:
        python = target.prepare(code_dir(args.code), args.python, log=say, ready_timeout=60)
        serve(target, args.port, keep=args.keep, python=python, log=say)
    return 0


def cmd_ssh(args) -> int:
    import subprocess

    target = target_for(args)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    with target.remote:
        argv = target.remote.ssh_argv(tty=not cmd) + (["-t"] if not cmd and sys.stdin.isatty() else [])
    return subprocess.call([*argv, target.remote.target(), *cmd])


def cmd_ssh_config(args) -> int:
    from infra.sshconfig import write_ssh_config

    path, names = write_ssh_config(args.names)
    say(f"wrote {len(names)} host(s) to {path}: {', '.join('mnist-' + n for n in names)}")
    say(f"add this line at the top of ~/.ssh/config (once):  Include {path}")
    return 0


def cmd_forget_host(args) -> int:
    from infra.remote import forget_host
    from infra.state import State

    host = State().get(args.name)
    if host is None:
        raise UserError(f"unknown name {args.name!r}")
    forget_host(host.instance_id or f"{host.host}:{host.port}")
    say(f"forgot the pinned host key of {args.name}; the next connection pins the key it sees")
    return 0


CLOUD_COMMANDS = {"report": cmd_report, "autostop": cmd_autostop, "launch": cmd_launch, "attach": cmd_attach, "status": cmd_status, "ls": cmd_status,
                  "stop": cmd_stop, "start": cmd_start, "down": cmd_down, "setup": cmd_setup, "sync": cmd_sync,
                  "logs": cmd_logs, "runs": cmd_runs, "pull": cmd_pull, "jupyter": cmd_jupyter, "ssh": cmd_ssh,
                  "ssh-config": cmd_ssh_config, "forget-host": cmd_forget_host, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "train":
            return cmd_train(global_aws(rest, args))
        if args.command == "sweep":
            return cmd_sweep(global_aws(rest, args))
        if args.command in TRAINER_COMMANDS:
            return run_trainer([args.command, *rest])
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
