"""infra.provision under moto.mock_aws: our functions, asserting on what EC2 then holds."""

from __future__ import annotations

import stat

import pytest
from botocore.exceptions import ClientError

from cloud import DLAMI_ID, REGION, aws_env, seed_dlami
from infra import provision as P
from infra.aws import Aws, CloudError, explain
from infra.errors import UserError
from infra.state import State

CIDR = "203.0.113.7/32"


@pytest.fixture
def aws(tmp_path, monkeypatch):
    from moto import mock_aws

    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        seed_dlami()
        yield Aws()


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
        P.attach_host("me@127.0.0.1:2222", "box", str(key))


@pytest.mark.parametrize("target,parsed", [("ubuntu@10.0.0.5", ("ubuntu", "10.0.0.5", 22)),
                                           ("me@box.lan:2222", ("me", "box.lan", 2222)),
                                           ("root@[::1]:2200", ("root", "::1", 2200))])
def test_parse_ssh_target(target, parsed):
    assert P.parse_ssh_target(target) == parsed


# ---------------------------------------------------------------------------------- the aws layer
def _client_error(code):
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")


def test_transient_errors_are_retried_with_backoff(aws):
    sleeps, calls = [], []
    aws._sleep = sleeps.append

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("RequestLimitExceeded")
        return "ok"

    assert aws.retrying(flaky, "ec2:run_instances") == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5


def test_other_errors_are_not_retried(aws):
    calls = []

    def denied():
        calls.append(1)
        raise _client_error("UnauthorizedOperation")

    with pytest.raises(CloudError, match="AWS denied ec2:run_instances .*README") as err:
        aws.retrying(denied, "ec2:run_instances")
    assert len(calls) == 1 and err.value.code == "UnauthorizedOperation"


def test_missing_credentials_region_and_unknown_region(tmp_path, monkeypatch):
    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_REGION", REGION)
    with pytest.raises(UserError, match="unknown AWS region 'mars-1'"):
        Aws(region="mars-1")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(UserError, match="no AWS region"):
        Aws()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="no AWS credentials"):
        Aws(region=REGION)
