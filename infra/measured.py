"""Seconds per epoch of the default recipe (net8k, 10 epochs), as measured on real GPUs, for cost
estimates (`mnist-cloud plan`). Each entry names the machine, the software and the command that
measured it; nothing here is estimated. Add a GPU by running scripts/gpu_check.sh on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochTime:
    gpu: str  # as torch.cuda.get_device_name() says it
    capability: tuple[int, int]
    variant: str  # scripts/gpu_bench.py's name; the CUDA default of trainer/device.py where it says so
    epoch_s: float  # median training seconds of one epoch, warm
    first_run_extra_s: float  # what a fresh process adds to its first epoch (cuDNN autotuning, lazy loading)
    run_s: float  # one fresh `train` process: data on the GPU, 10 epochs, the test pass, the files (not torch's import)
    measured: str  # where, when, with what
    instance_types: tuple[str, ...] = ()  # the EC2 types that carry this GPU


_H200 = ("NVIDIA H200, sm90, torch 2.11.0+cu130, CUDA 13.0; scripts/gpu_check.sh on this project's "
         "lent GPU machine, 2026-12-04 (docs/gpu.md)")
MEASURED = (
    EpochTime("NVIDIA H200", (9, 0), "graph-amp-b256", epoch_s=0.158, first_run_extra_s=2.5, run_s=10.0,
              measured=_H200, instance_types=("p5e.48xlarge", "p5en.48xlarge")),
    EpochTime("NVIDIA H200", (9, 0), "graph", epoch_s=0.228, first_run_extra_s=1.7, run_s=10.6,
              measured=_H200, instance_types=("p5e.48xlarge", "p5en.48xlarge")),
)


def epoch_times(gpu: str | None = None, instance_type: str | None = None) -> list[EpochTime]:
    """The measurements for a GPU name or an instance type (all of them with neither), fastest first."""
    found = [m for m in MEASURED
             if (gpu is None or m.gpu == gpu) and (instance_type is None or instance_type in m.instance_types)]
    return sorted(found, key=lambda m: m.epoch_s)
