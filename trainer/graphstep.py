"""`--cuda-graph`: the whole training step, batch gather to SGD update, as one CUDA graph.

An MNIST net this small is launch-bound on a GPU: ~120 kernel launches per step, each a few
microseconds of work, so the step time is Python and launch overhead. Captured once, a step is one
`graph.replay()`. For that, nothing in the step may depend on the host:
- the epoch is augmented ahead, at its start, in a few large launches (AUGMENT_CHUNK images each)
  into a static [steps, B, C, S, S] buffer in batch order; the step index is a device tensor and the
  batch is picked with `index_select` inside the graph. Per step, augmentation was ~40 of the ~150
  kernels; ahead of time it is a handful per 16k images;
- the learning rate and momentum of every step of the run are precomputed by replaying the
  scheduler (`schedule_table`), and the step reads its row by the device step counter;
- SGD is written with `torch._foreach_*` ops on device scalars (`StaticSGD`), since torch's SGD takes
  its momentum as a Python float and OneCycle changes it every step;
- per-step losses and the correct count go into device buffers, read once per epoch.

Off CUDA the same step runs eagerly, which is how the CPU tests cover every part of it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from trainer.augment import augment
from runspec.config import TrainConfig
from trainer.errors import UserError
from trainer.optim import schedule_table, zero_momentum_buffers

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as CUDA graphs require
AUGMENT_CHUNK = 16384  # images augmented per launch group at an epoch's start: ~40 MB of float32 in flight


def check_supported(cfg: TrainConfig, world: int, amp_dtype: torch.dtype | None) -> None:
    if cfg.optimizer != "sgd":
        raise UserError(f"--cuda-graph supports --optimizer sgd only, got {cfg.optimizer}")
    if cfg.schedule == "plateau":
        raise UserError("--cuda-graph needs a schedule fixed in advance; --schedule plateau reads validation")
    if world > 1:
        raise UserError("--cuda-graph runs in one process; drop torchrun/--gpus, or drop --cuda-graph")
    if amp_dtype == torch.float16:
        raise UserError("--cuda-graph cannot capture fp16's loss scaler; use --amp off, or a GPU with bf16 (sm80+)")
    if cfg.ema:
        raise UserError("--cuda-graph does not keep an --ema yet; drop one of them")
    if cfg.compile:
        raise UserError("--cuda-graph and --compile are two ways to the same end; pick one")


class StaticSGD:
    """torch.optim.SGD's update (weight decay, momentum, Nesterov, no dampening) with the learning
    rate and momentum read from device tensors, so that it can be captured. It works on the
    momentum buffers of a real `torch.optim.SGD`, whose state_dict therefore stays the checkpoint."""

    def __init__(self, optimizer: torch.optim.SGD, lr: torch.Tensor, momentum: torch.Tensor,
                 global_step: torch.Tensor):
        group = optimizer.param_groups[0]
        self.params = [p for p in group["params"] if p.requires_grad]
        self.weight_decay = group["weight_decay"]
        self.nesterov = group["nesterov"]
        self.lr, self.momentum, self.global_step = lr, momentum, global_step
        zero_momentum_buffers(optimizer)
        self.buffers = [optimizer.state[p]["momentum_buffer"] for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        at = self.global_step.view(1)
        lr = self.lr.index_select(0, at).squeeze(0)
        mom = self.momentum.index_select(0, at).squeeze(0)
        grads = [p.grad for p in self.params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        torch._foreach_mul_(self.buffers, mom)
        torch._foreach_add_(self.buffers, grads)
        update = torch._foreach_add(grads, torch._foreach_mul(self.buffers, mom)) if self.nesterov else self.buffers
        torch._foreach_sub_(self.params, torch._foreach_mul(update, lr))
        self.global_step += 1


class StaticStep:
    """The training step over static buffers; `run()` replays its CUDA graph, or runs it eagerly off CUDA."""

    def __init__(self, model, optimizer, cfg: TrainConfig, engine, split, steps: int):
        device = engine.device
        self.model, self.optimizer, self.cfg, self.engine, self.split = model, optimizer, cfg, engine, split
        self.steps = steps
        self.aug = cfg.augment_config()
        lrs, moms = schedule_table(cfg, steps)
        self.global_step = torch.zeros((), dtype=torch.long, device=device)
        self.step_in_epoch = torch.zeros((), dtype=torch.long, device=device)
        self.sgd = StaticSGD(optimizer, torch.tensor(lrs, device=device), torch.tensor(moms, device=device),
                             self.global_step)
        size = cfg.input_size
        self.epoch_x = torch.zeros(steps, cfg.batch_size, split.images.shape[1], size, size, device=device)
        self.epoch_y = torch.zeros(steps, cfg.batch_size, dtype=torch.long, device=device)
        self.losses = torch.zeros(steps, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.graph: Any = None
        self.eager_steps = 0
        self.capture_seconds = 0.0

    def _step(self) -> None:
        engine, cfg = self.engine, self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        at = self.step_in_epoch.view(1)
        x = self.epoch_x.index_select(0, at).squeeze(0).contiguous(memory_format=engine.memory_format)
        y = self.epoch_y.index_select(0, at).squeeze(0)
        with engine.autocast(cache=False):  # autocast's weight cache must not outlive a graph capture
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        self.sgd.step()
        self.losses.index_copy_(0, self.step_in_epoch.view(1), loss.detach().float().view(1))
        self.correct += (logits.argmax(1) == y).sum()
        self.step_in_epoch += 1

    def start_epoch(self, perm: torch.Tensor, epoch: int, first: int) -> None:
        """The epoch's batches, augmented in batch order: the same draws whether or not a resume split it."""
        engine, flat_x, flat_y = self.engine, self.epoch_x.view(-1, *self.epoch_x.shape[2:]), self.epoch_y.view(-1)
        order = perm[:self.steps * self.cfg.batch_size]
        for i in range(0, len(order), AUGMENT_CHUNK):
            idx = order[i:i + AUGMENT_CHUNK]
            x = augment(self.split.images.index_select(0, idx).float().div_(255.0), self.aug, engine.aug_gen)
            flat_x[i:i + len(idx)] = engine.prepare(x)
            flat_y[i:i + len(idx)] = self.split.labels.index_select(0, idx)
        self.step_in_epoch.fill_(first)
        self.global_step.fill_((epoch - 1) * self.steps + first)
        self.losses.zero_()
        self.correct.zero_()

    def run(self) -> None:
        if self.engine.device.type != "cuda":
            self._step()
            return
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            self._warmup_step()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _warmup_step(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1

    def _capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()  # dropout draws from the default generator, which capture registers itself
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        with torch.cuda.graph(graph):
            self._step()
        torch.cuda.synchronize()
        self.graph = graph
        self.capture_seconds = time.perf_counter() - start


def train_epoch_static(static: StaticStep, scheduler, per_step: bool, progress, stop) -> bool:
    """`train_one_epoch` for --cuda-graph: the same EpochProgress bookkeeping, one replay per step."""
    engine, cfg = static.engine, static.cfg
    static.model.train()
    if progress.perm is None:
        progress.perm = torch.randperm(len(static.split), generator=engine.generator, device=engine.device)
        progress.aug_state = engine.aug_gen.get_state()  # the epoch's augmentation draws from here
    elif progress.aug_state is not None:  # resumed mid-epoch: draw the epoch's augmentation again
        try:
            engine.aug_gen.set_state(progress.aug_state)
        except (RuntimeError, TypeError, ValueError):  # saved on another device: fresh draws (a note said so)
            pass
    first = progress.step
    start = time.perf_counter()  # the epoch's augmentation ahead is training time too
    static.start_epoch(progress.perm, progress.epoch, first)
    finished = True
    for step in range(first, static.steps):
        static.run()
        if stop:
            progress.step = step + 1
            finished = progress.step >= static.steps
            break
    else:
        progress.step = static.steps
    engine.sync()
    taken = progress.step - first
    progress.loss_sum += sum(l * cfg.batch_size for l in static.losses[first:progress.step].tolist())
    progress.correct += int(static.correct.item())
    progress.seen += taken * cfg.batch_size
    progress.seconds += time.perf_counter() - start - static.capture_seconds
    progress.compile_seconds += static.capture_seconds
    static.capture_seconds = 0.0
    if scheduler is not None and per_step:  # the host's scheduler follows, for logs and checkpoints
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(taken):
                scheduler.step()
    return finished
