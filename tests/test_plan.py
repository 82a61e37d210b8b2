"""`mnist-cloud plan` as a subprocess against a moto server on 127.0.0.1.

moto's Service Quotas knows only `vpc` (for `ec2` it answers NoSuchResourceException), it has no Price List
API, its spot price history is a constant, and its DryRun RunInstances always answers DryRunOperation. So the
server forges those answers here, in AWS's own request and response shapes and error codes (Faults in
tests/fixtures/aws.py): the CLI reaches them through botocore, as it would reach AWS.
"""

from __future__ import annotations

import json
import time

import pytest

from fixtures.aws import aws_env, json_error
from fixtures.forged import DEFAULT_QUOTA, PRICE_LIST, QUOTA, price_list, quotas, reset_forged, spot_history
from fixtures.cli import run_cli

REGIONS = ("us-east-1", "us-west-2", "eu-central-1")


@pytest.fixture
def plan(forged_server, tmp_path, mnist_cloud):
    """plan(*args) runs `mnist-cloud plan` against the freshly reset, DLAMI-seeded moto server; its Faults
    are `plan.faults`, with every quota 64 vCPUs and every price answered unless a test says otherwise."""
    url, faults = forged_server
    reset_forged(url, faults, REGIONS, quota_vcpus=64.0, usd="0.5260000000")
    env = aws_env(tmp_path, AWS_ENDPOINT_URL=url)

    def run(*args):
        return run_cli([*mnist_cloud, "plan", *args], env_extra=env, cwd=tmp_path)

    run.faults, run.url = faults, url
    return run


def rows_of(out) -> list[dict]:
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def table_row(out, region: str, instance_type: str, market: str) -> dict[str, str]:
    lines = out.stdout.splitlines()
    header = lines[0].replace("PRICE FROM", "PRICE_FROM").replace("QUOTA FREE/NEED", "QUOTA").replace(
        "RUN COST", "RUN").split()
    [row] = [l for l in lines[1:] if l.split()[:3] == [region, instance_type, market]]
    cells = row.split("  ")
    cells = [c.strip() for c in cells if c.strip()]
    assert len(cells) == len(header), (header, cells)
    return dict(zip(header, cells))


def run_instance_elsewhere(url: str, region: str, instance_type: str) -> None:
    """An instance someone else in the account runs (not tagged as ours): it counts against the quota."""
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=url, region_name=region, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.run_instances(ImageId=image, InstanceType=instance_type, MinCount=1, MaxCount=1)


def test_a_zero_quota_in_one_region_blocks_only_that_region_and_says_how_to_ask(plan):
    get, default = quotas({("us-east-1", "L-DB2E81BA"): 16.0}, {"L-DB2E81BA": 0.0})  # us-west-2: AWS's default 0
    plan.faults.answer_json(QUOTA, get)
    plan.faults.answer_json(DEFAULT_QUOTA, default)
    run_instance_elsewhere(plan.url, "us-east-1", "g4dn.xlarge")  # 4 vCPUs of the 16 in use

    out = plan("--instance", "g4dn.xlarge", "--region", "us-east-1,us-west-2")
    assert out.returncode == 0, out.stdout + out.stderr  # one row can launch
    assert table_row(out, "us-east-1", "g4dn.xlarge", "on-demand")["QUOTA"] == "12/4"
    west = table_row(out, "us-west-2", "g4dn.xlarge", "on-demand")
    assert west["QUOTA"] == "0/4" and west["OK"] == "no"
    assert ("next: aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-DB2E81BA "
            "--desired-value 4 --region us-west-2") in out.stdout
    by_region = {r["region"]: r for r in rows_of(plan("--instance", "g4dn.xlarge", "--region",
                                                      "us-east-1,us-west-2", "--json"))}
    assert by_region["us-east-1"]["ok"] and by_region["us-east-1"]["quota_vcpus"] == 16.0
    assert by_region["us-east-1"]["vcpus_in_use"] == 4 and by_region["us-east-1"]["vcpus_needed"] == 4
    assert not by_region["us-west-2"]["ok"] and by_region["us-west-2"]["quota_vcpus"] == 0.0
    assert by_region["us-west-2"]["quota_source"] == "AWS default"
    assert "vCPU quota" in by_region["us-west-2"]["reason"]

    alone = plan("--instance", "g4dn.xlarge", "--region", "us-west-2")
    assert alone.returncode == 1, alone.stdout + alone.stderr  # no row can launch


def test_the_vcpus_the_account_already_runs_count_against_the_quota(plan):
    get, default = quotas({("us-east-1", "L-DB2E81BA"): 6.0})
    plan.faults.answer_json(QUOTA, get)
    run_instance_elsewhere(plan.url, "us-east-1", "g4dn.xlarge")  # 4 of the 6 in use: 2 left, 4 needed
    out = plan("--instance", "g4dn.xlarge", "--region", "us-east-1")
    assert out.returncode == 1, out.stdout + out.stderr
    row = table_row(out, "us-east-1", "g4dn.xlarge", "on-demand")
    assert row["QUOTA"] == "2/4" and row["OK"] == "no"
    assert "is 6 (applied) with 4 in use: 2 free, 4 needed" in out.stdout
    assert "--quota-code L-DB2E81BA --desired-value 8 --region us-east-1" in out.stdout


def test_a_denied_service_quotas_call_is_an_unknown_not_a_failure(plan):
    plan.faults.answer_json(QUOTA, lambda request, region: json_error(
        "AccessDeniedException", "User: arn:aws:iam::123456789012:user/alice is not authorized to perform: "
        "servicequotas:GetServiceQuota"))
    out = plan("--instance", "g4dn.xlarge", "--region", "us-east-1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert table_row(out, "us-east-1", "g4dn.xlarge", "on-demand")["QUOTA"] == "unknown"
    assert "quota unknown (needs servicequotas:GetServiceQuota)" in out.stdout
    [row] = rows_of(plan("--instance", "g4dn.xlarge", "--region", "us-east-1", "--json"))
    assert row["ok"] and row["quota_vcpus"] is None
    assert "quota unknown (needs servicequotas:GetServiceQuota)" in row["warnings"]


def test_gpu_type_names_the_smallest_instance_type_with_that_gpu(plan):
    [row] = rows_of(plan("--gpu-type", "T4", "--region", "us-east-1", "--json"))
    assert row["instance_type"] == "g4dn.xlarge" and row["gpu"] == "T4" and row["vcpus_needed"] == 4
    # whole GPUs only: g6f.large has a fraction of an L4 (moto: Count 0; AWS: GpuPartitionSize under 1)
    [l4] = rows_of(plan("--gpu-type", "L4", "--region", "us-east-1", "--json"))
    assert l4["instance_type"] == "g6.xlarge", l4["instance_type"]
    unknown = plan("--gpu-type", "Q9000", "--region", "us-east-1")
    assert unknown.returncode == 2 and "no instance type in us-east-1 has a GPU named 'Q9000'" in unknown.stderr


def test_region_all_is_every_region_enabled_for_the_account(plan):
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=plan.url, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    enabled = {r["RegionName"] for r in ec2.describe_regions()["Regions"]}
    rows = rows_of(plan("--instance", "g4dn.xlarge", "--region", "all", "--json"))
    assert {r["region"] for r in rows} == enabled and len(rows) == len(enabled) > 3
    assert all(r["ok"] for r in rows if r["region"] in REGIONS)  # the DLAMI is seeded in these only


def test_a_dozen_rows_take_about_the_slowest_row_not_their_sum(plan):
    plan.faults.latency = 0.5
    start = time.monotonic()
    out = plan("--instance", "g4dn.xlarge,g6.xlarge", "--region", ",".join(REGIONS), "--spot", "--json")
    elapsed = time.monotonic() - start
    rows = rows_of(out)
    assert len(rows) == 12 and all(r["ok"] for r in rows), "\n".join(r["reason"] for r in rows if not r["ok"])
    serial = plan.faults.requests * plan.faults.latency  # what asking one after another would take
    per_row = serial / len(rows)
    assert serial > 60, plan.faults.requests
    assert elapsed < per_row + 20 < serial / 2, (elapsed, per_row, serial)


def test_prices_are_live_spot_the_cheapest_newest_per_zone_and_on_demand_from_the_price_list(plan):
    plan.faults.answer_query("DescribeSpotPriceHistory", spot_history({
        "us-east-1a": [("0.3000", "2026-12-04T19:00:00.000Z")],
        # the older entry of a zone is history, not its price now
        "us-east-1b": [("0.2100", "2026-12-04T18:00:00.000Z"), ("0.0900", "2026-12-01T00:00:00.000Z")],
    }))
    plan.faults.answer_json(PRICE_LIST, price_list({("us-east-1", "g4dn.xlarge"): "0.6310000000"}))
    rows = {r["market"]: r for r in rows_of(plan("--instance", "g4dn.xlarge", "--region", "us-east-1", "--spot",
                                                 "--json"))}
    assert rows["spot"]["usd_per_hour"] == 0.21 and rows["spot"]["price_source"] == "live spot, us-east-1b"
    assert rows["on-demand"]["usd_per_hour"] == 0.631
    assert rows["on-demand"]["price_source"] == "live, AWS Price List"
    [asked] = plan.faults.sent[PRICE_LIST]
    assert {"Type": "TERM_MATCH", "Field": "regionCode", "Value": "us-east-1"} in asked["Filters"]
    # the default run: 10 epochs at T4's labelled estimate plus launch and setup, at the live price
    assert rows["on-demand"]["run_usd"] == pytest.approx(0.631 * rows["on-demand"]["run_seconds"] / 3600)
    assert "estimate for T4" in rows["on-demand"]["run_basis"]

    # the Price List answer is kept for an hour: asked again, the API is not
    plan.faults.answer_json(PRICE_LIST, lambda request, region: json_error("AccessDeniedException", "denied"))
    [again] = rows_of(plan("--instance", "g4dn.xlarge", "--region", "us-east-1", "--json"))
    assert again["usd_per_hour"] == 0.631 and len(plan.faults.sent[PRICE_LIST]) == 1


def test_without_the_price_list_the_built_in_table_is_a_labelled_fallback(plan):
    plan.faults.answer_json(PRICE_LIST, lambda request, region: json_error(
        "AccessDeniedException", "User: arn:aws:iam::123456789012:user/alice is not authorized to perform: "
        "pricing:GetProducts"))
    [row] = rows_of(plan("--instance", "g4dn.xlarge", "--region", "us-west-2", "--json"))
    assert row["usd_per_hour"] == 0.526 and row["price_source"].startswith("fallback: built-in table")
    assert "on-demand price unknown (needs pricing:GetProducts)" in row["warnings"]


def test_a_denied_dry_run_names_what_is_missing(plan):
    message = ("You are not authorized to perform this operation. User: arn:aws:iam::123456789012:user/alice is "
               "not authorized to perform: ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:"
               "instance/* because no identity-based policy allows the ec2:RunInstances action. Encoded "
               "authorization failure message: EnC0dEd-Why")
    plan.faults.fail("RunInstances", "UnauthorizedOperation", times=5, status=403,
                     when=lambda query: query.get("DryRun") == "true", message=message)
    out = plan("--instance", "g4dn.xlarge", "--region", "us-east-1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "AWS denies the launch: your identity lacks ec2:RunInstances" in out.stdout
    assert "aws sts decode-authorization-message --encoded-message EnC0dEd-Why" in out.stdout
    [dry] = plan.faults.sent["RunInstances"]
    assert dry["DryRun"] == "true" and dry["InstanceType"] == "g4dn.xlarge" and "SubnetId" in dry
    assert "SecurityGroupId.1" not in dry and "KeyName" not in dry
