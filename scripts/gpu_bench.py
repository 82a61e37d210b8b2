#!/usr/bin/env python3
"""The default recipe on one GPU, variant by variant: fp32, AMP, torch.compile, CUDA graph, larger batches.

    python scripts/gpu_bench.py --out OUT                           # every variant, seeds 1,2; the winner on 3-5
    python scripts/gpu_bench.py --variants fp32,graph-b512 --seeds 1
    python scripts/gpu_bench.py --device cpu --quick                # a smoke test of the script itself

A variant is `BASE[-bN][-lrX]`: BASE is one of VARIANTS below, `-bN` trains at batch N (the peak LR
scaled linearly from the recipe's, as `--batch-size N` does) and `-lrX` sets the peak LR instead.
Each variant runs in one fresh process, its seeds one after another inside it (`fit()`, as
`python -m trainer train` calls it), so a CUDA error in one variant cannot poison another, and no
seed pays for a second torch import. From each run's metrics.jsonl and result.json it reports:
- train s: the epochs' training steps (no evaluation, process start, data load, compile or capture);
- compile s: torch.compile's compilation or the CUDA graph's capture, reported apart;
- s/epoch: the median training time of one epoch;
- test %: result.json's test accuracy, of the weights the run delivers (model.pt): min and median.

The winner (`--winner-seeds`) follows the rule trainer/device.py states for the CUDA default: the
fastest median train time among the variants whose every seed delivered at least --bar % test
accuracy. gpu_bench.json and gpu_bench.md in --out are rewritten after every variant, so a run cut
short still leaves what it measured. Figures come only from the machine it ran on; the header names
the GPU and the torch and CUDA versions. Run it alone on the machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the script runs from a checkout: runspec/ and trainer/ are beside it

import runspec

# trainer flags per base variant, on top of the default recipe (net8k, 10 epochs, 24 px, batch 128, OneCycle,
# 5 test-time views) as a CUDA GPU trains it: every variant at 24 px throughout (SAME_SIZE), since the captured
# default drops the recipe's 20-px epochs (one graph, one size), so that the variants differ in speed only
SAME_SIZE = ["--early-epochs", "0"]
VARIANTS = {
    "fp32": ["--amp", "off", "--no-cuda-graph"],  # typed: no CUDA default fills anything in
    "amp": ["--amp", "on", "--no-cuda-graph"],  # bf16 on sm80+, fp16 + loss scaler below (a T4)
    "compile": ["--amp", "off", "--compile"],
    "compile-ro": ["--amp", "off", "--compile", "--compile-mode", "reduce-overhead"],
    "graph": ["--cuda-graph", "--amp", "off"],
    "graph-amp": ["--cuda-graph", "--amp", "on"],  # bf16 only: fp16's scaler cannot be captured
}
# The larger batches were chosen on the CPU, on validation, before any GPU ran (docs/gpu.md).
DEFAULT_VARIANTS = "fp32,amp,compile,graph,graph-amp,graph-b256,graph-amp-b256,graph-b512,graph-amp-b512"
QUICK = ["--epochs", "2", "--train-limit", "4096", "--eval-limit", "1000"]
NAME = re.compile(r"^(?P<base>[a-z0-9]+(?:-(?:amp|ro))?)(?:-b(?P<batch>\d+))?(?:-lr(?P<lr>[0-9.]+))?$")


def variant_flags(name: str) -> list[str]:
    """The trainer flags of a variant name; ValueError for a name that is not one."""
    m = NAME.match(name)
    if not m or m["base"] not in VARIANTS:
        raise ValueError(name)
    flags = [*VARIANTS[m["base"]], *SAME_SIZE]
    if m["batch"]:
        flags += ["--batch-size", m["batch"]]
    if m["lr"]:
        flags += ["--lr", m["lr"]]
    return flags


def device_banner(device: str) -> str:
    code = ("import torch; from trainer.device import capability, device_name, resolve_device;"
            f"d = resolve_device({device!r});"
            "cap = capability(d); cap = f', capability {cap[0]}.{cap[1]}' if cap else '';"
            "print(f'{device_name(d)}{cap}, torch {torch.__version__}, CUDA {torch.version.cuda}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() or (out.stderr.strip().splitlines() or ["?"])[-1]


def worker(args) -> int:
    """One variant, its seeds in this process: a JSON line per run on stdout."""
    from runspec.config import from_namespace
    from trainer.cli import parse_train_args
    from trainer.train import fit

    for seed in args.seeds:
        run_id = f"gpu-{args.worker}-s{seed}"
        argv = ["--device", args.device, *variant_flags(args.worker), "--seed", str(seed), "--run-id", run_id,
                "--out-dir", str(args.runs), "--no-progress", "--no-report",
                *(["--data-dir", args.data_dir] if args.data_dir else []), *(QUICK if args.quick else [])]
        print(f"$ python -m trainer train {' '.join(argv)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            ns, explicit = parse_train_args(argv)
            fit(from_namespace(ns), explicit)
        except Exception as e:  # noqa: BLE001 - reported as this run's error, the next seed still runs
            print(json.dumps({"variant": args.worker, "seed": seed, "error": f"{type(e).__name__}: {e}"[:300]}),
                  flush=True)
            continue
        run = runspec.read_run(Path(args.runs) / run_id)
        rows, result, config = run.rows, run.completed(), run.config
        print(json.dumps({
            "variant": args.worker, "seed": seed, "precision": config["device"]["amp"] or "fp32",
            "batch_size": config["config"]["batch_size"], "lr": config["config"]["lr"], "epochs": len(rows),
            "train_s": sum(r["train_seconds"] for r in rows),
            "epochs_s": sum(r["seconds"] for r in rows),
            "compile_s": sum(r.get("compile_seconds", 0.0) for r in rows),
            "epoch_s": statistics.median(r["train_seconds"] for r in rows),
            "test_acc": result["test_acc"], "run_s": time.perf_counter() - started}), flush=True)
    return runspec.ExitCode.OK


def run_variant(variant: str, seeds: list[int], args, runs: Path) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--seeds", ",".join(map(str, seeds)),
           "--device", args.device, "--runs", str(runs), *(["--data-dir", args.data_dir] if args.data_dir else []),
           *(["--quick"] if args.quick else [])]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {r["seed"] for r in results}
    for seed in seeds:
        if seed not in done:  # the process died (a CUDA fault, a kill): say so for each seed it did not report
            results.append({"variant": variant, "seed": seed, "error": f"worker exited {proc.returncode}"})
    for r in results:
        if "error" in r:
            print(f"  {variant} seed {r['seed']}: failed: {r['error']}", flush=True)
        else:
            print(f"  {variant} seed {r['seed']}: train {r['train_s']:.2f} s, compile {r['compile_s']:.1f} s, "
                  f"test {r['test_acc']:.2f}%", flush=True)
    return results


def summarize(results: list[dict], variant: str) -> dict | None:
    ok = [r for r in results if r["variant"] == variant and "error" not in r]
    if not ok:
        return None
    accs = [r["test_acc"] for r in ok]
    return {"variant": variant, "precision": ok[0]["precision"], "batch_size": ok[0]["batch_size"],
            "lr": ok[0]["lr"], "seeds": len(ok),
            "failed": sum(1 for r in results if r["variant"] == variant and "error" in r),
            "train_s": statistics.median(r["train_s"] for r in ok),
            "compile_s": statistics.median(r["compile_s"] for r in ok),
            "epoch_s": statistics.median(r["epoch_s"] for r in ok),
            "test_min": min(accs), "test_median": statistics.median(accs)}


def pick_winner(summaries: list[dict], bar: float) -> dict | None:
    """The rule of trainer/device.py's CUDA default: the fastest median train time among the variants
    that ran without a failure and whose every seed delivered at least `bar` % test accuracy."""
    held = [s for s in summaries if not s["failed"] and s["test_min"] >= bar]
    return min(held, key=lambda s: s["train_s"]) if held else None


def table(results: list[dict], variants: list[str]) -> str:
    lines = ["| variant | precision | batch | peak LR | train s | s/epoch | compile s | test % min | "
             "test % median | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        s = summarize(results, v)
        if s is None:
            why = next((r["error"] for r in results if r["variant"] == v), "not run")
            lines.append(f"| {v} | - | - | - | failed: {why} | | | | | 0 |")
            continue
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append(f"| {v} | {s['precision']} | {s['batch_size']} | {s['lr']:g} | {s['train_s']:.2f} | "
                      f"{s['epoch_s']:.3f} | {s['compile_s']:.1f} | {s['test_min']:.2f} | {s['test_median']:.2f} | "
                      f"{s['seeds']}{failed} |")
    return "\n".join(lines)


def write(out: Path, banner: str, args, results: list[dict], variants: list[str], winner: dict | None) -> None:
    summaries = [s for s in (summarize(results, v) for v in variants) if s]
    data = {"device": banner, "quick": args.quick, "bar": args.bar, "seeds": args.seeds,
            "summaries": summaries, "winner": winner, "results": results}
    tmp = out / "gpu_bench.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out / "gpu_bench.json")
    text = f"{banner}{' (--quick: not a measurement)' if args.quick else ''}\n\n{table(results, variants)}\n"
    if winner:
        text += (f"\nwinner (fastest with every seed >= {args.bar}%): {winner['variant']}, "
                 f"{winner['train_s']:.2f} s, test min {winner['test_min']:.2f}% over {winner['seeds']} seeds\n")
    (out / "gpu_bench.md").write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds per variant (default: %(default)s)")
    p.add_argument("--winner-seeds", default="3,4,5",
                   help="more seeds for the winner, so that it has 1-5 (default: %(default)s; '' for none)")
    p.add_argument("--bar", type=float, default=99.45, help="test %% every seed must hold (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="default: %(default)s")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST IDX directory")
    p.add_argument("--out", default=None, help="where gpu_bench.json and gpu_bench.md go (default: a temp dir)")
    p.add_argument("--runs", default=None, help="where the run directories go (default: OUT)")
    p.add_argument("--quick", action="store_true", help="2 epochs on 4,096 images: checks the script, measures nothing")
    p.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.worker:
        return worker(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if not _is_variant(v)]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; a variant is BASE[-bN][-lrX], BASE one of "
                f"{', '.join(VARIANTS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="mnist-cloud-gpu-bench-"))
    runs = Path(args.runs) if args.runs else out
    out.mkdir(parents=True, exist_ok=True)

    banner = device_banner(args.device)
    print(f"device: {banner}", flush=True)
    results: list[dict] = []
    for v in variants:
        results += run_variant(v, args.seeds, args, runs)
        write(out, banner, args, results, variants, None)
    winner = pick_winner([s for s in (summarize(results, v) for v in variants) if s], args.bar)
    extra = [int(s) for s in args.winner_seeds.split(",") if s]
    if winner and extra:
        print(f"winner on seeds {args.seeds}: {winner['variant']}; running seeds {extra}", flush=True)
        results += run_variant(winner["variant"], extra, args, runs)
        winner = summarize(results, winner["variant"])
    write(out, banner, args, results, variants, winner)
    print(f"\n{(out / 'gpu_bench.md').read_text()}")
    print(f"gpu_bench.json and gpu_bench.md: {out}; runs: {runs}")
    return runspec.ExitCode.FAILED if results and all("error" in r for r in results) else runspec.ExitCode.OK


def _is_variant(name: str) -> bool:
    try:
        variant_flags(name)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
