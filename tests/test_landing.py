"""`launch` over lists of types and regions, and the name found in its region afterwards: the real CLI
against a moto server on 127.0.0.1, with quotas, prices and capacity errors forged there (tests/fixtures/
forged.py), as AWS would answer them. No SSH: moto's instances have made-up addresses, never contacted."""

from __future__ import annotations

import json

import pytest

from fixtures.aws import Faults, aws_env, ec2_client
from fixtures.cli import run_cli
from fixtures.forged import PRICE_LIST, QUOTA, QUOTA_CODES, price_list, quotas, reset_forged, spot_history

REGIONS = ("us-east-1", "us-west-2", "eu-central-1")


@pytest.fixture
def cloud(forged_server, ip_service, tmp_path, mnist_cloud):
    """cloud(*args) runs mnist-cloud against the freshly reset, DLAMI-seeded moto server (default region
    us-east-1), with every quota 64 vCPUs and every on-demand price $0.526 unless a test forges others."""
    url, faults = forged_server
    reset_forged(url, faults, REGIONS, quota_vcpus=64.0, usd="0.5260000000")
    env = aws_env(tmp_path, AWS_ENDPOINT_URL=url, MNIST_CLOUD_IP_URL=ip_service)

    def run(*args):
        if args and args[0] == "launch":
            args = (*args, "--no-wait-ssh")  # moto's made-up addresses are never contacted
        return run_cli([*mnist_cloud, *args], env_extra=env, cwd=tmp_path)

    run.faults, run.url, run.home = faults, url, tmp_path / "mnist-cloud-home"
    return run


def launches(faults: Faults) -> list[dict]:
    """The RunInstances calls that would have started a machine (DryRuns left out)."""
    return [q for q in faults.sent["RunInstances"] if q.get("DryRun") != "true"]


def ours(url: str, region: str, what: str) -> list:
    """The instances (alive), security groups or key pairs tagged as mnist-cloud's in a region."""
    ec2 = ec2_client(url) if region == "us-east-1" else _client(url, region)
    tagged = [{"Name": "tag-key", "Values": ["mnist-cloud:name"]}]
    if what == "instances":
        return [i for r in ec2.describe_instances(Filters=tagged)["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] not in ("terminated", "shutting-down")]
    if what == "groups":
        return ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]
    return ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]


def _client(url: str, region: str):
    import boto3

    return boto3.client("ec2", endpoint_url=url, region_name=region, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def state(home) -> dict:
    return json.loads((home / "state.json").read_text())["hosts"]


def test_a_launch_over_lists_skips_what_cannot_launch_then_fails_over_to_the_next_cheapest(cloud):
    # us-east-1 has no G quota: its rows are skipped without a RunInstances call. In us-west-2 the T4
    # (g4dn, cheaper) has no capacity in any zone; the L4 (g6) lands there.
    get, default = quotas({("us-east-1", "L-DB2E81BA"): 0.0}, {code: 64.0 for code in QUOTA_CODES})
    cloud.faults.answer_json(QUOTA, get)
    cloud.faults.answer_json(PRICE_LIST, price_list({("us-east-1", "g4dn.xlarge"): "0.3000000000",
                                                 ("us-west-2", "g4dn.xlarge"): "0.5000000000",
                                                 ("us-east-1", "g6.xlarge"): "0.3100000000",
                                                 ("us-west-2", "g6.xlarge"): "0.6000000000"}))
    cloud.faults.fail("RunInstances", "InsufficientInstanceCapacity", times=50,
                      when=lambda q: q.get("InstanceType") == "g4dn.xlarge" and q.get("DryRun") != "true",
                      message="We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone "
                              "you requested.")

    out = cloud("launch", "--gpu-type", "T4,L4", "--region", "us-east-1,us-west-2", "--name", "far")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipping g4dn.xlarge on-demand in us-east-1: vCPU quota" in out.stdout
    assert "skipping g6.xlarge on-demand in us-east-1: vCPU quota" in out.stdout
    [first] = [line for line in out.stdout.splitlines() if line.startswith("trying g4dn.xlarge")]
    zones = first.split(", zones ")[1].split(", ")  # the zones that offer g4dn.xlarge there
    tried = [q["InstanceType"] for q in launches(cloud.faults)]
    assert len(zones) > 1 and tried == ["g4dn.xlarge"] * len(zones) + ["g6.xlarge"], tried  # zone by zone, then on
    assert out.stdout.index("trying g4dn.xlarge on-demand in us-west-2 at $0.5000/h") < \
        out.stdout.index("trying g6.xlarge on-demand in us-west-2 at $0.6000/h")
    assert "no capacity for g4dn.xlarge on-demand in any zone of us-west-2 (InsufficientInstanceCapacity)" in out.stdout
    ready = [line for line in out.stdout.splitlines() if line.startswith("ready: far")]
    assert ready and "g6.xlarge" in ready[0] and "us-west-2" in ready[0], out.stdout
    assert "$0.6000/h (live, AWS Price List)" in ready[0]
    assert not ours(cloud.url, "us-east-1", "groups") and not ours(cloud.url, "us-east-1", "key pairs")
    [inst] = ours(cloud.url, "us-west-2", "instances")
    assert inst["InstanceType"] == "g6.xlarge"
    assert state(cloud.home)["far"]["region"] == "us-west-2"
    assert state(cloud.home)["far"]["instance_type"] == "g6.xlarge"

    # afterwards the name is found in its region without --region (the default region is us-east-1)
    status = cloud("status", "far", "--wide")
    assert status.returncode == 0 and inst["InstanceId"] in status.stdout, status.stdout + status.stderr
    stopped = cloud("stop", "far")
    assert stopped.returncode == 0 and "is stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    everything = cloud("status", "--wide")  # the configured region and every region the state knows
    assert everything.stdout.splitlines()[0].split()[:2] == ["NAME", "REGION"], everything.stdout
    assert any(line.split()[:2] == ["far", "us-west-2"] for line in everything.stdout.splitlines())
    down = cloud("down", "far", "--yes", "--discard-runs")
    assert down.returncode == 0 and inst["InstanceId"] in down.stdout, down.stdout + down.stderr
    assert not ours(cloud.url, "us-west-2", "instances") and not ours(cloud.url, "us-west-2", "groups")


def test_spot_candidates_all_come_before_on_demand_and_a_region_given_up_is_left_clean(cloud):
    cloud.faults.answer_query("DescribeSpotPriceHistory", spot_history({
        "us-east-1a": [("0.2500", "2026-12-04T19:00:00.000Z")],
        "us-west-2b": [("0.2000", "2026-12-04T19:00:00.000Z")]}))
    # on demand in us-west-2 is cheaper than spot in us-east-1: spot still goes first, as --spot asks
    cloud.faults.answer_json(PRICE_LIST, price_list({("us-east-1", "g4dn.xlarge"): "0.5000000000",
                                                 ("us-west-2", "g4dn.xlarge"): "0.2200000000"}))
    cloud.faults.fail("RunInstances", "InsufficientInstanceCapacity", times=50,
                      when=lambda q: q.get("InstanceMarketOptions.MarketType") == "spot")

    out = cloud("launch", "--instance", "g4dn.xlarge", "--region", "us-east-1,us-west-2", "--spot", "--name", "sp")
    assert out.returncode == 0, out.stdout + out.stderr
    trying = [line.split(" at ")[0] for line in out.stdout.splitlines() if line.startswith("trying ")]
    assert trying == ["trying g4dn.xlarge spot in us-west-2", "trying g4dn.xlarge spot in us-east-1",
                      "trying g4dn.xlarge on-demand in us-west-2"], out.stdout
    west = [line for line in out.stdout.splitlines() if line.startswith("trying g4dn.xlarge spot in us-west-2")]
    assert ", zones us-west-2b, us-west-2a" in west[0], west  # the cheapest spot zone first, then the others
    markets = [q.get("InstanceMarketOptions.MarketType", "on-demand") for q in launches(cloud.faults)]
    assert markets[-1] == "on-demand" and set(markets[:-1]) == {"spot"}, markets
    [inst] = ours(cloud.url, "us-west-2", "instances")
    assert "InstanceLifecycle" not in inst  # on demand
    # us-east-1 was tried (spot) and given up: what that try made there is gone
    assert not ours(cloud.url, "us-east-1", "groups") and not ours(cloud.url, "us-east-1", "key pairs")
    assert not ours(cloud.url, "us-east-1", "instances")


def test_status_all_regions_finds_a_machine_the_state_forgot_and_down_all_regions_ends_it(cloud):
    out = cloud("launch", "--instance", "g4dn.xlarge", "--region", "eu-central-1", "--name", "lost")
    assert out.returncode == 0, out.stdout + out.stderr
    [inst] = ours(cloud.url, "eu-central-1", "instances")
    (cloud.home / "state.json").unlink()  # another laptop, or a state file lost

    assert inst["InstanceId"] not in cloud("status", "--wide").stdout  # the configured region only
    found = cloud("status", "--all-regions", "--wide")
    assert found.returncode == 0, found.stdout + found.stderr
    assert any(line.split()[:3] == ["lost", "eu-central-1", inst["InstanceId"]]
               for line in found.stdout.splitlines()), found.stdout

    kept = cloud("down", "--all", "--yes", "--discard-runs")  # the state knows no region: us-east-1 only
    assert kept.returncode == 0 and ours(cloud.url, "eu-central-1", "instances"), kept.stdout
    swept = cloud("down", "--all", "--all-regions", "--yes", "--discard-runs")
    assert swept.returncode == 0 and inst["InstanceId"] in swept.stdout, swept.stdout + swept.stderr
    assert not ours(cloud.url, "eu-central-1", "instances") and not ours(cloud.url, "eu-central-1", "groups")


def test_down_all_sweeps_every_region_the_state_knows(cloud):
    for region, name in (("us-west-2", "west"), ("eu-central-1", "east")):
        out = cloud("launch", "--instance", "g4dn.xlarge", "--region", region, "--name", name)
        assert out.returncode == 0, out.stdout + out.stderr
    swept = cloud("down", "--all", "--yes", "--discard-runs")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "deleted: 2 instance(s)" in swept.stdout, swept.stdout
    assert not ours(cloud.url, "us-west-2", "instances") and not ours(cloud.url, "eu-central-1", "instances")
