"""Stop and start a name's instances; their disks stay (launch makes them, teardown ends them)."""

from __future__ import annotations

from pathlib import Path

from infra.aws import Aws
from infra.ec2.autostop import refuse_over_budget
from infra.ec2.instances import Instance, alive_instances, describe_instance, wait_for_state
from infra.ec2.keys import KeyInfo
from infra.ec2.launching import LaunchSpec, wait_up
from infra.ec2.network import default_vpc, detect_public_ip, ensure_security_group, normalize_cidr
from infra.ec2.owners import caller_identity
from infra.ec2.spot import spot_interruptions, spot_requests
from infra.ec2.tags import Log
from infra.errors import UserError
from infra.state import State, keys_dir


def stop(aws: Aws, name: str, log: Log = print) -> Instance:
    """Stop every instance of a name. EC2 stops a spot instance only if a persistent request launched
    it (as `launch --spot` does); its request is then disabled until `start`."""
    insts = alive_instances(aws, name)
    spot = [i.instance_id for i in insts if i.lifecycle == "spot"]
    if any(r.get("InstanceId") in spot and r.get("Type") == "one-time" for r in spot_requests(aws, name, spot)):
        raise UserError(f"{name} is a one-time spot instance (launched by an older mnist-cloud), which cannot be "
                        f"stopped; `mnist-cloud down {name}`")
    running = [i.instance_id for i in insts if i.state not in ("stopped", "stopping")]
    if running:
        aws.call("ec2", "stop_instances", InstanceIds=running)
        log(f"stopping {name} ({', '.join(running)}); waiting")
    else:
        log(f"{name} ({', '.join(i.instance_id for i in insts)}) is already stopped")
    ids = [i.instance_id for i in insts]
    wait_for_state(aws, ids, "stopped", f"{name} to stop")
    return describe_instance(aws, ids[0])


def start(aws: Aws, name: str, ssh_cidr: str | None = None, log: Log = print, state: State | None = None,
          wait_ready=None) -> Instance:
    state = state or State()
    insts = alive_instances(aws, name)
    cidr = normalize_cidr(ssh_cidr) if ssh_cidr else detect_public_ip()
    ensure_security_group(aws, name, caller_identity(aws), default_vpc(aws), cidr, log, cluster=len(insts) > 1)
    stopping = [i.instance_id for i in insts if i.state == "stopping"]
    if stopping:
        wait_for_state(aws, stopping, "stopped", f"{name} to stop")
    stopped = [i.instance_id for i in insts if i.state in ("stopped", "stopping")]
    interrupted = spot_interruptions(aws, [i for i in insts if i.instance_id in stopped])
    if interrupted:  # EC2 refuses StartInstances for these
        raise UserError(f"{name} was stopped by a spot interruption ({', '.join(sorted(set(interrupted.values())))}); "
                        f"only EC2 can start it, when capacity returns, and its runs then resume by themselves. "
                        f"`mnist-cloud status {name}` shows it")
    refuse_over_budget(aws, name, [i for i in insts if i.instance_id in stopped])
    if stopped:
        aws.call("ec2", "start_instances", InstanceIds=stopped)
        log(f"starting {name} ({', '.join(stopped)}); waiting")
    else:
        log(f"{name} is already {insts[0].state}")
    host = state.get(name)
    key = KeyInfo(host.key_name or "", Path(host.key_path), host.created_key) if host and host.key_path else \
        KeyInfo(insts[0].key_name or "", keys_dir() / f"{insts[0].key_name}.pem", False)
    spec = LaunchSpec(name=name, instance_type=insts[0].instance_type)
    nodes = [wait_up(aws, spec, inst.instance_id, key, log, state, wait_ready, record=(n == 0))
             for n, inst in enumerate(insts)]
    return nodes[0]
