"""What one training step runs on besides the model: the device, its precision (autocast, the fp16 loss
scaler), the memory format, the random generators, and how many first steps are compilation.

`make_engine` resolves them from the config once per rank; the eager step (trainer/epoch.py) and the
captured CUDA-graph step (trainer/graphstep.py) both read them from the `Engine`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from runspec.config import TrainConfig
from trainer import device as dev
from trainer.data import centre_crop, normalize
from trainer.distributed import Dist
from trainer.graphstep import check_supported
from trainer.optim import WeightAverage


@dataclass
class Engine:
    """What one step needs besides the model: device, precision, memory format, RNG."""

    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    generator: torch.Generator  # batch order: the same on every rank
    scaler: torch.amp.GradScaler | None
    dist: Dist = field(default_factory=Dist)
    aug_generator: torch.Generator | None = None  # augmentation: per rank (defaults to `generator`)
    compile_pending: int = 0  # steps that compile (or record CUDA graphs) under torch.compile: timed apart
    input_size: int = 28  # the centre crop every batch is cut to (training batches come cut from augment)
    ema: WeightAverage | None = None  # updated after every optimizer step
    tta: int = 1  # views every evaluation averages (trainer/tta.py): part of what the run delivers

    def sync(self) -> None:
        """Wait for the device (timing); the CPU never runs ahead of itself."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @property
    def aug_gen(self) -> torch.Generator:
        return self.aug_generator or self.generator

    def autocast(self, cache: bool = True):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, cache_enabled=cache)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return self.model_input(centre_crop(images, self.input_size))

    def model_input(self, crop: torch.Tensor) -> torch.Tensor:
        """A uint8 crop -> the model's input: normalized, in the engine's memory format."""
        return normalize(crop).contiguous(memory_format=self.memory_format)


def compile_steps(cfg: TrainConfig) -> int:
    """Steps whose time is compilation: the first; with CUDA graphs (reduce-overhead, max-autotune)
    torch.compile warms up and records on the next two as well."""
    if not cfg.compile:
        return 0
    return 3 if cfg.compile_mode in ("reduce-overhead", "max-autotune") else 1


def make_engine(cfg: TrainConfig, dist: Dist, device: torch.device, channels_last: bool) -> Engine:
    amp_dtype = dev.amp_dtype(device.type, cfg.amp, dev.capability(device))
    if cfg.cuda_graph:
        check_supported(cfg, dist.world, amp_dtype)
    return Engine(
        device=device, amp_dtype=amp_dtype,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        generator=torch.Generator(device=device).manual_seed(cfg.seed + 10_000),  # batch order + augmentation
        scaler=torch.amp.GradScaler(device.type) if dev.needs_grad_scaler(amp_dtype) else None,
        dist=dist,
        aug_generator=torch.Generator(device=device).manual_seed(cfg.seed + 20_000 + dist.rank) if dist.active else None,
        compile_pending=compile_steps(cfg),
        input_size=cfg.input_size,
        tta=cfg.tta,
    )
