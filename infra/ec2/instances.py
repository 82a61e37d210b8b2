"""Instances as records: find them by name, describe one, and wait for a state or EC2's status checks.

All AWS calls go through infra.aws."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from infra.aws import Aws, CloudError
from infra.ec2.tags import TAG_AUTOSTOP, TAG_BUDGET, TAG_NAME, TAG_NODE, TAG_OWNER, parse_budget
from infra.errors import UserError
from infra.hosts import check_name

if TYPE_CHECKING:
    from infra.pricing import Price

ALIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


@dataclass
class Instance:
    name: str
    instance_id: str
    instance_type: str
    state: str
    lifecycle: str  # "spot" or "on-demand"
    public_ip: str | None
    private_ip: str | None
    launch_time: datetime | None
    key_name: str | None
    zone: str | None
    owner: str | None
    tags: dict = field(default_factory=dict)
    subnet_id: str | None = None

    @property
    def uptime_hours(self) -> float:
        """Hours since (re)start while running; 0 when not running (stopped instances bill for disk only)."""
        if self.state != "running" or self.launch_time is None:
            return 0.0
        return max(0.0, (datetime.now(timezone.utc) - self.launch_time).total_seconds() / 3600)

    def cost_so_far(self, price: "Price") -> float | None:
        """What its uptime has cost at `price` (infra/ec2/prices.py machine_price: for spot, the mean over
        that uptime); None when the price is unknown."""
        return price.cost(self.uptime_hours)

    @property
    def autostop(self) -> str:
        return self.tags.get(TAG_AUTOSTOP, "-")

    @property
    def budget(self) -> float | None:
        """USD it may cost from launch on (the tag); None: no budget (or a tag nobody can read)."""
        try:
            return parse_budget(self.tags.get(TAG_BUDGET))
        except ValueError:
            return None


def instance_from(desc: dict) -> Instance:
    tags = {t["Key"]: t["Value"] for t in desc.get("Tags", [])}
    return Instance(
        name=tags.get(TAG_NAME, ""),
        instance_id=desc["InstanceId"],
        instance_type=desc["InstanceType"],
        state=desc["State"]["Name"],
        lifecycle="spot" if desc.get("InstanceLifecycle") == "spot" else "on-demand",
        public_ip=desc.get("PublicIpAddress"),
        private_ip=desc.get("PrivateIpAddress"),
        launch_time=desc.get("LaunchTime"),
        key_name=desc.get("KeyName"),
        zone=desc.get("Placement", {}).get("AvailabilityZone"),
        owner=tags.get(TAG_OWNER),
        tags=tags,
        subnet_id=desc.get("SubnetId"),
    )


def find_instances(aws: Aws, name: str | None = None, include_terminated: bool = False) -> list[Instance]:
    """Instances tagged as ours (one name, or all), live from EC2, oldest first."""
    tag_filter = {"Name": f"tag:{TAG_NAME}", "Values": [name]} if name else {"Name": "tag-key", "Values": [TAG_NAME]}
    states = ALIVE_STATES + (["terminated"] if include_terminated else [])
    reservations = aws.paginate("ec2", "describe_instances", "Reservations",
                                Filters=[tag_filter, {"Name": "instance-state-name", "Values": states}])
    found = [instance_from(i) for r in reservations for i in r["Instances"]]
    return sorted(found, key=lambda i: (i.name, i.launch_time or datetime.min.replace(tzinfo=timezone.utc)))


def describe_instance(aws: Aws, instance_id: str) -> Instance:
    try:
        reservations = aws.call("ec2", "describe_instances", InstanceIds=[instance_id])["Reservations"]
    except CloudError as e:
        if e.code.startswith("InvalidInstanceID"):
            raise UserError(f"no instance {instance_id} in {aws.region}; check the id and --region") from None
        raise
    return instance_from(reservations[0]["Instances"][0])


def alive_instances(aws: Aws, name: str) -> list[Instance]:
    """Every live instance of a name, node 0 first."""
    alive = [i for i in find_instances(aws, check_name(name)) if i.state != "shutting-down"]
    if not alive:
        raise UserError(f"no instance named {name!r} in {aws.region}; see `mnist-cloud ls`")
    return sorted(alive, key=lambda i: int(i.tags.get(TAG_NODE, "0")))


def only_instance(aws: Aws, name: str) -> Instance:
    return alive_instances(aws, name)[0]


# Our own polls, not botocore's waiters: instance_terminated gives up on `pending` or `stopping`, and a
# waiter ends in a traceback on a dropped connection. aws.wait polls again on those, up to a deadline.
# The permissions come from the EBS user guide's "Requirements for Amazon EBS encryption".
KMS_HINT = ("; a common cause is default EBS encryption with a KMS key you may not use: allow kms:CreateGrant, "
            "kms:Decrypt, kms:DescribeKey, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt* on it "
            "(docs/cloud.md#iam-permissions)")


def launch_failure(desc: dict) -> str:
    """One line for an instance that ended while starting, with EC2's StateReason."""
    reason = desc.get("StateReason") or {}
    code, message = reason.get("Code") or "no code", reason.get("Message") or "EC2 gave no reason"
    hint = KMS_HINT if code == "Client.InternalError" or re.search(r"kms|encrypt", message, re.IGNORECASE) else ""
    why = message if message.startswith(code) else f"{code}: {message}"  # EC2 often repeats the code
    return (f"{desc['InstanceId']} went from pending to {desc['State']['Name']}: {why}{hint}; "
            "`mnist-cloud down NAME` tidies up")


def wait_for_state(aws: Aws, ids: list[str], wanted: str, what: str, timeout: float = 900,
                   delay: float = 5) -> list[dict]:
    """Poll until every instance is `wanted` (running, stopped or terminated); their descriptions.

    Waiting for `running`, an instance that ends instead is an error that says why (StateReason)."""
    def check():
        try:
            descs = [i for r in aws.call("ec2", "describe_instances", InstanceIds=ids)["Reservations"]
                     for i in r["Instances"]]
        except CloudError as e:
            if not e.code.startswith("InvalidInstanceID"):
                raise
            # not visible yet right after the launch; long gone when we wait for its end
            return [] if wanted == "terminated" else None
        for d in descs:
            if wanted == "running" and d["State"]["Name"] in ("shutting-down", "terminated"):
                raise CloudError(launch_failure(d), "LaunchFailed")
        return descs if all(d["State"]["Name"] == wanted for d in descs) else None

    return aws.wait(what, check, timeout=timeout, delay=delay)


def wait_status_ok(aws: Aws, instance_id: str, timeout: float = 900, delay: float = 10) -> None:
    """Poll until EC2's instance and system status checks pass."""
    def check():
        statuses = aws.call("ec2", "describe_instance_status", InstanceIds=[instance_id])["InstanceStatuses"]
        passed = statuses and all(s.get("InstanceStatus", {}).get("Status") == "ok"
                                  and s.get("SystemStatus", {}).get("Status", "ok") == "ok" for s in statuses)
        return True if passed else None

    aws.wait(f"{instance_id}'s status checks", check, timeout=timeout, delay=delay)
