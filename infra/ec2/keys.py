"""The keys of SSH to an instance: its EC2 key pair with the private key file, and the host key
fingerprints it printed to its console at first boot."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from infra.aws import Aws, CloudError
from infra.ec2.tags import Log, resource_prefix, tag_list
from infra.errors import UserError
from infra.state import check_key_file, keys_dir, write_private_key


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
