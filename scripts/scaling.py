#!/usr/bin/env python3
"""Data-parallel scaling on this machine: one process against `torchrun --nproc_per_node N` (CPU, gloo).

    python scripts/scaling.py                         # net8k, 3 epochs on 20,000 images, 1 vs 2 processes
    python scripts/scaling.py --procs 1,2 --epochs 5 --train-limit 50000 --seeds 1,2

Every configuration runs the same `python -m trainer train` with the same *global* batch (so the
same number of optimizer steps and the same schedule); N processes split the machine's cores
between them (`--threads` per process = cores / N), so the comparison is at equal hardware.
It prints a markdown table: seconds per epoch (training only, median over epochs), training img/s,
and the delivered weights' test accuracy, from result.json (min / median over seeds). Run it alone on the
machine: it measures time.
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


def run(procs: int, seed: int, args, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // procs)
    run_id = f"scale-p{procs}-s{seed}"
    trainer = ["-m", "trainer", "train", "--model", args.model, "--epochs", str(args.epochs), "--train-limit",
               str(args.train_limit), "--batch-size", str(args.batch_size), "--seed", str(seed), "--threads",
               str(threads), "--run-id", run_id, "--out-dir", str(out), "--no-progress", "--no-report"]
    if args.data_dir:
        trainer += ["--data-dir", args.data_dir]
    if procs == 1:
        cmd = [sys.executable, *trainer]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *trainer]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - started
    run = runspec.read_run(out / run_id)
    rows, result = run.rows, run.completed()
    return {"procs": procs, "threads": threads, "seed": seed, "epochs": len(rows),
            "train_seconds": statistics.median(r["train_seconds"] for r in rows),
            "img_per_s": statistics.median(r["img_per_s"] for r in rows),
            "test_acc": result["test_acc"], "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="process counts to compare (default: %(default)s)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--model", default="net8k", help="model (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=20000, help="training images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="the global batch (default: %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST IDX directory")
    p.add_argument("--out", default=None, help="directory for the runs and scaling.json (default: a temp dir)")
    args = p.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="mnist-cloud-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    results = [run(int(n), int(s), args, out) for n in args.procs.split(",") for s in args.seeds.split(",")]
    (out / "scaling.json").write_text(json.dumps(results, indent=2))

    print(f"\n{args.model}, {args.train_limit:,} training images, global batch {args.batch_size}, "
          f"{args.epochs} epochs, {os.cpu_count()} cores, seeds {args.seeds}:\n")
    print("| processes x threads | s/epoch (train) | img/s | speed-up | test min / median |")
    print("|---|---|---|---|---|")
    base = None
    for n in dict.fromkeys(r["procs"] for r in results):
        rows = [r for r in results if r["procs"] == n]
        secs = statistics.median(r["train_seconds"] for r in rows)
        ips = statistics.median(r["img_per_s"] for r in rows)
        base = base or secs
        accs = [r["test_acc"] for r in rows]
        print(f"| {n} x {rows[0]['threads']} | {secs:.1f} | {ips:,.0f} | {base / secs:.2f}x | "
              f"{min(accs):.2f}% / {statistics.median(accs):.2f}% |")
    print(f"\nruns and scaling.json in {out}")
    return runspec.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
