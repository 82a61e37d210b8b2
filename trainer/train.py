"""The training run, top to bottom: set up, build, create or restore, the epochs, finish.

`fit()` is the whole plan. One epoch's steps and evaluation are trainer/epoch.py, what a step runs on is
trainer/engine.py, what a resume reads and restores is trainer/resume.py, and everything written goes
through the recorder (trainer/recorder.py). Validation drives best.pt, --target, --patience and the
plateau schedule; the test set is only ever reported.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runspec.config import TrainConfig
from trainer import device as dev
from trainer import rundir as rd
from trainer.data import DeviceData, load_mnist, make_splits
from trainer.device import device_name, resolve_device
from trainer.distributed import Dist
from trainer.engine import Engine, make_engine
from trainer.env import environment
from trainer.epoch import EpochProgress, StopFlag, epoch_stats, evaluate, train_one_epoch
from trainer.errors import UserError
from trainer.fetch import resolve_data_dir
from trainer.graphstep import StaticStep, train_epoch_static
from trainer.models import ModelSpec, count_params, get_spec
from trainer.optim import WeightAverage, epoch_steps, make_optimizer, make_scheduler
from trainer.recorder import Recorder, recorder
from trainer.resume import Standing, checkpoint_state, restore, rng_state
from trainer.summary import format_table, layer_table


@dataclass
class Training:
    """One rank's run as `build` sets it up: what the epochs and the finish work with."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    record: Recorder
    data: DeviceData
    data_dir: Path
    model: nn.Module  # the plain module: evaluation and checkpoints
    step_model: nn.Module  # what the steps call: under DDP, compiled when asked
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool  # the scheduler steps per batch, not per epoch
    engine: Engine
    steps: int  # per epoch
    params: int
    macs: int
    summary: str  # the layer table


def fit(cfg: TrainConfig, explicit: set[str] = frozenset()) -> dict[str, Any]:
    """Train per `cfg` and return the result written to result.json. `explicit` = flags the user typed.

    Under torchrun every rank runs this; rank 0 alone owns the run directory and the console."""
    dist = Dist.from_env()
    try:
        result = _fit(cfg, explicit, dist)
        # every rank reaches the end before any tears the group down (shutdown() closes gloo's sockets for
        # real), so no rank's sockets close while a peer still has work for them, as when a rank stopping
        # early (--stop-after) left while rank 0 wrote last.pt. Not on an error, where the others may never come.
        dist.barrier()
        return result
    finally:
        dist.shutdown()


def _fit(cfg: TrainConfig, explicit: set[str], dist: Dist) -> dict[str, Any]:
    record = recorder(dist.main)
    cfg, spec, device = setup(record.resumed_config(cfg, explicit), dist)
    record.mark_rank0()
    t = build(cfg, spec, dist, device, record)
    standing = restore(cfg, record, t.engine, t.model, t.optimizer, t.scheduler) if cfg.resume else create(t)
    record.graph(t.model, cfg.input_size)  # the plain module: a compiled or captured step does not trace
    ended = run_epochs(t, standing)
    return ended or finish(t, standing)


def setup(cfg: TrainConfig, dist: Dist) -> tuple[TrainConfig, ModelSpec, torch.device]:
    """The config checked, this rank's device, the process group up, and the config every rank trains with."""
    cfg.validate()
    spec = get_spec(cfg.model)
    if cfg.val_size == 0 and (cfg.target is not None or cfg.patience or cfg.schedule == "plateau"):
        raise UserError("--target, --patience and --schedule plateau read the validation split; "
                        "they cannot be used with --val-size 0")
    if cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide evenly over {dist.world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.device(resolve_device(cfg.device))
    dist.init(device)
    if dist.active:
        cfg = dist.broadcast(cfg, device)  # a resumed run's config lives on rank 0's machine only
        spec = get_spec(cfg.model)  # so does its model: the other ranks typed only --resume
        if not dist.main:
            cfg = dataclasses.replace(cfg, progress=False, report=False)
    return cfg, spec, device


def build(cfg: TrainConfig, spec: ModelSpec, dist: Dist, device: torch.device, record: Recorder) -> Training:
    """Data, model, engine, optimizer and schedule on the device, in the order of their random draws."""
    torch.manual_seed(cfg.seed)  # weights and dropout
    data_dir = resolve_data_dir(cfg.data_dir)
    data = make_splits(load_mnist(data_dir), cfg.val_size, cfg.seed, device, cfg.train_limit, cfg.eval_limit)
    model = spec.build()
    layers = layer_table(model, cfg.input_size)
    if cfg.early_epochs:  # the early epochs' size too, before any training
        layer_table(model, cfg.early_size, flag="--early-size")
    if dist.active:
        torch.manual_seed(cfg.seed + 7919 * dist.rank)  # each rank its own dropout masks; DDP syncs the weights
    use_cl = dev.channels_last(cfg.channels_last, device.type)
    model = model.to(device=device, memory_format=torch.channels_last if use_cl else torch.contiguous_format)
    dev.configure_backends(device, cfg.deterministic)
    engine = make_engine(cfg, dist, device, use_cl)
    wrapped = dist.wrap(model, device)
    model = wrapped.module if dist.active else model
    optimizer = make_optimizer(cfg, model, device.type)
    steps = epoch_steps(cfg, len(data.train), dist.world)
    if steps == 0:
        raise UserError(f"{len(data.train)} training images make no batch of {cfg.batch_size}"
                        f"{f' over {dist.world} processes' if dist.active else ''}: "
                        "use a smaller --batch-size or a larger --train-limit")
    scheduler, per_step = make_scheduler(cfg, optimizer, steps)
    step_model = torch.compile(wrapped, mode=cfg.compile_mode, dynamic=False) if cfg.compile else wrapped
    engine.ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    return Training(cfg=cfg, dist=dist, device=device, record=record, data=data, data_dir=data_dir, model=model,
                    step_model=step_model, optimizer=optimizer, scheduler=scheduler, per_step=per_step, engine=engine,
                    steps=steps, params=count_params(model), macs=sum(r.macs for r in layers),
                    summary=format_table(layers, title=f"{cfg.model}: {spec.description}"))


def create(t: Training) -> Standing:
    """A new run: rank 0 makes its directory and writes what the run starts from."""
    cfg, data, dist = t.cfg, t.data, t.dist
    val = len(data.val) if data.val else 0
    t.record.started(
        cfg, model={"name": cfg.model, "params": t.params, "macs": t.macs,
                    **({"source": source} if (source := get_spec(cfg.model).source) else {})},
        environment=environment(t.device, t.engine.amp_dtype, t.engine.memory_format == torch.channels_last, dist),
        data={"dir": str(t.data_dir), "train": len(data.train), "val": val, "test": len(data.test)},
        summary=t.summary,
        line=f"device: {device_name(t.device)}{f' x {dist.world} processes' if dist.active else ''}  |  "
             f"train/val/test: {len(data.train)}/{val}/{len(data.test)}")
    return Standing()


def run_epochs(t: Training, standing: Standing) -> dict[str, Any] | None:
    """The epochs, to the last or to an early stop (None: the run goes on to finish), or the outcome of a
    run that ends here: interrupted by a signal, or stopped by --stop-after."""
    cfg = t.cfg
    static = (StaticStep(t.step_model, t.optimizer, cfg, t.engine, t.data.train, t.steps)  # after a resume's load
              if cfg.cuda_graph else None)
    show_progress = cfg.progress and sys.stderr.isatty()
    clock = Clock.start(t.record.epochs(), standing.partial)
    with StopFlag() as stop:
        for epoch in range(standing.start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            partial = standing.partial
            progress = partial if partial and partial.epoch == epoch else EpochProgress(epoch)
            standing.partial, standing.epoch = None, epoch
            if static is not None:
                finished = train_epoch_static(static, t.scheduler, t.per_step, progress, stop)
            else:
                finished = train_one_epoch(t.step_model, t.data.train, t.optimizer, t.scheduler, t.per_step, cfg,
                                           t.engine, progress, show_progress, stop)
            if not finished:
                return interrupted_in_epoch(t, standing, progress, stop)
            row, improved = end_epoch(t, standing, progress, t0, clock)
            t.record.epoch(row, standing.best_val)  # the row first, then the checkpoint
            save(t, standing, epoch, improved)
            if t.dist.any(bool(stop), t.device) and epoch < cfg.epochs:  # signalled during evaluation: epoch saved
                return interrupted(t, stop, f"the end of epoch {epoch}")
            standing.stop_reason = early_stop_reason(cfg, standing, row["val_acc"])
            if not standing.stop_reason and cfg.stop_after and epoch - standing.start_epoch + 1 >= cfg.stop_after \
                    and epoch < cfg.epochs:
                t.record.stopped(cfg, epoch)
                return {"status": "stopped", "epoch": epoch, "run_dir": t.record.run_dir}
            if standing.stop_reason:
                t.record.early_stop(epoch, standing.stop_reason)
                break
    return None


@dataclass
class Clock:
    """The run's elapsed time across resumes: what the epochs before this process took, plus its own."""

    started: float
    before: float

    @classmethod
    def start(cls, rows: list[dict[str, Any]], partial: EpochProgress | None) -> "Clock":
        started = time.perf_counter()
        before = rows[-1]["elapsed"] if rows else 0.0
        if partial:
            before += partial.seconds
        return cls(started, before)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started


def end_epoch(t: Training, standing: Standing, progress: EpochProgress, t0: float,
              clock: Clock) -> tuple[dict[str, Any], bool]:
    """The epoch's metrics row after validation (and the test, with --test-every-epoch), the epoch-wise
    schedule's step, and whether validation improved."""
    cfg, engine, data = t.cfg, t.engine, t.data
    train = epoch_stats(progress, engine)
    val_loss, val_acc = evaluate(t.model, data.val, engine, cfg.eval_batch_size) if data.val else (None, None)
    test_loss, test_acc = (evaluate(t.model, data.test, engine, cfg.eval_batch_size) if cfg.test_every_epoch
                           else (None, None))
    # rank 0's numbers on every rank: on CPUs each rank's BatchNorm statistics differ a little,
    # and ranks that disagreed about --target or --patience would hang the next collective
    standing.scores = t.dist.broadcast((val_loss, val_acc, test_loss, test_acc), t.device)
    val_loss, val_acc, test_loss, test_acc = standing.scores
    lr = t.optimizer.param_groups[0]["lr"]
    if t.scheduler is not None and not t.per_step:
        t.scheduler.step(val_acc) if cfg.schedule == "plateau" else t.scheduler.step()
    improved = standing.score(progress.epoch, val_acc)
    row = {"epoch": progress.epoch, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val_loss,
           "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
           "seconds": time.perf_counter() - t0 - progress.compile_seconds, "train_seconds": train["seconds"],
           "img_per_s": train["img_per_s"], "elapsed": clock.elapsed()}
    if progress.compile_seconds:
        row["compile_seconds"] = progress.compile_seconds
    return row, improved


def early_stop_reason(cfg: TrainConfig, standing: Standing, val_acc: float | None) -> str | None:
    if cfg.target is not None and val_acc >= cfg.target:
        return f"validation accuracy {val_acc:.2f}% reached --target {cfg.target}"
    if cfg.patience and standing.stale >= cfg.patience:
        return f"no better validation accuracy for {standing.stale} epochs (--patience {cfg.patience})"
    return None


def save(t: Training, standing: Standing, epoch_done: int, improved: bool,
         partial: dict[str, Any] | None = None) -> None:
    """A checkpoint, written by rank 0 with every rank's random state: gathering it is a collective,
    so every rank calls this."""
    rng_ranks = t.dist.gather(rng_state(t.engine), t.device) if t.dist.active else None
    t.record.checkpoint(functools.partial(
        checkpoint_state, t.model, t.optimizer, t.scheduler, t.engine, t.cfg, epoch_done, standing.best_val,
        standing.best_epoch, standing.stale, partial=partial, rng_ranks=rng_ranks), improved)


def interrupted_in_epoch(t: Training, standing: Standing, progress: EpochProgress, stop: StopFlag) -> dict[str, Any]:
    """last.pt with how far the epoch got, so that --resume continues at its next step."""
    sums = t.dist.sum([progress.loss_sum, progress.correct, progress.seen], t.device)
    state = {**progress.state(), "loss_sum": sums[0], "correct": int(sums[1]), "seen": int(sums[2])}
    save(t, standing, progress.epoch - 1, improved=False, partial=state)
    return interrupted(t, stop, f"epoch {progress.epoch} step {progress.step}")


def interrupted(t: Training, stop: StopFlag, where: str) -> dict[str, Any]:
    t.record.interrupted(stop.signal, where)
    return {"status": "interrupted", "signal": stop.signal or signal.SIGTERM, "run_dir": t.record.run_dir}


def finish(t: Training, standing: Standing) -> dict[str, Any]:
    """What the run delivers, the final weights or their average, tested: its accuracy is the headline."""
    cfg, engine, data = t.cfg, t.engine, t.data
    delivered = engine.ema.model if engine.ema is not None else t.model
    val_loss, val_acc, test_loss, test_acc = standing.scores
    if engine.ema is not None:
        val_loss, val_acc = evaluate(delivered, data.val, engine, cfg.eval_batch_size) if data.val else (None, None)
    if engine.ema is not None or test_acc is None:  # the final weights' test was skipped per epoch
        test_loss, test_acc = evaluate(delivered, data.test, engine, cfg.eval_batch_size)
    val_loss, val_acc, test_loss, test_acc = t.dist.broadcast((val_loss, val_acc, test_loss, test_acc), t.device)
    result = {
        "status": "completed",
        "run_id": t.record.run_id(cfg),
        "run_dir": t.record.run_dir,
        "model": cfg.model,
        "params": t.params,
        "epochs": standing.epoch,
        "stop_reason": standing.stop_reason,
        "weights": "ema" if engine.ema is not None else "final",
        "delivered": rd.MODEL,
        "tta": cfg.tta,  # the views every accuracy here averages: part of what is delivered
        "test_acc": test_acc,
        "test_loss": test_loss,
        "val_acc": val_acc,
        "best_val_acc": standing.best_val,
        "best_epoch": standing.best_epoch,
        "seconds": t.record.seconds(),
    }
    t.record.finished(cfg, result, delivered)
    t.dist.barrier()
    return result
