"""Sweeps: a grid of (model, seed, --set key=values) fanned out over machines, one run per GPU at a time,
a queue per machine, each failed run retried once, every run pulled back, and one summary over seeds.

Claims rest on many seeds, not one lucky run: the summary gives min, median and max test accuracy per
configuration (cifar10-airbench does the same). A run's test accuracy is its result.json's: the weights it
delivers (model.pt: the final weights, or their EMA), tested once at the end. The first epoch whose test
accuracy reached 99.40% needs --test-every-epoch, and is a peek at the test set, not a decision."""

from __future__ import annotations

import itertools
import math
import queue
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import runspec
from infra.errors import UserError
from infra.pricing import hourly_price
from infra.targets import LocalTarget, SSHTarget, code_dir

TARGET = runspec.TARGET


@dataclass
class Point:
    config: str  # the label shared by every seed of one configuration
    seed: int
    args: list[str]
    run_id: str
    attempts: int = 0
    status: str = "pending"  # pending / completed / failed
    where: str = ""
    seconds: float = 0.0


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"{what}: give a comma-separated list")
    return items


def expand(models: list[str] | None, seeds: list[int], sets: dict[str, list[str]], prefix: str) -> list[Point]:
    """The grid, in a stable order: configurations outer, seeds inner."""
    keys = sorted(sets)
    points = []
    for model in models or [None]:
        for values in itertools.product(*(sets[k] for k in keys)):
            label_parts = ([model] if model else []) + [f"{k}={v}" for k, v in zip(keys, values)]
            config = " ".join(label_parts) or "defaults"
            for seed in seeds:
                args = (["--model", model] if model else []) + \
                    [a for k, v in zip(keys, values) for a in (f"--{k.replace('_', '-')}", v)] + ["--seed", str(seed)]
                slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", f"{config}-s{seed}").strip("-").replace("=", "")
                points.append(Point(config, seed, args, f"{prefix}-{len(points):02d}-{slug}"[:80]))
    return points


def epochs_of(trainer_args: list[str], default: int = 15) -> int:
    for i, a in enumerate(trainer_args):
        if a == "--epochs" and i + 1 < len(trainer_args) and trainer_args[i + 1].isdigit():
            return int(trainer_args[i + 1])
    return default


def estimate(points: list[Point], trainer_args: list[str], instance_types: list[str], slots: int,
             epoch_seconds: float) -> tuple[float, float]:
    """(hours of wall time, USD) for the whole sweep, with every machine billed while it lasts."""
    run_hours = epochs_of(trainer_args) * epoch_seconds / 3600
    wall = len(points) * run_hours / max(slots, 1)
    prices = [hourly_price(t) for t in instance_types]
    if any(p is None for p in prices):
        unknown = [t for t, p in zip(instance_types, prices) if p is None]
        raise UserError(f"no price for {', '.join(unknown)}: add it to prices.json to use --max-cost")
    return wall, wall * sum(prices)


# ---------------------------------------------------------------------------------- running
def run_local(points: list[Point], trainer_args: list[str], runs: Path, log) -> None:
    for p in points:
        for attempt in (1, 2):
            run_id = p.run_id if attempt == 1 else f"{p.run_id}-retry"
            log(f"[local] {run_id}: {p.config} seed {p.seed}" + (" (retry)" if attempt == 2 else ""))
            started = time.monotonic()
            code = LocalTarget().run(["train", *trainer_args, *p.args, "--run-id", run_id, "--out-dir", str(runs),
                                      "--no-progress"])
            p.attempts, p.seconds, p.where = attempt, time.monotonic() - started, "local"
            if code == 0:
                p.run_id, p.status = run_id, "completed"
                break
            p.status = "failed"
            log(f"[local] {run_id} failed (exit {code})" + ("; retrying once" if attempt == 1 else ""))


def run_remote(names: list[str], points: list[Point], trainer_args: list[str], runs: Path, log,
               python: str | None = None, code: str | None = None, region=None, profile=None) -> None:
    """A queue per machine and a worker per GPU (one for a machine without GPUs); each run detached."""
    source = code_dir(code)
    work: queue.Queue[Point] = queue.Queue()
    for p in points:
        work.put(p)
    slots = []
    for name in names:
        target = SSHTarget.resolve(name, region, profile)
        with target.remote:
            py = target.prepare(source, python, log)
            gpus = target.gpu_count(py)
        slots += [(name, py, gpu if gpus else None) for gpu in range(max(gpus, 1))]
    log(f"sweep: {len(points)} run(s) on {len(slots)} slot(s): " + ", ".join(
        f"{n}{'' if g is None else f':gpu{g}'}" for n, _, g in slots))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str, py: str, gpu: int | None) -> None:
        try:
            target = SSHTarget.resolve(name, region, profile)
            env = {**runspec.git_env(source), **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})}
            with target.remote:
                while True:
                    try:
                        p = work.get_nowait()
                    except queue.Empty:
                        return
                    p.attempts += 1
                    run_id = p.run_id if p.attempts == 1 else f"{p.run_id}-retry"
                    where = f"{name}{'' if gpu is None else f':gpu{gpu}'}"
                    with lock:
                        log(f"[{where}] {run_id}: {p.config} seed {p.seed}" + (" (retry)" if p.attempts > 1 else ""))
                    started = time.monotonic()
                    target.run([*trainer_args, *p.args], run_id, py, env=env)
                    _, exit_code = target.wait_finished(run_id, timeout=math.inf)
                    p.seconds, p.where = time.monotonic() - started, where
                    if exit_code == 0:
                        target.pull(run_id, runs, log=lambda m: None)
                        p.run_id, p.status = run_id, "completed"
                        with lock:
                            log(f"[{where}] {run_id} done")
                    elif p.attempts < 2:
                        with lock:
                            log(f"[{where}] {run_id} failed (exit {exit_code}); retrying once")
                        work.put(p)
                    else:
                        p.status = "failed"
                        with lock:
                            log(f"[{where}] {run_id} failed again (exit {exit_code}); giving up on it")
        except BaseException as e:  # surfaced after the other workers finish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=slot, daemon=True) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------- results
@dataclass
class ConfigSummary:
    config: str
    runs: int
    failed: int
    accs: list[float] = field(default_factory=list)  # the delivered weights' test accuracy, per run
    weights: list[str] = field(default_factory=list)  # what each run delivered: "final" or "ema"
    # per run with per-epoch test (--test-every-epoch) only: the first epoch at TARGET, None if never
    epochs_to_target: list[int | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cost: float | None = None


def read_run(run_dir: Path) -> dict:
    """A completed run (pulled back here, wherever it ran): result.json's test accuracy and weights; the
    per-epoch test, when there is one, only for the peek. A damaged run is one line (runspec)."""
    run = runspec.read_run(run_dir)
    result = run.completed()
    rows = run.rows
    price = (run.config.get("cloud") or {}).get("price_per_hour")
    seconds = rows[-1]["elapsed"] if rows else 0.0
    tested = [r for r in rows if r.get("test_acc") is not None]
    return {"test_acc": result["test_acc"], "weights": result.get("weights", "final"),
            "tested_each_epoch": bool(tested),
            "to_target": next((r["epoch"] for r in tested if r["test_acc"] >= TARGET), None),
            "seconds": seconds, "cost": price * seconds / 3600 if price is not None else None}


def summarize(points: list[Point], runs: Path) -> list[ConfigSummary]:
    out: dict[str, ConfigSummary] = {}
    for p in points:
        s = out.setdefault(p.config, ConfigSummary(p.config, 0, 0))
        s.runs += 1
        if p.status != "completed":
            s.failed += 1
            continue
        r = read_run(runs / p.run_id)
        s.accs.append(r["test_acc"])
        s.weights.append(r["weights"])
        if r["tested_each_epoch"]:
            s.epochs_to_target.append(r["to_target"])
        s.seconds.append(r["seconds"])
        if r["cost"] is not None:
            s.cost = (s.cost or 0.0) + r["cost"]
    return list(out.values())


def table(summaries: list[ConfigSummary]) -> str:
    header = ["config", "runs", "delivered", "min test", "median test", "max test",
              f"first epoch test>={TARGET:.2f}% (peek, median)", "time (median)", "cost"]
    rows = []
    for s in summaries:
        reached = [e for e in s.epochs_to_target if e is not None]
        if reached:
            to_target = f"{statistics.median(reached):g} ({len(reached)}/{len(s.epochs_to_target)} reached)"
        else:
            to_target = "not reached" if s.epochs_to_target else ("n/a" if s.accs else "-")
        rows.append([s.config, f"{len(s.accs)}/{s.runs}" + (f" ({s.failed} failed)" if s.failed else ""),
                     ", ".join(sorted(set(s.weights))) or "-",
                     f"{min(s.accs):.2f}%" if s.accs else "-", f"{statistics.median(s.accs):.2f}%" if s.accs else "-",
                     f"{max(s.accs):.2f}%" if s.accs else "-", to_target,
                     f"{statistics.median(s.seconds):.0f}s" if s.seconds else "-",
                     "-" if s.cost is None else f"${s.cost:.3f}"])
    return "\n".join(runspec.table(header, rows))
