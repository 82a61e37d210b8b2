"""The training loop. Reads top to bottom: device, data, model, optimizer, epochs, result.

The dataset sits on the device; an epoch is a randperm over it, each batch is gathered, augmented
and normalized there. Validation drives best.pt, --target, --patience and the plateau schedule;
the test set is only ever reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runspec.config import TrainConfig
from trainer import device as dev
from trainer import rundir as rd
from trainer.augment import augment
from trainer.data import DeviceData, Split, centre_crop, load_mnist, make_splits, normalize
from trainer.device import device_name, resolve_device
from trainer.distributed import Dist
from trainer.env import environment
from trainer.errors import UserError
from trainer.fetch import resolve_data_dir
from trainer.graphstep import StaticStep, check_supported, train_epoch_static
from trainer.models import ModelSpec, count_params, get_spec, source_changed
from trainer.optim import (
    WeightAverage,
    epoch_steps,
    load_optimizer_state,
    make_optimizer,
    make_scheduler,
)
from trainer.recorder import Recorder, recorder
from trainer.summary import format_table, layer_table


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
        return normalize(centre_crop(images, self.input_size)).contiguous(memory_format=self.memory_format)


def compile_steps(cfg: TrainConfig) -> int:
    """Steps whose time is compilation: the first; with CUDA graphs (reduce-overhead, max-autotune)
    torch.compile warms up and records on the next two as well."""
    if not cfg.compile:
        return 0
    return 3 if cfg.compile_mode in ("reduce-overhead", "max-autotune") else 1


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
    aug = cfg.augment_config()
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
def predict_logits(model: nn.Module, images: torch.Tensor, engine: Engine, batch_size: int) -> torch.Tensor:
    """Logits for uint8 images [N, 1, 28, 28], in eval mode (no dropout, BN running stats)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        with engine.autocast():
            out.append(model(engine.prepare(images[i:i + batch_size])).float())
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, split: Split, engine: Engine, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) on a split."""
    logits = predict_logits(model, split.images, engine, batch_size)
    loss = F.cross_entropy(logits, split.labels).item()
    acc = 100.0 * (logits.argmax(1) == split.labels).float().mean().item()
    return loss, acc


# ---------------------------------------------------------------------------------- checkpoints
# Random streams, for re-seeding a resume on another kind of device (trainer/device.py).
STREAM_BATCHES, STREAM_AUGMENT, STREAM_ACCELERATOR = 1, 2, 3


def rng_state(engine: Engine) -> dict[str, Any]:
    """Every random state of this process, each tagged with its device type."""
    state = {"torch": torch.get_rng_state(), "generator": dev.generator_state(engine.generator)}
    if engine.aug_generator is not None:
        state["aug_generator"] = dev.generator_state(engine.aug_generator)
    accelerator = dev.accelerator_rng_state(engine.device)
    if accelerator is not None:
        state["accelerator"] = accelerator
    return state


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


# ---------------------------------------------------------------------------------- the run
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


def fit(cfg: TrainConfig, explicit: set[str] = frozenset()) -> dict[str, Any]:
    """Train per `cfg` and return the result written to result.json. `explicit` = flags the user typed.

    Under torchrun every rank runs this; rank 0 alone owns the run directory and the console."""
    dist = Dist.from_env()
    try:
        return _fit(cfg, explicit, dist)
    finally:
        dist.shutdown()


def _fit(cfg: TrainConfig, explicit: set[str], dist: Dist) -> dict[str, Any]:
    record = recorder(dist.main)
    cfg, spec, device = setup(record.resumed_config(cfg, explicit), dist)
    record.mark_rank0()
    t = build(cfg, spec, dist, device, record)
    standing = restore(t) if cfg.resume else create(t)
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
    )


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


def restore(t: Training) -> Standing:
    """Continue from the run's newest readable checkpoint, read by rank 0 and sent to every rank (on the
    CPU: a map_location of rank 0's GPU would land every rank's copy there)."""
    cfg, dist, engine = t.cfg, t.dist, t.engine
    ckpt, source = dist.broadcast(t.record.read_checkpoint(), t.device)
    changed = source_changed(ckpt.get("model_source"), get_spec(cfg.model))
    if changed:  # your own model's file: the run continues in today's code, and says so
        t.record.note(changed.replace("loaded into today's code", "continued in today's code"))
    t.model.load_state_dict(ckpt["model_state"])
    load_optimizer_state(t.optimizer, ckpt["optimizer_state"])
    if t.scheduler is not None and ckpt["scheduler_state"] is not None:
        t.scheduler.load_state_dict(ckpt["scheduler_state"])
    if engine.ema is not None:
        engine.ema.load(ckpt["ema_state"])
    if engine.scaler is not None and ckpt.get("scaler_state"):
        engine.scaler.load_state_dict(ckpt["scaler_state"])
    elif ckpt.get("scaler_state"):
        t.record.note(f"note: this run was saved with fp16 loss scaling and continues in "
                      f"{str(engine.amp_dtype).replace('torch.', '') if engine.amp_dtype else 'fp32'} (--amp auto "
                      "is fp32; --amp on on a GPU before sm80 keeps fp16)")
    step = (ckpt.get("partial") or {}).get("step", 0)
    restore_rng(rank_rng(ckpt, dist), engine, cfg.seed, ckpt["epoch"] + 1, step)
    standing = Standing(start_epoch=ckpt["epoch"] + 1, epoch=ckpt["epoch"], best_val=ckpt["best_val_acc"],
                        best_epoch=ckpt["best_epoch"], stale=ckpt.get("stale", 0))
    if ckpt.get("partial"):
        standing.partial = partial = EpochProgress.from_state(ckpt["partial"], t.device)
        if not dist.main:  # rank 0 carries the epoch's running totals (already summed over ranks)
            partial.loss_sum, partial.correct, partial.seen = 0.0, 0, 0
    if standing.start_epoch > cfg.epochs:
        raise UserError(f"{cfg.resume} already finished all {cfg.epochs} epochs; nothing to resume")
    where = f"epoch {partial.epoch} step {partial.step}" if standing.partial else f"the end of epoch {ckpt['epoch']}"
    t.record.resumed(cfg, ckpt["epoch"], source, where, step, t.device)
    return standing


def rank_rng(ckpt: dict[str, Any], dist: Dist) -> dict[str, Any]:
    """This rank's saved random state; under another number of processes, rank 0's without its per-rank
    streams, which would repeat on every rank (they are re-seeded)."""
    ranks = ckpt.get("rng_ranks")
    rng = ranks[dist.rank] if ranks and len(ranks) == dist.world else ckpt["rng"]
    if dist.active and rng is ckpt["rng"]:
        rng = {**rng, "aug_generator": None, "accelerator": None}
    return rng


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
