"""More than one region at once: a session per region, and one question asked of each concurrently.

A forgotten machine in another region is the costliest kind, so `status` and `down --all` look in every
region the state knows (and with --all-regions, every region enabled for the account). Sessions and their
clients are made in the calling thread, as infra/aws.py asks; the calls then run one thread per region.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from infra.aws import Aws
from infra.ec2.instance_types import enabled_regions

T = TypeVar("T")


def sessions(first: Aws, regions: Iterable[str | None], profile: str | None,
             services: tuple[str, ...] = ("ec2",)) -> dict[str, Aws]:
    """One session per region (`first` serves its own region, and None means first's), keyed by region,
    with the clients for `services` made here, in the calling thread."""
    out = {first.region: first}
    for region in regions:
        if region and region not in out:
            out[region] = Aws(region=region, profile=profile)
    for aws in out.values():
        for service in services:
            aws.client(service)
    return out


def every_region(first: Aws, profile: str | None) -> dict[str, Aws]:
    """A session for each region enabled for the account (DescribeRegions), first's region first."""
    return sessions(first, enabled_regions(first), profile)


def in_each(found: dict[str, Aws], ask: Callable[[Aws], T]) -> dict[str, T]:
    """ask(session) in every region at once, keyed by region in `found`'s order; the first error raises."""
    if len(found) <= 1:  # none (SSH hosts only) or one: no pool
        return {region: ask(aws) for region, aws in found.items()}
    with ThreadPoolExecutor(max_workers=min(16, len(found))) as pool:
        futures = {region: pool.submit(ask, aws) for region, aws in found.items()}
        return {region: f.result() for region, f in futures.items()}
