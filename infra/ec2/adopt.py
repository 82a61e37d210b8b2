"""Adopt an instance mnist-cloud did not launch: tag it with a name and record how to reach it."""

from __future__ import annotations

from pathlib import Path

from infra.aws import Aws
from infra.ec2.instances import Instance, describe_instance, find_instances
from infra.ec2.tags import TAG_NAME, Log
from infra.errors import UserError
from infra.hosts import check_name
from infra.state import Host, State, check_key_file, keys_dir


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
