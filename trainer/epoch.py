"""One epoch: its steps in batch order, where it got to (saved when a run is interrupted mid-epoch), its
training loss and accuracy, and the evaluation and prediction that follow it.

The dataset sits on the device; an epoch is a randperm over it, each batch is gathered, augmented and
normalized there. A SIGTERM or Ctrl-C (`StopFlag`) ends the epoch after the step in flight.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runspec.config import TrainConfig
from trainer import tta
from trainer.augment import augment
from trainer.data import Split
from trainer.engine import Engine
from trainer.optim import epoch_steps

# Under DDP, agreeing on a stop signal is an all-reduce and a host sync: ask every this many steps,
# at the same step on every rank (a SIGTERM still checkpoints within a second).
STOP_CHECK_EVERY = 16


@dataclass
class EpochProgress:
    """Where an epoch is: its batch order and how far it got. Saved in last.pt when a run is
    interrupted mid-epoch, so that --resume continues at the very next step."""

    epoch: int
    perm: torch.Tensor | None = None
    step: int = 0  # steps done
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0  # the first compiled step, kept out of `seconds`
    aug_state: torch.Tensor | None = None  # --cuda-graph: the augmentation generator before the epoch's draws

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "perm": self.perm.cpu(), "step": self.step, "loss_sum": self.loss_sum,
                "correct": self.correct, "seen": self.seen, "seconds": self.seconds,
                "compile_seconds": self.compile_seconds, "aug_state": self.aug_state}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "EpochProgress":
        return cls(**{**state, "perm": state["perm"].to(device)})


class StopFlag:
    """Set by SIGTERM (a spot notice, `kill`) or Ctrl-C: the loop finishes its step, checkpoints, exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving last.pt, then exiting "
              f"(resume with --resume)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_one_epoch(model, split: Split, optimizer, scheduler, per_step: bool, cfg: TrainConfig, engine: Engine,
                    progress: EpochProgress, show_progress: bool, stop: StopFlag | None = None) -> bool:
    """Train `progress.epoch` from `progress.step` on; True if the epoch finished, False if stopped.

    Nothing in the step waits for the device: per-step losses go into a float32 buffer on the
    device (MPS has no float64) and are summed on the host once, at the end."""
    model.train()
    n = len(split)
    world, rank = engine.dist.world, engine.dist.rank
    steps = epoch_steps(cfg, n, world)
    local = cfg.batch_size // world
    aug = cfg.augment_config(progress.epoch)  # progressive resizing: the early epochs' size
    if progress.perm is None:
        progress.perm = torch.randperm(n, generator=engine.generator, device=engine.device)
    perm = progress.perm
    losses = torch.zeros(steps, device=engine.device)  # mean loss of each step
    sizes: list[int] = []  # images in each step (known on the host)
    correct = torch.zeros((), device=engine.device, dtype=torch.long)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=progress.step, desc=f"epoch {progress.epoch}/{cfg.epochs}", unit="batch",
                   leave=False, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    first = progress.step
    finished = True
    for step in range(first, steps):
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        if world > 1:  # this rank's slice of the global batch
            idx = idx[rank * local:(rank + 1) * local]
        x = split.images[idx].float().div_(255.0)  # [0, 1] for augmentation
        x = engine.prepare(augment(x, aug, engine.aug_gen))
        y = split.labels[idx]
        with engine.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(optimizer)  # a fused optimizer skips the inf check's host sync
            engine.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if per_step:
            scheduler.step()
        if engine.ema is not None:
            engine.ema.update()
        losses[step - first] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        sizes.append(y.shape[0])
        if engine.compile_pending:  # this step compiled (or recorded): report it apart from training time
            engine.sync()
            progress.compile_seconds += time.perf_counter() - start
            engine.compile_pending -= 1
            start = time.perf_counter()
        if bar is not None and (step % 20 == 0 or step == steps - 1):  # a sync, but only for a terminal
            done = progress.seen + sum(sizes)
            loss_sum = (losses[:len(sizes)] * torch.tensor(sizes, device=engine.device)).sum().item()
            bar.set_postfix(loss=f"{(progress.loss_sum + loss_sum) / done:.4f}",
                            acc=f"{100 * (progress.correct + correct.item()) / done:.2f}%",
                            img_s=f"{sum(sizes) / max(time.perf_counter() - start, 1e-9):,.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
        last = step + 1 == steps
        if world == 1 or last or (step + 1) % STOP_CHECK_EVERY == 0:
            if engine.dist.any(bool(stop), engine.device):  # all ranks stop at the same step
                progress.step = step + 1
                finished = last
                break
    else:
        progress.step = steps
    engine.sync()
    if bar is not None:
        bar.close()
    # summed on the host in double precision, the same whether or not the epoch was split by a resume
    progress.loss_sum += sum(l * b for l, b in zip(losses[:len(sizes)].tolist(), sizes))
    progress.correct += int(correct.item())
    progress.seen += sum(sizes)
    progress.seconds += time.perf_counter() - start
    return finished


def epoch_stats(progress: EpochProgress, engine: Engine) -> dict[str, float]:
    """Loss and accuracy over the whole global batch stream (summed over ranks)."""
    loss_sum, correct, seen = engine.dist.sum([progress.loss_sum, progress.correct, progress.seen], engine.device)
    return {"loss": loss_sum / seen, "acc": 100.0 * correct / seen, "seconds": progress.seconds,
            "img_per_s": seen / max(progress.seconds, 1e-9)}


@torch.inference_mode()
def predict_log_probs(model: nn.Module, images: torch.Tensor, engine: Engine, batch_size: int) -> torch.Tensor:
    """Log-probabilities for uint8 images [N, 1, 28, 28], in eval mode (no dropout, BN running stats),
    averaged over the engine's test-time views (one view: log_softmax of the logits)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        with engine.autocast():
            out.append(tta.log_probs(model, images[i:i + batch_size], engine.input_size, engine.tta,
                                     engine.model_input))
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, split: Split, engine: Engine, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) on a split, of the model with its test-time views."""
    log_probs = predict_log_probs(model, split.images, engine, batch_size)
    loss = F.nll_loss(log_probs, split.labels).item()
    acc = 100.0 * (log_probs.argmax(1) == split.labels).float().mean().item()
    return loss, acc
