"""The runs on a machine that were never pulled (or changed since their pull, see
infra/agent/autostop.py's pull record): before `down` terminates a machine, pull them here or refuse
in one line; `pull --all` pulls them; `status` counts them.

Terminating deletes the root volume, and with it every run on it: a run is never lost by `down`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.errors import UserError
from infra.targets import SSHTarget


@dataclass
class Unpulled:
    """What one name's machines hold that is not pulled yet."""

    name: str
    nodes: list[SSHTarget] = field(default_factory=list)
    runs: dict[str, SSHTarget] = field(default_factory=dict)  # run id -> the node to pull it from

    @property
    def run_ids(self) -> list[str]:
        return sorted(self.runs)


def check(instances, region: str | None = None, profile: str | None = None,
          regions: dict[str, str] | None = None) -> tuple[list[Unpulled], list[str]]:
    """([Unpulled] per name with unpulled runs, [why a name could not be checked]) for the live
    instances about to be terminated. `regions`: name -> the region it was found in, where that differs."""
    found, problems = [], []
    for name in sorted({i.name for i in instances}):
        mine = [i for i in instances if i.name == name]
        not_running = [i for i in mine if i.state != "running"]
        if not_running:
            i = not_running[0]
            problems.append(f"{name} is {i.state}, so its runs cannot be checked (`mnist-cloud start {name}`, "
                            "then down again pulls them)")
            continue
        item = Unpulled(name)
        try:
            item.nodes = SSHTarget.resolve_cluster(name, (regions or {}).get(name, region), profile)
            item.runs = newest_unpulled(item.nodes)
        except UserError as e:
            close(item)
            problems.append(f"{name} cannot be checked ({str(e).split(';')[0]})")
            continue
        if item.runs:
            found.append(item)
        else:
            close(item)
    return found, problems


def newest_unpulled(nodes: list[SSHTarget]) -> dict[str, SSHTarget]:
    """{run id: node} of the runs whose newest copy is unpulled. A resumed cluster run was pushed to
    every node; the copy with the most epochs (rank 0's) is the run, the others are stale."""
    unpulled = {node.label: set(node.unpulled_runs()) for node in nodes}
    if len(nodes) == 1:
        return {run_id: nodes[0] for run_id in unpulled[nodes[0].label]}
    newest: dict[str, tuple[int, SSHTarget]] = {}
    for node in nodes:
        for run in node.runs():
            if run["run_id"] not in newest or run["epochs"] > newest[run["run_id"]][0]:
                newest[run["run_id"]] = (run["epochs"], node)
    return {run_id: node for run_id, (_, node) in newest.items() if run_id in unpulled[node.label]}


def refuse(found: list[Unpulled], problems: list[str], pull: bool) -> None:
    """One line, and nothing terminated, when a run could be lost: a machine could not be checked,
    or it holds unpulled runs and we may not pull them (--no-pull)."""
    held = [] if pull else [f"{u.name} holds unpulled run(s) {', '.join(u.run_ids)} (`mnist-cloud pull {u.name} RUN`, "
                             "or down without --no-pull pulls them)" for u in found]
    if held or problems:
        for u in found:
            close(u)
        raise UserError(f"not terminating, runs could be lost: {'; '.join(held + problems)}; "
                        "or add --discard-runs to delete them with the instance")


def pull_all(found: list[Unpulled], local_runs: Path, log=print, why: str = " before terminating it") -> None:
    """Pull every unpulled run into local_runs (as `mnist-cloud pull` does)."""
    for item in found:
        try:
            for run_id, node in sorted(item.runs.items()):
                res = node.pull(run_id, local_runs, log=log)
                log(f"pulled {run_id} from {node.label}{why}: {res.files} file(s), {res.bytes:,} bytes "
                    f"({res.method}) into {Path(local_runs) / run_id}")
        finally:
            close(item)


def close(item: Unpulled) -> None:
    for node in item.nodes:
        node.remote.close()


def pull_waiting(name: str, local_runs: Path, region: str | None = None, profile: str | None = None,
                 log=print) -> list[str]:
    """`pull NAME --all`: every run of `name` not pulled yet, each from the node holding its newest copy;
    returns their ids (none: nothing waited)."""
    item = Unpulled(name, SSHTarget.resolve_cluster(name, region, profile))
    try:
        item.runs = newest_unpulled(item.nodes)
    except BaseException:
        close(item)
        raise
    pull_all([item], local_runs, log=log, why="")
    return item.run_ids


def count_waiting(machines: list[tuple], connect_timeout: float = 3, deadline: float = 10) -> dict[str, int | None]:
    """`status`'s PULL column: {node's alias (instance id, or host:port): runs waiting to be pulled from
    it}, None where its machine could not be asked. `machines`: (Host, its nodes' Endpoints), from
    infra/resolve.py answered_before. Status is run often: every machine is asked at once, with a short
    connect timeout, and whatever has not answered after `deadline` seconds (connected, then stuck) is
    left to its daemon thread, which does not hold up the exit."""
    import threading

    from infra.remote import Remote

    answers: dict[int, dict[str, int | None]] = {}

    def ask(n: int, host, endpoints) -> None:
        nodes = []
        try:
            nodes = [SSHTarget(host, Remote(ep, connect_timeout=connect_timeout)) for ep in endpoints]
            counts = {node.remote.ep.alias: 0 for node in nodes}
            for node in newest_unpulled(nodes).values():
                counts[node.remote.ep.alias] += 1
            answers[n] = counts
        except UserError:
            pass
        finally:
            for node in nodes:
                node.remote.close()

    threads = [threading.Thread(target=ask, args=(n, *machine), daemon=True) for n, machine in enumerate(machines)]
    end = time.monotonic() + deadline
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    counts: dict[str, int | None] = {}
    for n, (_, endpoints) in enumerate(machines):
        counts.update(answers.get(n) or {ep.alias: None for ep in endpoints})
    return counts
