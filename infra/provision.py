"""Launch, find, start, stop and terminate named EC2 instances. Returns dataclass records.

Every resource this module creates carries the tags `mnist-cloud:name` and `mnist-cloud:owner`,
set at creation (TagSpecifications), so an interrupted launch never leaves something untagged and
`down` can always find what a name owns. All AWS calls go through infra.aws.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from infra.aws import Aws, CloudError
from infra.errors import UserError
from infra.pricing import estimate_cost, hourly_price
from infra.state import Host, State, check_key_file, keys_dir, write_private_key

TAG_NAME = "mnist-cloud:name"
TAG_OWNER = "mnist-cloud:owner"
TAG_AUTOSTOP = "mnist-cloud:autostop"
TAG_NODE = "mnist-cloud:node"
ALIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow",
                  "InsufficientSpotInstanceCapacity", "Unsupported"}
DLAMI_SSM_ROOT = "/aws/service/deeplearning/ami"
DLAMI_NAME_PATTERNS = {  # describe-images fallback, by architecture
    "x86_64": "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu *)*",
    "arm64": "Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch * (Ubuntu *)*",
}
# Families the PyTorch DLAMIs no longer support: the release notes of every PyTorch 2.6 to 2.11 DLAMI list
# "supported_ec2_instances: G4dn, G5, G6, Gr6, G6e, P4, P4de, P5, P5e, P5en, P6-B200" (ARM64: G5g, P6e-GB200),
# with no P2/P3 (K80, V100) or G3 (M60); the CUDA 13 builds dropped those GPUs.
DLAMI_UNSUPPORTED = {"p2": "K80", "p3": "V100", "p3dn": "V100", "g3": "M60", "g3s": "M60"}
IP_SERVICE = "https://checkip.amazonaws.com"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}$")
DEFAULT_USER = "ubuntu"  # the Deep Learning AMI's login

Log = Callable[[str], None]


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UserError(f"name {name!r}: use 1-39 lowercase letters, digits and dashes, starting with a letter or digit")
    return name


def resource_prefix(name: str) -> str:
    return f"mnist-cloud-{name}"


# ---------------------------------------------------------------------------------- records
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

    @property
    def cost_so_far(self) -> float | None:
        return estimate_cost(self.instance_type, self.uptime_hours)

    @property
    def autostop(self) -> str:
        return self.tags.get(TAG_AUTOSTOP, "-")


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


def tag_list(name: str, owner: str, extra: dict | None = None) -> list[dict]:
    tags = {TAG_NAME: name, TAG_OWNER: owner, "Name": resource_prefix(name), **(extra or {})}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


# ---------------------------------------------------------------------------------- lookups
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


# ---------------------------------------------------------------------------------- waits
# Our own polls, not botocore's waiters: instance_terminated gives up on `pending` or `stopping`, and a
# waiter ends in a traceback on a dropped connection. aws.wait polls again on those, up to a deadline.
# The permissions come from the EBS user guide's "Requirements for Amazon EBS encryption".
KMS_HINT = ("; a common cause is default EBS encryption with a KMS key you may not use: allow kms:CreateGrant, "
            "kms:Decrypt, kms:DescribeKey, kms:GenerateDataKeyWithoutPlaintext and kms:ReEncrypt* on it "
            "(README, IAM section)")


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


@dataclass
class InstanceTypeInfo:
    name: str
    architecture: str
    vcpus: int
    gpus: str  # e.g. "1 x NVIDIA T4", or "" for none


def instance_type_info(aws: Aws, instance_type: str) -> InstanceTypeInfo:
    try:
        types = aws.call("ec2", "describe_instance_types", InstanceTypes=[instance_type])["InstanceTypes"]
    except CloudError as e:
        if e.code in ("InvalidInstanceType", "InvalidParameterValue"):
            raise UserError(f"unknown instance type {instance_type!r} in {aws.region}; "
                            "GPU types look like g4dn.xlarge, g5.xlarge, g6.xlarge") from None
        raise
    if not types:
        raise UserError(f"unknown instance type {instance_type!r} in {aws.region}")
    t = types[0]
    archs = t.get("ProcessorInfo", {}).get("SupportedArchitectures", ["x86_64"])
    gpus = ", ".join(f"{g.get('Count', 1)} x {g.get('Manufacturer', '')} {g.get('Name', '')}".replace("  ", " ")
                     for g in t.get("GpuInfo", {}).get("Gpus", []))
    return InstanceTypeInfo(instance_type, "x86_64" if "x86_64" in archs else "arm64",
                            t.get("VCpuInfo", {}).get("DefaultVCpus", 0), gpus)


def check_dlami_supports(instance_type: str) -> None:
    """Refuse, in one line, a family that no current PyTorch DLAMI supports (see DLAMI_UNSUPPORTED)."""
    family = instance_type.split(".")[0]
    if family in DLAMI_UNSUPPORTED:
        raise UserError(f"{instance_type} ({DLAMI_UNSUPPORTED[family]}) is not supported by the current PyTorch "
                        "Deep Learning AMIs (CUDA 13); pick g4dn, g5, g6 or p4d, or pass --ami with an image built "
                        "for it")


def pytorch_version(name: str) -> tuple[int, ...]:
    """(2, 12) from a DLAMI name or SSM path ('... PyTorch 2.12 ...', 'pytorch-2.12-...'); () if none."""
    m = re.search(r"pytorch[ -](\d+)\.(\d+)", name, re.IGNORECASE)
    return tuple(int(x) for x in m.groups()) if m else ()


def resolve_dlami(aws: Aws, architecture: str = "x86_64", log: Log = print) -> tuple[str, str]:
    """(ami id, why): the newest PyTorch Deep Learning AMI on Ubuntu.

    SSM public parameters first, then describe_images by name; both take the highest PyTorch version,
    then the newest."""
    pattern = re.compile(r"/([^/]*pytorch-(\d+)\.(\d+)[^/]*ubuntu-(\d+)\.(\d+)[^/]*)/latest/ami-id$")
    try:
        params = aws.paginate("ssm", "get_parameters_by_path", "Parameters",
                              Path=f"{DLAMI_SSM_ROOT}/{architecture}", Recursive=True)
    except CloudError as e:
        log(f"note: could not read the DLAMI SSM parameters ({e.code}); searching images by name instead")
        params = []
    candidates = []
    for p in params:
        m = pattern.search(p["Name"])
        if m:
            version = tuple(int(x) for x in m.groups()[1:])
            candidates.append((version, "oss-nvidia-driver" in m.group(1), m.group(1), p["Value"]))
    if candidates:
        version, _, ami_type, ami = max(candidates)
        return ami, f"newest PyTorch DLAMI in SSM: {ami_type} (PyTorch {version[0]}.{version[1]})"
    images = aws.call("ec2", "describe_images", Owners=["amazon"], Filters=[
        {"Name": "name", "Values": [DLAMI_NAME_PATTERNS.get(architecture, DLAMI_NAME_PATTERNS["x86_64"])]},
        {"Name": "architecture", "Values": [architecture]},
        {"Name": "state", "Values": ["available"]},
    ])["Images"]
    if not images:
        raise UserError(f"no PyTorch Deep Learning AMI found in {aws.region}; pass --ami ami-...")
    newest = max(images, key=lambda i: (pytorch_version(i.get("Name", "")), i.get("CreationDate", "")))
    return newest["ImageId"], f"newest Amazon image named {newest.get('Name')!r} (SSM had none)"


def root_snapshot_gb(image: dict) -> int | None:
    """Size of the AMI's root snapshot: the smallest root volume EC2 accepts."""
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == image.get("RootDeviceName") and "Ebs" in mapping:
            return mapping["Ebs"].get("VolumeSize")
    return None


def describe_ami(aws: Aws, ami: str) -> dict:
    images = aws.call("ec2", "describe_images", ImageIds=[ami])["Images"]
    if not images:
        raise UserError(f"AMI {ami} not found in {aws.region}")
    return images[0]


# ---------------------------------------------------------------------------------- network and keys
def normalize_cidr(text: str) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UserError(f"--ssh-cidr {text!r} is not a CIDR; use your address like 203.0.113.7/32") from None
    if network.version != 4:  # the rule is written as an IPv4 range; the default VPC has no IPv6 anyway
        raise UserError(f"--ssh-cidr {text!r} is IPv6; give your public IPv4 address, like 203.0.113.7/32")
    return str(network)


def detect_public_ip(url: str | None = None, timeout: float = 5.0) -> str:
    """The caller's public address as a /32, from a what-is-my-ip service ($MNIST_CLOUD_IP_URL overrides it)."""
    url = url or os.environ.get("MNIST_CLOUD_IP_URL", IP_SERVICE)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(100).decode().strip()
        ip = ipaddress.ip_address(text)
    except (OSError, ValueError) as e:
        raise UserError(f"could not detect your public IP from {url} ({e}); pass --ssh-cidr YOUR.IP/32") from None
    return f"{ip}/{ip.max_prefixlen}"


def default_vpc(aws: Aws) -> str:
    vpcs = aws.call("ec2", "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise UserError(f"no default VPC in {aws.region}; create one with `aws ec2 create-default-vpc`")
    return vpcs[0]["VpcId"]


def describe_default_subnets(aws: Aws, vpc_id: str) -> list[dict]:
    """The default VPC's default subnets (one per AZ), sorted by AZ."""
    subnets = aws.call("ec2", "describe_subnets", Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                            {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    return sorted(subnets, key=lambda s: s["AvailabilityZone"])


def default_subnets(aws: Aws, vpc_id: str) -> list[tuple[str, str]]:
    """(availability zone, subnet id) of the default VPC, one per AZ, sorted by AZ."""
    return [(s["AvailabilityZone"], s["SubnetId"]) for s in describe_default_subnets(aws, vpc_id)]


def with_network(call: dict, subnet: str | None, public_ip: bool) -> dict:
    """run_instances arguments for one subnet. Where the subnet hands out no public IPv4 address
    (MapPublicIpOnLaunch off), the network interface asks for one; EC2 then wants the subnet and the
    groups on that interface, not at the top level."""
    if not public_ip:
        return dict(call, SubnetId=subnet) if subnet else call
    interface = {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "Groups": call["SecurityGroupIds"]}
    if subnet:
        interface["SubnetId"] = subnet
    rest = {k: v for k, v in call.items() if k != "SecurityGroupIds"}
    return dict(rest, NetworkInterfaces=[interface])


def find_security_group(aws: Aws, name: str) -> dict | None:
    groups = aws.call("ec2", "describe_security_groups",
                      Filters=[{"Name": "group-name", "Values": [resource_prefix(name)]}])["SecurityGroups"]
    return groups[0] if groups else None


def ensure_security_group(aws: Aws, name: str, owner: str, vpc_id: str, cidr: str, log: Log,
                          cluster: bool = False) -> str:
    """The name's security group with exactly these inbound rules: TCP 22 from `cidr`; and for a
    multi-node cluster, all traffic from members of this same group (rendezvous, NCCL), nothing else."""
    group = find_security_group(aws, name)
    if group is None:
        group_id = aws.call("ec2", "create_security_group", GroupName=resource_prefix(name), VpcId=vpc_id,
                            Description=f"mnist-cloud {name}: SSH from one address",
                            TagSpecifications=[{"ResourceType": "security-group",
                                                "Tags": tag_list(name, owner)}])["GroupId"]
        current = []
    else:
        group_id, current = group["GroupId"], group.get("IpPermissions", [])
    wanted = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": cidr}]}]
    if cluster:
        wanted.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]})

    def key(perm: dict) -> tuple:
        return (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort"),
                tuple(sorted(r["CidrIp"] for r in perm.get("IpRanges", []))),
                tuple(sorted(r["CidrIpv6"] for r in perm.get("Ipv6Ranges", []))),
                tuple(sorted(g["GroupId"] for g in perm.get("UserIdGroupPairs", []))))

    have = {key(p) for p in current}
    stale = [p for p in current if key(p) not in {key(w) for w in wanted}]
    if stale:
        aws.call("ec2", "revoke_security_group_ingress", GroupId=group_id, IpPermissions=stale)
    missing = [w for w in wanted if key(w) not in have]
    if missing:
        # a group created a moment ago may still be "not found" (EC2 is eventually consistent)
        aws.call("ec2", "authorize_security_group_ingress", GroupId=group_id, IpPermissions=missing,
                 settle=("InvalidGroup.NotFound",) if group is None else ())
    log(f"security group {group_id} ({resource_prefix(name)}): SSH (22) from {cidr} only"
        + ("; all traffic between the cluster's own members" if cluster else ""))
    return group_id


def ensure_placement_group(aws: Aws, name: str, owner: str, log: Log) -> str | None:
    """A cluster placement group: the nodes land close together, for fast collective communication.

    Not every instance type, region or endpoint offers one; then the cluster launches without it and
    says so."""
    group = resource_prefix(name)
    try:
        found = aws.call("ec2", "describe_placement_groups", Filters=[{"Name": "group-name", "Values": [group]}])
        if not found.get("PlacementGroups"):
            aws.call("ec2", "create_placement_group", GroupName=group, Strategy="cluster",
                     TagSpecifications=[{"ResourceType": "placement-group", "Tags": tag_list(name, owner)}])
        log(f"placement group {group}: cluster")
        return group
    except CloudError as e:
        log(f"note: no cluster placement group ({e}); launching the nodes without one")
        return None


@dataclass
class KeyInfo:
    key_name: str
    private_key: Path
    created: bool  # made or imported by us for this name, deleted by `down`


def ensure_key_pair(aws: Aws, name: str, owner: str, log: Log, key_name: str | None = None,
                    key_path: str | None = None, public_key: str | None = None, in_use: bool = False) -> KeyInfo:
    """An EC2 key pair and the private key file that goes with it.

    --key-name K uses an existing pair (private key from --key, else keys dir, else ~/.ssh/K.pem);
    --public-key P imports the user's own public key; otherwise a new ed25519 pair is created and its
    private key saved with mode 600. Private key material is never printed."""
    if key_name:
        try:
            aws.call("ec2", "describe_key_pairs", KeyNames=[key_name])
        except CloudError as e:
            if e.code == "InvalidKeyPair.NotFound":
                raise UserError(f"key pair {key_name!r} does not exist in {aws.region}; drop --key-name to create one") from None
            raise
        candidates = [Path(key_path).expanduser()] if key_path else [keys_dir() / f"{key_name}.pem",
                                                                      Path.home() / ".ssh" / f"{key_name}.pem"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UserError(f"no private key for key pair {key_name!r}: pass --key PATH")
        return KeyInfo(key_name, check_key_file(found), created=False)

    ours = resource_prefix(name)
    tags = [{"ResourceType": "key-pair", "Tags": tag_list(name, owner)}]
    existing = aws.call("ec2", "describe_key_pairs", Filters=[{"Name": "key-name", "Values": [ours]}])["KeyPairs"]
    if public_key:
        pub = Path(public_key).expanduser()
        private = check_key_file(pub.with_suffix("") if pub.suffix == ".pub" else Path(str(pub) + ".key"))
        if not existing:
            try:
                material = pub.read_bytes()
            except OSError as e:
                raise UserError(f"cannot read --public-key {pub}: {e.strerror}") from None
            aws.call("ec2", "import_key_pair", KeyName=ours, PublicKeyMaterial=material, TagSpecifications=tags)
            log(f"key pair {ours}: imported {pub}")
        return KeyInfo(ours, private, created=True)
    path = keys_dir() / f"{ours}.pem"
    if existing and path.is_file():
        return KeyInfo(ours, check_key_file(path), created=True)
    if existing:
        if in_use:
            raise UserError(f"key pair {ours} exists but its private key {path} is gone; "
                            f"`mnist-cloud down {name}` and launch again")
        aws.call("ec2", "delete_key_pair", KeyName=ours)  # ours, unused, and useless without its private half
    material = aws.call("ec2", "create_key_pair", KeyName=ours, KeyType="ed25519", KeyFormat="pem",
                        TagSpecifications=tags)["KeyMaterial"]
    write_private_key(path, material)
    log(f"key pair {ours}: created; private key {path} (mode 600)")
    return KeyInfo(ours, path, created=True)


# ---------------------------------------------------------------------------------- launch
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
    user_data: str | None = None  # e.g. the autostop watchdog installer
    wait_status_checks: bool = True
    nodes: int = 1  # K > 1: a cluster of K instances in one placement group

    @property
    def autostop(self):
        from infra.watchdog import AutostopConfig

        return AutostopConfig(idle_minutes=self.autostop_minutes,
                              action="stop" if self.spot else self.autostop_action,  # see _shutdown_behavior
                              after_train=self.autostop_after_train,
                              enabled=bool(self.autostop_minutes or self.autostop_after_train))


def _record(state: State, inst: Instance, key: KeyInfo, region: str, user: str = DEFAULT_USER) -> None:
    state.put(Host(name=inst.name, kind="ec2", host=inst.public_ip, user=user, key_path=str(key.private_key),
                   instance_id=inst.instance_id, region=region, key_name=key.key_name, created_key=key.created))


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
        f"{info.gpus or 'no GPU (training runs on its CPU)'}, "
        f"{f'${price:.3f}/h on demand' if price is not None else 'price unknown (add it to prices.json)'}")
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
    nodes = [_wait_up(aws, spec, inst.instance_id, key, log, state, None, record=(i == 0))
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
    # on-demand fallback stops too, as the autostop tag (written before the launch) says.
    return spec.autostop.action


def _run_with_fallback(aws: Aws, spec: LaunchSpec, params: dict, vpc: str, log: Log, pin: str | None = None) -> dict:
    """run_instances: spot in each AZ in turn, then on demand (saying so); capacity errors only.
    `pin`: the only subnet to use (a cluster's later nodes)."""
    subnets = [s for s in describe_default_subnets(aws, vpc) if pin in (None, s["SubnetId"])]
    zones = [(s["AvailabilityZone"], s["SubnetId"]) for s in subnets]
    private = {s["SubnetId"] for s in subnets if not s.get("MapPublicIpOnLaunch", True)}
    # EC2 picks the zone when no subnet is named; not when pinned, nor when a subnet gives no public address
    anywhere = not zones or not (pin or private)
    plans: list[tuple[bool, str | None, str | None]] = []
    if spec.spot:
        plans += [(True, zone, subnet) for zone, subnet in zones] or [(True, None, None)]
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
    raise UserError(f"no capacity for {spec.instance_type} in {aws.region} ({last_error.code}); "
                    "try another instance type or --region")


def _wait_up(aws: Aws, spec: LaunchSpec, instance_id: str, key: KeyInfo, log: Log, state: State,
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
    return _wait_up(aws, spec, inst.instance_id, key, log, state, wait_ready, record=node == "0")


# ---------------------------------------------------------------------------------- lifecycle
def alive_instances(aws: Aws, name: str) -> list[Instance]:
    """Every live instance of a name, node 0 first."""
    alive = [i for i in find_instances(aws, check_name(name)) if i.state != "shutting-down"]
    if not alive:
        raise UserError(f"no instance named {name!r} in {aws.region}; see `mnist-cloud ls`")
    return sorted(alive, key=lambda i: int(i.tags.get(TAG_NODE, "0")))


def only_instance(aws: Aws, name: str) -> Instance:
    return alive_instances(aws, name)[0]


def stop(aws: Aws, name: str, log: Log = print) -> Instance:
    """Stop every instance of a name. EC2 stops a spot instance only if a persistent request launched
    it (as `launch --spot` does); its request is then disabled until `start`."""
    insts = alive_instances(aws, name)
    spot = [i.instance_id for i in insts if i.lifecycle == "spot"]
    if any(r.get("InstanceId") in spot and r.get("Type") == "one-time" for r in spot_requests(aws, name, spot)):
        raise UserError(f"{name} is a one-time spot instance (launched by an older mnist-cloud), which cannot be "
                        f"stopped; `mnist-cloud down {name}`")
    running = [i.instance_id for i in insts if i.state not in ("stopped", "stopping")]
    if running:
        aws.call("ec2", "stop_instances", InstanceIds=running)
        log(f"stopping {name} ({', '.join(running)}); waiting")
    else:
        log(f"{name} ({', '.join(i.instance_id for i in insts)}) is already stopped")
    ids = [i.instance_id for i in insts]
    wait_for_state(aws, ids, "stopped", f"{name} to stop")
    return describe_instance(aws, ids[0])


def start(aws: Aws, name: str, ssh_cidr: str | None = None, log: Log = print, state: State | None = None,
          wait_ready=None) -> Instance:
    state = state or State()
    insts = alive_instances(aws, name)
    cidr = normalize_cidr(ssh_cidr) if ssh_cidr else detect_public_ip()
    ensure_security_group(aws, name, caller_identity(aws), default_vpc(aws), cidr, log, cluster=len(insts) > 1)
    stopping = [i.instance_id for i in insts if i.state == "stopping"]
    if stopping:
        wait_for_state(aws, stopping, "stopped", f"{name} to stop")
    stopped = [i.instance_id for i in insts if i.state in ("stopped", "stopping")]
    interrupted = spot_interruptions(aws, [i for i in insts if i.instance_id in stopped])
    if interrupted:  # EC2 refuses StartInstances for these
        raise UserError(f"{name} was stopped by a spot interruption ({', '.join(sorted(set(interrupted.values())))}); "
                        f"only EC2 can start it, when capacity returns, and its runs then resume by themselves. "
                        f"`mnist-cloud status {name}` shows it")
    if stopped:
        aws.call("ec2", "start_instances", InstanceIds=stopped)
        log(f"starting {name} ({', '.join(stopped)}); waiting")
    else:
        log(f"{name} is already {insts[0].state}")
    host = state.get(name)
    key = KeyInfo(host.key_name or "", Path(host.key_path), host.created_key) if host and host.key_path else \
        KeyInfo(insts[0].key_name or "", keys_dir() / f"{insts[0].key_name}.pem", False)
    spec = LaunchSpec(name=name, instance_type=insts[0].instance_type)
    nodes = [_wait_up(aws, spec, inst.instance_id, key, log, state, wait_ready, record=(n == 0))
             for n, inst in enumerate(insts)]
    return nodes[0]


# ---------------------------------------------------------------------------------- spot requests
SPOT_OPEN_STATES = ["open", "active", "disabled"]  # not yet cancelled, closed or failed
# StateReason of an instance EC2 stopped for a spot interruption (Server.SpotInstanceTermination is the
# terminate behaviour's, which `launch --spot` no longer uses)
SPOT_STOP_REASON = "Server.SpotInstanceShutdown"


def spot_requests(aws: Aws, name: str, instance_ids: list[str]) -> list[dict]:
    """The name's spot requests that are still open, active or disabled: by their tag, and by their
    instance (a request launched by an older mnist-cloud carries no tag)."""
    found = {}
    filters = [{"Name": f"tag:{TAG_NAME}", "Values": [name]}]
    if instance_ids:
        filters.append({"Name": "instance-id", "Values": instance_ids})
    for f in filters:
        for r in aws.paginate("ec2", "describe_spot_instance_requests", "SpotInstanceRequests",
                              Filters=[f, {"Name": "state", "Values": SPOT_OPEN_STATES}]):
            found[r["SpotInstanceRequestId"]] = r
    return list(found.values())


def cancel_spot_requests(aws: Aws, name: str, instance_ids: list[str], log: Log) -> list[str]:
    """Cancel the name's spot requests. A persistent request outlives its instance: left alone, it
    launches a new one after `down` terminates this one, and that one bills."""
    ids = [r["SpotInstanceRequestId"] for r in spot_requests(aws, name, instance_ids)]
    if ids:
        aws.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=ids)
        log(f"cancelled spot request(s) {', '.join(ids)}")
    return ids


def spot_interruptions(aws: Aws, insts: list[Instance]) -> dict[str, str]:
    """{instance id: why} for the spot instances EC2 has stopped for an interruption, or is about to.

    The spot request's status code says it (instance-stopped-by-price, instance-stopped-no-capacity,
    marked-for-stop; not instance-stopped-by-user), else the instance's StateReason."""
    spot = [i for i in insts if i.lifecycle == "spot" and i.state != "terminated"]
    if not spot:
        return {}
    why = {}
    requests = aws.paginate("ec2", "describe_spot_instance_requests", "SpotInstanceRequests",
                            Filters=[{"Name": "instance-id", "Values": [i.instance_id for i in spot]}])
    for r in requests:
        code = r.get("Status", {}).get("Code", "")
        if code.startswith("marked-for-stop") or (code.startswith("instance-stopped-")
                                                  and code != "instance-stopped-by-user"):
            why[r["InstanceId"]] = code
    stopped = [i.instance_id for i in spot if i.state in ("stopping", "stopped") and i.instance_id not in why]
    if stopped:
        for reservation in aws.paginate("ec2", "describe_instances", "Reservations", InstanceIds=stopped):
            for desc in reservation["Instances"]:
                if desc.get("StateReason", {}).get("Code") == SPOT_STOP_REASON:
                    why[desc["InstanceId"]] = SPOT_STOP_REASON
    return why


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


# ---------------------------------------------------------------------------------- adoption
def attach_instance(aws: Aws, instance_id: str, name: str, user: str, key_path: str | None, log: Log = print,
                    state: State | None = None) -> Instance:
    """Adopt an existing instance: tag it with the name, record its address, user and key."""
    check_name(name)
    state = state or State()
    inst = describe_instance(aws, instance_id)
    if inst.state in ("terminated", "shutting-down"):
        raise UserError(f"{instance_id} is {inst.state}")
    other = [i for i in find_instances(aws, name) if i.instance_id != instance_id]
    if other:
        raise UserError(f"name {name!r} is already used by {other[0].instance_id}; pick another --name")
    if key_path:
        key = check_key_file(Path(key_path))
    else:
        candidates = [keys_dir() / f"{inst.key_name}.pem", Path.home() / ".ssh" / f"{inst.key_name}.pem"]
        found = next((p for p in candidates if inst.key_name and p.is_file()), None)
        if found is None:
            raise UserError(f"{instance_id} uses key pair {inst.key_name!r}; pass --key PATH to its private key")
        key = check_key_file(found)
    aws.call("ec2", "create_tags", Resources=[instance_id], Tags=[{"Key": TAG_NAME, "Value": name}])
    inst = describe_instance(aws, instance_id)
    state.put(Host(name=name, kind="ec2", host=inst.public_ip, user=user, key_path=str(key),
                   instance_id=instance_id, region=aws.region, key_name=inst.key_name, created_key=False,
                   extra={"attached": True}))
    log(f"attached {instance_id} as {name!r}: {user}@{inst.public_ip or '(no public IP yet)'} with key {key}")
    return inst


def parse_ssh_target(target: str) -> tuple[str, str, int]:
    """USER@HOST[:PORT] -> (user, host, port)."""
    m = re.match(r"^(?P<user>[^@\s]+)@(?P<host>\[[^\]]+\]|[^:\s]+)(?::(?P<port>\d+))?$", target or "")
    if not m:
        raise UserError(f"--host {target!r}: expected USER@HOST or USER@HOST:PORT")
    port = int(m.group("port") or 22)
    if not 0 < port < 65536:
        raise UserError(f"--host {target!r}: port must be 1-65535")
    return m.group("user"), m.group("host").strip("[]"), port


def attach_host(target: str, name: str, key_path: str, log: Log = print, state: State | None = None,
                verify: Callable[[Host], None] | None = None) -> Host:
    """Adopt any SSH machine (a lab box, another cloud) under a name. `verify` (e.g. a test login)
    runs before anything is recorded."""
    check_name(name)
    state = state or State()
    user, host, port = parse_ssh_target(target)
    key = check_key_file(Path(key_path))
    existing = state.get(name)
    if existing and existing.kind == "ec2":
        raise UserError(f"name {name!r} already names EC2 instance {existing.instance_id}; pick another --name")
    record = Host(name=name, kind="ssh", host=host, user=user, port=port, key_path=str(key))
    if verify is not None:
        verify(record)
    state.put(record)
    log(f"attached {user}@{host}:{port} as {name!r} with key {key}")
    return record


FINGERPRINT_WAIT = 180.0  # cloud-init prints the host keys late in the first boot


def console_fingerprints(aws: Aws, instance_id: str, timeout: float = FINGERPRINT_WAIT, delay: float = 10,
                         log: Log = print) -> list[str]:
    """SSH host key fingerprints the instance printed to its console at first boot (cloud-init).

    Polls the console output until the fingerprint block appears (up to `timeout` s); used to check the very
    first SSH connection. Empty, after saying so, when there is none: the first connection is then trust on
    first use."""
    def check():
        output = aws.call("ec2", "get_console_output", InstanceId=instance_id, Latest=True).get("Output") or ""
        block = re.search(r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----",
                          output, re.DOTALL)
        return re.findall(r"SHA256:[A-Za-z0-9+/]+", block.group(1)) if block else None

    try:
        return aws.wait(f"{instance_id}'s host key fingerprints", check, timeout=timeout, delay=delay)
    except CloudError as e:
        why = f"no host key fingerprints on {instance_id}'s console after {timeout:.0f} s" \
            if e.code == "WaitTimeout" else f"cannot read {instance_id}'s console ({e.code})"
        log(f"note: {why}; trusting the host key on first use and pinning it from then on")
        return []


def autostop_for(inst: Instance, config):
    """The autostop setting as EC2 will carry it out on this instance: a spot instance stops (see
    _shutdown_behavior: terminating it would make its persistent request launch a new one)."""
    return dataclasses.replace(config, action="stop") if inst.lifecycle == "spot" else config


def set_autostop(aws: Aws, name: str, config, log: Log = print) -> Instance:
    """Record the autostop setting on the instance (tag) and make EC2's shutdown behaviour match it."""
    inst = only_instance(aws, name)
    if autostop_for(inst, config) != config:
        log(f"note: autostop on spot instance {name} stops it; `mnist-cloud down {name}` deletes it")
        config = autostop_for(inst, config)
    aws.call("ec2", "modify_instance_attribute", InstanceId=inst.instance_id,
             Attribute="instanceInitiatedShutdownBehavior", Value=config.action)
    aws.call("ec2", "create_tags", Resources=[inst.instance_id], Tags=[{"Key": TAG_AUTOSTOP, "Value": config.tag}])
    return describe_instance(aws, inst.instance_id)


# ---- down's owner filter (teardown)
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
