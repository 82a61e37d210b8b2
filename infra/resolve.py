"""Name -> machines: the one place where the transport meets EC2.

A name in the state file is either any SSH host (its address is the state's) or EC2 instances (one,
or a cluster's nodes), whose addresses are read live, since they change on every stop/start. For
EC2 the host key is pinned under the instance id, and the first connection checks the key against
the fingerprints the instance printed to its console. infra/targets.py builds SSHTargets from what
this returns and never imports the AWS layer itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra.errors import UserError
from infra.remote import Endpoint, pinned_keys
from infra.state import Host, State


@dataclass
class Shutdown:
    """EC2's InstanceInitiatedShutdownBehavior of one instance, which only the laptop can change."""

    aws: Any
    instance: Any

    @property
    def guarded(self) -> bool:
        """Whether autostop may terminate this instance, so that runs need it to stop instead while they
        are unpulled (a spot instance always stops)."""
        return (self.instance.lifecycle != "spot" and self.instance.autostop.endswith(":terminate")
                and self.instance.budget is None)  # a budget keeps it at stop: the watchdog never terminates

    def set(self, behavior: str) -> None:
        self.aws.call("ec2", "modify_instance_attribute", InstanceId=self.instance.instance_id,
                      Attribute="instanceInitiatedShutdownBehavior", Value=behavior)


@dataclass
class Resolved:
    host: Host
    ep: Endpoint
    expected_fingerprints: list[str] | None = None  # from the console, for a key not pinned yet
    instance_type: str | None = None
    lifecycle: str | None = None  # "spot" or "on-demand" on EC2
    shutdown: Shutdown | None = None  # None: not EC2
    price: Callable[[], Any] | None = None  # asks AWS for the machine's Price (infra/ec2/prices.py); None: not EC2


def known_host(name: str) -> Host:
    state = State()
    host = state.get(name)
    if host is None:
        known = ", ".join(h.name for h in state.all()) or "none yet"
        raise UserError(f"unknown name {name!r} (known: {known}); `mnist-cloud launch --name {name} ...` "
                        f"or `mnist-cloud attach ... --name {name}`")
    return host


def resolve(name: str, region: str | None = None, profile: str | None = None) -> list[Resolved]:
    """Every machine of `name`, node 0 first (one for a single machine); running, with an address."""
    host = known_host(name)
    if host.kind != "ec2":
        return [Resolved(host, Endpoint(name=name, host=host.host, user=host.user, key_path=host.key_path,
                                        port=host.port))]
    from infra.aws import Aws
    from infra.ec2 import console_fingerprints, describe_instance, machine_price, pricing_session

    from infra import settings

    aws = Aws(region=region or host.region, profile=settings.value("profile", profile))
    pricing = pricing_session(aws)  # made here, in the calling thread; asked only when a run starts
    out = []
    for node, instance_id in enumerate(host.extra.get("nodes") or [host.instance_id]):
        inst = describe_instance(aws, instance_id)
        label = name if node == 0 else f"{name}/node{node}"
        if inst.state in ("terminated", "shutting-down"):
            raise UserError(f"{label}'s instance {instance_id} is {inst.state}; "
                            f"`mnist-cloud down {name}` tidies up, `mnist-cloud launch` makes a new one")
        if inst.state != "running":
            raise UserError(f"{label} ({instance_id}) is {inst.state}; `mnist-cloud start {name}` first")
        if not inst.public_ip:
            raise UserError(f"{label} ({instance_id}) has no public IP address")
        if node == 0 and inst.public_ip != host.host:
            host.host = inst.public_ip
            State().put(host)
        # one look (timeout=0): a machine reached here first was launched with --no-wait-ssh, long booted
        expected = None if pinned_keys(instance_id) else (
            console_fingerprints(aws, instance_id, timeout=0, log=lambda m: None) or None)
        ep = ec2_endpoint(host, label, inst.public_ip, instance_id)
        out.append(Resolved(host, ep, expected, inst.instance_type, inst.lifecycle, Shutdown(aws, inst),
                            price=lambda inst=inst: machine_price(aws, pricing, inst)))
    return out


def ec2_endpoint(host: Host, label: str, address: str, instance_id: str) -> Endpoint:
    """How to reach one EC2 node of `host` (label: NAME or NAME/nodeN) at `address`; its key is pinned
    under the instance id, and every node works in the name's directory."""
    return Endpoint(name=label, host=address, user=host.user, key_path=host.key_path, port=host.port,
                    alias=instance_id, workdir=f"mnist-cloud/{host.name}")


def answered_before(host: Host, addresses: dict[str, str]) -> list[Endpoint] | None:
    """Every node of `host` as an Endpoint, from addresses already read live (instance id -> public IP,
    as `status` has them), without asking AWS; None unless each node is running there and answered
    before (its host key is pinned): a machine never reached may be anyone's address, or hang."""
    if host.kind != "ec2":
        ep = Endpoint(name=host.name, host=host.host, user=host.user, key_path=host.key_path, port=host.port)
        return [ep] if pinned_keys(ep.alias) else None
    out = []
    for node, instance_id in enumerate(host.extra.get("nodes") or [host.instance_id]):
        if not addresses.get(instance_id) or not pinned_keys(instance_id):
            return None
        out.append(ec2_endpoint(host, host.name if node == 0 else f"{host.name}/node{node}",
                                addresses[instance_id], instance_id))
    return out
