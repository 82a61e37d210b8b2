"""What an instance type is (its architecture, vCPUs and GPUs, from describe_instance_types), the smallest
type with a given GPU, where a type is offered (describe_instance_type_offerings), and which regions the
account has enabled."""

from __future__ import annotations

from dataclasses import dataclass

from infra.aws import Aws, CloudError
from infra.errors import UserError


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


def vcpus_of(aws: Aws, instance_types: list[str]) -> dict[str, int]:
    """{type: default vCPUs} for the given types."""
    found = aws.paginate("ec2", "describe_instance_types", "InstanceTypes", InstanceTypes=instance_types)
    return {t["InstanceType"]: t.get("VCpuInfo", {}).get("DefaultVCpus", 0) for t in found}


def smallest_with_gpu(aws: Aws, gpu: str) -> str:
    """The smallest instance type whose GPU AWS names `gpu` (GpuInfo: 'T4', 'L4', 'A10G', 'T4g', ...):
    fewest GPUs, then fewest vCPUs, then least memory. Whole GPUs only: a fractional one (g6f: its
    GpuPartitionSize is under 1, and its Count 0) needs a GRID driver that the PyTorch DLAMI lacks."""
    every = aws.paginate("ec2", "describe_instance_types", "InstanceTypes")

    def whole(g: dict) -> bool:
        return g.get("Count", 1) >= 1 and g.get("GpuPartitionSize", 1) >= 1

    with_it = [t for t in every if any(g.get("Name", "").lower() == gpu.lower() and whole(g)
                                       for g in t.get("GpuInfo", {}).get("Gpus", []))]
    if not with_it:
        names = sorted({g.get("Name", "") for t in every for g in t.get("GpuInfo", {}).get("Gpus", [])})
        raise UserError(f"no instance type in {aws.region} has a GPU named {gpu!r}; AWS's names: {', '.join(names)}")

    def size(t: dict) -> tuple:
        gpus = sum(g.get("Count", 1) for g in t["GpuInfo"]["Gpus"])
        return gpus, t.get("VCpuInfo", {}).get("DefaultVCpus", 0), t.get("MemoryInfo", {}).get("SizeInMiB", 0)

    return min(with_it, key=lambda t: (size(t), t["InstanceType"]))["InstanceType"]


def offering_zones(aws: Aws, instance_type: str) -> list[str]:
    """The availability zones of this region that offer the type, sorted."""
    found = aws.paginate("ec2", "describe_instance_type_offerings", "InstanceTypeOfferings",
                         LocationType="availability-zone",
                         Filters=[{"Name": "instance-type", "Values": [instance_type]}])
    return sorted({o["Location"] for o in found})


def enabled_regions(aws: Aws) -> list[str]:
    """Every region enabled for the account (DescribeRegions without AllRegions)."""
    return sorted(r["RegionName"] for r in aws.call("ec2", "describe_regions")["Regions"])
