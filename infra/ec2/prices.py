"""What an hour of an instance type costs now: spot from EC2's spot price history (the newest price per
zone), on-demand from the AWS Price List API, kept for an hour in the user's cache directory. The built-in
table (infra/pricing.py) is the caller's labelled fallback when neither answers."""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from infra.aws import Aws

CACHE_SECONDS = 3600
# the Price List API answers only in these regions; it prices every region
PRICING_REGIONS = ("us-east-1", "ap-south-1")


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


def _write_cache(key: str, usd: float) -> None:
    """Atomic, so that rows filled at the same time never read a half-written file."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_cache()
    entries[key] = {"usd": usd, "at": time.time()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prices-")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, path)


def spot_price(aws: Aws, instance_type: str, zones: list[str] | None = None) -> tuple[float, str] | None:
    """(USD per hour, zone): the cheapest of the newest Linux spot price of each zone, or None if EC2 has
    none. Raises CloudError."""
    history = aws.call("ec2", "describe_spot_price_history", InstanceTypes=[instance_type],
                       ProductDescriptions=["Linux/UNIX"], StartTime=datetime.now(timezone.utc))["SpotPriceHistory"]
    newest: dict[str, dict] = {}
    for h in history:
        zone = h["AvailabilityZone"]
        if (zones is None or zone in zones) and (zone not in newest or h["Timestamp"] > newest[zone]["Timestamp"]):
            newest[zone] = h
    if not newest:
        return None
    best = min(newest.values(), key=lambda h: float(h["SpotPrice"]))
    return float(best["SpotPrice"]), best["AvailabilityZone"]


def on_demand_price(pricing: Aws, region: str, instance_type: str) -> float | None:
    """USD per hour of Linux on-demand `instance_type` in `region` from the Price List API (`pricing` is a
    session in one of PRICING_REGIONS), cached for CACHE_SECONDS; None if it lists none. Raises CloudError."""
    key = f"on-demand/{region}/{instance_type}"
    cached = _read_cache().get(key)
    if cached and time.time() - cached.get("at", 0) < CACHE_SECONDS:
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
    _write_cache(key, min(usd))
    return min(usd)
