"""What the command modules share: the options more than one command takes, each declared here once (a
machine's name, --code, --python, --region/--profile), and the few helpers a handler uses to talk to
the user (say, confirm) or to reach AWS and a named machine (session, target_for).

Cheap to import, like every command module: boto3, fabric and paramiko load inside the helpers, when a
command runs.
"""

from __future__ import annotations

import argparse
import sys

from infra.errors import Parser, UserError

__all__ = ["DEFAULT_NAME", "Parser", "aws_group", "aws_options", "cloud_command", "code_option", "confirm",
           "global_aws", "machine_name", "names", "python_option", "say", "session", "state_region", "target_for"]

DEFAULT_NAME = "mnist"
CODE_HELP = "checkout to sync (default: the current directory)"


def machine_name(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_NAME, required: bool = False,
                 help: str | None = None) -> None:
    """NAME: the machine a command works on, a name from `launch` or `attach` (optional unless required)."""
    if help is None:
        help = "the machine: a name from `launch` or `attach`" + (f" (default: {default})" if default and not required
                                                                  else "")
    if required:
        p.add_argument("name", help=help)
    else:
        p.add_argument("name", nargs="?", default=default, help=help)


def code_option(p: argparse.ArgumentParser, help: str | None = CODE_HELP) -> None:
    """--code DIR: the project to sync to the machine."""
    p.add_argument("--code", metavar="DIR", help=help)


def python_option(p: argparse.ArgumentParser, help: str | None = None, metavar: str | None = None) -> None:
    """--python: the interpreter to use on the machine."""
    p.add_argument("--python", metavar=metavar, help=help)


def aws_options(p, region_help: str | None = "AWS region (default: the AWS config / AWS_DEFAULT_REGION)",
                profile_help: str | None = "AWS profile from ~/.aws/config (default: AWS_PROFILE)",
                default=argparse.SUPPRESS) -> None:
    """--region and --profile. SUPPRESS (the cloud commands): a value typed before the command is kept
    unless one typed after it replaces it."""
    p.add_argument("--region", default=default, help=region_help)
    p.add_argument("--profile", default=default, help=profile_help)


def aws_group() -> argparse.ArgumentParser:
    """The "AWS" group of --region and --profile, as a parent parser: mnist-cloud's own, and every cloud
    command's."""
    p = argparse.ArgumentParser(add_help=False)
    aws_options(p.add_argument_group("AWS"))
    return p


def cloud_command(sub, name: str, summary: str, **kwargs) -> Parser:
    """A command's parser that takes the AWS group, as every command that may reach EC2 does."""
    return sub.add_parser(name, parents=[aws_group()], help=summary, **kwargs)


def global_aws(rest: list[str], args) -> list[str]:
    """`mnist-cloud --region R --profile P train ...`: the global options, handed to a pass-through
    command as if typed after it (one typed after it wins)."""
    from infra.targets import has_option

    for key in ("region", "profile"):
        value = getattr(args, key, None)
        if value is not None and not has_option(rest, f"--{key}"):
            rest = [f"--{key}", value, *rest]
    return rest


def names(text: str | None, what: str) -> list[str]:
    """A comma-separated option (--instance A,B, --region R1,R2) as a list, order kept, repeats dropped."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise UserError(f"{what} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))


def say(message: str) -> None:
    print(message, flush=True)


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"{question} needs --yes when not run from a terminal")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("cancelled; nothing was changed")


def session(args, name: str | None = None):
    """The AWS session for --region/--profile, else, for a `name` the state knows on EC2, the region it was
    launched in (a name is found without --region wherever it landed), else the config's, else the AWS
    defaults."""
    from infra import settings
    from infra.aws import Aws

    region = getattr(args, "region", None)
    if region is None and name:
        region = state_region(name)
    found = settings.resolve({"region": region, "profile": getattr(args, "profile", None)})
    return Aws(region=found["region"].value, profile=found["profile"].value)


def state_region(name: str) -> str | None:
    """The region the state records for an EC2 name, None for a name it does not know (or an SSH host)."""
    from infra.state import State

    host = State().get(name)
    return host.region if host is not None and host.kind == "ec2" else None


def target_for(args):
    """The machine called args.name, to work on over SSH."""
    from infra.targets import SSHTarget

    return SSHTarget.resolve(args.name, getattr(args, "region", None), getattr(args, "profile", None))
