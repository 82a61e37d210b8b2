"""`mnist-cloud plan`: before anything is spent, one row per (region, instance type, market) saying whether a
launch there can work and what it costs: the vCPU quota left, the zones that offer the type, the live hourly
price, the image, a DryRun of the launch, the network, a verdict with its next step, and the cost of the
default run. Rows are filled concurrently (one thread per row; the sessions and their clients are made
first, in the calling thread, as infra.aws asks). `plan_rows` is what `launch` over lists builds on.

A call the identity may not make leaves its column "unknown (needs PERMISSION)": a doubt, not a failure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from infra import measured
from infra.aws import Aws, CloudError
from infra.ec2 import instance_types as types
from infra.ec2 import prices, quotas
from infra.ec2.images import DLAMI_UNSUPPORTED, resolve_dlami
from infra.ec2.network import default_subnets, default_vpc
from infra.errors import UserError
from infra.pricing import fallback_price
from runspec.config import default_value

T = TypeVar("T")
DENIED = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
MARKETS = ("spot", "on-demand")
DEFAULT_EPOCHS = default_value("epochs")  # the default recipe's
LAUNCH_AND_SETUP_S = 600.0  # launch, boot, status checks and setup_ec2.sh on a fresh DLAMI: about 10 minutes
# A GPU nobody has measured (infra/measured.py holds the measured ones) is assumed to train an epoch of the
# default recipe in 1 s: an assumption, shown as one, not a figure. It is a loose ceiling, not a guess per
# GPU: the slowest GPU on offer, a T4, has a floor of 0.23 s (launch-bound, docs/gpu.md), the H200 measured
# 0.16-0.23 s, and launch and setup (LAUNCH_AND_SETUP_S) outweigh 10 such epochs sixty times over.
UNMEASURED_EPOCH_S = 1.0


@dataclass
class PlanRow:
    region: str
    instance_type: str
    market: str  # "spot" or "on-demand"
    nodes: int = 1
    ok: bool = False
    reason: str = ""
    next_step: str = ""
    warnings: list[str] = field(default_factory=list)
    usd_per_hour: float | None = None
    price_source: str = ""
    cheapest_zone: str | None = None
    zones: list[str] | None = None
    gpu: str = ""
    vcpus_needed: int | None = None
    quota_code: str = ""
    quota_vcpus: float | None = None
    quota_source: str = ""
    vcpus_in_use: int | None = None
    image: str | None = None
    subnet: str | None = None
    permission: str = ""
    run_seconds: float | None = None
    run_usd: float | None = None
    run_basis: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (reason, next step)

    def unknown(self, column: str, permission: str) -> str:
        text = f"unknown (needs {permission})"
        self.warnings.append(f"{column} {text}")
        return text

    def fail(self, reason: str, next_step: str) -> None:
        self.failures.append((reason, next_step))

    def as_json(self) -> dict:
        out = asdict(self)
        out.pop("failures")
        return out


def asking(row: PlanRow, column: str, permission: str, fn: Callable[[], T]) -> T | None:
    """fn()'s answer, or None with the column marked unknown where AWS refused or failed to answer."""
    try:
        return fn()
    except CloudError as e:
        if e.code in DENIED:
            row.unknown(column, permission)
        else:
            row.warnings.append(f"{column} unknown ({e.code or e})")
        return None


def expected_epoch_seconds(instance_type: str, gpu: str) -> tuple[float, float, str]:
    """(seconds per epoch, extra seconds of a first run, what the figure rests on)."""
    found = measured.epoch_times(instance_type=instance_type) or [
        m for m in measured.epoch_times() if gpu and m.gpu.lower().endswith(gpu.lower())]
    if found:
        m = found[-1]  # the slowest measured variant: the estimate of a cost must not flatter
        return m.epoch_s, m.first_run_extra_s, f"measured on {m.gpu}"
    return UNMEASURED_EPOCH_S, 0.0, f"estimate for {gpu or 'an unmeasured GPU'}: assumed, never measured"


def run_cost(row: PlanRow, epochs: int) -> None:
    """The default run on this row: launch and setup, plus epochs x the expected seconds per epoch."""
    from infra.sweep import run_hours

    epoch_s, first_extra, basis = expected_epoch_seconds(row.instance_type, row.gpu)
    row.run_seconds = LAUNCH_AND_SETUP_S + first_extra + run_hours(["--epochs", str(epochs)], epoch_s) * 3600
    row.run_basis = f"{epochs} epochs, {epoch_s:g} s/epoch ({basis}) + {LAUNCH_AND_SETUP_S:.0f} s launch and setup"
    if row.usd_per_hour is not None:
        row.run_usd = row.usd_per_hour * row.nodes * row.run_seconds / 3600


def fill_price(row: PlanRow, aws: Aws, pricing: Aws) -> None:
    if row.market == "spot":
        found = asking(row, "spot price", "ec2:DescribeSpotPriceHistory",
                       lambda: prices.spot_price(aws, row.instance_type, row.zones))
        if found is not None:
            row.usd_per_hour, row.cheapest_zone = found
            row.price_source = f"live spot, {row.cheapest_zone}"
    else:
        found = asking(row, "on-demand price", "pricing:GetProducts",
                       lambda: prices.on_demand_price(pricing, row.region, row.instance_type))
        if found is not None:
            row.usd_per_hour, row.price_source = found, prices.LIVE_ON_DEMAND
    if row.usd_per_hour is None:
        fallback = fallback_price(row.instance_type)
        row.usd_per_hour, row.price_source = fallback.usd_per_hour, fallback.source


def fill_quota(row: PlanRow, aws: Aws, vcpus_per_node: int | None) -> None:
    row.quota_code = quotas.quota_code(row.instance_type, row.market)
    quota = asking(row, "quota", "servicequotas:GetServiceQuota",
                   lambda: quotas.vcpu_quota(aws, row.quota_code))
    if quota is not None:
        row.quota_vcpus, row.quota_source = quota.vcpus, quota.source
    group = quotas.family_group(row.instance_type)
    row.vcpus_in_use = asking(row, "vCPUs in use", "ec2:DescribeInstances",
                              lambda: quotas.vcpus_in_use(aws, group, row.market,
                                                          lambda t: types.vcpus_of(aws, t)))
    if row.quota_vcpus is None or row.vcpus_in_use is None or vcpus_per_node is None:
        return
    free = row.quota_vcpus - row.vcpus_in_use
    if free < row.vcpus_needed:
        name = quotas.QUOTA_NAMES[row.quota_code]
        row.fail(f"vCPU quota '{name}' is {row.quota_vcpus:g} ({row.quota_source}) with {row.vcpus_in_use} in use: "
                 f"{max(free, 0):g} free, {row.vcpus_needed} needed",
                 quotas.increase_command(row.quota_code, row.vcpus_in_use + row.vcpus_needed, row.region))


def fill_network(row: PlanRow, aws: Aws) -> None:
    try:
        vpc = default_vpc(aws)
    except UserError as e:
        row.fail(str(e), f"aws ec2 create-default-vpc --region {row.region}")
        return
    except CloudError as e:
        if e.code in DENIED:
            row.unknown("network", "ec2:DescribeVpcs")
            return
        raise
    subnets = asking(row, "network", "ec2:DescribeSubnets", lambda: default_subnets(aws, vpc))
    if subnets is None:
        return
    usable = [(zone, subnet) for zone, subnet in subnets if row.zones is None or zone in row.zones]
    if usable:
        if row.cheapest_zone:
            usable.sort(key=lambda zs: zs[0] != row.cheapest_zone)
        row.subnet = usable[0][1]
    elif row.zones:
        row.fail(f"the default VPC {vpc} has no default subnet in a zone that offers {row.instance_type} "
                 f"({', '.join(row.zones)})",
                 f"aws ec2 create-default-subnet --availability-zone {row.zones[0]} --region {row.region}")


def fill_permission(row: PlanRow, aws: Aws) -> None:
    """A DryRun RunInstances with the launch's image, type, subnet and market (without the security group
    and key pair, which do not exist yet)."""
    if row.image is None or row.subnet is None:
        row.permission = "not checked (no image or subnet)"
        return
    call: dict[str, Any] = {"ImageId": row.image, "InstanceType": row.instance_type, "SubnetId": row.subnet,
                            "MinCount": 1, "MaxCount": 1, "DryRun": True}
    if row.market == "spot":
        call["InstanceMarketOptions"] = {"MarketType": "spot"}
    try:
        aws.call("ec2", "run_instances", **call)
        row.permission = "allowed"  # a DryRun never succeeds; this is only what moto-like fakes may do
    except CloudError as e:
        if e.code == "DryRunOperation":
            row.permission = "allowed"
        elif e.code == "UnauthorizedOperation":
            actions = sorted(set(re.findall(r"not authorized to perform: ([\w-]+:[\w-]+)", e.detail))) or \
                ["ec2:RunInstances"]
            row.permission = f"denied: {', '.join(actions)}"
            encoded = re.search(r"Encoded authorization failure message: (\S+)", e.detail)
            why = (f"; `aws sts decode-authorization-message --encoded-message {encoded.group(1)}` says why"
                   if encoded else "")
            row.fail(f"AWS denies the launch: your identity lacks {', '.join(actions)}",
                     f"add {', '.join(actions)} to your IAM identity (docs/cloud.md#iam-permissions){why}")
        else:
            row.permission = f"unknown ({e.code})"
            row.warnings.append(f"permission unknown ({e.code}: {e.detail or e})")


def fill_row(row: PlanRow, aws: Aws, pricing: Aws, epochs: int) -> PlanRow:
    """Every column of one row, in the order each needs the last."""
    try:
        info = types.instance_type_info(aws, row.instance_type)
    except UserError as e:
        row.fail(str(e), f"mnist-cloud plan --gpu-type GPU --region {row.region}")
        info = None
    except CloudError as e:
        if e.code not in DENIED:
            raise
        row.unknown("instance type", "ec2:DescribeInstanceTypes")
        info = None
    if info is not None:
        row.gpu = info.gpus.split(" x ", 1)[-1].replace("NVIDIA ", "").strip() if info.gpus else ""
        row.vcpus_needed = info.vcpus * row.nodes
    family = row.instance_type.split(".")[0]
    if family in DLAMI_UNSUPPORTED:
        row.fail(f"{row.instance_type} ({DLAMI_UNSUPPORTED[family]}) is not supported by the current PyTorch "
                 "DLAMIs", "pick g4dn, g5, g6 or p4d (`mnist-cloud plan --gpu-type T4,A10G,L4`)")
    row.zones = asking(row, "zones", "ec2:DescribeInstanceTypeOfferings",
                       lambda: types.offering_zones(aws, row.instance_type))
    if row.zones == []:
        row.fail(f"{row.instance_type} is not offered in {row.region}",
                 f"mnist-cloud plan --instance {row.instance_type} --region all")
    fill_quota(row, aws, info.vcpus if info else None)
    fill_price(row, aws, pricing)
    if info is not None:
        try:
            row.image, _ = resolve_dlami(aws, info.architecture, log=lambda message: None)
        except UserError as e:
            row.fail(str(e), f"pass --ami ami-... (an image for {info.architecture} in {row.region}) to launch")
        except CloudError as e:
            if e.code not in DENIED:
                raise
            row.unknown("image", "ssm:GetParametersByPath, ec2:DescribeImages")
    fill_network(row, aws)
    fill_permission(row, aws)
    run_cost(row, epochs)
    return verdict(row)


def verdict(row: PlanRow) -> PlanRow:
    row.ok = not row.failures
    if row.failures:
        row.reason = "; ".join(reason for reason, _ in row.failures)
        row.next_step = row.failures[0][1]
    else:
        row.reason = "ok" + (f", with doubts: {'; '.join(row.warnings)}" if row.warnings else "")
        spot = " --spot" if row.market == "spot" else ""
        nodes = f" --nodes {row.nodes}" if row.nodes > 1 else ""
        row.next_step = f"mnist-cloud launch --instance {row.instance_type} --region {row.region}{spot}{nodes}"
    return row


def plan_rows(sessions: dict[str, Aws], pricing: Aws, instance_types: list[str], spot: bool, nodes: int = 1,
              epochs: int = DEFAULT_EPOCHS) -> list[PlanRow]:
    """The rows for every (region, type, market): spot then on-demand with `spot` (a spot launch falls back
    to on-demand), on-demand alone without. `sessions`: one Aws per region, made in the calling thread."""
    for aws in sessions.values():
        for service in ("ec2", "service-quotas", "ssm"):
            aws.client(service)  # clients are thread-safe, making them is not: made here, used by the rows
    pricing.client("pricing")
    markets = MARKETS if spot else ("on-demand",)
    rows = [PlanRow(region, t, market, nodes) for region in sessions for t in instance_types for market in markets]
    if not rows:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(rows))) as pool:
        futures = [pool.submit(fill_row, row, sessions[row.region], pricing, epochs) for row in rows]
        return [f.result() for f in futures]


@dataclass
class Where:
    """What the rows are asked of: a session per region (made in the calling thread), the Price List
    session, and the instance types (the smallest with each GPU, for --gpu-type)."""

    sessions: dict[str, Aws]
    pricing: Aws
    instance_types: list[str]


def where(regions: list[str | None], profile: str | None, instance_types: list[str], gpus: list[str]) -> Where:
    """Sessions for regions (["all"]: every region enabled for the account; [None]: the AWS default) and
    the instance types, or the smallest type with each GPU in `gpus` (read in the first region)."""
    first = Aws(region=None if regions == ["all"] else regions[0], profile=profile)
    if regions == ["all"]:
        regions = list(types.enabled_regions(first))
    elif "all" in regions:
        raise UserError("--region all stands alone; or list the regions, e.g. us-east-1,us-west-2")
    if gpus:
        instance_types = list(dict.fromkeys(types.smallest_with_gpu(first, gpu) for gpu in gpus))
    sessions = {r: first if r in (first.region, None) else Aws(region=r, profile=profile) for r in regions}
    sessions = {aws.region: aws for aws in sessions.values()}
    pricing = next((aws for r, aws in sessions.items() if r in prices.PRICING_REGIONS), None) or \
        prices.pricing_session(first)
    return Where(sessions, pricing, instance_types)


def plan(regions: list[str | None], profile: str | None, instance_types: list[str], gpus: list[str], spot: bool,
         nodes: int = 1, epochs: int = DEFAULT_EPOCHS) -> list[PlanRow]:
    """The rows for regions and instance types (or GPUs), as `where` reads them."""
    found = where(regions, profile, instance_types, gpus)
    return plan_rows(found.sessions, found.pricing, found.instance_types, spot, nodes, epochs)


def _money(usd: float | None, digits: int = 3) -> str:
    return "?" if usd is None else f"${usd:.{digits}f}"


def table(rows: list[PlanRow]) -> str:
    """The human table, then one line of reason and one of next step per row."""
    header = ["REGION", "TYPE", "MARKET", "OK", "USD/H", "PRICE FROM", "QUOTA FREE/NEED", "ZONES", "RUN COST"]
    body = []
    for r in rows:
        if r.quota_vcpus is None or r.vcpus_in_use is None:
            quota = "unknown"
        else:
            quota = f"{r.quota_vcpus - r.vcpus_in_use:g}/{r.vcpus_needed if r.vcpus_needed is not None else '?'}"
        zones = "unknown" if r.zones is None else str(len(r.zones))
        body.append([r.region, r.instance_type, r.market, "yes" if r.ok else "no", _money(r.usd_per_hour, 4),
                     r.price_source, quota, zones, _money(r.run_usd)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    for r in rows:
        lines.append(f"{r.region} {r.instance_type} {r.market}: {r.reason}")
        lines.append(f"  next: {r.next_step}")
        lines.append(f"  run cost: {_money(r.run_usd)} for the default run ({r.run_basis})")
    return "\n".join(lines)


def as_json(rows: list[PlanRow]) -> str:
    return json.dumps([r.as_json() for r in rows], indent=2)
