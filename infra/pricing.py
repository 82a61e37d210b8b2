"""What an instance costs when AWS cannot say: a small built-in table of on-demand prices, which the user
can override, and the Price record every cost is computed from.

The live prices (spot price history, the AWS Price List) are infra/ec2/prices.py's; this table is their
labelled fallback. The built-in numbers are us-east-1 Linux on-demand list prices in USD per hour; other
regions and spot differ. Put {"g4dn.xlarge": 0.40, ...} in ~/.config/mnist-cloud/prices.json (or the
file named by $MNIST_CLOUD_PRICES) to use your own where AWS does not answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from infra.errors import UserError
from infra.state import config_dir

# us-east-1, Linux, on-demand, USD per hour. g4dn/g5/g6/p3 from AWS's on-demand page; g6e, g5g, p4d, p4de and
# p5 as instances.vantage.sh listed them in January 2026 (after AWS's June 2025 cut of P4/P5 prices: p4d was
# 32.77, p5 98.32). p5e.48xlarge has no us-east-1 on-demand list price (AWS sells it through Capacity Blocks):
# it is priced live from the Price List, or not at all.
ON_DEMAND_USD_PER_HOUR = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912, "g4dn.16xlarge": 4.352, "g4dn.metal": 7.824,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672, "g5.16xlarge": 4.096, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g5g.xlarge": 0.42, "g5g.2xlarge": 0.556, "g5g.4xlarge": 0.828, "g5g.8xlarge": 1.372,
    "g5g.16xlarge": 2.744, "g5g.metal": 2.744,
    "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.4xlarge": 1.323, "g6.8xlarge": 2.014,
    "g6.12xlarge": 4.602, "g6.16xlarge": 3.397, "g6.24xlarge": 6.675, "g6.48xlarge": 13.35,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.242, "g6e.4xlarge": 3.004, "g6e.8xlarge": 4.529,
    "g6e.12xlarge": 10.493, "g6e.16xlarge": 7.577, "g6e.24xlarge": 15.066, "g6e.48xlarge": 30.131,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p3.16xlarge": 24.48,
    "p4d.24xlarge": 21.958, "p4de.24xlarge": 27.447,
    "p5.48xlarge": 55.04,
}
BUILT_IN = "fallback: built-in table (us-east-1 on-demand)"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Price:
    """USD per hour of one machine (None: nobody knows), and where the figure came from: one label that
    status, config.json's cloud.price_source, the report and the sweep summary all show as it is."""

    usd_per_hour: float | None
    source: str
    kind: str = "fallback"  # "spot" (its zone's history), "on-demand" (the Price List), "fallback", "unknown"
    note: str = ""  # why a fallback: the live answer that failed

    def cost(self, hours: float) -> float | None:
        return None if self.usd_per_hour is None else self.usd_per_hour * hours


def prices_file() -> Path:
    return Path(os.environ.get("MNIST_CLOUD_PRICES") or config_dir() / "prices.json")


def user_prices() -> dict[str, float]:
    """The user's prices.json, {} when there is none."""
    path = prices_file()
    if not path.exists():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError, TypeError):
        raise UserError(f"{path} must be a JSON object of instance type -> USD per hour") from None


def price_table() -> dict[str, float]:
    return {**ON_DEMAND_USD_PER_HOUR, **user_prices()}


def hourly_price(instance_type: str) -> float | None:
    return price_table().get(instance_type)


def fallback_price(instance_type: str, note: str = "") -> Price:
    """The price when AWS does not answer: the user's prices.json, else the built-in table, each labelled
    as a fallback; `note` says why AWS did not answer."""
    mine = user_prices()
    if instance_type in mine:
        return Price(mine[instance_type], f"fallback: your {prices_file()}", "fallback", note)
    if instance_type in ON_DEMAND_USD_PER_HOUR:
        return Price(ON_DEMAND_USD_PER_HOUR[instance_type], BUILT_IN, "fallback", note)
    return Price(None, UNKNOWN, "unknown", note)
