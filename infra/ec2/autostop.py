"""Autostop and the budget on EC2's side: the tags that record them and the shutdown behaviour that carries
them out (stop, always, while a machine has a budget: its watchdog stops it there, and must never terminate it)."""

from __future__ import annotations

import dataclasses
import re

from infra.aws import Aws, CloudError
from infra.ec2.instances import Instance, alive_instances, describe_instance, only_instance
from infra.ec2.tags import TAG_AUTOSTOP, TAG_BUDGET, Log, budget_text
from infra.errors import UserError


def autostop_for(inst: Instance, config):
    """The autostop setting as EC2 will carry it out on this instance: a spot instance stops (see
    launching._shutdown_behavior: terminating it would make its persistent request launch a new one)."""
    return dataclasses.replace(config, action="stop") if inst.lifecycle == "spot" else config


def set_autostop(aws: Aws, name: str, config, log: Log = print) -> Instance:
    """Record the autostop setting on the instance (tag) and make EC2's shutdown behaviour match it."""
    inst = only_instance(aws, name)
    if autostop_for(inst, config) != config:
        log(f"note: autostop on spot instance {name} stops it; `mnist-cloud down {name}` deletes it")
        config = autostop_for(inst, config)
    if inst.budget is not None and config.action == "terminate":
        log(f"note: {name} has a ${inst.budget:g} budget, so it stops rather than terminates; "
            f"`mnist-cloud budget {name} none` removes it")
        config = dataclasses.replace(config, shutdown_behavior="stop")
    aws.call("ec2", "modify_instance_attribute", InstanceId=inst.instance_id,
             Attribute="instanceInitiatedShutdownBehavior", Value=config.shutdown_behavior or config.action)
    aws.call("ec2", "create_tags", Resources=[inst.instance_id], Tags=[{"Key": TAG_AUTOSTOP, "Value": config.tag}])
    return describe_instance(aws, inst.instance_id)


# what the watchdog writes to the serial console when it stops the machine for its budget (infra/agent/autostop.py)
BUDGET_STOP_LINE = re.compile(r"mnist-cloud budget: stopped: spent \$([0-9.]+) of the \$([0-9.]+) budget")


def budget_stop(aws: Aws, inst: Instance) -> float | None:
    """What a stopped instance had cost when its watchdog stopped it for its budget, from the console output
    EC2 kept of its last boot; None when it was not (or the console cannot be read)."""
    if inst.state not in ("stopped", "stopping"):
        return None
    try:
        output = aws.call("ec2", "get_console_output", InstanceId=inst.instance_id).get("Output") or ""
    except CloudError:
        return None
    found = BUDGET_STOP_LINE.findall(output)
    return float(found[-1][0]) if found else None


def refuse_over_budget(aws: Aws, name: str, insts: list[Instance]) -> None:
    """`start` of a machine its budget stopped: only once the budget is above what it cost (or removed)."""
    for inst in insts:
        spent = budget_stop(aws, inst)
        if spent is not None and inst.budget is not None and inst.budget <= spent:
            raise UserError(f"{name} was stopped by its budget (it had cost ${spent:.2f} of ${inst.budget:g}); "
                            f"raise it first: `mnist-cloud budget {name} USD` (or none), then start it")


def set_budget(aws: Aws, name: str, budget: float | None) -> list[Instance]:
    """Record the budget on every instance of the name (the tag, readable while it is stopped); with one, EC2
    stops the instance on its own shutdown. Removing it leaves the behaviour as it is (stop: the safe one)."""
    insts = alive_instances(aws, name)
    ids = [i.instance_id for i in insts]
    # "none" rather than no tag: no ec2:DeleteTags to ask for (docs/cloud.md's policy)
    aws.call("ec2", "create_tags", Resources=ids, Tags=[{"Key": TAG_BUDGET, "Value": budget_text(budget)}])
    if budget is not None:
        for i in ids:
            aws.call("ec2", "modify_instance_attribute", InstanceId=i,
                     Attribute="instanceInitiatedShutdownBehavior", Value="stop")
    return [describe_instance(aws, i) for i in ids]
