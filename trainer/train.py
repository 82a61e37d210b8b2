"""The training loop. Reads top to bottom: device, data, model, optimizer, epochs, result.

The dataset sits on the device; an epoch is a randperm over it, each batch is gathered, augmented
and normalized there. Validation drives best.pt, --target, --patience and the plateau schedule;
the test set is only ever reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import runspec
from trainer import rundir as rd
from trainer.augment import augment
from trainer.checkpoint import load_checkpoint, move_checkpoint, save_checkpoint
from runspec.config import TrainConfig, from_dict
from trainer.data import DeviceData, Split, centre_crop, load_mnist, make_splits, normalize
from trainer import device as dev
from trainer.device import device_name, resolve_device
from trainer.distributed import Dist
from trainer.errors import CheckpointError, UserError
from trainer.fetch import resolve_data_dir
from trainer.models import count_params, get_spec
from trainer.optim import (
    WeightAverage,
    epoch_steps,
    load_optimizer_state,
    make_optimizer,
    make_scheduler,
)
from trainer.summary import format_table, layer_table

# On resume, everything comes from the run's config.json except these: flags about this invocation,
# and flags that may differ on the machine it continues on (taken only when given).
INVOCATION_FLAGS = {"resume", "stop_after", "progress", "report"}
RESUMABLE_OVERRIDES = {"device", "data_dir", "threads", "eval_batch_size", "amp", "channels_last", "compile_mode",
                       "deterministic"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- environment
def write_run_report(run: "rd.RunDir", log=print) -> None:
    """report.html at the end of a run; a failure here never costs the run its result."""
    from trainer.report import write_report

    try:
        log(f"report: {write_report(run.path)}")
    except UserError as e:
        log(f"report skipped: {e}")


def use_switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


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

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "perm": self.perm.cpu(), "step": self.step, "loss_sum": self.loss_sum,
                "correct": self.correct, "seen": self.seen, "seconds": self.seconds,
                "compile_seconds": self.compile_seconds}

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


def log_line(row: dict[str, Any], best_val: float | None) -> str:
    """Seed 000's format, then what it lacked: test accuracy, LR and time."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"

    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    return (f"Epoch: {row['epoch']} | Train Loss: {row['train_loss']:.4f} | Train Acc: {row['train_acc']:.2f}% | "
            f"Val Loss: {num(row['val_loss'])} | Val Acc: {pct(row['val_acc'])} | Best Val Acc: {pct(best_val)} | "
            f"Test Acc: {pct(row['test_acc'])} | LR: {row['lr']:.4g} | {row['seconds']:.1f}s"
            + (f" (+{row['compile_seconds']:.1f}s compile)" if row.get("compile_seconds") else ""))


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


# what a resume reads without a default; a checkpoint lacking one is as unusable as a damaged one
RESUME_KEYS = ("epoch", "optimizer_state", "scheduler_state", "best_val_acc", "best_epoch", "rng")


def load_resume_checkpoint(run: "rd.RunDir") -> tuple[dict[str, Any], str]:
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


# ---------------------------------------------------------------------------------- the run
def resolve_resume(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, rd.RunDir]:
    """The saved config of the run being resumed, with only the flags that may change applied."""
    run = rd.RunDir.existing(cfg.resume)
    saved = from_dict(run.read_config()["config"])
    ignored = sorted(explicit - RESUMABLE_OVERRIDES - INVOCATION_FLAGS)
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        print(f"note: resuming keeps the run's saved config; ignoring {flags}", file=sys.stderr)
    changes = {k: getattr(cfg, k) for k in (explicit & RESUMABLE_OVERRIDES) | INVOCATION_FLAGS}
    return dataclasses.replace(saved, **changes), run


def fit(cfg: TrainConfig, explicit: set[str] = frozenset()) -> dict[str, Any]:
    """Train per `cfg` and return the result written to result.json. `explicit` = flags the user typed.

    Under torchrun every rank runs this; rank 0 alone owns the run directory and the console."""
    dist = Dist.from_env()
    try:
        return _fit(cfg, explicit, dist)
    finally:
        dist.shutdown()


def _fit(cfg: TrainConfig, explicit: set[str], dist: Dist) -> dict[str, Any]:
    say = print if dist.main else (lambda *a, **k: None)
    run = None
    if cfg.resume and dist.main:
        cfg, run = resolve_resume(cfg, explicit)
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
        if not dist.main:
            cfg = dataclasses.replace(cfg, progress=False, report=False)
    if dist.main and os.environ.get(runspec.ENV_RANK0_FILE):  # tells `train --on --nodes` where rank 0 runs
        Path(os.environ[runspec.ENV_RANK0_FILE]).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    torch.manual_seed(cfg.seed)  # weights and dropout
    data_dir = resolve_data_dir(cfg.data_dir)
    data: DeviceData = make_splits(load_mnist(data_dir), cfg.val_size, cfg.seed, device, cfg.train_limit,
                                   cfg.eval_limit)

    model = spec.build()
    params = count_params(model)
    summary = format_table(layer_table(model, cfg.input_size), title=f"{cfg.model}: {spec.description}")
    if dist.active:
        torch.manual_seed(cfg.seed + 7919 * dist.rank)  # each rank its own dropout masks; DDP syncs the weights
    use_cl = use_switch(cfg.channels_last, device.type in ("cpu", "cuda"))
    memory_format = torch.channels_last if use_cl else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    dev.configure_backends(device, cfg.deterministic)
    amp_dtype = dev.amp_dtype(device.type, cfg.amp, dev.capability(device))
    if cfg.cuda_graph:
        from trainer.graphstep import check_supported

        check_supported(cfg, dist.world, amp_dtype)
    engine = Engine(
        device=device, amp_dtype=amp_dtype, memory_format=memory_format,
        generator=torch.Generator(device=device).manual_seed(cfg.seed + 10_000),  # batch order + augmentation
        scaler=torch.amp.GradScaler(device.type) if dev.needs_grad_scaler(amp_dtype) else None,
        dist=dist,
        aug_generator=torch.Generator(device=device).manual_seed(cfg.seed + 20_000 + dist.rank) if dist.active else None,
        compile_pending=compile_steps(cfg),
        input_size=cfg.input_size,
    )
    wrapped = dist.wrap(model, device)
    model = wrapped.module if dist.active else model  # the plain module: evaluation and checkpoints
    optimizer = make_optimizer(cfg, model, device.type)
    steps = epoch_steps(cfg, len(data.train), dist.world)
    if steps == 0:
        raise UserError(f"{len(data.train)} training images make no batch of {cfg.batch_size}"
                        f"{f' over {dist.world} processes' if dist.active else ''}: "
                        "use a smaller --batch-size or a larger --train-limit")
    scheduler, per_step = make_scheduler(cfg, optimizer, steps)
    step_model = torch.compile(wrapped, mode=cfg.compile_mode, dynamic=False) if cfg.compile else wrapped

    start_epoch, best_val, best_epoch, stale, partial = 1, None, None, 0, None
    engine.ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    if cfg.resume:
        # on the CPU, then to every rank: a map_location of rank 0's GPU would land every rank's copy there
        ckpt, source = load_resume_checkpoint(run) if dist.main else (None, None)
        ckpt, source = dist.broadcast((ckpt, source), device)
        model.load_state_dict(ckpt["model_state"])
        load_optimizer_state(optimizer, ckpt["optimizer_state"])
        if scheduler is not None and ckpt["scheduler_state"] is not None:
            scheduler.load_state_dict(ckpt["scheduler_state"])
        if engine.ema is not None:
            engine.ema.load(ckpt["ema_state"])
        if engine.scaler is not None and ckpt.get("scaler_state"):
            engine.scaler.load_state_dict(ckpt["scaler_state"])
        elif ckpt.get("scaler_state") and dist.main:
            print(f"note: this run was saved with fp16 loss scaling and continues in "
                  f"{str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'} (--amp auto is fp32; "
                  "--amp on on a GPU before sm80 keeps fp16)", file=sys.stderr, flush=True)
        ranks = ckpt.get("rng_ranks")
        rng = ranks[dist.rank] if ranks and len(ranks) == dist.world else ckpt["rng"]
        if dist.active and rng is ckpt["rng"]:  # another number of processes: rank 0's per-rank streams
            rng = {**rng, "aug_generator": None, "accelerator": None}  # would repeat on every rank: re-seed
        restore_rng(rng, engine, cfg.seed, ckpt["epoch"] + 1, (ckpt.get("partial") or {}).get("step", 0))
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val_acc"], ckpt["best_epoch"]
        stale = ckpt.get("stale", 0)
        if ckpt.get("partial"):
            partial = EpochProgress.from_state(ckpt["partial"], device)
            if not dist.main:  # rank 0 carries the epoch's running totals (already summed over ranks)
                partial.loss_sum, partial.correct, partial.seen = 0.0, 0, 0
        if start_epoch > cfg.epochs:
            raise UserError(f"{cfg.resume} already finished all {cfg.epochs} epochs; nothing to resume")
        where = f"epoch {partial.epoch} step {partial.step}" if partial else f"the end of epoch {ckpt['epoch']}"
        if dist.main:
            run.trim_metrics(ckpt["epoch"])
            run.log(f"Resumed from {source} at {where} on {device_name(device)}")
            run.append_metrics({"event": "resumed", "epoch": start_epoch, "from": source,
                                "step": partial.step if partial else 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            run.update_config(status="running", resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        say(f"resuming {cfg.resume} from {source} at {where}", flush=True)
    elif dist.main:
        out_dir = Path(cfg.out_dir)
        cfg.run_id = cfg.run_id or rd.new_run_id(out_dir, cfg.model, cfg.seed)
        run = rd.RunDir.create(out_dir, cfg.run_id)
        run.write_config({
            "run_id": cfg.run_id,
            "status": "running",
            "config": dataclasses.asdict(cfg),
            "model": {"name": cfg.model, "params": params, "macs": sum(r.macs for r in layer_table(model, cfg.input_size))},
            "git": runspec.git_state(PROJECT_ROOT),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": {"type": device.type, "name": device_name(device), "amp": str(amp_dtype).replace("torch.", "")
                       if amp_dtype else None, "channels_last": use_cl},
            "distributed": {"world_size": dist.world, "backend": ("nccl" if device.type == "cuda" else "gloo")}
            if dist.active else None,
            "host": socket.gethostname(),
            "cloud": runspec.cloud_info(),
            "data": {"dir": str(data_dir), "train": len(data.train), "val": len(data.val) if data.val else 0,
                     "test": len(data.test)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        run.write_text(rd.SUMMARY, summary + "\n")
        say(summary, flush=True)
        say(f"run dir: {run.path}  |  device: {device_name(device)}"
            f"{f' x {dist.world} processes' if dist.active else ''}  |  "
            f"train/val/test: {len(data.train)}/{len(data.val) if data.val else 0}/{len(data.test)}", flush=True)

    static = None
    if cfg.cuda_graph:
        from trainer.graphstep import StaticStep

        static = StaticStep(step_model, optimizer, cfg, engine, data.train, steps)  # after a resume's load

    show_progress = cfg.progress and sys.stderr.isatty()
    run_started = time.perf_counter()
    epoch_rows = run.read_epochs() if run is not None else []
    elapsed_before = epoch_rows[-1]["elapsed"] if epoch_rows else 0.0
    if partial:
        elapsed_before += partial.seconds
    epoch = start_epoch - 1
    stop_reason = None

    def save(epoch_done: int, improved: bool, partial_state: dict | None = None) -> None:
        rng_ranks = dist.gather(rng_state(engine), device) if dist.active else None  # a collective: every rank
        if not dist.main:
            return
        state = checkpoint_state(model, optimizer, scheduler, engine, cfg, epoch_done, best_val, best_epoch, stale,
                                 partial=partial_state, rng_ranks=rng_ranks)
        # last.pt -> prev.pt first: if the new last.pt is ever damaged, resume still has the one before
        if run.file(rd.LAST).exists():
            move_checkpoint(run.file(rd.LAST), run.file(rd.PREV))
        save_checkpoint(run.file(rd.LAST), state)
        if improved:
            save_checkpoint(run.file(rd.BEST), state)

    def interrupted(stop: StopFlag, where: str) -> dict[str, Any]:
        name = signal.Signals(stop.signal).name if stop.signal else "SIGTERM"
        if dist.main:
            run.append_metrics({"event": "interrupted", "signal": name, "at": where,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            run.update_config(status="interrupted", interrupted_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            msg = f"interrupted by {name} at {where}; last.pt is saved: continue with --resume {run.path}"
            run.log(msg)
            say(msg, flush=True)
        return {"status": "interrupted", "signal": stop.signal or signal.SIGTERM,
                "run_dir": str(run.path) if run else None}

    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            progress = partial if partial and partial.epoch == epoch else EpochProgress(epoch)
            partial = None
            if static is not None:
                from trainer.graphstep import train_epoch_static

                finished = train_epoch_static(static, scheduler, per_step, progress, stop)
            else:
                finished = train_one_epoch(step_model, data.train, optimizer, scheduler, per_step, cfg, engine,
                                           progress, show_progress, stop)
            if not finished:
                sums = dist.sum([progress.loss_sum, progress.correct, progress.seen], device)
                state = {**progress.state(), "loss_sum": sums[0], "correct": int(sums[1]), "seen": int(sums[2])}
                save(epoch - 1, improved=False, partial_state=state)
                return interrupted(stop, f"epoch {epoch} step {progress.step}")
            train = epoch_stats(progress, engine)
            val_loss, val_acc = evaluate(model, data.val, engine, cfg.eval_batch_size) if data.val else (None, None)
            test_loss, test_acc = (evaluate(model, data.test, engine, cfg.eval_batch_size) if cfg.test_every_epoch
                                   else (None, None))
            # rank 0's numbers on every rank: on CPUs each rank's BatchNorm statistics differ a little,
            # and ranks that disagreed about --target or --patience would hang the next collective
            val_loss, val_acc, test_loss, test_acc = dist.broadcast((val_loss, val_acc, test_loss, test_acc), device)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None and not per_step:
                scheduler.step(val_acc) if cfg.schedule == "plateau" else scheduler.step()
            improved = val_acc is not None and (best_val is None or val_acc > best_val)
            if improved:
                best_val, best_epoch, stale = val_acc, epoch, 0
            else:
                stale += 1
            row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val_loss,
                   "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                   "seconds": time.perf_counter() - t0 - progress.compile_seconds, "train_seconds": train["seconds"],
                   "img_per_s": train["img_per_s"],
                   "elapsed": elapsed_before + time.perf_counter() - run_started}
            if progress.compile_seconds:
                row["compile_seconds"] = progress.compile_seconds
            if dist.main:  # the row before the checkpoint: a kill between them redoes the epoch, never loses its row
                run.append_metrics(row)
                line = log_line(row, best_val)
                run.log(line)
                say(line, flush=True)
            save(epoch, improved)
            if dist.any(bool(stop), device) and epoch < cfg.epochs:  # signalled during evaluation: epoch saved
                return interrupted(stop, f"the end of epoch {epoch}")

            if cfg.target is not None and val_acc >= cfg.target:
                stop_reason = f"validation accuracy {val_acc:.2f}% reached --target {cfg.target}"
            elif cfg.patience and stale >= cfg.patience:
                stop_reason = f"no better validation accuracy for {stale} epochs (--patience {cfg.patience})"
            elif cfg.stop_after and epoch - start_epoch + 1 >= cfg.stop_after and epoch < cfg.epochs:
                if dist.main:
                    run.update_config(status="stopped")
                    msg = f"stopped after epoch {epoch} (--stop-after {cfg.stop_after}); continue with --resume {run.path}"
                    run.log(msg)
                    say(msg, flush=True)
                    if cfg.report:
                        write_run_report(run)
                return {"status": "stopped", "epoch": epoch, "run_dir": str(run.path) if run else None}
            if stop_reason:
                if dist.main:
                    run.log(f"Early stop at epoch {epoch}: {stop_reason}")
                say(f"early stop: {stop_reason}", flush=True)
                break

    # What the run delivers: the final weights, or their average. Its accuracy is the headline.
    delivered = engine.ema.model if engine.ema is not None else model
    if engine.ema is not None:
        val_loss, val_acc = evaluate(delivered, data.val, engine, cfg.eval_batch_size) if data.val else (None, None)
    if engine.ema is not None or test_acc is None:  # the final weights' test was skipped per epoch
        test_loss, test_acc = evaluate(delivered, data.test, engine, cfg.eval_batch_size)
    val_loss, val_acc, test_loss, test_acc = dist.broadcast((val_loss, val_acc, test_loss, test_acc), device)
    weights = "ema" if engine.ema is not None else "final"
    result = {
        "status": "completed",
        "run_id": run.path.name if run else cfg.run_id,
        "run_dir": str(run.path) if run else None,
        "model": cfg.model,
        "params": params,
        "epochs": epoch,
        "stop_reason": stop_reason,
        "weights": weights,
        "delivered": rd.MODEL,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "val_acc": val_acc,
        "best_val_acc": best_val,
        "best_epoch": best_epoch,
        "seconds": run.read_epochs()[-1].get("elapsed") if run else None,
    }
    if not dist.main:
        dist.barrier()
        return result
    raw = getattr(delivered, "_orig_mod", delivered)
    save_checkpoint(run.file(rd.MODEL), {"model_name": cfg.model, "model_state": raw.state_dict(), "weights": weights,
                                         "epoch": epoch, "config": dataclasses.asdict(cfg)})
    rd.write_json(run.file(rd.RESULT), result)
    run.update_config(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    what = f"{'EMA of the' if weights == 'ema' else 'final'} weights, epoch {epoch}"
    run.log(f"Test accuracy: {test_acc:.2f}% ({what}, in {rd.MODEL})")
    val = "" if val_acc is None else f"; val {val_acc:.2f}%"
    say(f"test accuracy: {test_acc:.2f}% ({what}{val}, in {rd.MODEL})  |  {run.path}", flush=True)
    if cfg.report:
        write_run_report(run)
    dist.barrier()
    return result
