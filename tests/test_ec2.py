"""infra.ec2 under moto.mock_aws: our functions, asserting on what EC2 then holds."""

from __future__ import annotations

import stat

import pytest
from botocore.exceptions import ClientError

from fixtures.aws import DLAMI_ID, REGION, aws_env, seed_dlami
from infra import ec2 as P
from infra import hosts
from infra.aws import Aws, CloudError, explain
from infra.ec2 import launching
from infra.errors import UserError
from infra.state import State

CIDR = "203.0.113.7/32"


@pytest.fixture
def ec2(aws):
    return aws.client("ec2")


def launch(aws, name="exp", logs=None, **kw):
    spec = P.LaunchSpec(name=name, instance_type=kw.pop("instance_type", "g4dn.xlarge"), ssh_cidr=kw.pop("ssh_cidr", CIDR),
                        **kw)
    return P.launch(aws, spec, log=(logs.append if logs is not None else lambda m: None))


# ---------------------------------------------------------------------------------- AMI
def test_resolve_dlami_takes_highest_pytorch_on_ubuntu(aws):
    ami, why = P.resolve_dlami(aws)
    assert ami == DLAMI_ID and "pytorch-2.12-ubuntu-24.04" in why


def test_resolve_dlami_falls_back_to_image_search(tmp_path, monkeypatch):
    from moto import mock_aws

    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        seed_dlami(ssm=False)
        ami, why = P.resolve_dlami(Aws())
    assert ami == DLAMI_ID and "SSM had none" in why


def test_no_dlami_at_all_says_pass_ami(tmp_path, monkeypatch):
    from moto import mock_aws

    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        with pytest.raises(UserError, match="pass --ami"):
            P.resolve_dlami(Aws())


# ---------------------------------------------------------------------------------- launch
def test_launch_is_locked_down(aws, ec2, tmp_path):
    logs = []
    inst = launch(aws, logs=logs, disk_gb=60)
    desc = ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    assert desc["ImageId"] == DLAMI_ID and desc["State"]["Name"] == "running"
    # IMDSv2 only, hop limit 2
    assert desc["MetadataOptions"]["HttpTokens"] == "required"
    assert desc["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    # encrypted gp3 root volume of the requested size
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [inst.instance_id]}])["Volumes"]
    assert [(v["Size"], v["VolumeType"], v["Encrypted"]) for v in volumes] == [(60, "gp3", True)]
    # tagged at creation, instance and volume
    tags = {t["Key"]: t["Value"] for t in desc["Tags"]}
    assert tags["mnist-cloud:name"] == "exp" and tags["mnist-cloud:owner"].startswith("arn:aws:")
    assert {t["Key"] for t in volumes[0]["Tags"]} >= {"mnist-cloud:name", "mnist-cloud:owner"}
    # SSH from exactly the caller's /32, nothing else inbound
    group = ec2.describe_security_groups(GroupIds=[desc["SecurityGroups"][0]["GroupId"]])["SecurityGroups"][0]
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
            for p in group["IpPermissions"]] == [("tcp", 22, 22, [CIDR])]
    behaviour = ec2.describe_instance_attribute(InstanceId=inst.instance_id,
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    assert any("AMI " + DLAMI_ID in line and "newest PyTorch DLAMI" in line for line in logs)


def test_key_pair_is_created_and_saved_600_and_never_printed(aws, tmp_path):
    logs = []
    inst = launch(aws, logs=logs)
    host = State().get("exp")
    key = tmp_path / "mnist-cloud-home" / "keys" / "mnist-cloud-exp.pem"
    assert host.key_path == str(key) and host.instance_id == inst.instance_id and host.user == "ubuntu"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    material = key.read_text()
    assert "PRIVATE KEY" in material
    body = material.splitlines()[1]
    assert not any(body in line or "PRIVATE KEY" in line for line in logs)


def test_import_existing_public_key(aws, ec2, tmp_path):
    import subprocess

    private = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    launch(aws, public_key=str(private) + ".pub")
    assert State().get("exp").key_path == str(private)
    pair = ec2.describe_key_pairs(KeyNames=["mnist-cloud-exp"])["KeyPairs"][0]
    assert {t["Key"] for t in pair.get("Tags", [])} >= {"mnist-cloud:name"}


def test_relaunch_reuses_and_starts_a_stopped_instance(aws, ec2):
    first = launch(aws)
    P.stop(aws, "exp", log=lambda m: None)
    logs = []
    second = launch(aws, logs=logs)
    assert second.instance_id == first.instance_id and second.state == "running"
    assert any("already exists" in l for l in logs) and any("starting it" in l for l in logs)
    alive = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] != "terminated"]
    assert len(alive) == 1


def test_relaunch_from_a_new_address_replaces_the_rule(aws, ec2):
    launch(aws)
    launch(aws, ssh_cidr="198.51.100.4/32")
    group = P.find_security_group(aws, "exp")
    assert [[r["CidrIp"] for r in p["IpRanges"]] for p in group["IpPermissions"]] == [["198.51.100.4/32"]]


def test_spot_launch_is_spot_and_stops_on_shutdown(aws, ec2):
    inst = launch(aws, spot=True)
    assert inst.lifecycle == "spot"
    behaviour = ec2.describe_instance_attribute(InstanceId=inst.instance_id,
                                                Attribute="instanceInitiatedShutdownBehavior")
    # a persistent request relaunches a terminated instance: its own shutdown (autostop) must stop it
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"


def test_spot_without_capacity_tries_every_zone_then_says_on_demand(aws, monkeypatch):
    real_call = aws.call
    spot_zones = []

    def no_spot(service, operation, **kwargs):
        if operation == "run_instances" and "InstanceMarketOptions" in kwargs:
            spot_zones.append(kwargs.get("SubnetId"))
            raise CloudError("no capacity", "InsufficientInstanceCapacity")
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", no_spot)
    logs = []
    inst = launch(aws, spot=True, logs=logs)
    assert len(spot_zones) == len(P.default_subnets(aws, P.default_vpc(aws))) > 1
    assert inst.lifecycle == "on-demand"
    assert any("falling back to ON-DEMAND" in l for l in logs)


def test_non_capacity_errors_do_not_fall_back(aws, monkeypatch):
    real_call = aws.call

    def quota(service, operation, **kwargs):
        if operation == "run_instances":
            raise CloudError(explain("VcpuLimitExceeded", "", "run_instances"), "VcpuLimitExceeded")
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", quota)
    with pytest.raises(CloudError, match="vCPU quota"):
        launch(aws, spot=True)


def test_unknown_instance_type(aws):
    with pytest.raises(UserError, match="unknown instance type 'g9.huge'"):
        launch(aws, instance_type="g9.huge")


def test_open_world_cidr_only_when_asked_and_warned(aws):
    logs = []
    launch(aws, ssh_cidr="0.0.0.0/0", logs=logs)
    assert any("WARNING" in l and "0.0.0.0/0" in l for l in logs)


def test_bad_cidr(aws):
    with pytest.raises(UserError, match="is not a CIDR"):
        launch(aws, ssh_cidr="my-laptop")


# ---------------------------------------------------------------------------------- down
def _ours(ec2):
    instances = [i for r in ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": ["mnist-cloud:name"]}])["Reservations"]
                 for i in r["Instances"] if i["State"]["Name"] != "terminated"]
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": ["mnist-cloud:name"]}])["SecurityGroups"]
    pairs = ec2.describe_key_pairs(Filters=[{"Name": "tag-key", "Values": ["mnist-cloud:name"]}])["KeyPairs"]
    volumes = ec2.describe_volumes(Filters=[{"Name": "tag-key", "Values": ["mnist-cloud:name"]}])["Volumes"]
    return instances, groups, pairs, volumes


def test_down_removes_instance_group_key_and_state(aws, ec2, tmp_path):
    launch(aws)
    report = P.down(aws, "exp", log=lambda m: None)
    assert len(report.terminated) == 1 and report.key_pairs == ["mnist-cloud-exp"]
    assert _ours(ec2) == ([], [], [], [])
    assert State().get("exp") is None
    assert not (tmp_path / "mnist-cloud-home" / "keys" / "mnist-cloud-exp.pem").exists()
    again = P.down(aws, "exp", log=lambda m: None)  # a clean no-op
    assert again.terminated == [] and again.security_groups == []


def test_down_all_sweeps_every_name(aws, ec2):
    launch(aws, name="a")
    launch(aws, name="b", spot=True)
    P.ensure_security_group(aws, "orphan", P.caller_identity(aws), P.default_vpc(aws), CIDR, lambda m: None)
    report = P.down_all(aws, log=lambda m: None)
    assert len(report.terminated) == 2
    assert _ours(ec2) == ([], [], [], [])


def test_stop_of_unknown_name(aws):
    with pytest.raises(UserError, match="no instance named 'ghost'"):
        P.stop(aws, "ghost")


# ---------------------------------------------------------------------------------- attach
def test_attach_instance_tags_and_records_it(aws, ec2, tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    key.chmod(0o600)
    pair = ec2.create_key_pair(KeyName="theirs")
    run = ec2.run_instances(ImageId=DLAMI_ID, InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1, KeyName="theirs")
    iid = run["Instances"][0]["InstanceId"]
    P.attach_instance(aws, iid, "lab", "ubuntu", str(key), log=lambda m: None)
    assert [i.instance_id for i in P.find_instances(aws, "lab")] == [iid]
    host = State().get("lab")
    assert host.kind == "ec2" and host.key_path == str(key) and not host.created_key


def test_attach_refuses_open_key_file(aws, tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    key.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        hosts.attach_host("me@127.0.0.1:2222", "box", str(key))


@pytest.mark.parametrize("target,parsed", [("ubuntu@10.0.0.5", ("ubuntu", "10.0.0.5", 22)),
                                           ("me@box.lan:2222", ("me", "box.lan", 2222)),
                                           ("root@[::1]:2200", ("root", "::1", 2200))])
def test_parse_ssh_target(target, parsed):
    assert hosts.parse_ssh_target(target) == parsed


# ---------------------------------------------------------------------------------- the aws layer
def _client_error(code):
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")


def test_botocore_standard_retries_are_configured(aws, monkeypatch):
    # throttling itself is retried by botocore: see test_cloud_faults.py, through the real HTTP path
    retries = aws.client("ec2").meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == 6
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the standard setting wins over our default
    assert Aws().client("ec2").meta.config.retries["total_max_attempts"] == 2


class FakeTime:
    """Aws's clock and sleep: time passes only when Aws sleeps, and a loop that would never end fails the test
    after `limit` sleeps instead of hanging it."""

    def __init__(self, limit: int = 1000):
        self.now, self.sleeps, self.limit = 0.0, [], limit

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert len(self.sleeps) <= self.limit, "the loop did not end"
        self.now += seconds


def assert_one_line(err: Exception) -> None:
    """What the CLI prints for it: a UserError (one line on stderr, exit 2), not a traceback."""
    assert isinstance(err, UserError) and str(err) and "\n" not in str(err), repr(err)


def test_throttling_backs_off_longer_each_time_then_says_so_in_one_line(aws, monkeypatch):
    """Our retries are botocore's standard mode: each wait before a retry is longer than the one before
    (jitter pinned to its maximum), MAX_ATTEMPTS requests in all, then one line. A constant delay fails this."""
    import types

    import botocore.endpoint
    from botocore.retries import standard
    from fixtures.aws import Faults

    from infra.aws import MAX_ATTEMPTS

    real_init = standard.ExponentialBackoff.__init__
    monkeypatch.setattr(standard.ExponentialBackoff, "__init__",
                        lambda self, **kw: real_init(self, **{**kw, "random": lambda: 1.0}))
    sleeps = []
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=sleeps.append))
    faults = Faults()
    faults.install(monkeypatch)
    faults.fail("DescribeInstances", "RequestLimitExceeded", times=100, status=503)
    with pytest.raises(CloudError) as err:
        P.find_instances(Aws(), "exp")  # a client made after the patches
    assert_one_line(err.value)
    assert err.value.code == "RequestLimitExceeded" and "throttled ec2:describe_instances" in str(err.value)
    assert "run the command again" in str(err.value)
    assert len(faults.sent["DescribeInstances"]) == MAX_ATTEMPTS and len(sleeps) == MAX_ATTEMPTS - 1 >= 3, sleeps
    assert all(later > earlier for earlier, later in zip(sleeps, sleeps[1:])), sleeps
    assert sleeps[-1] >= 8 * sleeps[0], sleeps  # exponential, not a creep


def test_a_wait_polls_every_delay_until_its_deadline_then_says_what_it_waited_for(aws):
    """aws.wait is a fixed-interval poll (like botocore's waiters; the backoff is inside each call, above).
    It ends at its deadline, on the injected clock, in one line naming the last transient error."""
    t = FakeTime()
    slow = Aws(sleep=t.sleep, clock=t.clock)
    checks = []

    def throttled():
        checks.append(t.now)
        raise CloudError(explain("Throttling", "", "ec2:describe_instances"), "Throttling", transient=True)

    with pytest.raises(CloudError) as err:
        slow.wait("i-123 to run", throttled, timeout=22, delay=5)
    assert_one_line(err.value)
    assert err.value.code == "WaitTimeout" and str(err.value).startswith("gave up after 22 s waiting for i-123 to run")
    assert "last error: AWS throttled" in str(err.value) and "run the command again" in str(err.value)
    assert t.sleeps == [5, 5, 5, 5, 2] and checks == [0, 5, 10, 15, 20, 22]  # the last sleep stops at the deadline

    denied = FakeTime()
    with pytest.raises(CloudError, match="AWS denied"):  # not transient: no second look
        Aws(sleep=denied.sleep, clock=denied.clock).wait("x", lambda: (_ for _ in ()).throw(
            CloudError(explain("UnauthorizedOperation", "", "ec2:x"), "UnauthorizedOperation")), timeout=60)
    assert denied.sleeps == []


def test_not_found_right_after_a_create_settles_then_the_last_answer_is_the_error(aws, monkeypatch):
    """call(settle=...) asks again for SETTLE_SECONDS, then one last time; that answer's line is the error."""
    from infra.aws import SETTLE_SECONDS

    t = FakeTime()
    slow = Aws(sleep=t.sleep, clock=t.clock)
    tries = []

    def never_visible(**kwargs):
        tries.append(t.now)
        raise _client_error("InvalidGroup.NotFound")

    monkeypatch.setattr(slow.client("ec2"), "authorize_security_group_ingress", never_visible)
    with pytest.raises(CloudError) as err:
        slow.call("ec2", "authorize_security_group_ingress", settle=("InvalidGroup.NotFound",), GroupId="sg-1")
    assert_one_line(err.value)
    assert err.value.code == "InvalidGroup.NotFound" and "authorize_security_group_ingress failed" in str(err.value)
    assert t.now == SETTLE_SECONDS and tries[-2:] == [SETTLE_SECONDS, SETTLE_SECONDS]  # the deadline, then the last try
    assert len(tries) == SETTLE_SECONDS / 2 + 2


def _group_in_use(aws, monkeypatch, times):
    """delete_security_group answers DependencyViolation `times` times (the instance's interface lets go late)."""
    real_call = aws.call
    refused = []

    def in_use(service, operation, **kwargs):
        if operation == "delete_security_group" and len(refused) < times:
            refused.append(kwargs["GroupId"])
            raise CloudError(explain("DependencyViolation", "resource has a dependent object", operation),
                             "DependencyViolation")
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", in_use)
    return refused


def test_down_waits_for_a_security_group_still_in_use(aws, ec2, monkeypatch):
    launch(aws)
    t = FakeTime()
    aws._sleep, aws._clock = t.sleep, t.clock
    refused = _group_in_use(aws, monkeypatch, times=3)
    report = P.down(aws, "exp", log=lambda m: None)
    assert len(refused) == 3 and report.security_groups == refused[:1]
    assert _ours(ec2) == ([], [], [], [])


def test_a_security_group_that_stays_in_use_ends_down_in_one_line(aws, ec2, monkeypatch):
    launch(aws)
    t = FakeTime()
    aws._sleep, aws._clock = t.sleep, t.clock
    refused = _group_in_use(aws, monkeypatch, times=10_000)
    with pytest.raises(CloudError) as err:
        P.down(aws, "exp", log=lambda m: None)
    assert_one_line(err.value)
    assert err.value.code == "WaitTimeout" and f"after {P.GROUP_RELEASE_WAIT:.0f} s" in str(err.value)
    assert f"security group {refused[0]}" in str(err.value) and "run the command again" in str(err.value)
    assert t.now == P.GROUP_RELEASE_WAIT and len(refused) == P.GROUP_RELEASE_WAIT / 5 + 1
    assert _ours(ec2)[0] == [] and len(_ours(ec2)[1]) == 1  # terminated; the group is left for the next `down`


def _cluster_with_placement_group_in_use(aws, monkeypatch, times):
    """A two-node cluster whose placement group EC2 still counts as in use for `times` delete attempts
    after the instances terminated (moto has no placement groups: their answers are forged)."""
    monkeypatch.setattr(launching, "ensure_placement_group", lambda *a, **k: None)
    launch(aws, nodes=2, wait_status_checks=False)
    real_call = aws.call
    refused, deleted = [], []

    def placement(service, operation, **kwargs):
        if operation == "describe_placement_groups":
            return {"PlacementGroups": [] if deleted else [{"GroupName": "mnist-cloud-exp", "Strategy": "cluster"}]}
        if operation == "delete_placement_group":
            if len(refused) < times:
                refused.append(kwargs["GroupName"])
                raise CloudError(explain("InvalidPlacementGroup.InUse", "The placement group is in use", operation),
                                 "InvalidPlacementGroup.InUse")
            deleted.append(kwargs["GroupName"])
            return {}
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", placement)
    t = FakeTime()
    aws._sleep, aws._clock = t.sleep, t.clock
    return refused, deleted, t


def test_down_waits_for_a_placement_group_still_in_use(aws, ec2, monkeypatch):
    refused, deleted, _ = _cluster_with_placement_group_in_use(aws, monkeypatch, times=3)
    report = P.down(aws, "exp", log=lambda m: None)
    assert len(refused) == 3 and deleted == ["mnist-cloud-exp"] == report.placement_groups
    assert _ours(ec2) == ([], [], [], [])


def test_a_placement_group_that_stays_in_use_leaves_nothing_else_behind(aws, ec2, monkeypatch):
    """InUse past the deadline: the security group and key pair are still deleted, and one line says
    what is left and that `down` again finishes it."""
    refused, deleted, t = _cluster_with_placement_group_in_use(aws, monkeypatch, times=10_000)
    with pytest.raises(P.DownIncomplete) as err:
        P.down(aws, "exp", log=lambda m: None)
    assert_one_line(err.value)
    assert "placement group mnist-cloud-exp" in str(err.value) and "run the command again" in str(err.value)
    assert t.now == P.PLACEMENT_RELEASE_WAIT and not deleted
    report = err.value.report
    assert len(report.terminated) == 2 and len(report.security_groups) == 1 and report.key_pairs
    assert _ours(ec2) == ([], [], [], [])  # instances, group, key pair and volumes all gone


def test_other_errors_are_not_retried(aws):
    calls = []

    def denied():
        calls.append(1)
        raise _client_error("UnauthorizedOperation")

    with pytest.raises(CloudError, match="AWS denied ec2:run_instances .*docs/cloud.md#iam-permissions") as err:
        aws.translating(denied, "ec2:run_instances")
    assert len(calls) == 1 and err.value.code == "UnauthorizedOperation"


def test_missing_credentials_region_and_unknown_region(tmp_path, monkeypatch):
    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_REGION", REGION)
    assert Aws(region="mars-1").region == "mars-1"  # no gate on botocore's list: the first call tells
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(UserError, match="no AWS region"):
        Aws()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="no AWS credentials"):
        Aws(region=REGION)


# ---------------------------------------------------------------------------------- real EC2 semantics
@pytest.mark.parametrize("tag,caller,same", [
    ("arn:aws:sts::123456789012:assumed-role/trainer/botocore-session-1",
     "arn:aws:sts::123456789012:assumed-role/trainer/botocore-session-2", True),
    ("arn:aws:sts::123456789012:assumed-role/trainer/botocore-session-1",
     "arn:aws:sts::123456789012:assumed-role/other/botocore-session-1", False),
    ("arn:aws:sts::123456789012:assumed-role/trainer/s", "arn:aws:sts::999999999999:assumed-role/trainer/s", False),
    ("arn:aws:iam::123456789012:user/alice", "arn:aws:iam::123456789012:user/alice", True),
    ("arn:aws:iam::123456789012:user/alice", "arn:aws:iam::123456789012:user/bob", False),
    (None, "arn:aws:iam::123456789012:user/alice", False),
])
def test_owners_compare_without_the_session_name(tag, caller, same):
    assert P.same_owner(tag, caller) is same


def _moto_instances():
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    return [i for r in backend.reservations.values() for i in r.instances]


def test_down_waits_while_an_instance_is_still_stopping(aws, ec2, monkeypatch):
    """EC2 finishes a stop before it terminates; botocore's terminated waiter gave up on `stopping`."""
    from moto.ec2.models.instances import Instance
    from moto.ec2.responses.instances import InstanceResponse

    inst = launch(aws)
    aws._sleep = lambda s: None
    real_terminate, real_describe = Instance.terminate, InstanceResponse.describe_instances
    later, polls = [], []

    def terminate_later(self, *a, **kw):
        self._state.name, self._state.code = "stopping", 64
        later.append(lambda: real_terminate(self, *a, **kw))

    def describe(self):
        polls.append(1)
        if later and len(polls) > 3:
            later.pop()()
        return real_describe(self)

    monkeypatch.setattr(Instance, "terminate", terminate_later)
    monkeypatch.setattr(InstanceResponse, "describe_instances", describe)
    report = P.down(aws, "exp", log=lambda m: None)
    assert report.terminated == [inst.instance_id] and not later
    assert ec2.describe_instances(InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"] == "terminated"


def test_an_instance_that_dies_while_pending_says_why(aws, monkeypatch):
    from moto.ec2.models.instances import StateReason
    from moto.ec2.responses.instances import InstanceResponse

    real_describe = InstanceResponse.describe_instances

    def describe(self):  # EC2 could not create the encrypted root volume
        for i in _moto_instances():
            if i._state.name != "terminated":
                i._state.name, i._state.code = "terminated", 48
                i.state_reason = StateReason("Client.InternalError: Client error on launch", "Client.InternalError")
        return real_describe(self)

    aws._sleep = lambda s: None
    monkeypatch.setattr(InstanceResponse, "describe_instances", describe)
    with pytest.raises(CloudError, match=r"pending to terminated: Client.InternalError: Client error on launch; "
                                         r"a common cause is default EBS encryption with a KMS key"):
        launch(aws, wait_status_checks=False)


def test_disk_smaller_than_the_ami_snapshot_is_one_line(aws, ec2):
    with pytest.raises(UserError, match=r"--disk-gb 10 is smaller than the root snapshot of AMI .* \(15 GB\); "
                                        r"use --disk-gb 15 or more"):
        launch(aws, disk_gb=10)
    assert _ours(ec2)[0] == []


def test_cluster_nodes_launch_in_node_0s_subnet(aws, monkeypatch):
    real_call = aws.call
    tries = []

    def first_zone_full(service, operation, **kwargs):  # node 0 ends up in the second zone
        if operation == "run_instances":
            tries.append(kwargs.get("SubnetId"))
            if len(tries) <= 2:
                raise CloudError("no capacity", "InsufficientInstanceCapacity")
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", first_zone_full)
    monkeypatch.setattr(launching, "ensure_placement_group", lambda *a, **k: None)  # moto has no DescribePlacementGroups
    node0 = launch(aws, nodes=3, wait_status_checks=False)
    subnets = {i.subnet_id for i in P.find_instances(aws, "exp")}
    zones = P.default_subnets(aws, P.default_vpc(aws))
    assert node0.subnet_id == zones[1][1] and subnets == {node0.subnet_id}


def test_a_subnet_without_public_ips_gets_one_on_the_interface(aws, ec2, monkeypatch):
    for _, subnet in P.default_subnets(aws, P.default_vpc(aws)):
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": False})
    real_call = aws.call
    sent = []

    def record(service, operation, **kwargs):
        if operation == "run_instances":
            sent.append(kwargs)
        return real_call(service, operation, **kwargs)

    monkeypatch.setattr(aws, "call", record)
    inst = launch(aws, wait_status_checks=False)
    assert inst.public_ip
    [call] = sent
    assert "SecurityGroupIds" not in call and "SubnetId" not in call
    [interface] = call["NetworkInterfaces"]
    assert interface["AssociatePublicIpAddress"] is True and interface["SubnetId"] and interface["Groups"]


def _seed_image(ami, name, arch, created):
    from datetime import datetime, timezone

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami

    ec2 = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    ec2.amis[ami] = Ami(ec2, ami, name=name, owner_alias="amazon", owner_id="898082745236", architecture=arch,
                        root_device_name="/dev/sda1", creation_date=datetime(*created, tzinfo=timezone.utc))


def test_image_search_takes_the_highest_pytorch_then_the_newest_for_each_architecture(tmp_path, monkeypatch):
    from moto import mock_aws

    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        seed_dlami(ssm=False)  # PyTorch 2.12, built 2026-11-01
        _seed_image("ami-0000000000000a290", "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.9 (Ubuntu 22.04) "
                    "20261201", "x86_64", (2026, 12, 1))
        _seed_image("ami-0000000000000b212", "Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.12 "
                    "(Ubuntu 24.04) 20261001", "arm64", (2026, 10, 1))
        _seed_image("ami-0000000000000b209", "Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.9 "
                    "(Ubuntu 24.04) 20261115", "arm64", (2026, 11, 15))
        aws = Aws()
        assert P.resolve_dlami(aws, "x86_64")[0] == DLAMI_ID
        assert P.resolve_dlami(aws, "arm64")[0] == "ami-0000000000000b212"


def test_a_family_the_dlami_dropped_is_refused_unless_an_ami_is_given(aws, ec2):
    with pytest.raises(UserError, match=r"p3dn.24xlarge \(V100\) is not supported .* pass --ami"):
        launch(aws, instance_type="p3dn.24xlarge")
    assert _ours(ec2)[0] == []
    assert launch(aws, instance_type="p3dn.24xlarge", ami=DLAMI_ID, wait_status_checks=False).state == "running"


FINGERPRINTS = ("-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:abcDEF+/123 root@ip (ED25519)\n"
                "-----END SSH HOST KEY FINGERPRINTS-----\n")


def test_host_key_fingerprints_are_polled_for_until_cloud_init_prints_them(aws, monkeypatch):
    from moto.ec2.responses import general

    inst = launch(aws, wait_status_checks=False)
    real, calls = general.General.get_console_output, []

    def late_boot(self):
        calls.append(1)
        monkeypatch.setattr(general, "SAMPLE_CONSOLE_OUTPUT", "booting\n" + (FINGERPRINTS if len(calls) >= 3 else ""))
        return real(self)

    monkeypatch.setattr(general.General, "get_console_output", late_boot)
    aws._sleep = lambda s: None
    logs = []
    assert P.console_fingerprints(aws, inst.instance_id, log=logs.append) == ["SHA256:abcDEF+/123"]
    assert len(calls) == 3 and logs == []


def test_no_fingerprints_says_trust_on_first_use(aws, monkeypatch):
    from moto.ec2.responses import general

    inst = launch(aws, wait_status_checks=False)
    monkeypatch.setattr(general, "SAMPLE_CONSOLE_OUTPUT", "booting, no keys yet\n")
    aws._sleep = lambda s: None
    logs = []
    assert P.console_fingerprints(aws, inst.instance_id, timeout=0.2, log=logs.append) == []
    assert len(logs) == 1 and "trusting the host key on first use" in logs[0]
