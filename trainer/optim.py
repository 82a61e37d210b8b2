"""How the weights move: the optimizer, its schedule, and the average of the weights it visits.

Apart from the loop so that the report (the LR plot) and --cuda-graph (its precomputed LR and momentum
table) replay a run's own schedule, from its steps per epoch, without importing the trainer.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from runspec.config import TrainConfig
from trainer import device as dev


def steps_in_epoch(n: int, batch_size: int, max_steps: int | None, world: int = 1, drop_last: bool = False) -> int:
    if world > 1 or drop_last:  # every rank takes every step / static shapes: no ragged last batch
        steps = n // batch_size
    else:
        steps = n // batch_size + (1 if n % batch_size >= 2 else 0)  # a last batch of 1 would break BatchNorm
    return min(steps, max_steps) if max_steps else steps


def epoch_steps(cfg: TrainConfig, n: int, world: int = 1) -> int:
    """Steps per epoch of a run with this config (the report replays the schedule with it)."""
    return steps_in_epoch(n, cfg.batch_size, cfg.max_steps, world, drop_last=cfg.static_shapes)


def make_optimizer(cfg: TrainConfig, model: nn.Module, device_type: str = "cpu") -> torch.optim.Optimizer:
    params = model.parameters()
    fused = {"fused": True} if dev.fused_optimizer(device_type) else {}
    if cfg.optimizer == "sgd":
        sgd = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                              weight_decay=cfg.weight_decay, **fused)
        if fused and cfg.momentum > 0:
            # Fused SGD makes its momentum buffers with empty_like at the first step, and a first step
            # that a GradScaler skips (an fp16 overflow, common at the initial scale) leaves them
            # uninitialized
            zero_momentum_buffers(sgd)
        return sgd
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def zero_momentum_buffers(sgd: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer where it has none: with no dampening, SGD's first
    step from zero is the same as the one that creates the buffer."""
    for group in sgd.param_groups:
        for p in group["params"]:
            if sgd.state[p].get("momentum_buffer") is None:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state, fitted to this machine's optimizer. The saved param groups carry
    the saving device's flags (a CPU run's fused=None would turn CUDA's fused SGD into one that the
    GradScaler feeds arguments it refuses) and its state tensors the saved memory layout (a
    channels-last momentum buffer against a contiguous parameter makes a fused kernel go wrong)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        for p in group["params"]:
            for name, value in optimizer.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    optimizer.state[p][name] = torch.empty_like(p).copy_(value)
                elif name == "step" and group.get("fused") and torch.is_tensor(value):
                    optimizer.state[p][name] = value.to(device=p.device, dtype=torch.float32)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, True if it steps per batch)."""
    sgd = cfg.optimizer == "sgd"
    if cfg.schedule in ("onecycle", "cyclic") and cfg.epochs * steps_per_epoch < 4:
        return None, False  # a smoke run of a step or three: OneCycle cannot split it into phases
    if cfg.schedule == "onecycle":
        # at least two warm-up steps: OneCycleLR divides by (warm-up steps - 1)
        pct_start = min(max(cfg.pct_start, 2.5 / (cfg.epochs * steps_per_epoch)), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=pct_start,
            div_factor=10.0, final_div_factor=100.0, cycle_momentum=sgd and cfg.momentum > 0,
            base_momentum=min(0.85, cfg.momentum), max_momentum=cfg.momentum), True
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=cfg.lr / 10, max_lr=cfg.lr, step_size_up=2 * steps_per_epoch, mode="triangular2",
            cycle_momentum=sgd and cfg.momentum > 0, base_momentum=min(0.85, cfg.momentum),
            max_momentum=cfg.momentum), True
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), False
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=2), False
    return None, False


def schedule_table(cfg: TrainConfig, steps: int) -> tuple[list[float], list[float]]:
    """(lr, momentum) of every optimizer step of the run, by replaying the run's own scheduler."""
    # a stand-in parameter made without a random draw: nn.Linear's init would move the global generator,
    # and a mid-epoch resume builds this table after restoring it (dropout would then draw other masks)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(cfg, holder)
    scheduler, per_step = make_scheduler(cfg, optimizer, steps)
    group = optimizer.param_groups[0]
    lrs, moms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no optimizer runs here
        for _ in range(cfg.epochs):
            for _ in range(steps):
                lrs.append(group["lr"])
                moms.append(group.get("momentum", 0.0))
                if scheduler is not None and per_step:
                    scheduler.step()
            if scheduler is not None and not per_step:
                scheduler.step()
    return lrs, moms


class WeightAverage:
    """An exponential moving average of the weights and BatchNorm statistics, updated after every
    step. The decay warms up as min(decay, (1 + n) / (10 + n)), so the first steps' random weights
    fade fast instead of lingering in a short run's average."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        # the same tensor objects all run long: load_state_dict copies into them in place
        self._mine = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        self._theirs = [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._mine, self._theirs, 1.0 - decay)

    def state(self) -> dict[str, Any]:
        return {"model_state": self.model.state_dict(), "updates": self.updates}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model_state"])
        self.updates = state["updates"]
