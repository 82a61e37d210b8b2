#!/usr/bin/env python3
"""Kernel launches per training step of the default recipe, counted by the profiler on the device.

    python scripts/step_launches.py --data-dir .data/mnist [--json OUT.json]

A step is launch-bound when its kernels are tiny: its time is then about (launches x the time one
launch costs), which is what the README's T4 bound multiplies. Counted as the difference between
two short runs (20 and 40 steps of one epoch), so that data loading, the epoch's
augmentation ahead and evaluation cancel out (8,192 images: 64 steps of 128, so both run in full),
after a run that warms cuDNN's algorithm cache:
- plain: the eager step (`train_one_epoch`), batch gather, augmentation, forward, backward, SGD;
- static: the step that --cuda-graph captures (`StaticStep._step`), run eagerly here so that the
  profiler sees each kernel: its augmentation was done ahead, for the whole epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import runspec


def kernels_in_run(steps: int, cuda_graph: bool, args, out: Path) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from runspec.config import TrainConfig
    from trainer.train import fit

    cfg = TrainConfig(data_dir=args.data_dir, out_dir=str(out), run_id=f"launch-{int(cuda_graph)}-{steps}",
                      device=args.device, epochs=1, max_steps=steps, train_limit=8192, eval_limit=256, val_size=0,
                      input_size=24, lr=0.2, cuda_graph=cuda_graph, progress=False, report=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fit(cfg)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST IDX directory")
    p.add_argument("--device", default="cuda", help="default: %(default)s")
    p.add_argument("--out", default="/tmp/mnist-cloud-launches", help="run directories (default: %(default)s)")
    p.add_argument("--json", help="write the counts here too")
    args = p.parse_args()
    import torch

    if args.device != "cuda" or not torch.cuda.is_available():
        print("step_launches.py counts CUDA kernels: it needs a CUDA GPU", file=sys.stderr)
        return runspec.ExitCode.BAD_INPUT
    from trainer import graphstep

    graphstep.StaticStep.run = graphstep.StaticStep._step  # eager, so the profiler sees every kernel
    counts = {}
    for name, graph in (("plain", False), ("static", True)):
        # a first run fills cuDNN's per-shape algorithm cache (benchmark mode tries several kernels per
        # conv shape, once per process): counted, the trial kernels would differ between the two runs
        kernels_in_run(5, graph, args, Path(args.out) / "warm-up")
        few, many = (kernels_in_run(n, graph, args, Path(args.out)) for n in (20, 40))
        counts[name] = (many - few) / 20
        print(f"{name}: {counts[name]:.1f} kernels per step ({few} in 20 steps' run, {many} in 40's)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2))
    return runspec.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
