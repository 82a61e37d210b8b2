"""Who owns a resource: the caller's IAM identity, owner ARNs compared and shortened, others' instances."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from infra.aws import Aws

if TYPE_CHECKING:
    from infra.ec2.instances import Instance


def caller_identity(aws: Aws) -> str:
    """The owner recorded on everything we create: the caller's IAM ARN."""
    return aws.call("sts", "get_caller_identity")["Arn"]


# botocore (and the AWS CLI) name an assumed-role session `botocore-session-<epoch>` unless told
# otherwise, so that part of arn:aws:sts::ACCT:assumed-role/ROLE/SESSION changes with every command.
# Any other session name is chosen: under IAM Identity Center (SSO) it is the person's user name, and
# everyone with the same permission set shares ROLE (AWSReservedSSO_<Set>_<hash>).
_BOTOCORE_SESSION = re.compile(r"^(arn:[^:]+:sts::\d+:assumed-role/[^/]+)/botocore-session-\d+$")


def owner_key(arn: str | None) -> str:
    """The part of an owner ARN that names who owns: an assumed role's ARN without botocore's own
    session name; any other ARN whole (an SSO user's session name is who they are)."""
    m = _BOTOCORE_SESSION.match(arn or "")
    return m.group(1) if m else (arn or "")


def same_owner(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and owner_key(a) == owner_key(b)


def owner_label(arn: str | None) -> str:
    """A short name for an owner ARN: `user/alice`, `AWSReservedSSO_Dev_0a1b/alice`, `role/ci`."""
    key = owner_key(arn)
    if not key:
        return "no one (untagged)"
    resource = key.split(":", 5)[-1]
    return resource.removeprefix("assumed-role/")


def others_instances(instances: list["Instance"], me: str) -> list["Instance"]:
    """The instances tagged with another owner than `me` (untagged ones, from older versions, are nobody's)."""
    return [i for i in instances if i.owner and not same_owner(i.owner, me)]
