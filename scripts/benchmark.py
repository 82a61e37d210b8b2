#!/usr/bin/env python3
"""Delivered test accuracy and whole-run wall time of our recipes over seeds, against the seed pipeline.

    python scripts/benchmark.py                    # seeds 1-5 x (net8k, net20k), then the seed pipeline
    python scripts/benchmark.py --seeds 1 --recipes net8k --seed-pipeline throughput
    python scripts/benchmark.py --recipes net8k --extra-recipe 'net8k-r10=--rotate 10'

Each (recipe, seed) is one `python -m trainer train` in a fresh process, timed by this script from
process start to exit (data loading, every epoch, the final test, the report). The accuracy of a run
is result.json's "test_acc": the test accuracy of the weights the run delivers (its model.pt; "weights"
says final or EMA). Per recipe it reports the min and median of that over seeds, never the best run.

The seed pipeline (scripts/seed_pipeline.py) is what the seed projects ran: seed 001's net and recipe
on a torchvision-style DataLoader over PIL images with RandomRotation(7), batch 128, 2 workers.
`--seed-pipeline full` (the default) trains it, testing after every epoch as the seed projects did,
until it reaches 99.40% on test; its seconds to get there, over the median whole-run wall time of a
recipe, is that recipe's speed-up. `full` and `throughput` also time training img/s of both pipelines on
the same nets (ours at what `python -m trainer train --model NET` would use: batch, input size,
augmentation); `skip` neither.

Our recipes run first and benchmark.json (in --out) is rewritten after every run, so a crash late
keeps the rows before it. The tables printed at the end are markdown, ready for the README.
Run it alone on the machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))  # the script runs from a checkout: trainer/ is beside it, not installed
sys.path.insert(0, str(SCRIPTS))  # and seed_pipeline.py beside this file, also when it is loaded as a module

import runspec
from runspec import UserError

TARGET = runspec.TARGET
SEED_PIPELINE = "seed pipeline (seed001)"

# The recipes benchmarked: name -> `python -m trainer train` flags on top of the defaults.
# Add one here (or for one run, with --extra-recipe NAME="flags") and --recipes accepts its name.
RECIPES: dict[str, list[str]] = {
    "net8k": [],  # the defaults: net8k and its default recipe (runspec/recipes.py)
    "net8k-fast": ["--recipe", "fast"],  # the same, fewer epochs: time first, less margin
    "net20k": ["--model", "net20k"],  # + its recipe: rotate 10, translate 0.1, scale 0.1
}
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it becomes part of a run directory's name


# ---------------------------------------------------------------- what to run
def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if not seeds:
        raise UserError("--seeds names no seed")
    return list(dict.fromkeys(seeds))


def parse_recipes(names: str, extra_recipes: list[str]) -> dict[str, list[str]]:
    """The recipes to run, in order: those named by --recipes, then every --extra-recipe NAME=FLAGS."""
    extras: dict[str, list[str]] = {}
    for spec in extra_recipes:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not RECIPE_NAME.fullmatch(name):
            raise UserError(f"--extra-recipe takes NAME=\"trainer flags\" with NAME of letters, digits, '.', '_' "
                            f"or '-', e.g. 'net8k-r10=--rotate 10'; got {spec!r}")
        if name in RECIPES or name in extras:
            raise UserError(f"--extra-recipe {name}: that recipe already exists; pick another name")
        extras[name] = shlex.split(flags)
    known = {**RECIPES, **extras}
    chosen = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UserError(f"unknown recipe {', '.join(map(repr, unknown))} in --recipes; choose from "
                        f"{', '.join(known)}, or add one with --extra-recipe NAME=\"trainer flags\"")
    chosen += [n for n in extras if n not in chosen]
    if not chosen:
        raise UserError("no recipe to run: name some with --recipes or add one with --extra-recipe")
    return {n: known[n] for n in chosen}


def run_id(recipe: str, seed: int) -> str:
    return f"bench-{recipe}-s{seed}"


# ---------------------------------------------------------------- one run of ours
def run_numbers(run_dir: Path) -> dict[str, Any]:
    """A completed run's numbers: result.json (the delivered weights' test accuracy), config.json, metrics.jsonl.
    "peek_epoch" is the first epoch whose test accuracy reached TARGET: it PEEKS at the test set, so it is
    never a headline; "n/a" when no epoch was tested (the trainer tests only at the end unless
    --test-every-epoch)."""
    run = runspec.read_run(run_dir)
    result, rows = run.completed(), run.rows
    return {"test_acc": result["test_acc"],
            "weights": result.get("weights"),  # "final" or "ema"; absent from trainers before issue 12
            "params": run.config["model"]["params"],
            "epochs": len(rows),
            "seconds_per_epoch": statistics.median(r["seconds"] for r in rows),
            "img_per_s": statistics.median(r["img_per_s"] for r in rows),
            "peek_epoch": runspec.first_epoch_at_target(rows, TARGET) if run.tested_each_epoch else "n/a"}


def run_recipe(name: str, flags: list[str], seed: int, runs_dir: Path, extra: list[str]) -> dict[str, Any]:
    rid = run_id(name, seed)
    cmd = [sys.executable, "-m", "trainer", "train", *flags, "--seed", str(seed), "--run-id", rid,
           "--out-dir", str(runs_dir), "--no-progress", *extra]
    print(f"$ python {shlex.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)  # stderr passes through: errors show
    wall = time.perf_counter() - started
    if proc.returncode:
        raise UserError(f"run {rid} failed (exit {proc.returncode}, its error is above; run directory "
                        f"{runs_dir / rid}); benchmark.json keeps the runs before it")
    return {"recipe": name, "seed": seed, "flags": flags, **run_numbers(runs_dir / rid), "wall_seconds": wall}


# ---------------------------------------------------------------- summaries
def speed_up(seed_pipeline: dict | None, seconds: float) -> float | None:
    """Seed pipeline's seconds to TARGET test accuracy over our whole-run seconds; None if it never got there."""
    if not seed_pipeline or seed_pipeline.get("seconds_to_target") is None:
        return None
    return seed_pipeline["seconds_to_target"] / seconds


def summarize(runs: list[dict], seed_pipeline: dict | None) -> list[dict[str, Any]]:
    """Per recipe, over seeds: min and median delivered test accuracy, median and max wall time, speed-ups."""
    by_recipe: dict[str, list[dict]] = {}
    for r in runs:
        by_recipe.setdefault(r["recipe"], []).append(r)
    out = []
    for name, rows in by_recipe.items():
        accs, walls = [r["test_acc"] for r in rows], [r["wall_seconds"] for r in rows]
        wall_median, wall_max = statistics.median(walls), max(walls)
        out.append({"recipe": name, "runs": len(rows), "at_target": sum(a >= TARGET for a in accs),
                    "test_min": min(accs), "test_median": statistics.median(accs),
                    "wall_median": wall_median, "wall_max": wall_max,
                    "speed_up_median": speed_up(seed_pipeline, wall_median),
                    "speed_up_slowest": speed_up(seed_pipeline, wall_max)})
    return out


# ---------------------------------------------------------------- tables
def fmt(v, spec: str = ".2f", none: str = "n/a") -> str:
    if v is None:
        return none
    return v if isinstance(v, str) else format(v, spec)


def times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def header(host: dict) -> str:
    return (f"host: {host['cpu']}, {host['cores']} cores, torch {host['torch']}\n"
            f"command: `{host['command']}`")


def runs_table(runs: list[dict]) -> str:
    lines = [f"| recipe | seed | params | epochs | weights | test acc (delivered) | wall (s) | s/epoch | img/s | "
             f"first epoch test >= {TARGET:.2f}% (peeks at test) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['params']:,} | {r['epochs']} | {fmt(r['weights'])} | "
                     f"{r['test_acc']:.2f}% | {r['wall_seconds']:.0f} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['img_per_s']:,.0f} | {fmt(r['peek_epoch'], 'd', none='not reached')} |")
    return "\n".join(lines)


def recipes_table(summary: list[dict]) -> str:
    lines = [f"| recipe | seeds | test min | test median | seeds >= {TARGET:.2f}% | wall median (s) | wall max (s) | "
             "speed-up (median) | speed-up (slowest seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['recipe']} | {s['runs']} | {s['test_min']:.2f}% | {s['test_median']:.2f}% | "
                     f"{s['at_target']}/{s['runs']} | {s['wall_median']:.0f} | {s['wall_max']:.0f} | "
                     f"{times(s['speed_up_median'])} | {times(s['speed_up_slowest'])} |")
    return "\n".join(lines)


def seed_pipeline_line(sp: dict) -> str:
    reached = (f"{TARGET:.2f}% test at epoch {sp['epoch_to_target']} after **{sp['seconds_to_target']:.0f} s**"
               if sp["seconds_to_target"] is not None else
               f"did not reach {TARGET:.2f}% test in {sp['epochs']} epochs (best {sp['best_test']:.2f}%)")
    return (f"seed pipeline ({sp['model']} net, seed {sp['seed']}, {sp['workers']} workers): {reached}; "
            f"{sp['seconds_per_epoch']:.0f} s/epoch, {sp['img_per_s']:,.0f} img/s")


def speed_up_lines(summary: list[dict], sp: dict) -> str:
    lines = []
    for s in summary:
        if s["speed_up_median"] is None:
            lines.append(f"speed-up of {s['recipe']}: n/a (the seed pipeline did not reach {TARGET:.2f}% test)")
            continue
        short = (f"; only {s['at_target']}/{s['runs']} seeds delivered >= {TARGET:.2f}% test"
                 if s["at_target"] < s["runs"] else "")
        lines.append(f"speed-up of {s['recipe']}: seed pipeline {sp['seconds_to_target']:.0f} s to {TARGET:.2f}% test "
                     f"/ {s['recipe']}'s median whole run {s['wall_median']:.0f} s = **{s['speed_up_median']:.1f}x** "
                     f"({s['speed_up_slowest']:.1f}x against its slowest seed, {s['wall_max']:.0f} s; "
                     f"delivered test min {s['test_min']:.2f}%{short})")
    return "\n".join(lines)


def throughput_table(rows: list[dict]) -> str:
    t = rows[0]
    lines = [f"training throughput on the same net: ours at the trainer's defaults (batch {t['ours_batch']}, "
             f"{t['ours_input']}x{t['ours_input']} input, {t['ours_augment']}) vs the seed DataLoader + PIL "
             f"(batch 128, 28x28, RandomRotation(7), {t['workers']} workers)", "",
             "| net | ours (img/s) | seed DataLoader + PIL (img/s) | speed-up |", "|---|---|---|---|"]
    for t in rows:
        lines.append(f"| {t['model']} | {t['ours_img_per_s']:,.0f} | {t['seed_img_per_s']:,.0f} | "
                     f"{t['ours_img_per_s'] / t['seed_img_per_s']:.1f}x |")
    return "\n".join(lines)


def render(report: dict) -> str:
    """Every table of the report, markdown, in the order the README shows them."""
    parts = [header(report["host"])]
    summary = summarize(report["runs"], report["seed_pipeline"])
    if report["runs"]:
        parts += [runs_table(report["runs"]), recipes_table(summary)]
    sp = report["seed_pipeline"]
    if sp:
        parts.append(seed_pipeline_line(sp))
        if summary:
            parts.append(speed_up_lines(summary, sp))
    if report["throughput"]:
        parts.append(throughput_table(report["throughput"]))
    return "\n\n".join(parts)


def host_info(argv: list[str]) -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "node": platform.node(),
            "command": "python " + shlex.join(argv)}


def trainer_defaults(model_name: str):
    """The TrainConfig `python -m trainer train --model NAME` would run: the defaults plus the model's recipe."""
    from trainer.cli import parse_train_args
    from runspec.config import from_namespace

    return from_namespace(parse_train_args(["--model", model_name])[0])


def throughput(model_name: str, data_dir: str | None, steps: int, workers: int) -> dict:
    """Training img/s on one net: our device-resident pipeline at the trainer's defaults (batch, input
    size, augmentation, channels-last) vs the seed DataLoader (batch 128, RandomRotation(7), 28x28)."""
    import torch
    import torch.nn.functional as F

    from trainer.augment import augment
    from trainer.data import load_mnist, make_splits, normalize
    from trainer.fetch import resolve_data_dir
    from trainer.models import build_model

    import seed_pipeline

    cfg = trainer_defaults(model_name)

    def timed(batches, channels_last: bool) -> float:
        model = build_model(model_name)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        seen, start = 0, None
        for i, (x, y) in enumerate(batches()):
            if i == 5:  # warm-up excluded
                seen, start = 0, time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += y.shape[0]
            if i == steps + 5:
                break
        return seen / (time.perf_counter() - start)

    data = make_splits(load_mnist(resolve_data_dir(data_dir)), cfg.val_size, 1, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    aug, batch = cfg.augment_config(), cfg.batch_size
    channels_last = cfg.channels_last != "off"  # "auto" is on for CPU

    def ours():
        while True:
            perm = torch.randperm(len(data.train), generator=gen)
            for i in range(0, len(perm) - batch + 1, batch):
                idx = perm[i:i + batch]
                x = augment(data.train.images[idx].float().div_(255), aug, gen)  # cut to aug.input_size
                memory_format = torch.channels_last if channels_last else torch.contiguous_format
                yield normalize(x).contiguous(memory_format=memory_format), data.train.labels[idx]

    def seeds():
        train, _, _ = seed_pipeline.loaders(data_dir, 1, workers=workers)
        while True:
            yield from train

    knobs = ("rotate", "translate", "scale", "shear", "perspective", "brightness", "contrast", "crop")
    augment_text = ", ".join(f"{k} {getattr(aug, k):g}" for k in knobs if getattr(aug, k)) or "no augmentation"
    return {"model": model_name, "ours_batch": batch, "ours_input": aug.input_size, "ours_augment": augment_text,
            "workers": workers, "ours_img_per_s": timed(ours, channels_last), "seed_img_per_s": timed(seeds, False)}


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"comma-separated recipes, of: {', '.join(RECIPES)} (default: %(default)s)")
    p.add_argument("--extra-recipe", action="append", default=[], metavar='NAME="FLAGS"',
                   help="also run an ad-hoc recipe: trainer flags on top of the defaults, e.g. "
                        "'net8k-r10=--rotate 10' (repeatable)")
    p.add_argument("--seed-pipeline", choices=("full", "throughput", "skip"), default="full",
                   help="full: also train the seed pipeline to 99.40%% test (about 20 min on 2 cores) and time "
                        "throughput; throughput: only img/s; skip: neither (default: %(default)s)")
    p.add_argument("--seed-epochs", type=int, default=19, help="seed pipeline epoch budget (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="seed pipeline DataLoader workers (default: %(default)s)")
    p.add_argument("--throughput-steps", type=int, default=60, help="timed steps per pipeline (default: %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"),
                   help="MNIST IDX directory (default: $MNIST_DATA_DIR, else the trainer's choice)")
    p.add_argument("--out", default=None, help="directory for runs/ and benchmark.json (default: a new temp dir)")
    p.add_argument("--extra", default="", help="extra trainer flags for every recipe run, e.g. '--epochs 10'")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(argv[1:])
    seeds = parse_seeds(args.seeds)
    recipes = parse_recipes(args.recipes, args.extra_recipe)
    out = Path(args.out or tempfile.mkdtemp(prefix="mnist-cloud-bench-"))
    runs_dir = out / "runs"
    taken = [runs_dir / run_id(n, s) for n in recipes for s in seeds if (runs_dir / run_id(n, s)).exists()]
    if taken:  # found now, not after an hour of the runs before it
        raise UserError(f"{taken[0]} already exists; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra) + (["--data-dir", args.data_dir] if args.data_dir else [])
    report: dict[str, Any] = {"host": host_info(argv), "target": TARGET, "runs": [], "seed_pipeline": None,
                              "throughput": []}

    def save() -> None:
        runspec.write_json(out / "benchmark.json", report)

    for name, flags in recipes.items():
        for seed in seeds:
            report["runs"].append(run_recipe(name, flags, seed, runs_dir, extra))
            save()
    if args.seed_pipeline != "skip":
        for model_name in ("seed001", "net8k"):
            print(f"throughput: {model_name}", flush=True)
            report["throughput"].append(throughput(model_name, args.data_dir, args.throughput_steps, args.workers))
            save()
    if args.seed_pipeline == "full":
        print(f"seed pipeline: training seed001 until {TARGET:.2f}% test", flush=True)
        import seed_pipeline  # torch, torchvision and PIL: only once the seed pipeline runs

        report["seed_pipeline"] = {"recipe": SEED_PIPELINE,
                                   **seed_pipeline.run(args.data_dir, seeds[0], args.seed_epochs, args.workers)}
        save()
    print("\n" + render(report))
    print(f"\nruns and benchmark.json in {out}")
    return runspec.ExitCode.OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(runspec.ExitCode.BAD_INPUT)
