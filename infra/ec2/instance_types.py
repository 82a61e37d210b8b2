"""What an instance type is: its architecture, vCPUs and GPUs, from describe_instance_types."""

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
