"""`launch` over lists: where a launch lands when it may go to several instance types and regions.

The candidates are the plan's rows (infra/plan.py) that can launch; the rest are skipped, each in one line,
without a RunInstances call. The candidates go cheapest first, every spot one before any on-demand one; each
tries its offering zones in turn (the cheapest spot zone first), and a capacity error moves on to the next
zone, then to the next candidate. What a try made in a region where nothing landed (its security group and
key pair) is deleted before the next region is tried, so that nothing is left behind where no machine runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from infra.aws import Aws
from infra.ec2 import Instance, LaunchSpec, NoCapacity, down, find_instances, launch
from infra.ec2.regions import in_each
from infra.ec2.tags import Log
from infra.errors import UserError
from infra.plan import PlanRow, Where, plan_rows
from infra.state import State


def order(rows: list[PlanRow]) -> list[PlanRow]:
    """The rows that can launch, in the order to try them: spot before on-demand, then cheapest first (a
    row without a price after every priced one of its market)."""
    ok = [r for r in rows if r.ok]
    return sorted(ok, key=lambda r: (r.market != "spot", r.usd_per_hour is None, r.usd_per_hour or 0.0))


def zones_to_try(row: PlanRow) -> list[str] | None:
    """The row's offering zones, its cheapest spot zone first; None when they are unknown (EC2 picks)."""
    if row.zones is None:
        return None
    return sorted(row.zones, key=lambda zone: (zone != row.cheapest_zone, zone))


def _price(row: PlanRow) -> str:
    return "price unknown" if row.usd_per_hour is None else f"${row.usd_per_hour:.4f}/h ({row.price_source})"


def existing(where: Where, name: str) -> tuple[str, list[Instance]] | None:
    """(region, live instances) where `name` already lives: the region the state records, else any of the
    candidate regions. A name lives in one region; a launch over lists reuses it there."""
    host = State().get(name)
    regions = dict(where.sessions)
    if host is not None and host.kind == "ec2" and host.region and host.region not in regions:
        regions[host.region] = Aws(region=host.region, profile=where.pricing.profile)
    found = in_each(regions, lambda aws: [i for i in find_instances(aws, name) if i.state != "shutting-down"])
    for region, alive in found.items():
        if alive:
            return region, alive
    return None


def land(where: Where, spec: LaunchSpec, spot: bool, log: Log = print, epochs: int | None = None,
         wait_ready: Callable[[Aws, Instance], None] | None = None) -> tuple[Instance, PlanRow | None, Aws]:
    """Launch spec.name on the first candidate that has capacity: (instance, its plan row, its session).
    A name that lives already is reused where it lives (row None)."""
    if spec.ami or spec.key_name:
        raise UserError(f"{'--ami' if spec.ami else '--key-name'} names a resource of one region: give one "
                        "--instance and one --region with it")
    lives = existing(where, spec.name)
    if lives:
        region, alive = lives
        aws = where.sessions.get(region) or Aws(region=region, profile=where.pricing.profile)
        log(f"{spec.name} already lives in {region} ({alive[0].instance_type}); reusing it there")
        one = replace(spec, instance_type=alive[0].instance_type)
        return launch(aws, one, log, wait_ready=_ready(wait_ready, aws)), None, aws
    rows = plan_rows(where.sessions, where.pricing, where.instance_types, spot, spec.nodes,
                     **({"epochs": epochs} if epochs else {}))
    for row in rows:
        if not row.ok:
            log(f"skipping {row.instance_type} {row.market} in {row.region}: {row.reason}")
    candidates = order(rows)
    if not candidates:
        raise UserError("no candidate can launch (each reason is above); `mnist-cloud plan` with the same "
                        "--instance/--gpu-type and --region shows the next step for each")
    log(f"{len(candidates)} candidate(s), cheapest first: "
        + ", ".join(f"{r.instance_type} {r.market} {r.region}" for r in candidates))
    tried = []
    for row in candidates:
        aws = where.sessions[row.region]
        zones = zones_to_try(row)
        log(f"trying {row.instance_type} {row.market} in {row.region} at {_price(row)}"
            + (f", zones {', '.join(zones)}" if zones else ""))
        one = replace(spec, instance_type=row.instance_type, spot=row.market == "spot", zones=zones,
                      on_demand_fallback=False, price_text=_price(row))
        try:
            return launch(aws, one, log, wait_ready=_ready(wait_ready, aws)), row, aws
        except NoCapacity as e:
            tried.append(f"{row.instance_type} {row.market} in {row.region} ({e.code})")
            log(f"no capacity for {row.instance_type} {row.market} in any zone of {row.region} ({e.code}); "
                "deleting what this try made there, then the next candidate")
            tidy(aws, spec.name)
    raise UserError(f"no capacity anywhere it may go: {'; '.join(tried)}; try later, or add types "
                    "(--gpu-type) or regions (--region all)")


def _ready(wait_ready, aws: Aws):
    return None if wait_ready is None else (lambda inst: wait_ready(aws, inst))


def tidy(aws: Aws, name: str) -> None:
    """Delete the security group and key pair a try without capacity made in this region (no instance of
    the name runs there: the try would have reused it)."""
    down(aws, name, log=lambda message: None)
