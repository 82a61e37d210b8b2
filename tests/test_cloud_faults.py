"""The real `mnist-cloud` against a moto server that misbehaves the way real EC2 and STS do now and then:
throttling, a dropped connection in the middle of a wait, "not found" right after a create, and an
assumed-role caller whose session name changes with every command."""

from __future__ import annotations

import urllib.request

import pytest
from fixtures.aws import Faults, aws_env, ec2_client, moto_server, seed_dlami
from fixtures.cli import assert_user_error, run_cli

FAULTS = Faults()


@pytest.fixture(scope="module")
def faulty_moto():
    """A moto server on 127.0.0.1 that answers with the FAULTS a test sets up; public IPs are loopback:
    nothing here leaves the machine."""
    with moto_server(faults=FAULTS) as url:
        yield url


@pytest.fixture
def faulty_moto_cli(faulty_moto, ip_service, tmp_path, mnist_cloud):
    """faulty_moto_cli(*args, extra_env=...) runs mnist-cloud against a reset, DLAMI-seeded, fault-free
    moto server."""
    urllib.request.urlopen(urllib.request.Request(f"{faulty_moto}/moto-api/reset", method="POST")).read()
    seed_dlami()
    FAULTS.clear()
    env = aws_env(tmp_path, AWS_ENDPOINT_URL=faulty_moto, MNIST_CLOUD_IP_URL=ip_service)

    def run(*args, extra_env=None):
        if args and args[0] == "launch":
            args = (*args, "--no-wait-ssh", "--no-wait-checks")
        return run_cli([*mnist_cloud, *args], env_extra={**env, **(extra_env or {})}, cwd=tmp_path)

    run.endpoint = faulty_moto
    yield run
    FAULTS.clear()


def alive(endpoint) -> dict[str, str]:
    """{name tag: state} of every instance that is not terminated."""
    found = {}
    for r in ec2_client(endpoint).describe_instances()["Reservations"]:
        for i in r["Instances"]:
            tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            if i["State"]["Name"] != "terminated":
                found[tags.get("mnist-cloud:name", "?")] = i["State"]["Name"]
    return found


# ---------------------------------------------------------------------------------- retries
def test_throttled_calls_are_retried_by_botocore(faulty_moto_cli):
    FAULTS.fail("RunInstances", "RequestLimitExceeded", times=2, status=503)
    out = faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "busy")
    assert out.returncode == 0, out.stderr
    assert FAULTS.hits["RunInstances"] == 2 and len(FAULTS.sent["RunInstances"]) == 3
    assert alive(faulty_moto_cli.endpoint) == {"busy": "running"}


def test_throttling_past_every_retry_is_one_line(faulty_moto_cli):
    FAULTS.fail("RunInstances", "RequestLimitExceeded", times=10, status=503)
    out = faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "busy", extra_env={"AWS_MAX_ATTEMPTS": "2"})
    assert_user_error(out, "throttled ec2:run_instances", "run the command again")
    assert len(FAULTS.sent["RunInstances"]) == 2  # AWS_MAX_ATTEMPTS counts the first attempt too


@pytest.mark.slow
def test_a_dropped_connection_during_a_wait_polls_again(faulty_moto_cli):
    # botocore's own retries are off (1 attempt), so the wait itself must survive the dropped connections
    FAULTS.drop("DescribeInstances", times=2, when=lambda q: "InstanceId.1" in q)
    out = faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "flaky", extra_env={"AWS_MAX_ATTEMPTS": "1"})
    assert out.returncode == 0, out.stderr
    assert FAULTS.hits["DescribeInstances"] == 2 and "ready: flaky" in out.stdout


@pytest.mark.slow
def test_not_found_right_after_a_create_is_waited_out(faulty_moto_cli):
    FAULTS.fail("AuthorizeSecurityGroupIngress", "InvalidGroup.NotFound", times=2)
    FAULTS.fail("RunInstances", "InvalidKeyPair.NotFound", times=1)
    out = faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "fresh")
    assert out.returncode == 0, out.stderr
    assert FAULTS.hits["AuthorizeSecurityGroupIngress"] == 2 and FAULTS.hits["RunInstances"] == 1
    assert alive(faulty_moto_cli.endpoint) == {"fresh": "running"}


# ---------------------------------------------------------------------------------- owners
def assume(endpoint, session_name: str, role: str = "trainer") -> dict[str, str]:
    """Temporary credentials of `role`, as a new botocore session (or an SSO login) would get them."""
    import boto3

    kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}
    iam = boto3.client("iam", **kw)
    try:
        iam.create_role(RoleName=role, AssumeRolePolicyDocument="{}")
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    creds = boto3.client("sts", **kw).assume_role(RoleArn=f"arn:aws:iam::123456789012:role/{role}",
                                                   RoleSessionName=session_name)["Credentials"]
    return {"AWS_ACCESS_KEY_ID": creds["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"]}


@pytest.mark.slow
def test_down_all_finds_earlier_sessions_of_the_same_role_but_not_other_people(faulty_moto_cli):
    first = assume(faulty_moto_cli.endpoint, "botocore-session-1")
    second = assume(faulty_moto_cli.endpoint, "botocore-session-2")
    assert faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "monday", extra_env=first).returncode == 0
    assert faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "tuesday", extra_env=second).returncode == 0
    assert faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "colleague").returncode == 0  # an IAM user
    assert set(alive(faulty_moto_cli.endpoint)) == {"monday", "tuesday", "colleague"}

    third = assume(faulty_moto_cli.endpoint, "botocore-session-3")
    # these instances have no SSH: down checks the earlier sessions' machines for unpulled runs, not the colleague's
    refused = faulty_moto_cli("down", "--all", "--yes", extra_env=third)
    assert refused.returncode == 2 and "monday cannot be checked" in refused.stderr
    assert "tuesday cannot be checked" in refused.stderr and "colleague" not in refused.stderr
    down = faulty_moto_cli("down", "--all", "--yes", "--discard-runs", extra_env=third)
    assert down.returncode == 0, down.stderr
    assert "2 instance(s)" in down.stdout
    assert alive(faulty_moto_cli.endpoint) == {"colleague": "running"}  # someone else's: left alone

    assert_user_error(faulty_moto_cli("down", "--all", "--any-owner", extra_env=third), "INCLUDING OTHER PEOPLE'S",
                      "--yes")
    assert alive(faulty_moto_cli.endpoint) == {"colleague": "running"}
    everyone = faulty_moto_cli("down", "--all", "--any-owner", "--yes", "--discard-runs", extra_env=third)
    assert everyone.returncode == 0 and "1 instance(s)" in everyone.stdout
    assert alive(faulty_moto_cli.endpoint) == {}


SSO_ROLE = "AWSReservedSSO_Trainers_0a1b2c3d4e5f6789"  # IAM Identity Center's role for a permission set


def test_owner_key_strips_only_botocores_session_names():
    from infra.ec2 import owner_key, owner_label, same_owner

    role = f"arn:aws:sts::123456789012:assumed-role/{SSO_ROLE}"
    assert same_owner(f"{role}/botocore-session-1700000000", f"{role}/botocore-session-1700000999")
    assert not same_owner(f"{role}/alice", f"{role}/bob")  # SSO teammates share the role, not the owner
    assert owner_key(f"{role}/alice") == f"{role}/alice"
    assert owner_label(f"{role}/alice") == f"{SSO_ROLE}/alice"
    assert owner_label("arn:aws:iam::123456789012:user/carol") == "user/carol"


@pytest.mark.slow
def test_sso_teammates_sharing_a_role_do_not_touch_each_others_machines(faulty_moto_cli):
    alice, bob = assume(faulty_moto_cli.endpoint, "alice", SSO_ROLE), assume(faulty_moto_cli.endpoint, "bob", SSO_ROLE)
    assert faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "mnist", extra_env=alice).returncode == 0
    ec2 = ec2_client(faulty_moto_cli.endpoint)
    groups = lambda: sorted((g["GroupName"], str(g["IpPermissions"])) for g in ec2.describe_security_groups()["SecurityGroups"])
    before = groups()

    # bob's launch of the same name is refused in one line, and alice's /32 stays
    assert_user_error(faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "mnist", extra_env=bob),
                            f"mnist is {SSO_ROLE}/alice's instance", "--name mnist-bob")
    assert groups() == before and alive(faulty_moto_cli.endpoint) == {"mnist": "running"}

    # status: bob sees none of his own, and is told the team's are hidden; --any-owner shows them, with owners
    mine = faulty_moto_cli("status", extra_env=bob)
    assert mine.returncode == 0 and "mnist " not in mine.stdout and "--any-owner" in mine.stdout
    team = faulty_moto_cli("status", "--any-owner", extra_env=bob)
    assert team.returncode == 0 and "OWNER" in team.stdout and f"{SSO_ROLE}/alice" in team.stdout
    assert "mnist" in faulty_moto_cli("status", extra_env=alice).stdout

    # down: bob's NAME is refused, his --all leaves alice's machine, --any-owner on the name takes it
    assert_user_error(faulty_moto_cli("down", "mnist", "--yes", extra_env=bob), "alice's", "--any-owner")
    assert faulty_moto_cli("down", "--all", "--yes", "--discard-runs", extra_env=bob).returncode == 0
    assert alive(faulty_moto_cli.endpoint) == {"mnist": "running"}
    taken = faulty_moto_cli("down", "mnist", "--any-owner", "--yes", "--discard-runs", extra_env=bob)
    assert taken.returncode == 0, taken.stderr
    assert alive(faulty_moto_cli.endpoint) == {}


# ---------------------------------------------------------------------------------- credentials and regions
def no_keys(tmp_path, config_text: str) -> dict[str, str]:
    """An environment whose only credentials are a profile of this AWS config (and a home of its own)."""
    config = tmp_path / "aws-config"
    config.write_text(config_text)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"AWS_CONFIG_FILE": str(config), "HOME": str(home), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}


def test_an_expired_sso_login_is_one_line_at_once_with_the_login_command(faulty_moto_cli, tmp_path):
    """A legacy SSO profile whose cached token has expired: botocore fails at the first signed call,
    locally, with UnauthorizedSSOTokenError; that is not a network blip to poll but a login to redo."""
    import hashlib
    import json

    start = "https://example.awsapps.com/start"
    env = no_keys(tmp_path, f"[profile team]\nsso_start_url = {start}\nsso_region = us-east-1\n"
                            "sso_account_id = 123456789012\nsso_role_name = Trainers\nregion = us-east-1\n")
    cache = tmp_path / "home" / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    (cache / f"{hashlib.sha1(start.encode()).hexdigest()}.json").write_text(json.dumps(
        {"startUrl": start, "region": "us-east-1", "accessToken": "old", "expiresAt": "2020-01-01T00:00:00Z"}))
    out = faulty_moto_cli("status", "--profile", "team", extra_env=env)
    assert_user_error(out, "SSO login for profile 'team' has expired", "`aws sso login --profile team`")
    assert not FAULTS.sent  # nothing was sent anywhere


def test_expired_credentials_in_the_middle_of_a_wait_end_it_at_once(faulty_moto_cli):
    # three answers, then it would work: the old rule polled through them as transient and launched
    FAULTS.fail("DescribeInstances", "ExpiredToken", times=3, when=lambda q: "InstanceId.1" in q)
    out = faulty_moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "late")
    assert_user_error(out, "session credentials have expired (ExpiredToken)", "aws sso login")
    assert FAULTS.hits["DescribeInstances"] == 1  # asked once, not polled


def test_request_expired_names_the_clock(faulty_moto_cli):
    FAULTS.fail("DescribeInstances", "RequestExpired", times=3)
    assert_user_error(faulty_moto_cli("status"), "clock may be off", "date -u")
    assert FAULTS.hits["DescribeInstances"] == 1


def test_a_region_botocores_list_does_not_know_yet_is_not_refused(tmp_path, monkeypatch):
    """botocore's bundled endpoint list lags the real regions: a new one must not be refused by it.
    (moto's EC2 knows only the listed regions, so this is checked where the gate was, not end to end.)"""
    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    from infra.aws import Aws

    assert Aws(region="xx-future-1").region == "xx-future-1"


def test_a_region_that_does_not_answer_is_one_line_at_once(faulty_moto_cli):
    # a mistyped region's endpoint does not resolve; here the endpoint is a closed loopback port, the same
    # EndpointConnectionError. Nothing has answered yet, so it is no blip to poll
    out = faulty_moto_cli("status", "--region", "us-esat-1", extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                                                        "AWS_MAX_ATTEMPTS": "1"})
    assert_user_error(out, "cannot reach AWS", "check --region ('us-esat-1'")


def test_a_region_not_enabled_for_the_account_says_so(faulty_moto_cli):
    FAULTS.fail("DescribeInstances", "OptInRequired", times=3, status=401)
    assert_user_error(faulty_moto_cli("status", "--region", "me-south-1"), "region me-south-1 is not enabled",
                      "--region")
    assert FAULTS.hits["DescribeInstances"] == 1


def test_one_process_resolves_its_credentials_once(tmp_path, monkeypatch):
    """An MFA-protected profile asks for a code each time credentials are resolved: once per process,
    however many Aws objects (and regions) a command makes. credential_process counts the resolutions."""
    count = tmp_path / "resolved"
    script = tmp_path / "creds.sh"
    script.write_text(f'#!/bin/sh\necho x >> "{count}"\n'
                      'echo \'{"Version": 1, "AccessKeyId": "testing", "SecretAccessKey": "testing"}\'\n')
    script.chmod(0o755)
    for k, v in no_keys(tmp_path, f"[profile proc]\ncredential_process = {script}\nregion = us-east-1\n").items():
        monkeypatch.setenv(k, v)
    from infra.aws import Aws

    for region in ("us-east-1", "eu-west-1", "us-east-1"):
        Aws(region=region, profile="proc").session.get_credentials().get_frozen_credentials()
    assert count.read_text().count("x") == 1


def test_an_assumed_roles_credentials_are_kept_in_the_aws_clis_cache(faulty_moto_cli, tmp_path):
    env = no_keys(tmp_path, "[profile base]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
                            "[profile role]\nrole_arn = arn:aws:iam::123456789012:role/trainer\n"
                            "source_profile = base\nregion = us-east-1\n")
    for _ in range(2):
        out = faulty_moto_cli("status", "--profile", "role", extra_env=env)
        assert out.returncode == 0, out.stderr
    assert list((tmp_path / "home" / ".aws" / "cli" / "cache").glob("*.json"))  # where the AWS CLI looks
    assert len(FAULTS.sent["AssumeRole"]) == 1  # the second command took them from there: no second MFA code
