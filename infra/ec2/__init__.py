"""EC2, one room per question: which instances a name has (instances), what a type is (instance_types),
which image it boots (images), what it costs (prices), where it sits on the network (network), the keys of
SSH to it (keys), who owns it (owners), launching (launching), spot requests (spot), stopping and starting
(lifecycle), `down` (teardown), adopting an instance (adopt), autostop's EC2 side (autostop), and what marks a
resource as ours (tags).

The verbs and records the rest of mnist-cloud uses are importable from here: `from infra.ec2 import launch`.
All AWS calls go through infra.aws. The launch room is named `launching` so that `infra.ec2.launch` is always
the verb, never a module that an attribute lookup could mistake for it.
"""

from infra.ec2.adopt import attach_instance
from infra.ec2.autostop import autostop_for, set_autostop, set_budget
from infra.ec2.images import resolve_dlami
from infra.ec2.instances import Instance, describe_instance, find_instances
from infra.ec2.keys import console_fingerprints
from infra.ec2.launching import LaunchSpec, NoCapacity, launch
from infra.ec2.lifecycle import start, stop
from infra.ec2.network import default_subnets, default_vpc, ensure_security_group, find_security_group
from infra.ec2.owners import caller_identity, others_instances, owner_key, owner_label, same_owner
from infra.ec2.prices import machine_price, machine_prices, pricing_session
from infra.ec2.spot import spot_interruptions
from infra.ec2.tags import TAG_OWNER
from infra.ec2.teardown import (GROUP_RELEASE_WAIT, PLACEMENT_RELEASE_WAIT, DownIncomplete, DownReport, down, down_all,
                                 instances_to_terminate)

__all__ = [
    "GROUP_RELEASE_WAIT", "PLACEMENT_RELEASE_WAIT", "TAG_OWNER",
    "DownIncomplete", "DownReport", "Instance", "LaunchSpec", "NoCapacity",
    "attach_instance", "autostop_for", "caller_identity", "console_fingerprints", "default_subnets", "default_vpc",
    "describe_instance", "down", "down_all", "instances_to_terminate", "ensure_security_group", "find_instances", "find_security_group",
    "launch", "machine_price", "machine_prices", "others_instances", "owner_key", "owner_label", "pricing_session",
    "resolve_dlami", "same_owner", "set_autostop", "set_budget",
    "spot_interruptions", "start", "stop",
]
