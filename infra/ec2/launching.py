"""Launch a name: one instance or a cluster, spot or on demand, zone by zone, or reuse what the name has."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from infra.aws import Aws, CloudError
from infra.ec2.images import check_dlami_supports, describe_ami, resolve_dlami, root_snapshot_gb
from infra.ec2.instance_types import instance_type_info
from infra.ec2.instances import (
    Instance,
    describe_instance,
    find_instances,
    instance_from,
    wait_for_state,
    wait_status_ok,
)
from infra.ec2.keys import KeyInfo, ensure_key_pair
from infra.ec2.network import (
    default_vpc,
    describe_default_subnets,
    detect_public_ip,
    ensure_placement_group,
    ensure_security_group,
    normalize_cidr,
    with_network,
)
from infra.ec2.owners import caller_identity, others_instances, owner_label
from infra.ec2.tags import TAG_AUTOSTOP, TAG_BUDGET, TAG_NODE, Log, budget_text, resource_prefix, tag_list
from infra.errors import UserError
from infra.hosts import check_name
from infra.pricing import hourly_price
from infra.state import Host, State

CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
                  "InsufficientSpotInstanceCapacity", "Unsupported"}
DEFAULT_USER = "ubuntu"  # the Deep Learning AMI's login


class NoCapacity(UserError):
    """Every zone (and market) a launch may try answered with a capacity error; `code` is the last one."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class LaunchSpec:
    name: str
    instance_type: str
    spot: bool = False
    ami: str | None = None
    disk_gb: int = 100
    key_name: str | None = None
    key_path: str | None = None
    public_key: str | None = None
    ssh_cidr: str | None = None
    autostop_minutes: float = 30
    autostop_action: str = "stop"  # or "terminate"
    autostop_after_train: bool = False
    user_data: str | bytes | None = None  # e.g. the autostop watchdog installer (infra/watchdog.py user_data)
    budget_usd: float | None = None  # USD it may cost from launch on: the watchdog stops it there
    usd_per_hour: float | None = None  # what the watchdog counts with until the laptop prices it live
    wait_status_checks: bool = True
    nodes: int = 1  # K > 1: a cluster of K instances in one placement group
    zones: list[str] | None = None  # only these zones, in this order (a candidate of `launch` over lists)
    on_demand_fallback: bool = True  # a spot launch falls back to on-demand in its region (not over lists)
    price_text: str | None = None  # the live price, where the caller knows it (launch over lists)

    @property
    def autostop(self):
        from infra.watchdog import AutostopConfig

        return AutostopConfig(idle_minutes=self.autostop_minutes,
                              action="stop" if self.spot else self.autostop_action,  # see _shutdown_behavior
                              after_train=self.autostop_after_train,
                              enabled=bool(self.autostop_minutes or self.autostop_after_train),
                              shutdown_behavior="stop" if self.budget_usd is not None else None,
                              budget_usd=self.budget_usd, usd_per_hour=self.usd_per_hour)


def _record(state: State, inst: Instance, key: KeyInfo, region: str, user: str = DEFAULT_USER) -> None:
    """The name's record: what the same instance had in `extra` (a cluster's nodes, the last budget figure,
    the launch's notify URLs) is kept across a start or a reuse; a new instance starts afresh."""
    old = state.get(inst.name)
    extra = old.extra if old is not None and old.instance_id == inst.instance_id else {}
    state.put(Host(name=inst.name, kind="ec2", host=inst.public_ip, user=user, key_path=str(key.private_key),
                   instance_id=inst.instance_id, region=region, key_name=key.key_name, created_key=key.created,
                   instance_type=inst.instance_type, extra=extra))


def launch(aws: Aws, spec: LaunchSpec, log: Log = print, state: State | None = None,
           wait_ready: Callable[[Instance], None] | None = None) -> Instance:
    """Create (or reuse) the instance called spec.name and wait until it is running and healthy.

    `wait_ready` is the hook for the SSH layer: called with the running instance before returning."""
    check_name(spec.name)
    state = state or State()
    if spec.disk_gb < 8 or spec.disk_gb > 16384:
        raise UserError(f"--disk-gb must be between 8 and 16384, got {spec.disk_gb}")
    info = instance_type_info(aws, spec.instance_type)
    cidr = normalize_cidr(spec.ssh_cidr) if spec.ssh_cidr else detect_public_ip()
    if cidr in ("0.0.0.0/0", "::/0"):
        log(f"WARNING: --ssh-cidr {cidr} opens SSH to the whole internet; prefer your own /32")
    price = hourly_price(spec.instance_type)
    log(f"instance type {info.name}: {info.architecture}, {info.vcpus} vCPUs, "
        f"{info.gpus or 'no GPU (training runs on its CPU)'}, " + (spec.price_text or (
            f"${price:.3f}/h on demand in the built-in table" if price is not None
            else "price unknown (add it to prices.json)")))
    owner = caller_identity(aws)

    if not 1 <= spec.nodes <= 64:
        raise UserError(f"--nodes must be between 1 and 64, got {spec.nodes}")
    alive = [i for i in find_instances(aws, spec.name) if i.state != "shutting-down"]
    theirs = others_instances(alive, owner)
    if theirs:  # adopting it would revoke their /32 and need their key
        raise UserError(f"{spec.name} is {owner_label(theirs[0].owner)}'s instance ({theirs[0].instance_id}), not "
                        f"yours ({owner_label(owner)}): pick another --name, e.g. --name {spec.name}-"
                        f"{re.sub('[^a-z0-9]+', '-', owner_label(owner).rsplit('/', 1)[-1].lower()).strip('-') or '2'}")
    if alive:
        if len(alive) != spec.nodes:
            raise UserError(f"{spec.name} has {len(alive)} instance(s), not {spec.nodes}; "
                            f"`mnist-cloud down {spec.name}` first to change --nodes")
        nodes = [_reuse(aws, spec, inst, cidr, owner, log, state, None) for inst in alive]
        _record_cluster(state, spec.name, nodes)
        if wait_ready is not None:
            for inst in nodes:
                wait_ready(inst)
        return nodes[0]

    if spec.ami:
        ami, why = spec.ami, "--ami"
    else:
        check_dlami_supports(spec.instance_type)
        ami, why = resolve_dlami(aws, info.architecture, log)
    image = describe_ami(aws, ami)
    log(f"AMI {ami} ({image.get('Name', '?')}): {why}")
    snapshot_gb = root_snapshot_gb(image)
    if snapshot_gb and spec.disk_gb < snapshot_gb:
        raise UserError(f"--disk-gb {spec.disk_gb} is smaller than the root snapshot of AMI {ami} ({snapshot_gb} GB); "
                        f"use --disk-gb {snapshot_gb} or more")
    key = ensure_key_pair(aws, spec.name, owner, log, spec.key_name, spec.key_path, spec.public_key)
    vpc = default_vpc(aws)
    group_id = ensure_security_group(aws, spec.name, owner, vpc, cidr, log, cluster=spec.nodes > 1)
    placement = ensure_placement_group(aws, spec.name, owner, log) if spec.nodes > 1 else None

    launched = []
    for node in range(spec.nodes):
        extra = {TAG_AUTOSTOP: spec.autostop.tag}
        if spec.budget_usd is not None:
            extra[TAG_BUDGET] = budget_text(spec.budget_usd)
        if spec.nodes > 1:
            extra[TAG_NODE] = str(node)
        tags = tag_list(spec.name, owner, extra)
        params = dict(
            ImageId=ami, InstanceType=spec.instance_type, KeyName=key.key_name, MinCount=1, MaxCount=1,
            SecurityGroupIds=[group_id],
            MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 2, "HttpEndpoint": "enabled"},
            BlockDeviceMappings=[{"DeviceName": image.get("RootDeviceName", "/dev/sda1"),
                                  "Ebs": {"VolumeSize": spec.disk_gb, "VolumeType": "gp3", "Encrypted": True,
                                          "DeleteOnTermination": True}}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags},
                               {"ResourceType": "volume", "Tags": tags}],
        )
        if placement:
            params["Placement"] = {"GroupName": placement}
        if spec.user_data:
            params["UserData"] = spec.user_data
        # a cluster placement group lives in one zone: later nodes go into node 0's subnet
        pin = launched[0].subnet_id if launched else None
        inst = instance_from(_run_with_fallback(aws, spec, params, vpc, log, pin=pin))
        launched.append(inst)
        if node == 0:
            _record(state, inst, key, aws.region)  # before waiting: a Ctrl-C from here on still leaves a record
        log(f"launched {inst.instance_id} ({inst.lifecycle}) in {inst.zone}"
            + (f" as node {node} of {spec.nodes}" if spec.nodes > 1 else "") + "; waiting until it is running")
    nodes = [wait_up(aws, spec, inst.instance_id, key, log, state, None, record=(i == 0))
             for i, inst in enumerate(launched)]
    _record_cluster(state, spec.name, nodes)
    if wait_ready is not None:
        for inst in nodes:
            wait_ready(inst)
    return nodes[0]


def _record_cluster(state: State, name: str, nodes: list[Instance]) -> None:
    host = state.get(name)
    if host is None:
        return
    host.extra = {**host.extra, "nodes": [i.instance_id for i in nodes]} if len(nodes) > 1 else \
        {k: v for k, v in host.extra.items() if k != "nodes"}
    state.put(host)


# A persistent request with interruption behaviour "stop": an interruption stops the instance and keeps
# its disk (last.pt), and EC2 starts it again when capacity returns. "stop" requires "persistent".
SPOT_OPTIONS = {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}


def _shutdown_behavior(spec: LaunchSpec) -> str:
    # A spot launch always stops on its own shutdown (autostop): terminating an instance of a
    # persistent request makes EC2 open the request again and launch a fresh one, which bills. Its
    # on-demand fallback stops too, as the autostop tag (written before the launch) says. A machine with a
    # budget stops too: the watchdog stops it at the budget, and must never terminate it.
    return spec.autostop.shutdown_behavior or spec.autostop.action


def _run_with_fallback(aws: Aws, spec: LaunchSpec, params: dict, vpc: str, log: Log, pin: str | None = None) -> dict:
    """run_instances: spot in each AZ in turn, then on demand (saying so); capacity errors only.
    `pin`: the only subnet to use (a cluster's later nodes)."""
    subnets = [s for s in describe_default_subnets(aws, vpc) if pin in (None, s["SubnetId"])]
    if spec.zones is not None:  # a candidate's offering zones, cheapest first
        subnets = sorted((s for s in subnets if s["AvailabilityZone"] in spec.zones),
                         key=lambda s: spec.zones.index(s["AvailabilityZone"]))
    zones = [(s["AvailabilityZone"], s["SubnetId"]) for s in subnets]
    private = {s["SubnetId"] for s in subnets if not s.get("MapPublicIpOnLaunch", True)}
    # EC2 picks the zone when no subnet is named; not when pinned, nor when a subnet gives no public address
    anywhere = spec.zones is None and (not zones or not (pin or private))
    plans: list[tuple[bool, str | None, str | None]] = []
    if spec.spot:
        plans += [(True, zone, subnet) for zone, subnet in zones] or [(True, None, None)] * (spec.zones is None)
    if not spec.spot or spec.on_demand_fallback:
        plans += [(False, None, None)] * anywhere + [(False, zone, subnet) for zone, subnet in zones]
    if spec.spot and spec.autostop_action == "terminate":
        log("note: autostop on a spot instance stops it (terminating it would make its persistent request "
            "launch a new one); `mnist-cloud down` deletes it")
    last_error = None
    for i, (spot, zone, subnet) in enumerate(plans):
        if spec.spot and not spot and (i == 0 or plans[i - 1][0]):
            log(f"no spot capacity for {spec.instance_type} in any zone of {aws.region} "
                f"({last_error.code if last_error else '?'}); falling back to ON-DEMAND at "
                f"{hourly_price(spec.instance_type) or '?'} $/h")
        call = dict(params, InstanceInitiatedShutdownBehavior=_shutdown_behavior(spec),
                    ClientToken=f"mnist-cloud-{uuid.uuid4().hex}")
        call = with_network(call, subnet, subnet in private)
        if spot:
            call["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": SPOT_OPTIONS}
            # the request carries the name too, so that `down` finds and cancels it even without its instance
            call["TagSpecifications"] = params["TagSpecifications"] + [
                {"ResourceType": "spot-instances-request", "Tags": params["TagSpecifications"][0]["Tags"]}]
        try:
            # the group and key pair were created or found just now: "not found" is EC2 catching up
            return aws.call("ec2", "run_instances", settle=("InvalidGroup.NotFound", "InvalidKeyPair.NotFound"),
                            **call)["Instances"][0]
        except CloudError as e:
            if e.code not in CAPACITY_CODES:
                raise
            last_error = e
            where = zone or "the default zone"
            log(f"no {'spot' if spot else 'on-demand'} capacity for {spec.instance_type} in {where} ({e.code}); "
                "trying the next option")
    if last_error is None:
        raise UserError(f"{aws.region}'s default VPC has no subnet in a zone that offers {spec.instance_type} "
                        f"({', '.join(spec.zones or [])})")
    raise NoCapacity(f"no capacity for {spec.instance_type} in {aws.region} ({last_error.code}); try another "
                     "instance type or --region, or give several: --instance A,B --region R1,R2", last_error.code)


def wait_up(aws: Aws, spec: LaunchSpec, instance_id: str, key: KeyInfo, log: Log, state: State,
            wait_ready: Callable[[Instance], None] | None, record: bool = True) -> Instance:
    wait_for_state(aws, [instance_id], "running", f"{instance_id} to run")
    if spec.wait_status_checks:
        log("running; waiting for the EC2 status checks")
        wait_status_ok(aws, instance_id)
    inst = describe_instance(aws, instance_id)
    if record:
        _record(state, inst, key, aws.region)
    if wait_ready is not None:
        wait_ready(inst)
    return inst


def _reuse(aws: Aws, spec: LaunchSpec, inst: Instance, cidr: str, owner: str, log: Log, state: State,
           wait_ready) -> Instance:
    log(f"{spec.name} already exists: {inst.instance_id} ({inst.instance_type}, {inst.state}); reusing it")
    if inst.instance_type != spec.instance_type:
        log(f"note: it is a {inst.instance_type}, not {spec.instance_type}; `mnist-cloud down {spec.name}` first "
            "to change the type")
    ensure_security_group(aws, spec.name, owner, default_vpc(aws), cidr, log, cluster=spec.nodes > 1)
    host = state.get(spec.name)
    if host and host.key_path:
        key = KeyInfo(host.key_name or inst.key_name or "", Path(host.key_path), host.created_key)
    else:
        key = ensure_key_pair(aws, spec.name, owner, log, spec.key_name or (
            inst.key_name if inst.key_name != resource_prefix(spec.name) else None),
            spec.key_path, spec.public_key, in_use=True)
    if inst.state == "stopping":
        log("waiting for it to finish stopping")
        wait_for_state(aws, [inst.instance_id], "stopped", f"{inst.instance_id} to stop")
        inst.state = "stopped"
    if inst.state == "stopped":
        log("it was stopped; starting it")
        aws.call("ec2", "start_instances", InstanceIds=[inst.instance_id])
    node = inst.tags.get(TAG_NODE, "0")
    return wait_up(aws, spec, inst.instance_id, key, log, state, wait_ready, record=node == "0")
