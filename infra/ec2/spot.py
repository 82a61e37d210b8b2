"""A name's spot requests: find them, cancel them, and tell an interruption from a user's stop."""

from __future__ import annotations

from infra.aws import Aws
from infra.ec2.instances import Instance
from infra.ec2.tags import TAG_NAME, Log

SPOT_OPEN_STATES = ["open", "active", "disabled"]  # not yet cancelled, closed or failed
# StateReason of an instance EC2 stopped for a spot interruption (Server.SpotInstanceTermination is the
# terminate behaviour's, which `launch --spot` no longer uses)
SPOT_STOP_REASON = "Server.SpotInstanceShutdown"


def spot_requests(aws: Aws, name: str, instance_ids: list[str]) -> list[dict]:
    """The name's spot requests that are still open, active or disabled: by their tag, and by their
    instance (a request launched by an older mnist-cloud carries no tag)."""
    found = {}
    filters = [{"Name": f"tag:{TAG_NAME}", "Values": [name]}]
    if instance_ids:
        filters.append({"Name": "instance-id", "Values": instance_ids})
    for f in filters:
        for r in aws.paginate("ec2", "describe_spot_instance_requests", "SpotInstanceRequests",
                              Filters=[f, {"Name": "state", "Values": SPOT_OPEN_STATES}]):
            found[r["SpotInstanceRequestId"]] = r
    return list(found.values())


def cancel_spot_requests(aws: Aws, name: str, instance_ids: list[str], log: Log) -> list[str]:
    """Cancel the name's spot requests. A persistent request outlives its instance: left alone, it
    launches a new one after `down` terminates this one, and that one bills."""
    ids = [r["SpotInstanceRequestId"] for r in spot_requests(aws, name, instance_ids)]
    if ids:
        aws.call("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=ids)
        log(f"cancelled spot request(s) {', '.join(ids)}")
    return ids


def spot_interruptions(aws: Aws, insts: list[Instance]) -> dict[str, str]:
    """{instance id: why} for the spot instances EC2 has stopped for an interruption, or is about to.

    The spot request's status code says it (instance-stopped-by-price, instance-stopped-no-capacity,
    marked-for-stop; not instance-stopped-by-user), else the instance's StateReason."""
    spot = [i for i in insts if i.lifecycle == "spot" and i.state != "terminated"]
    if not spot:
        return {}
    why = {}
    requests = aws.paginate("ec2", "describe_spot_instance_requests", "SpotInstanceRequests",
                            Filters=[{"Name": "instance-id", "Values": [i.instance_id for i in spot]}])
    for r in requests:
        code = r.get("Status", {}).get("Code", "")
        if code.startswith("marked-for-stop") or (code.startswith("instance-stopped-")
                                                  and code != "instance-stopped-by-user"):
            why[r["InstanceId"]] = code
    stopped = [i.instance_id for i in spot if i.state in ("stopping", "stopped") and i.instance_id not in why]
    if stopped:
        for reservation in aws.paginate("ec2", "describe_instances", "Reservations", InstanceIds=stopped):
            for desc in reservation["Instances"]:
                if desc.get("StateReason", {}).get("Code") == SPOT_STOP_REASON:
                    why[desc["InstanceId"]] = SPOT_STOP_REASON
    return why
