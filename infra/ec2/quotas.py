"""How many vCPUs this account may still run: EC2's vCPU quotas per family group and market (from Service
Quotas), and the vCPUs already running in each group across the whole account (every instance, not only
ours, plus open spot requests for spot)."""

from __future__ import annotations

from dataclasses import dataclass

from infra.aws import Aws, CloudError

# (family group, market) -> the Service Quotas code of its vCPU quota
QUOTA_CODES = {
    ("G and VT", "on-demand"): "L-DB2E81BA", ("P", "on-demand"): "L-417A185B", ("Standard", "on-demand"): "L-1216C47A",
    ("G and VT", "spot"): "L-3819A6DF", ("P", "spot"): "L-7212CCBC", ("Standard", "spot"): "L-34B43A08",
}
QUOTA_NAMES = {
    "L-DB2E81BA": "Running On-Demand G and VT instances", "L-417A185B": "Running On-Demand P instances",
    "L-1216C47A": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
    "L-3819A6DF": "All G and VT Spot Instance Requests", "L-7212CCBC": "All P Spot Instance Requests",
    "L-34B43A08": "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
}
LIVE_STATES = ["pending", "running", "stopping", "shutting-down"]  # what counts against a vCPU quota


def family_group(instance_type: str) -> str:
    """The quota group of an instance type: 'G and VT' (g4dn, g5, g6, vt1, ...), 'P' (p3, p4d, p5, ...),
    else 'Standard'."""
    family = instance_type.split(".")[0].lower()
    if family.startswith(("g", "vt")):
        return "G and VT"
    if family.startswith("p"):
        return "P"
    return "Standard"


def quota_code(instance_type: str, market: str) -> str:
    return QUOTA_CODES[(family_group(instance_type), market)]


@dataclass
class Quota:
    code: str
    vcpus: float
    source: str  # "applied" or "AWS default"


def vcpu_quota(aws: Aws, code: str) -> Quota:
    """The applied value of an EC2 vCPU quota, else AWS's default where none has been applied
    (GetServiceQuota answers NoSuchResourceException then). Raises CloudError (e.g. AccessDeniedException)."""
    try:
        found = aws.call("service-quotas", "get_service_quota", ServiceCode="ec2", QuotaCode=code)
        return Quota(code, float(found["Quota"]["Value"]), "applied")
    except CloudError as e:
        if e.code != "NoSuchResourceException":
            raise
    found = aws.call("service-quotas", "get_aws_default_service_quota", ServiceCode="ec2", QuotaCode=code)
    return Quota(code, float(found["Quota"]["Value"]), "AWS default")


def vcpus_in_use(aws: Aws, group: str, market: str, vcpus_of) -> int:
    """vCPUs running in a family group and market across the whole account in this region, plus the open
    spot requests' for spot. `vcpus_of(types) -> {type: vcpus}` (describe_instance_types)."""
    instances = [i for r in aws.paginate("ec2", "describe_instances", "Reservations",
                                         Filters=[{"Name": "instance-state-name", "Values": LIVE_STATES}])
                 for i in r["Instances"]]
    types = [i["InstanceType"] for i in instances if family_group(i["InstanceType"]) == group
             and (i.get("InstanceLifecycle") == "spot") == (market == "spot")]
    if market == "spot":
        requests = aws.call("ec2", "describe_spot_instance_requests",
                            Filters=[{"Name": "state", "Values": ["open"]}])["SpotInstanceRequests"]
        types += [r["LaunchSpecification"]["InstanceType"] for r in requests
                  if family_group(r.get("LaunchSpecification", {}).get("InstanceType", "")) == group]
    if not types:
        return 0
    per_type = vcpus_of(sorted(set(types)))
    return sum(per_type.get(t, 0) for t in types)


def increase_command(code: str, desired: int, region: str) -> str:
    """The one line that asks AWS for more."""
    return (f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code} "
            f"--desired-value {desired} --region {region}")
