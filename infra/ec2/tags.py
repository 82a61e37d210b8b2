"""What marks an EC2 resource as mnist-cloud's: the tag keys, the name prefix, the tag list every create call
carries, and the log callback the EC2 verbs report through.

Every resource the EC2 rooms create carries the tags `mnist-cloud:name` and `mnist-cloud:owner`, set at
creation (TagSpecifications), so an interrupted launch never leaves something untagged and `down` can
always find what a name owns.
"""

from __future__ import annotations

from typing import Callable

TAG_NAME = "mnist-cloud:name"
TAG_OWNER = "mnist-cloud:owner"
TAG_AUTOSTOP = "mnist-cloud:autostop"
TAG_NODE = "mnist-cloud:node"

Log = Callable[[str], None]


def resource_prefix(name: str) -> str:
    return f"mnist-cloud-{name}"


def tag_list(name: str, owner: str, extra: dict | None = None) -> list[dict]:
    tags = {TAG_NAME: name, TAG_OWNER: owner, "Name": resource_prefix(name), **(extra or {})}
    return [{"Key": k, "Value": v} for k, v in tags.items()]
