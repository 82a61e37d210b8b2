"""Where an instance sits on the network: the caller's CIDR, the default VPC and its subnets, the name's
security group and cluster placement group."""

from __future__ import annotations

import ipaddress
import os
import urllib.request

from infra.aws import Aws, CloudError
from infra.ec2.tags import Log, resource_prefix, tag_list
from infra.errors import UserError

IP_SERVICE = "https://checkip.amazonaws.com"


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
