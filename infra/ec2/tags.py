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
TAG_BUDGET = "mnist-cloud:budget"  # USD the machine may cost from launch on (compute only); "none" or absent: none

Log = Callable[[str], None]


def budget_text(budget: float | None) -> str:
    return "none" if budget is None else f"{budget:g}"


def parse_budget(text: str | None) -> float | None:
    """A budget as the tag or a command line gives it: USD, or "none"/absent for none. Raises ValueError."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    value = float(text.strip().lstrip("$"))
    if not value > 0 or value == float("inf"):
        raise ValueError(text)
    return value


def resource_prefix(name: str) -> str:
    return f"mnist-cloud-{name}"


def tag_list(name: str, owner: str, extra: dict | None = None) -> list[dict]:
    tags = {TAG_NAME: name, TAG_OWNER: owner, "Name": resource_prefix(name), **(extra or {})}
    return [{"Key": k, "Value": v} for k, v in tags.items()]
