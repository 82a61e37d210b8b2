"""Autostop on EC2's side: the tag that records the setting and the shutdown behaviour that carries it out."""

from __future__ import annotations

import dataclasses

from infra.aws import Aws
from infra.ec2.instances import Instance, describe_instance, only_instance
from infra.ec2.tags import TAG_AUTOSTOP, Log


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
    aws.call("ec2", "modify_instance_attribute", InstanceId=inst.instance_id,
             Attribute="instanceInitiatedShutdownBehavior", Value=config.action)
    aws.call("ec2", "create_tags", Resources=[inst.instance_id], Tags=[{"Key": TAG_AUTOSTOP, "Value": config.tag}])
    return describe_instance(aws, inst.instance_id)
