"""What an instance costs: a small built-in table of on-demand prices, which the user can override.

The built-in numbers are us-east-1 Linux on-demand list prices in USD per hour; other regions and
spot differ. Put {"g4dn.xlarge": 0.40, ...} in ~/.config/mnist-cloud/prices.json (or the file named by
$MNIST_CLOUD_PRICES) to use your own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from infra.errors import UserError
from infra.state import config_dir

ON_DEMAND_USD_PER_HOUR = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912, "g4dn.16xlarge": 4.352, "g4dn.metal": 7.824,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672, "g5.16xlarge": 4.096, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.4xlarge": 1.323, "g6.8xlarge": 2.014,
    "g6.12xlarge": 4.602, "g6.16xlarge": 3.397, "g6.24xlarge": 6.675, "g6.48xlarge": 13.35,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p3.16xlarge": 24.48,
    "p4d.24xlarge": 32.77,
}


def prices_file() -> Path:
    return Path(os.environ.get("MNIST_CLOUD_PRICES") or config_dir() / "prices.json")


def price_table() -> dict[str, float]:
    table = dict(ON_DEMAND_USD_PER_HOUR)
    path = prices_file()
    if path.exists():
        try:
            override = json.loads(path.read_text())
            table.update({str(k): float(v) for k, v in override.items()})
        except (ValueError, AttributeError, TypeError):
            raise UserError(f"{path} must be a JSON object of instance type -> USD per hour") from None
    return table


def hourly_price(instance_type: str) -> float | None:
    return price_table().get(instance_type)


def estimate_cost(instance_type: str, hours: float) -> float | None:
    price = hourly_price(instance_type)
    return None if price is None else price * hours
