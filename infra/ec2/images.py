"""Which image an instance boots: the newest PyTorch Deep Learning AMI, the families it no longer
supports, and an AMI's root snapshot size."""

from __future__ import annotations

import re

from infra.aws import Aws, CloudError
from infra.ec2.tags import Log
from infra.errors import UserError

DLAMI_SSM_ROOT = "/aws/service/deeplearning/ami"
DLAMI_NAME_PATTERNS = {  # describe-images fallback, by architecture
    "x86_64": "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu *)*",
    "arm64": "Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch * (Ubuntu *)*",
}
# Families the PyTorch DLAMIs no longer support: the release notes of every PyTorch 2.6 to 2.11 DLAMI list
# "supported_ec2_instances: G4dn, G5, G6, Gr6, G6e, P4, P4de, P5, P5e, P5en, P6-B200" (ARM64: G5g, P6e-GB200),
# with no P2/P3 (K80, V100) or G3 (M60); the CUDA 13 builds dropped those GPUs.
DLAMI_UNSUPPORTED = {"p2": "K80", "p3": "V100", "p3dn": "V100", "g3": "M60", "g3s": "M60"}


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
