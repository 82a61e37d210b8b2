"""What a resume needs: the run to continue and its config, the newest readable checkpoint, what a
checkpoint holds besides the file format (trainer/checkpoint.py), every random stream, and putting it
all back on this rank.

A checkpoint is written at an epoch's end (and mid-epoch when a run is interrupted); `restore` loads it
into the model, optimizer, schedule, EMA and loss scaler, re-seeds what came from another kind of
device, and returns where the run stands.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runspec.config import TrainConfig, from_dict
from trainer import device as dev
from trainer import rundir as rd
from trainer.checkpoint import load_checkpoint
from trainer.distributed import Dist
from trainer.engine import Engine
from trainer.epoch import EpochProgress
from trainer.errors import CheckpointError, UserError
from trainer.models import get_spec, source_changed
from trainer.optim import load_optimizer_state

# On resume, everything comes from the run's config.json except these: flags about this invocation,
# and flags that may differ on the machine it continues on (taken only when given).
INVOCATION_FLAGS = {"resume", "stop_after", "progress", "report"}
RESUMABLE_OVERRIDES = {"device", "data_dir", "threads", "eval_batch_size", "amp", "channels_last", "compile_mode",
                       "deterministic", "tensorboard"}
# what a resume reads without a default; a checkpoint lacking one is as unusable as a damaged one
RESUME_KEYS = ("epoch", "optimizer_state", "scheduler_state", "best_val_acc", "best_epoch", "rng")
# Random streams, for re-seeding a resume on another kind of device (trainer/device.py).
STREAM_BATCHES, STREAM_AUGMENT, STREAM_ACCELERATOR = 1, 2, 3


@dataclass
class Standing:
    """Where the run stands between epochs: what a checkpoint keeps besides weights, optimizer and RNG."""

    start_epoch: int = 1
    epoch: int = 0  # the last epoch trained
    best_val: float | None = None
    best_epoch: int | None = None
    stale: int = 0  # epochs since validation last improved
    partial: EpochProgress | None = None  # how far an interrupted run got into its next epoch
    stop_reason: str | None = None
    scores: tuple = (None, None, None, None)  # the last epoch's (val_loss, val_acc, test_loss, test_acc)

    def score(self, epoch: int, val_acc: float | None) -> bool:
        """True if `val_acc` is the best yet."""
        improved = val_acc is not None and (self.best_val is None or val_acc > self.best_val)
        if improved:
            self.best_val, self.best_epoch, self.stale = val_acc, epoch, 0
        else:
            self.stale += 1
        return improved


def resolve_resume(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, rd.RunDir]:
    """The saved config of the run being resumed, with only the flags that may change applied."""
    run = rd.RunDir.existing(cfg.resume)
    saved = from_dict(run.read_config()["config"])
    ignored = sorted(explicit - RESUMABLE_OVERRIDES - INVOCATION_FLAGS)
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        print(f"note: resuming keeps the run's saved config; ignoring {flags}", file=sys.stderr)
    changes = {k: getattr(cfg, k) for k in (explicit & RESUMABLE_OVERRIDES) | INVOCATION_FLAGS}
    saved_on = (run.read_config().get("device") or {}).get("type")
    if saved.amp == "on" and saved_on == "cuda" and "amp" not in explicit \
            and dev.resolve_device(changes.get("device", saved.device)).type != "cuda":
        # precision is a choice per device (the CUDA default's bf16 is 5x slower than fp32 on a laptop CPU)
        changes["amp"] = "auto"
        print("note: this run trained with --amp on on CUDA; it continues in this device's default precision "
              "(--amp on keeps it)", file=sys.stderr)
    return dataclasses.replace(saved, **changes), run


def load_resume_checkpoint(run: rd.RunDir) -> tuple[dict[str, Any], str]:
    """The newest readable checkpoint of a run, trying last.pt, then prev.pt, then best.pt.

    Any damage (a flipped bit, a truncated copy, a file that is not ours) is reported in one line
    with the file that was used instead, rather than ending the resume."""
    found, skipped = [], []
    for name in (rd.LAST, rd.PREV, rd.BEST):
        path = run.file(name)
        if not path.exists():
            skipped += [f"{name} is missing"] if name == rd.LAST else []
            continue
        try:
            ckpt = load_checkpoint(path, needs=RESUME_KEYS)  # on the CPU: load_state_dict moves it to the device
        except CheckpointError as e:
            skipped.append(f"{name} {e.problem}")
            continue
        found.append(((ckpt["epoch"], (ckpt.get("partial") or {}).get("step", 0)), name, ckpt))
    if not found:
        raise UserError(f"no usable checkpoint in {run.path} (last.pt, prev.pt and best.pt are missing or damaged); "
                        "start a new run")
    _, name, ckpt = max(found, key=lambda f: f[0])
    if skipped:
        print(f"warning: {'; '.join(skipped)}; resuming from {name} (epoch {ckpt['epoch']})",
              file=sys.stderr, flush=True)
    return ckpt, name


def rng_state(engine: Engine) -> dict[str, Any]:
    """Every random state of this process, each tagged with its device type."""
    state = {"torch": torch.get_rng_state(), "generator": dev.generator_state(engine.generator)}
    if engine.aug_generator is not None:
        state["aug_generator"] = dev.generator_state(engine.aug_generator)
    accelerator = dev.accelerator_rng_state(engine.device)
    if accelerator is not None:
        state["accelerator"] = accelerator
    return state


def checkpoint_state(model, optimizer, scheduler, engine: Engine, cfg: TrainConfig, epoch: int,
                     best_val: float | None, best_epoch: int | None, stale: int = 0,
                     partial: dict[str, Any] | None = None, rng_ranks: list | None = None) -> dict[str, Any]:
    """Everything a resume needs. `epoch` is the last *completed* epoch; `partial` is how far the
    next one got, when a run was interrupted mid-epoch."""
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {
        "model_name": cfg.model,
        "model_source": get_spec(cfg.model).source,  # your own model's file and sha256 (None for the zoo's)
        "model_state": raw.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state": engine.scaler.state_dict() if engine.scaler is not None else None,
        "ema_state": engine.ema.state() if engine.ema is not None else None,
        "epoch": epoch,
        "best_val_acc": best_val,
        "best_epoch": best_epoch,
        "stale": stale,
        "partial": partial,
        "rng": rng_state(engine),
        "rng_ranks": rng_ranks,  # every rank's RNG state, for a distributed resume
        "world_size": engine.dist.world,
        "config": dataclasses.asdict(cfg),
    }


def restore(cfg: TrainConfig, record, engine: Engine, model: nn.Module, optimizer, scheduler) -> Standing:
    """Continue from the run's newest readable checkpoint, read by rank 0 (its `record`, a Recorder) and
    sent to every rank (on the CPU: a map_location of rank 0's GPU would land every rank's copy there)."""
    dist, device = engine.dist, engine.device
    ckpt, source = dist.broadcast(record.read_checkpoint(), device)
    changed = source_changed(ckpt.get("model_source"), get_spec(cfg.model))
    if changed:  # your own model's file: the run continues in today's code, and says so
        record.note(changed.replace("loaded into today's code", "continued in today's code"))
    model.load_state_dict(ckpt["model_state"])
    load_optimizer_state(optimizer, ckpt["optimizer_state"])
    if scheduler is not None and ckpt["scheduler_state"] is not None:
        scheduler.load_state_dict(ckpt["scheduler_state"])
    if engine.ema is not None:
        engine.ema.load(ckpt["ema_state"])
    if engine.scaler is not None and ckpt.get("scaler_state"):
        engine.scaler.load_state_dict(ckpt["scaler_state"])
    elif ckpt.get("scaler_state"):
        record.note(f"note: this run was saved with fp16 loss scaling and continues in "
                    f"{str(engine.amp_dtype).replace('torch.', '') if engine.amp_dtype else 'fp32'} (--amp auto "
                    "is fp32; --amp on on a GPU before sm80 keeps fp16)")
    step = (ckpt.get("partial") or {}).get("step", 0)
    restore_rng(rank_rng(ckpt, dist), engine, cfg.seed, ckpt["epoch"] + 1, step)
    standing = Standing(start_epoch=ckpt["epoch"] + 1, epoch=ckpt["epoch"], best_val=ckpt["best_val_acc"],
                        best_epoch=ckpt["best_epoch"], stale=ckpt.get("stale", 0))
    if ckpt.get("partial"):
        standing.partial = partial = EpochProgress.from_state(ckpt["partial"], device)
        if not dist.main:  # rank 0 carries the epoch's running totals (already summed over ranks)
            partial.loss_sum, partial.correct, partial.seen = 0.0, 0, 0
    if standing.start_epoch > cfg.epochs:
        raise UserError(f"{cfg.resume} already finished all {cfg.epochs} epochs; nothing to resume")
    where = f"epoch {partial.epoch} step {partial.step}" if standing.partial else f"the end of epoch {ckpt['epoch']}"
    record.resumed(cfg, ckpt["epoch"], source, where, step, device)
    return standing


def rank_rng(ckpt: dict[str, Any], dist: Dist) -> dict[str, Any]:
    """This rank's saved random state; under another number of processes, rank 0's without its per-rank
    streams, which would repeat on every rank (they are re-seeded)."""
    ranks = ckpt.get("rng_ranks")
    rng = ranks[dist.rank] if ranks and len(ranks) == dist.world else ckpt["rng"]
    if dist.active and rng is ckpt["rng"]:
        rng = {**rng, "aug_generator": None, "accelerator": None}
    return rng


def restore_rng(state: dict[str, Any], engine: Engine, seed: int, epoch: int, step: int) -> None:
    """Restore `rng_state`; a state from another kind of device is re-seeded from (seed, epoch, step)
    instead, with a one-line note, so that a GPU run resumes on a laptop and back. The per-rank
    streams (augmentation, dropout) take the rank into their seed."""
    torch.set_rng_state(state["torch"].cpu())  # the CPU generator: the same on every machine
    rank = engine.dist.rank
    reseed = functools.partial(dev.derived_seed, seed, epoch, step)
    ok = dev.restore_generator(engine.generator, state["generator"], reseed(STREAM_BATCHES))
    if engine.aug_generator is not None:
        ok &= dev.restore_generator(engine.aug_generator, state.get("aug_generator"),
                                    reseed(STREAM_AUGMENT + 16 * rank))
    accelerator = state.get("accelerator")
    if accelerator is None and state.get("cuda"):  # older checkpoints: every GPU's state, as a list
        index = engine.device.index or 0
        accelerator = {"device": "cuda", "state": state["cuda"][index]} if index < len(state["cuda"]) else None
    ok &= dev.restore_accelerator_rng(engine.device, accelerator, reseed(STREAM_ACCELERATOR + 16 * rank))
    if not ok:
        saved = state["generator"].get("device") if isinstance(state["generator"], dict) else None
        dev.warn_reseeded(saved, engine.device, seed, epoch, step)
