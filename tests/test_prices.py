"""What a machine costs (infra/ec2/prices.py): spot from its zone's price history over its uptime, on-demand from
the Price List for its region, the built-in table a labelled fallback; through `status` and `train --on`'s
environment too.

moto has no Price List API and a constant spot price history, so a moto server on 127.0.0.1 answers both as
AWS does (Faults, tests/fixtures/aws.py); our code reaches it through botocore, in this process (or the CLI's).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from fixtures.aws import DLAMI_ID, aws_env, ec2_client, json_error, seed_dlami
from fixtures.forged import PRICE_LIST, price_list, reset_forged, spot_history
from fixtures.cli import run_cli

SPOT = "DescribeSpotPriceHistory"


@pytest.fixture
def priced(forged_server, tmp_path, monkeypatch):
    """The moto server, reset, its Faults cleared, and this process's AWS environment pointed at it."""
    url, faults = forged_server
    reset_forged(url, faults)
    env = aws_env(tmp_path, AWS_ENDPOINT_URL=url)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return SimpleNamespace(url=url, faults=faults, env=env, tmp_path=tmp_path)


def at(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def instance(lifecycle: str, launched: datetime, instance_type: str = "g4dn.xlarge", zone: str = "us-east-1b"):
    from infra.ec2.instances import Instance

    return Instance(name="m", instance_id="i-0123456789abcdef0", instance_type=instance_type, state="running",
                    lifecycle=lifecycle, public_ip=None, private_ip=None, launch_time=launched, key_name=None,
                    zone=zone, owner=None)


def launch(url: str, name: str, instance_type: str, hours_ago: float) -> str:
    """An instance tagged with `name`, started `hours_ago` (moved back in the server's own backend)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    seed_dlami()
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "mnist-cloud:name", "Value": name}]}]
    [inst] = ec2_client(url).run_instances(ImageId=DLAMI_ID, InstanceType=instance_type, MinCount=1, MaxCount=1,
                                           TagSpecifications=tags)["Instances"]
    moved = ec2_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].get_instance(inst["InstanceId"])
    moved.launch_time -= timedelta(hours=hours_ago)
    return inst["InstanceId"]


def test_a_spot_machine_costs_the_time_weighted_mean_of_its_zone_history_over_its_uptime(priced):
    from infra.aws import Aws
    from infra.ec2.prices import machine_price, mean_price

    now = datetime.now(timezone.utc).replace(microsecond=0)
    launched = now - timedelta(hours=3)
    priced.faults.answer_query(SPOT, spot_history({
        # in force at launch: the newest record at or before it (the older one is history); it changes an hour in
        "us-east-1b": [("0.1000", at(launched - timedelta(hours=5))), ("0.3000", at(launched - timedelta(hours=1))),
                       ("0.6000", at(launched + timedelta(hours=1)))],
        "us-east-1a": [("5.0000", at(launched + timedelta(minutes=30)))],  # another zone: not this machine's
    }))
    aws = Aws()
    machine = instance("spot", launched)
    price = machine_price(aws, aws, machine, now=now)
    # 1 h at 0.30 and 2 h at 0.60 over 3 h up
    assert price.usd_per_hour == pytest.approx(0.5) and price.kind == "spot"
    assert price.source == "live spot, us-east-1b, mean over uptime"
    assert machine.cost_so_far(price) == pytest.approx(1.5, rel=1e-3)
    [asked] = priced.faults.sent[SPOT]
    assert asked["AvailabilityZone"] == "us-east-1b" and asked["ProductDescription.1"] == "Linux/UNIX"
    # the rule itself, over more history than EC2's window holds: an older change is not the price at launch
    history = [(launched - timedelta(hours=h), usd) for h, usd in ((5, 0.1), (1, 0.3), (-1, 0.6))]
    assert mean_price(history, launched, now) == pytest.approx(0.5)


def test_on_demand_is_the_price_list_of_the_machines_region_asked_in_a_pricing_region(priced):
    from infra.aws import Aws
    from infra.ec2.prices import LIVE_ON_DEMAND, machine_price, pricing_session

    asked_in = []
    answer = price_list({("us-west-2", "g5.xlarge"): "1.2120000000", ("us-east-1", "g5.xlarge"): "1.0060000000"})
    priced.faults.answer_json(PRICE_LIST, lambda request, region: asked_in.append(region) or answer(request, region))
    aws = Aws(region="us-west-2")
    pricing = pricing_session(aws)
    price = machine_price(aws, pricing, instance("on-demand", datetime.now(timezone.utc), "g5.xlarge", "us-west-2a"))
    assert (price.usd_per_hour, price.source, price.kind) == (1.212, LIVE_ON_DEMAND, "on-demand")
    assert asked_in == ["us-east-1"]  # the Price List answers in us-east-1 (or ap-south-1) only


def test_a_denied_price_is_the_labelled_fallback_never_an_error(priced):
    from infra.aws import Aws
    from infra.ec2.prices import machine_price
    from infra.pricing import BUILT_IN

    priced.faults.answer_json(PRICE_LIST, lambda request, region: json_error(
        "AccessDeniedException", "User: arn:aws:iam::123456789012:user/alice is not authorized to perform: "
        "pricing:GetProducts"))
    priced.faults.fail(SPOT, "UnauthorizedOperation", times=5)
    aws = Aws()
    for lifecycle, permission in (("on-demand", "pricing:GetProducts"), ("spot", "ec2:DescribeSpotPriceHistory")):
        price = machine_price(aws, aws, instance(lifecycle, datetime.now(timezone.utc) - timedelta(hours=1)))
        assert (price.usd_per_hour, price.source, price.kind) == (0.526, BUILT_IN, "fallback"), lifecycle
        assert permission in price.note


def test_the_newest_spot_price_per_zone_is_cached_for_an_hour(priced):
    from infra.aws import Aws
    from infra.ec2.prices import spot_price

    priced.faults.answer_query(SPOT, spot_history({"us-east-1a": [("0.3000", "2026-12-04T19:00:00.000Z")],
                                                   "us-east-1b": [("0.2100", "2026-12-04T18:00:00.000Z")]}))
    aws = Aws()
    assert spot_price(aws, "g4dn.xlarge") == (0.21, "us-east-1b")
    # asked again (a plan's spot rows, another zone choice): the cache answers, EC2 is not asked
    assert spot_price(aws, "g4dn.xlarge", ["us-east-1a"]) == (0.3, "us-east-1a")
    assert spot_price(aws, "g4dn.xlarge") == (0.21, "us-east-1b")
    assert len(priced.faults.sent[SPOT]) == 1


def test_status_shows_each_machines_real_price_and_footnotes_a_fallback(priced, mnist_cloud, monkeypatch, capsys):
    launch(priced.url, "live", "g4dn.xlarge", hours_ago=10)
    denied = launch(priced.url, "denied", "g6.xlarge", hours_ago=2)
    live_list = price_list({("us-east-1", "g4dn.xlarge"): "0.6310000000"})
    priced.faults.answer_json(PRICE_LIST, lambda request, region: json_error("AccessDeniedException", "denied")
                              if {"Type": "TERM_MATCH", "Field": "instanceType", "Value": "g6.xlarge"}
                              in request["Filters"] else live_list(request, region))
    footnote = (f"* denied ({denied}): fallback: built-in table (us-east-1 on-demand); AWS Price List: "
                "AccessDeniedException; allow pricing:GetProducts")
    out = run_cli([*mnist_cloud, "status", "--wide"], env_extra=priced.env, cwd=priced.tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    row = columns(lines)
    assert {k: row("live")[k] for k in ("USD/H", "PRICED BY", "COST SO FAR")} == {
        "USD/H": "0.6310", "PRICED BY": "price-list", "COST SO FAR": "$6.31"}
    assert row("denied")["USD/H"] == "0.8050" and row("denied")["PRICED BY"] == "fallback*"
    assert row("denied")["COST SO FAR"] == f"${2 * 0.805:.2f}"
    assert footnote in lines

    # the default table has no PRICED BY: the fallback's star is on its price, and the footnote stays
    from infra.commands import main

    monkeypatch.chdir(priced.tmp_path)
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = columns(lines)
    assert lines[0].split() == ["NAME", "TYPE", "STATE", "USD/H", "COST", "SO", "FAR", "PULL"] and footnote in lines
    assert (row("live")["USD/H"], row("denied")["USD/H"], row("denied")["COST SO FAR"]) == ("0.6310", "0.8050*",
                                                                                             "$1.61")

    # --json: the same machines, every column's fact under a stable key; stdout is the JSON alone
    assert main(["status", "--json"]) == 0
    out, err = capsys.readouterr()
    machines = {m["name"]: m for m in json.loads(out)}
    live = machines["live"]
    assert set(live) == set(STATUS_KEYS) and footnote in err.splitlines()
    assert {k: live[k] for k in ("kind", "region", "instance_type", "state", "lifecycle", "usd_per_hour",
                                 "price_kind", "price_source", "autostop", "budget_usd", "budget_spent_usd",
                                 "spot_interruption")} == {
        "kind": "ec2", "region": "us-east-1", "instance_type": "g4dn.xlarge", "state": "running",
        "lifecycle": "on-demand", "usd_per_hour": 0.631, "price_kind": "on-demand",
        "price_source": "live, AWS Price List", "autostop": None, "budget_usd": None, "budget_spent_usd": None,
        "spot_interruption": None}
    assert live["cost_so_far_usd"] == pytest.approx(6.31, abs=0.005)
    assert live["uptime_hours"] == pytest.approx(10, abs=0.01)
    assert live["zone"].startswith("us-east-1") and live["address"] == live["public_ip"]
    launched = datetime.fromisoformat(live["launched_at"])  # ISO 8601, UTC, with its offset
    assert launched.utcoffset() == timedelta(0) and datetime.now(timezone.utc) - launched > timedelta(hours=9.9)
    denied_row = machines["denied"]
    assert (denied_row["instance_id"], denied_row["usd_per_hour"], denied_row["price_kind"]) == (denied, 0.805,
                                                                                                 "fallback")
    assert denied_row["price_note"] == "AWS Price List: AccessDeniedException; allow pricing:GetProducts"


STATUS_KEYS = ("name", "kind", "region", "zone", "instance_id", "instance_type", "state", "lifecycle", "public_ip",
               "address", "launched_at", "uptime_hours", "usd_per_hour", "price_kind", "price_source", "price_note",
               "cost_so_far_usd", "autostop", "runs_to_pull", "budget_usd", "budget_spent_usd", "owner",
               "spot_interruption")


def columns(lines: list[str]):
    """row(NAME) -> {column: cell} of a status table, its columns cut where the header's words start."""
    header = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", lines[0])]  # "COST SO FAR" is one

    def row(name: str) -> dict[str, str]:
        [line] = [l for l in lines[1:] if l.startswith(name + " ")]
        ends = [start for _, start in header[1:]] + [None]
        return {column: line[start:end].strip() for (column, start), end in zip(header, ends)}
    return row


def test_a_run_on_an_instance_is_told_its_live_price_and_where_it_came_from(priced, monkeypatch):
    import runspec
    from infra.state import Host, State
    from infra.targets import SSHTarget

    iid = launch(priced.url, "pj", "g4dn.xlarge", hours_ago=1)
    priced.faults.answer_json(PRICE_LIST, price_list({("us-east-1", "g4dn.xlarge"): "0.6310000000"}))
    key = priced.tmp_path / "pj.pem"
    key.write_text("not a key: nothing connects here\n")
    key.chmod(0o600)
    State().put(Host(name="pj", kind="ec2", host="127.0.0.1", key_path=str(key), instance_id=iid,
                     region="us-east-1"))
    env = SSHTarget.resolve("pj").job_env()
    assert env[runspec.ENV_PRICE] == "0.631" and env[runspec.ENV_PRICE_SOURCE] == "live, AWS Price List"
    for k, v in env.items():  # the trainer's side: config.json's cloud
        monkeypatch.setitem(os.environ, k, v)
    assert runspec.cloud_info() == {"name": "pj", "instance_type": "g4dn.xlarge", "price_per_hour": 0.631,
                                    "price_source": "live, AWS Price List"}
