"""`mnist-cloud status` (ls): your machines, live from EC2, plus the state's SSH hosts. Each machine is one
record (machine_records) whose keys are what `status --json` prints; the table, compact or --wide, is
drawn from those records, so both show the same facts."""

from __future__ import annotations

import json
import sys
from datetime import timezone

import runspec
from infra.commands.lifecycle import status_regions
from infra.commands.options import cloud_command, machine_name, say
from infra.errors import UserError
from runspec import ExitCode


def add_status(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Your instances, live from EC2, in the configured region and in every region the "
                                  "state knows (where `launch` landed them); --all-regions looks in every region "
                                  "enabled for the account, concurrently. The table shows name, type, state, "
                                  "price, cost, runs to pull and budget; --wide adds every column, --json prints "
                                  "the records (keys in docs/reference.md).")
    machine_name(p, default=None, help="only this name")
    p.add_argument("--any-owner", action="store_true",
                   help="also the instances other people of this account launched, with an OWNER column")
    p.add_argument("--all-regions", action="store_true",
                   help="look in every region enabled for the account, not only the ones the state knows")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--wide", action="store_true",
                       help="every column: region, ID, lifecycle, zone, address, uptime, priced by, autostop")
    shown.add_argument("--json", action="store_true",
                       help="print a JSON list, one object per machine; notes go to stderr")
    p.set_defaults(handler=cmd_status)


# What status's PRICED BY column says of a Price's kind; a starred one has a footnote that says what and why.
PRICED_BY = {"spot": "spot-history", "on-demand": "price-list", "fallback": "fallback*", "unknown": "unknown*"}
# (header, the record's cell) of each column; COMPACT names the ones the table shows without --wide
COLUMNS = {
    "NAME": lambda r: r["name"],
    "REGION": lambda r: r["region"] or "-",
    "ID": lambda r: r["instance_id"] or "-",
    "TYPE": lambda r: "ssh host" if r["kind"] == "ssh" else r["instance_type"] or "?",
    "STATE": lambda r: r["state"] or "-",
    "LIFECYCLE": lambda r: r["lifecycle"] or "-",
    "ZONE": lambda r: r["zone"] or "-",
    "ADDRESS": lambda r: r["address"] or "-",
    "UPTIME": lambda r: _age(r["uptime_hours"] or 0.0),
    "USD/H": lambda r: "-" if r["usd_per_hour"] is None else f"{r['usd_per_hour']:.4f}",
    "PRICED BY": lambda r: PRICED_BY.get(r["price_kind"], "-"),
    "COST SO FAR": lambda r: "-" if r["kind"] != "ec2" or r["state"] == "gone" else
                             "?" if r["cost_so_far_usd"] is None else f"${r['cost_so_far_usd']:.2f}",
    "AUTOSTOP": lambda r: r["autostop"] or "-",
    "PULL": lambda r: _pull_cell(r),
    "BUDGET": lambda r: "-" if r["budget_usd"] is None else f"${r['budget_spent_usd'] or 0:.2f}/${r['budget_usd']:g}",
    "OWNER": lambda r: r["owner"] or "-",
}
COMPACT = ("NAME", "TYPE", "STATE", "USD/H", "COST SO FAR", "PULL", "BUDGET", "OWNER")


def cmd_status(args) -> int:
    records, notes = machine_records(args)
    note = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else say
    if args.json:
        say(json.dumps(records, indent=2))
    elif records:
        for line in status_table(records, wide=args.wide, owners=args.any_owner):
            say(line)
    for line in notes:
        note(line)
    return ExitCode.OK


def status_table(records: list[dict], wide: bool, owners: bool) -> list[str]:
    """The lines of the table: every column with `wide`, else COMPACT (BUDGET only when some machine has
    a budget, the fallback price's star on USD/H since PRICED BY is not there); OWNER with `owners`."""
    keep = [c for c in COLUMNS if (wide or c in COMPACT) and (c != "OWNER" or owners)
            and (c != "BUDGET" or wide or any(r["budget_usd"] is not None for r in records))]
    rows = []
    for r in records:
        cells = {c: COLUMNS[c](r) for c in keep}
        if not wide and r["price_kind"] in ("fallback", "unknown") and "USD/H" in cells:
            cells["USD/H"] += "*"
        rows.append([cells[c] for c in keep])
    return runspec.table(keep, rows)


def machine_records(args) -> tuple[list[dict], list[str]]:
    """([one record per machine: EC2 instances of yours, the state's SSH hosts, names whose instance is gone],
    [the lines under the table: footnotes, hints])."""
    from infra.ec2 import caller_identity, find_instances, machine_prices, others_instances, spot_interruptions
    from infra.ec2.autostop import budget_stop
    from infra.ec2.regions import in_each
    from infra.state import State

    state = State()
    ssh_hosts = [h for h in state.all() if h.kind == "ssh" and (not args.name or h.name == args.name)]
    needs_aws = not (args.name and ssh_hosts)
    try:
        regions = status_regions(args, state) if needs_aws else {}
        found = in_each(regions, lambda aws: find_instances(aws, args.name))
    except UserError as e:  # no region or no credentials: attached SSH hosts need neither
        if not ssh_hosts or any(h.kind == "ec2" for h in state.all()):
            raise
        regions, found, unasked = {}, {}, f"EC2 was not asked ({e}); the SSH hosts above need no AWS"
    else:
        unasked = None
    every = [i for region in found for i in found[region]]
    region_of = {i.instance_id: region for region in found for i in found[region]}
    theirs = set()
    if every and not args.any_owner:  # yours only: a team account holds everyone's
        theirs = {i.instance_id for i in others_instances(every, caller_identity(next(iter(regions.values()))))}
    instances = [i for i in every if i.instance_id not in theirs]
    interrupted: dict[str, str] = {}
    for part in in_each(regions, lambda aws: spot_interruptions(
            aws, [i for i in instances if region_of[i.instance_id] == aws.region])).values():
        interrupted.update(part)
    prices, stopped_at = {}, {}
    for region, aws in regions.items():  # the running ones; the others bill no hours
        prices.update(machine_prices(aws, [i for i in instances if region_of[i.instance_id] == region]))
        stopped_at.update({i.instance_id: budget_stop(aws, i) for i in instances  # what its watchdog last said
                           if region_of[i.instance_id] == region and i.budget is not None and i.state == "stopped"})
    waiting = pull_counts(state, instances, ssh_hosts)
    records = [instance_record(i, region_of[i.instance_id], prices.get(i.instance_id), interrupted.get(i.instance_id),
                               waiting.get(i.instance_id), budget_spent(i, prices.get(i.instance_id), state,
                                                                        stopped_at.get(i.instance_id)))
               for i in instances]
    records += [host_record(h, waiting.get(f"{h.host}:{h.port}")) for h in ssh_hosts]
    known = {i.name for i in every} | {h.name for h in ssh_hosts}
    gone = [h for h in state.all()  # cached names whose instance is gone: say so, EC2 is the truth
            if h.kind == "ec2" and h.name not in known and (not args.name or h.name == args.name)
            and (h.region in regions or not h.region)]
    records += [gone_record(h) for h in gone]
    return records, status_notes(args, records, theirs, regions) + ([unasked] if unasked else [])


def status_notes(args, records: list[dict], theirs: set, regions: dict) -> list[str]:
    notes = []
    if theirs:
        notes.append(f"{len(theirs)} instance(s) of other people in this account are not shown: "
                     "`mnist-cloud status --any-owner`")
    if not records:
        looked = f" in {', '.join(regions)}" if regions else ""
        notes.append(f"no instances{f' named {args.name!r}' if args.name else ''}{looked}. Launch one: "
                     "mnist-cloud launch --instance g4dn.xlarge")
    for r in records:
        if r["price_kind"] in ("fallback", "unknown"):
            notes.append(f"* {r['name']} ({r['instance_id']}): {r['price_source']}"
                         + (f"; {r['price_note']}" if r["price_note"] else ""))
    for r in records:
        if r["spot_interruption"]:
            notes.append(f"{r['name']}: spot interruption ({r['spot_interruption']}); EC2 starts it again when "
                         f"capacity returns, and its interrupted runs resume by themselves: `mnist-cloud logs "
                         f"{r['name']} -f` follows them. Until then only its disk bills")
    if any(r["state"] == "gone" for r in records):
        notes.append("'gone': the instance no longer exists in EC2 (terminated outside mnist-cloud?); "
                     "`mnist-cloud down NAME` tidies up")
    return notes


def _record(name: str, kind: str, **fields) -> dict:
    """One machine, every key present (None where it has no value), in the order docs/reference.md lists."""
    keys = ("region", "zone", "instance_id", "instance_type", "state", "lifecycle", "public_ip", "address",
            "launched_at", "uptime_hours", "usd_per_hour", "price_kind", "price_source", "price_note",
            "cost_so_far_usd", "autostop", "runs_to_pull", "budget_usd", "budget_spent_usd", "owner",
            "spot_interruption")
    return {"name": name, "kind": kind, **{k: fields.get(k) for k in keys}}


def instance_record(i, region: str, price, interruption: str | None, waiting: str | None,
                    spent: float | None) -> dict:
    from infra.ec2 import owner_label

    shown = i.state
    if interruption is not None:  # stopped (or about to be) by EC2, not by anyone here
        shown = "interrupting" if i.state == "running" else "interrupted"
    return _record(
        i.name, "ec2", region=region, zone=i.zone, instance_id=i.instance_id, instance_type=i.instance_type,
        state=shown, lifecycle=i.lifecycle, public_ip=i.public_ip, address=i.public_ip,
        launched_at=i.launch_time.astimezone(timezone.utc).isoformat() if i.launch_time else None,
        uptime_hours=i.uptime_hours, usd_per_hour=None if price is None else price.usd_per_hour,
        price_kind=None if price is None else price.kind, price_source=None if price is None else price.source,
        price_note=(price.note or None) if price is not None else None,
        cost_so_far_usd=0.0 if price is None else i.cost_so_far(price),
        autostop=None if i.autostop == "-" else i.autostop, runs_to_pull=_count(waiting), budget_usd=i.budget,
        budget_spent_usd=spent, owner=owner_label(i.owner), spot_interruption=interruption)


def host_record(h, waiting: str | None) -> dict:
    return _record(h.name, "ssh", address=f"{h.user}@{h.host}:{h.port}", runs_to_pull=_count(waiting))


def gone_record(h) -> dict:
    return _record(h.name, "ec2", region=h.region, instance_id=h.instance_id, state="gone")


def _count(cell: str | None) -> int | None:
    return int(cell) if cell is not None and cell.isdigit() else None


def _pull_cell(r: dict) -> str:
    """PULL: the count; "?" for a machine that could be asked but was not, or did not answer; "-" for one
    with no SSH to ask (stopped, gone)."""
    if r["runs_to_pull"] is not None:
        return str(r["runs_to_pull"])
    reachable = r["kind"] == "ssh" or (r["state"] in ("running", "interrupting") and r["public_ip"])
    return "?" if reachable else "-"


def pull_counts(state, instances, ssh_hosts) -> dict[str, str]:
    """PULL: {instance id, or an SSH host's host:port: how many runs wait to be pulled from it}; "?" for a
    running machine not asked (never reached from here: its host key is not pinned) or that did not
    answer within a few seconds; stopped ones are left out ("-": no SSH, no count)."""
    from infra.resolve import answered_before
    from infra.unpulled import count_waiting

    running = {i.instance_id: i.public_ip for i in instances if i.state == "running" and i.public_ip}
    shown = {iid: "?" for iid in running}
    machines = []
    for host in [*ssh_hosts, *(state.get(name) for name in sorted({i.name for i in instances}))]:
        endpoints = answered_before(host, running) if host is not None and host.kind in ("ec2", "ssh") else None
        if endpoints:
            machines.append((host, endpoints))
    for alias, count in count_waiting(machines).items():
        shown[alias] = "?" if count is None else str(count)
    return shown


def budget_spent(inst, price, state, stopped_at: float | None = None) -> float | None:
    """USD spent since launch, compute only, of a machine with a budget (None without one): what the console
    says its budget stopped it at, else the figure the machine's watchdog last gave mnist-cloud (a stopped
    one's stands), plus the hours since at today's price while it runs."""
    import time

    if inst.budget is None:
        return None
    if stopped_at is not None:
        return stopped_at
    host = state.get(inst.name)
    seen = (host.extra.get("budget") if host else None) or {}
    spent = seen.get("spent_usd")
    if spent is None:
        spent = 0.0 if price is None else inst.cost_so_far(price)  # this boot only: no figure from the machine yet
    elif inst.state == "running" and price is not None and price.usd_per_hour is not None:
        spent += max(0.0, time.time() - seen.get("at", time.time())) / 3600 * price.usd_per_hour
    return spent or 0.0


def _age(hours: float) -> str:
    minutes = int(hours * 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if hours else "-"
