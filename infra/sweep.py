"""Sweeps: a grid of (model, seed, --set key=values) fanned out over machines, one run per GPU at a time,
a queue per machine, each failed run retried once, every run pulled back, and one summary over seeds.

Claims rest on many seeds, not one lucky run: the summary gives min, median and max test accuracy per
configuration (cifar10-airbench does the same). A run's test accuracy is its result.json's: the weights it
delivers (model.pt: the final weights, or their EMA), tested once at the end. The first epoch whose test
accuracy reached 99.40% needs --test-every-epoch, and is a peek at the test set, not a decision."""

from __future__ import annotations

import argparse
import itertools
import math
import queue
import re
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import runspec
from infra.errors import UserError
from infra.pricing import hourly_price
from infra.targets import SSHTarget, code_dir, run_trainer
from runspec.config import default_value

TARGET = runspec.TARGET


@dataclass
class Point:
    config: str  # the label shared by every seed of one configuration
    seed: int
    args: list[str]
    run_id: str
    attempts: int = 0
    status: str = "pending"  # pending / completed / failed / interrupted (Ctrl-C)
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


def epochs_of(trainer_args: list[str]) -> int:
    """A run's epochs: its --epochs, else its model's recipe's (runspec/recipes.py), else TrainConfig's."""
    probe = argparse.ArgumentParser(add_help=False)  # the last of each wins, abbreviated or not, as in the trainer
    for flag in ("--epochs", "--model", "--recipe"):
        probe.add_argument(flag)
    typed = probe.parse_known_args(trainer_args)[0]
    if typed.epochs and typed.epochs.isdigit():
        return int(typed.epochs)
    return default_value("epochs", typed.model, typed.recipe or "default")


def run_hours(trainer_args: list[str], epoch_seconds: float) -> float:
    """Hours of training of one run with these trainer flags (its epochs_of)."""
    return epochs_of(trainer_args) * epoch_seconds / 3600


def sweep_epochs(points: list[Point], trainer_args: list[str]) -> int:
    """The epochs of every run of the sweep, each with its own model's and --set's."""
    return sum(epochs_of([*trainer_args, *p.args]) for p in points)


def estimate(points: list[Point], trainer_args: list[str], instance_types: list[str], slots: int,
             epoch_seconds: float) -> tuple[float, float]:
    """(hours of wall time, USD) for the whole sweep, with every machine billed while it lasts."""
    wall = sum(run_hours([*trainer_args, *p.args], epoch_seconds) for p in points) / max(slots, 1)
    prices = [hourly_price(t) for t in instance_types]
    if any(p is None for p in prices):
        unknown = [t for t, p in zip(instance_types, prices) if p is None]
        raise UserError(f"no price for {', '.join(unknown)}: add it to prices.json to use --max-cost")
    return wall, wall * sum(prices)


# ---------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    name: str
    points: list[Point]
    trainer_args: list[str]
    models: list[str] | None
    seeds: list[int]

    def describe(self) -> str:
        models = len(self.models or [None])
        settings = max(1, len(self.points) // max(1, len(self.seeds)) // models)
        return (f"{self.name}: {len(self.points)} run(s) = {models} model(s) x {settings} setting(s) x "
                f"{len(self.seeds)} seed(s)")


def plan(name: str | None, models: str | None, seeds: str, sets: list[str], trainer_args: list[str]) -> Plan:
    """The grid from `mnist-cloud sweep`'s flags (--model a,b --seeds 1,2 --set lr=0.05,0.1); the other
    flags go to every run's trainer."""
    from infra.targets import has_option

    for flag in ("--seed", "--run-id", "--out-dir", "--resume"):
        if has_option(trainer_args, flag):
            raise UserError(f"{flag} is set by the sweep itself; use --seeds / --name / --to")
    seed_list = []
    for text in parse_list(seeds, "--seeds"):
        if not text.lstrip("-").isdigit():
            raise UserError(f"--seeds: {text!r} is not an integer")
        seed_list.append(int(text))
    grid = {}
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=V1,V2 (a trainer flag, e.g. lr=0.05,0.1)")
        grid[key.lstrip("-").replace("-", "_")] = parse_list(values, f"--set {key}")
    model_list = parse_list(models, "--model") if models else None
    name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    return Plan(name, expand(model_list, seed_list, grid, name), trainer_args, model_list, seed_list)


# ---------------------------------------------------------------------------------- running
class LocalSlot:
    """This machine: one run at a time, in the foreground, written straight into the runs directory."""

    where = "local"

    def __enter__(self) -> "LocalSlot":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def execute(self, run_id: str, args: list[str], runs: Path) -> int:
        return run_trainer(["train", *args, "--run-id", run_id, "--out-dir", str(runs), "--no-progress"])


@dataclass
class MachineSlot:
    """One GPU of a named machine (the whole machine when it has none): a run starts detached there, and
    is pulled back into the runs directory when it ends. Each slot holds its own SSH connection."""

    name: str
    python: str
    gpu: int | None
    source: Path
    region: str | None = None
    profile: str | None = None

    @property
    def where(self) -> str:
        return self.name if self.gpu is None else f"{self.name}:gpu{self.gpu}"

    def __enter__(self) -> "MachineSlot":
        self.target = SSHTarget.resolve(self.name, self.region, self.profile)
        self.target.remote.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.target.remote.__exit__(*exc)

    def execute(self, run_id: str, args: list[str], runs: Path) -> int:
        env = {**runspec.git_env(self.source), **({"CUDA_VISIBLE_DEVICES": str(self.gpu)} if self.gpu is not None else {})}
        self.target.run(args, run_id, self.python, env=env)
        _, exit_code = self.target.wait_finished(run_id, timeout=math.inf)
        if exit_code == runspec.ExitCode.OK:
            self.target.pull(run_id, runs, log=lambda m: None)
        return exit_code


def machine_slots(names: list[str], log, python: str | None = None, code: str | None = None, region=None,
                  profile=None, notify: list[str] | None = None) -> list[MachineSlot]:
    """Each machine prepared (SSH, sync, setup, the URLs its runs' ends go to: `notify`, else the ones it was
    launched with), and a slot per GPU it has (one for a machine without)."""
    from infra.notify import launched_urls, push_notify

    source = code_dir(code)
    slots = []
    for name in names:
        target = SSHTarget.resolve(name, region, profile)
        with target.remote:
            py = target.prepare(source, python, log)
            push_notify(target.remote, notify or launched_urls(name), log)
            gpus = target.gpu_count(py)
        slots += [MachineSlot(name, py, gpu if gpus else None, source, region, profile) for gpu in range(max(gpus, 1))]
    return slots


def run(points: list[Point], slots: list, trainer_args: list[str], runs: Path, log) -> bool:
    """Every point on the first free slot, local or a machine alike: one queue, a worker per slot, and
    a failed run goes back on the queue once (as RUN-retry, on whichever slot is free next). Returns
    whether Ctrl-C stopped the sweep: no slot takes another run after that.

    One slot (--local, or one machine without GPUs) runs on the main thread, where Ctrl-C lands: the
    trainer, in the same process group, saves its checkpoint and exits before the sweep does."""
    work: queue.Queue[Point] = queue.Queue()
    for p in points:
        work.put(p)
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def say(message: str) -> None:
        with lock:
            log(message)

    def worker(slot) -> None:
        try:
            with slot:
                while not stop.is_set():
                    try:
                        p = work.get_nowait()
                    except queue.Empty:
                        return
                    p.attempts += 1
                    run_id = p.run_id if p.attempts == 1 else f"{p.run_id}-retry"
                    say(f"[{slot.where}] {run_id}: {p.config} seed {p.seed}" + (" (retry)" if p.attempts > 1 else ""))
                    started = time.monotonic()
                    exit_code = slot.execute(run_id, [*trainer_args, *p.args], runs)
                    p.seconds, p.where = time.monotonic() - started, slot.where
                    if exit_code == runspec.ExitCode.INTERRUPTED:  # Ctrl-C: the user's stop, not a failure
                        p.run_id, p.status = run_id, "interrupted"
                        stop.set()
                        say(f"[{slot.where}] {run_id} interrupted; the sweep stops here")
                    elif exit_code == runspec.ExitCode.OK:
                        p.run_id, p.status = run_id, "completed"
                        say(f"[{slot.where}] {run_id} done")
                    elif p.attempts < 2:
                        say(f"[{slot.where}] {run_id} failed (exit {exit_code}); retrying once")
                        work.put(p)
                    else:
                        p.status = "failed"
                        say(f"[{slot.where}] {run_id} failed again (exit {exit_code}); giving up on it")
        except BaseException as e:  # surfaced after the other workers finish
            errors.append(e)

    if len(slots) == 1:
        worker(slots[0])
    else:
        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:  # remote runs go on, detached: `mnist-cloud runs NAME` lists them
            stop.set()
            raise
    if errors:
        raise errors[0]
    return stop.is_set()


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
    price_sources: list[str] = field(default_factory=list)  # where each costed run's price came from


def run_outcome(run_dir: Path) -> dict:
    """A completed run (pulled back here, wherever it ran): result.json's test accuracy and weights; the
    per-epoch test, when there is one, only for the peek. A damaged run is one line (runspec)."""
    run = runspec.read_run(run_dir)
    result = run.completed()
    rows = run.rows
    cloud = run.config.get("cloud") or {}
    price = cloud.get("price_per_hour")
    seconds = rows[-1]["elapsed"] if rows else 0.0
    return {"test_acc": result["test_acc"], "weights": result.get("weights", "final"),
            "tested_each_epoch": run.tested_each_epoch,
            "to_target": runspec.first_epoch_at_target(rows),
            "seconds": seconds, "cost": price * seconds / 3600 if price is not None else None,
            "price_source": cloud.get("price_source") or ("unknown" if price is not None else None)}


def summarize(points: list[Point], runs: Path) -> list[ConfigSummary]:
    out: dict[str, ConfigSummary] = {}
    for p in points:
        s = out.setdefault(p.config, ConfigSummary(p.config, 0, 0))
        s.runs += 1
        if p.status != "completed":
            s.failed += 1
            continue
        r = run_outcome(runs / p.run_id)
        s.accs.append(r["test_acc"])
        s.weights.append(r["weights"])
        if r["tested_each_epoch"]:
            s.epochs_to_target.append(r["to_target"])
        s.seconds.append(r["seconds"])
        if r["cost"] is not None:
            s.cost = (s.cost or 0.0) + r["cost"]
            s.price_sources.append(r["price_source"])
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
    sources = Counter(source for s in summaries for source in s.price_sources)
    by_source = "; ".join(f"{source} ({n} run(s))" for source, n in sources.items())
    priced = [f"cost priced by: {by_source}"] if sources else []
    return "\n".join([*runspec.table(header, rows), *priced])


def finish(plan: Plan, runs: Path, log) -> int:
    """The summary over seeds (printed, and saved as RUNS/NAME.json), the overlaid curves of the
    completed runs (RUNS/NAME.html), and exit code 1 when a run failed twice."""
    from dataclasses import asdict

    summaries = summarize(plan.points, runs)
    log("")
    log(table(summaries))
    summary_file = runs / f"{plan.name}.json"
    runspec.write_json(summary_file, {"name": plan.name, "points": [asdict(p) for p in plan.points],
                                      "summary": [asdict(s) for s in summaries]})
    done = [str(runs / p.run_id) for p in plan.points if p.status == "completed"]
    curves = runs / f"{plan.name}.html"
    if len(done) >= 2:
        run_trainer(["compare", *done, "--out", str(curves)])
    log(f"summary: {summary_file}" + (f"; curves: {curves}" if len(done) >= 2 else ""))
    failed = [p.run_id for p in plan.points if p.status == "failed"]
    if failed:
        log(f"{len(failed)} run(s) failed twice: {', '.join(failed)}")
    missing = [p.run_id for p in plan.points if p.status not in ("completed", "failed")]
    if missing:
        log(f"{len(missing)} run(s) interrupted or not started: {', '.join(missing)}")
    return runspec.ExitCode.FAILED if failed or missing else runspec.ExitCode.OK
