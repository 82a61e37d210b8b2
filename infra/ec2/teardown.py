"""`down`: terminate a name's instances, then delete its volumes, groups and key pairs, waiting for EC2
to release what terminated instances still hold; `down --all` for every name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from infra.aws import Aws, CloudError
from infra.ec2.instances import Instance, find_instances, wait_for_state
from infra.ec2.network import find_security_group
from infra.ec2.owners import caller_identity, others_instances, owner_label, same_owner
from infra.ec2.spot import cancel_spot_requests
from infra.ec2.tags import TAG_NAME, TAG_NODE, TAG_OWNER, Log, resource_prefix
from infra.errors import UserError
from infra.hosts import check_name
from infra.state import State, keys_dir


@dataclass
class DownReport:
    terminated: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    key_pairs: list[str] = field(default_factory=list)
    key_files: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    placement_groups: list[str] = field(default_factory=list)
    left: list[CloudError] = field(default_factory=list)  # what could not be deleted this time, and why


class DownIncomplete(CloudError):
    """`down` deleted what it could and left the rest; `report` says which is which."""

    def __init__(self, report: DownReport):
        first, rest = report.left[0], report.left[1:]
        more = f" (and {len(rest)} more left: {'; '.join(str(e) for e in rest)})" if rest else ""
        super().__init__(f"{first}{more}", first.code, first.transient)
        self.report = report


GROUP_RELEASE_WAIT = 60.0  # a terminated instance's network interface can hold its group for a while
# EC2 answers InvalidPlacementGroup.InUse for a while after a cluster's instances have terminated
PLACEMENT_RELEASE_WAIT = 120.0


def _delete_when_released(aws: Aws, what: str, delete: Callable[[], object], gone: str, in_use: str,
                          timeout: float) -> bool:
    """delete(); False when it was already gone (`gone`). A resource that terminated instances still hold
    (`in_use`) is asked again through aws.wait, so one that stays in use ends in one line at the deadline,
    and `down` run again carries on from there."""
    def check():
        try:
            delete()
            return True
        except CloudError as e:
            if e.code == gone:
                return False
            if e.code == in_use:
                return None
            raise

    return aws.wait(f"{what} ({in_use})", check, timeout=timeout, delay=5)


def _delete_group(aws: Aws, group_id: str) -> bool:
    """Its instances' network interfaces may take a moment to let go of a security group."""
    return _delete_when_released(aws, f"security group {group_id} to be released by its network interfaces",
                                 lambda: aws.call("ec2", "delete_security_group", GroupId=group_id),
                                 "InvalidGroup.NotFound", "DependencyViolation", GROUP_RELEASE_WAIT)


def _delete_placement_group(aws: Aws, group: str) -> bool:
    """EC2 counts a cluster's terminated instances in its placement group for a while."""
    return _delete_when_released(aws, f"placement group {group} to be released by its terminated instances",
                                 lambda: aws.call("ec2", "delete_placement_group", GroupName=group),
                                 "InvalidPlacementGroup.Unknown", "InvalidPlacementGroup.InUse",
                                 PLACEMENT_RELEASE_WAIT)


def down(aws: Aws, name: str, log: Log = print, state: State | None = None) -> DownReport:
    """Terminate every instance of `name`, then delete its volumes, placement group, security group and
    the key pair it created. Once the instances are gone, a part that cannot be deleted (still in use
    at the deadline, say) does not stop the rest: DownIncomplete then carries the report and what is left."""
    check_name(name)
    state = state or State()
    report = DownReport()
    alive = [i for i in find_instances(aws, name)]
    cluster = any(TAG_NODE in i.tags for i in find_instances(aws, name, include_terminated=True))
    ids = [i.instance_id for i in alive if i.state != "terminated"]
    cancel_spot_requests(aws, name, ids, log)  # first: a persistent request would relaunch what we terminate
    if ids:
        aws.call("ec2", "terminate_instances", InstanceIds=ids)
        log(f"terminating {', '.join(ids)}; waiting")
        wait_for_state(aws, ids, "terminated", "termination")
        report.terminated = ids
    for part in (_down_volumes, _down_placement_group if cluster else None, _down_security_group, _down_key_pairs):
        if part is None:
            continue
        try:
            part(aws, name, report)
        except CloudError as e:  # the instances are gone: delete the rest, and say what is left
            report.left.append(e)
    host = state.get(name)
    if host and host.kind == "ec2" and not report.left:
        state.remove(name)
    if report.left:
        raise DownIncomplete(report)
    return report


def _down_volumes(aws: Aws, name: str, report: DownReport) -> None:
    """Root volumes go with their instance (DeleteOnTermination); sweep any that were left detached."""
    for volume in aws.call("ec2", "describe_volumes", Filters=[{"Name": f"tag:{TAG_NAME}", "Values": [name]},
                                                                {"Name": "status", "Values": ["available"]}])["Volumes"]:
        aws.call("ec2", "delete_volume", VolumeId=volume["VolumeId"])
        report.volumes.append(volume["VolumeId"])


def _down_placement_group(aws: Aws, name: str, report: DownReport) -> None:
    try:
        placement = aws.call("ec2", "describe_placement_groups", Filters=[
            {"Name": "group-name", "Values": [resource_prefix(name)]}]).get("PlacementGroups", [])
    except CloudError:
        placement = []  # none was made (see ensure_placement_group)
    for pg in placement:
        if _delete_placement_group(aws, pg["GroupName"]):
            report.placement_groups.append(pg["GroupName"])


def _down_security_group(aws: Aws, name: str, report: DownReport) -> None:
    group = find_security_group(aws, name)
    if group and {t["Key"]: t["Value"] for t in group.get("Tags", [])}.get(TAG_NAME) == name:
        if _delete_group(aws, group["GroupId"]):
            report.security_groups.append(group["GroupId"])


def _down_key_pairs(aws: Aws, name: str, report: DownReport) -> None:
    for pair in aws.call("ec2", "describe_key_pairs", Filters=[{"Name": f"tag:{TAG_NAME}", "Values": [name]}])["KeyPairs"]:
        aws.call("ec2", "delete_key_pair", KeyName=pair["KeyName"])
        report.key_pairs.append(pair["KeyName"])
        key_file = keys_dir() / f"{pair['KeyName']}.pem"
        if key_file.exists():
            key_file.unlink()
            report.key_files.append(str(key_file))


def down_all(aws: Aws, log: Log = print, state: State | None = None, any_owner: bool = False) -> DownReport:
    """Sweep every resource tagged as ours (by this caller, unless any_owner): instances, groups, key pairs."""
    state = state or State()
    me = caller_identity(aws)

    def mine(tags: dict) -> bool:
        return TAG_NAME in tags and (any_owner or same_owner(tags.get(TAG_OWNER), me))

    report = DownReport()
    names = {i.name for i in find_instances(aws) if mine(i.tags)}
    groups = aws.call("ec2", "describe_security_groups", Filters=[{"Name": "tag-key", "Values": [TAG_NAME]}])
    names |= {t["Value"] for g in groups["SecurityGroups"] for t in g.get("Tags", []) if t["Key"] == TAG_NAME
              and mine({x["Key"]: x["Value"] for x in g["Tags"]})}
    pairs = aws.call("ec2", "describe_key_pairs", Filters=[{"Name": "tag-key", "Values": [TAG_NAME]}])["KeyPairs"]
    names |= {t["Value"] for p in pairs for t in p.get("Tags", []) if t["Key"] == TAG_NAME
              and mine({x["Key"]: x["Value"] for x in p["Tags"]})}
    for name in sorted(names):
        try:
            part = down(aws, name, log, state)
        except DownIncomplete as e:  # the next name still goes down
            part = e.report
        for key in ("terminated", "security_groups", "key_pairs", "key_files", "volumes", "placement_groups",
                    "left"):
            getattr(report, key).extend(getattr(part, key))
    if report.left:
        raise DownIncomplete(report)
    return report


def instances_to_terminate(aws: Aws, name: str | None, any_owner: bool = False) -> list[Instance]:
    """The live instances `down NAME` (or `down --all`: name None) acts on. --all: yours only, or everyone's
    with any_owner. NAME: refused in one line if another owner's instance holds it, unless any_owner."""
    alive = [i for i in find_instances(aws, name) if i.state not in ("terminated", "shutting-down")]
    if name is None and not any_owner:
        me = caller_identity(aws)
        alive = [i for i in alive if same_owner(i.tags.get(TAG_OWNER), me)]
    elif not any_owner and alive:
        theirs = others_instances(alive, caller_identity(aws))
        if theirs:
            raise UserError(f"{name} is {owner_label(theirs[0].owner)}'s ({theirs[0].instance_id}), not yours: "
                            f"`mnist-cloud down {name} --any-owner` terminates it anyway")
    return alive
