"""What an hour of a machine costs, as AWS says: spot from EC2's spot price history (the newest price per zone
for a launch; the time-weighted mean over its uptime for a running instance), on-demand from the AWS Price
List API. The newest spot price per zone and the on-demand price are kept for an hour in the user's cache
directory. Where AWS does not answer, the built-in table (infra/pricing.py) is the labelled fallback:
`machine_price` never raises for a price it could not get.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.aws import Aws, CloudError
from infra.pricing import Price, fallback_price

if TYPE_CHECKING:
    from infra.ec2.instances import Instance

CACHE_SECONDS = 3600
# the Price List API answers only in these regions; it prices every region
PRICING_REGIONS = ("us-east-1", "ap-south-1")
SPOT_HISTORY_DAYS = 90  # how far back EC2 keeps spot price history
LIVE_ON_DEMAND = "live, AWS Price List"
_cache_lock = threading.Lock()  # the rows of a plan and the instances of a status write it at once


def cache_file() -> Path:
    """$MNIST_CLOUD_HOME/cache/prices.json, else $XDG_CACHE_HOME (or ~/.cache)/mnist-cloud/prices.json."""
    if os.environ.get("MNIST_CLOUD_HOME"):
        base = Path(os.environ["MNIST_CLOUD_HOME"]).expanduser() / "cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-cloud"
    return base / "prices.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _cached(key: str) -> dict | None:
    """The cache entry under `key` while it is younger than CACHE_SECONDS."""
    entry = _read_cache().get(key)
    return entry if isinstance(entry, dict) and time.time() - entry.get("at", 0) < CACHE_SECONDS else None


def _write_cache(entries: dict[str, dict[str, Any]]) -> None:
    """Atomic, so that threads and processes pricing at the same time never read a half-written file."""
    path = cache_file()
    with _cache_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache()
        cache.update({key: {**entry, "at": time.time()} for key, entry in entries.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prices-")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)


def newest_spot_prices(aws: Aws, instance_type: str) -> dict[str, float]:
    """{zone: USD per hour} of the newest Linux spot price in each zone of aws.region that has one, from the
    cache (one entry per zone, and one listing the zones) while it is fresh. Raises CloudError."""
    key = f"spot/{aws.region}/{instance_type}"
    listing = _cached(key)
    if listing is not None:
        zones = {zone: _cached(f"{key}/{zone}") for zone in listing["zones"]}
        if all(zones.values()):
            return {zone: entry["usd"] for zone, entry in zones.items()}
    history = aws.call("ec2", "describe_spot_price_history", InstanceTypes=[instance_type],
                       ProductDescriptions=["Linux/UNIX"], StartTime=datetime.now(timezone.utc))["SpotPriceHistory"]
    newest: dict[str, dict] = {}
    for h in history:
        zone = h["AvailabilityZone"]
        if zone not in newest or h["Timestamp"] > newest[zone]["Timestamp"]:
            newest[zone] = h
    prices = {zone: float(h["SpotPrice"]) for zone, h in newest.items()}
    _write_cache({key: {"zones": sorted(prices)}, **{f"{key}/{zone}": {"usd": usd} for zone, usd in prices.items()}})
    return prices


def spot_price(aws: Aws, instance_type: str, zones: list[str] | None = None) -> tuple[float, str] | None:
    """(USD per hour, zone): the cheapest of the newest Linux spot price of each zone (of `zones`, when
    given), or None if EC2 has none. Raises CloudError."""
    prices = {z: usd for z, usd in newest_spot_prices(aws, instance_type).items() if zones is None or z in zones}
    if not prices:
        return None
    zone = min(prices, key=prices.__getitem__)
    return prices[zone], zone


def on_demand_price(pricing: Aws, region: str, instance_type: str) -> float | None:
    """USD per hour of Linux on-demand `instance_type` in `region` from the Price List API (`pricing` is a
    session in one of PRICING_REGIONS), cached for CACHE_SECONDS; None if it lists none. Raises CloudError."""
    key = f"on-demand/{region}/{instance_type}"
    cached = _cached(key)
    if cached is not None:
        return cached["usd"]
    filters = {"instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
               "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}
    products = pricing.paginate("pricing", "get_products", "PriceList", ServiceCode="AmazonEC2",
                                FormatVersion="aws_v1",
                                Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()])
    usd = [float(dim["pricePerUnit"]["USD"])
           for text in products
           for term in json.loads(text).get("terms", {}).get("OnDemand", {}).values()
           for dim in term.get("priceDimensions", {}).values()
           if dim.get("unit") == "Hrs" and "USD" in dim.get("pricePerUnit", {})]
    usd = [u for u in usd if u > 0]
    if not usd:
        return None
    _write_cache({key: {"usd": min(usd)}})
    return min(usd)


def pricing_session(aws: Aws) -> Aws:
    """A session the Price List API answers in: `aws` itself where it can, else one in us-east-1."""
    return aws if aws.region in PRICING_REGIONS else Aws(region=PRICING_REGIONS[0], profile=aws.profile)


def spot_history(aws: Aws, instance_type: str, zone: str, start: datetime,
                 end: datetime) -> list[tuple[datetime, float]]:
    """[(timestamp, USD per hour)] of Linux spot `instance_type` in `zone` from start to end, oldest first. EC2
    also returns the last change before `start`: the price in force then. Raises CloudError."""
    records = aws.paginate("ec2", "describe_spot_price_history", "SpotPriceHistory", InstanceTypes=[instance_type],
                           ProductDescriptions=["Linux/UNIX"], AvailabilityZone=zone, StartTime=start, EndTime=end)
    return sorted((h["Timestamp"], float(h["SpotPrice"])) for h in records if h.get("AvailabilityZone") == zone)


def mean_price(history: list[tuple[datetime, float]], start: datetime, end: datetime) -> float | None:
    """The time-weighted mean USD per hour from start to end of a price history (oldest first): each price
    holds from its timestamp until the next one; the price in force at `start` is the newest record at or
    before it (the oldest record stands in when there is none). None for an empty history."""
    if not history:
        return None
    before = [usd for at, usd in history if at <= start]
    usd = before[-1] if before else history[0][1]
    if end <= start:
        return usd
    paid, since = 0.0, start
    for at, next_usd in history:
        if since < at < end:
            paid += usd * (at - since).total_seconds()
            since, usd = at, next_usd
    paid += usd * (end - since).total_seconds()
    return paid / (end - start).total_seconds()


def running_spot_price(aws: Aws, instance: "Instance", now: datetime) -> Price | None:
    """A spot instance's price: the mean over its uptime (the spot price history of its zone since it was
    started, up to the 90 days EC2 keeps), the price now when it is not running. Raises CloudError."""
    if not instance.zone:
        return None
    up = instance.state == "running" and instance.launch_time is not None
    start = max(instance.launch_time if up else now, now - timedelta(days=SPOT_HISTORY_DAYS))
    usd = mean_price(spot_history(aws, instance.instance_type, instance.zone, start, now), start, now)
    if usd is None:
        return None
    return Price(usd, f"live spot, {instance.zone}" + (", mean over uptime" if start < now else ""), "spot")


def machine_price(aws: Aws, pricing: Aws, instance: "Instance", now: datetime | None = None) -> Price:
    """What an hour of `instance` costs (`aws`: its region's session; `pricing`: one in PRICING_REGIONS, e.g.
    pricing_session(aws)): spot from its zone's history over its uptime, on-demand from the Price List for
    its region. Where AWS refuses or fails to answer, the labelled fallback; never raises for that."""
    now = now or datetime.now(timezone.utc)
    spot = instance.lifecycle == "spot"
    asked = "spot price history" if spot else "AWS Price List"
    try:
        if spot:
            found = running_spot_price(aws, instance, now)
        else:
            usd = on_demand_price(pricing, aws.region, instance.instance_type)
            found = None if usd is None else Price(usd, LIVE_ON_DEMAND, "on-demand")
    except CloudError as e:
        permission = "ec2:DescribeSpotPriceHistory" if spot else "pricing:GetProducts"
        why = f"; allow {permission}" if "Denied" in e.code or e.code == "UnauthorizedOperation" else ""
        return fallback_price(instance.instance_type, f"{asked}: {e.code or e}{why}")
    return found or fallback_price(instance.instance_type, f"{asked}: no price for {instance.instance_type}")


def machine_prices(aws: Aws, instances: list["Instance"]) -> dict[str, Price]:
    """{instance id: Price} of the running instances, asked concurrently: one spot history per spot instance,
    one Price List question per on-demand type (the clients are made here, in the calling thread)."""
    running = [i for i in instances if i.state == "running"]
    if not running:
        return {}
    aws.client("ec2")
    on_demand = {i.instance_type: i for i in running if i.lifecycle != "spot"}  # one instance stands per type
    pricing = pricing_session(aws) if on_demand else aws
    if on_demand:
        pricing.client("pricing")
    spot = [i for i in running if i.lifecycle == "spot"]
    with ThreadPoolExecutor(max_workers=min(16, len(on_demand) + len(spot))) as pool:
        by_type = {t: pool.submit(machine_price, aws, pricing, i) for t, i in on_demand.items()}
        by_id = {i.instance_id: pool.submit(machine_price, aws, pricing, i) for i in spot}
        return {i.instance_id: (by_id[i.instance_id] if i.lifecycle == "spot" else by_type[i.instance_type]).result()
                for i in running}
