#!/usr/bin/env python3
"""The default recipe on one GPU, variant by variant: fp32, AMP, torch.compile, CUDA graph.

    python scripts/gpu_bench.py --data-dir .data/mnist               # every variant, seeds 1,2,3
    python scripts/gpu_bench.py --variants fp32,graph --seeds 1
    python scripts/gpu_bench.py --device cpu --quick                 # a smoke test of the script itself

Each (variant, seed) is a fresh `python -m trainer train` process on the full 15-epoch default recipe.
From its metrics.jsonl and result.json it reports:
- train s: the 15 epochs' training steps (no evaluation, no process start, no data load);
- epochs s: the same plus the per-epoch validation (and test, only with --test-every-epoch);
- compile s: torch.compile's compilation or the CUDA graph's capture, reported apart;
- s/epoch: the median training time of one epoch;
- test %: result.json's test accuracy, of the weights the run delivers (model.pt); min and median over seeds.
Figures come only from the machine it ran on; the header names the GPU and the torch version.
Run it alone on the machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the script runs from a checkout: runspec/ is beside it, not installed

import runspec

# trainer flags per variant, on top of the defaults (net8k, 15 epochs, batch 128, OneCycle)
VARIANTS = {
    "fp32": ["--amp", "off"],
    "amp": ["--amp", "on"],  # bf16 on sm80+, fp16 + loss scaler below (a T4)
    "compile": ["--compile"],
    "compile-ro": ["--compile", "--compile-mode", "reduce-overhead"],
    "graph": ["--cuda-graph"],
    "graph-amp": ["--cuda-graph", "--amp", "on"],  # bf16 only: fp16's scaler cannot be captured
}
QUICK = ["--epochs", "2", "--train-limit", "4096", "--eval-limit", "1000"]


def device_banner(device: str) -> str:
    code = ("import torch; from trainer.device import capability, device_name, resolve_device;"
            f"d = resolve_device({device!r});"
            "cap = capability(d); cap = f', capability {cap[0]}.{cap[1]}' if cap else '';"
            "print(f'{device_name(d)}{cap}, torch {torch.__version__}, CUDA {torch.version.cuda}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def run_variant(variant: str, seed: int, args, out: Path) -> dict:
    run_id = f"gpu-{variant}-s{seed}"
    cmd = [sys.executable, "-m", "trainer", "train", "--device", args.device, *VARIANTS[variant],
           "--seed", str(seed), "--run-id", run_id, "--out-dir", str(out), "--no-progress", "--no-report",
           *(["--data-dir", args.data_dir] if args.data_dir else []), *(QUICK if args.quick else [])]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  failed (exit {proc.returncode}): {last}", flush=True)
        return {"variant": variant, "seed": seed, "error": last}
    run = runspec.read_run(out / run_id)
    rows, result = run.rows, run.completed()
    config = run.config
    return {"variant": variant, "seed": seed, "amp": config["device"]["amp"] or "fp32",
            "train_s": sum(r["train_seconds"] for r in rows),
            "epochs_s": sum(r["seconds"] for r in rows),
            "compile_s": sum(r.get("compile_seconds", 0.0) for r in rows),
            "epoch_s": statistics.median(r["train_seconds"] for r in rows),
            "test_acc": result["test_acc"], "process_s": wall}


def table(results: list[dict], variants: list[str]) -> str:
    lines = ["| variant | precision | train s (median) | epochs s (median) | compile s | s/epoch | "
             "test % min | test % median | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        ok = [r for r in results if r["variant"] == v and "error" not in r]
        failed = [r for r in results if r["variant"] == v and "error" in r]
        if not ok:
            why = failed[0]["error"] if failed else "not run"
            lines.append(f"| {v} | - | failed: {why} | | | | | | {len(failed)} |")
            continue
        med = lambda key: statistics.median(r[key] for r in ok)
        accs = [r["test_acc"] for r in ok]
        lines.append(f"| {v} | {ok[0]['amp']} | {med('train_s'):.2f} | {med('epochs_s'):.2f} | "
                     f"{med('compile_s'):.1f} | {med('epoch_s'):.3f} | {min(accs):.2f} | "
                     f"{statistics.median(accs):.2f} | {len(ok)}{f' ({len(failed)} failed)' if failed else ''} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="default: %(default)s")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST IDX directory")
    p.add_argument("--out", default=None, help="directory for the runs and gpu_bench.json (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="2 epochs on 4,096 images: checks the script, measures nothing")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out or tempfile.mkdtemp(prefix="mnist-cloud-gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    banner = device_banner(args.device)
    print(f"device: {banner}", flush=True)
    results = [run_variant(v, s, args, out) for v in variants for s in seeds]
    (out / "gpu_bench.json").write_text(json.dumps({"device": banner, "quick": args.quick, "results": results},
                                                   indent=2))
    print(f"\n{banner}{' (--quick: not a measurement)' if args.quick else ''}")
    print(table(results, variants))
    print(f"\nruns and gpu_bench.json: {out}")
    return 1 if any("error" in r for r in results) and not any("error" not in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
