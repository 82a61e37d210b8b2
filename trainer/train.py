"""The training loop. Reads top to bottom: device, data, model, optimizer, epochs, result.

The dataset sits on the device; an epoch is a randperm over it, each batch is gathered, augmented
and normalized there. Validation drives best.pt, --target, --patience and the plateau schedule;
the test set is only ever reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import rundir as rd
from trainer.augment import augment
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, from_dict
from trainer.data import DeviceData, Split, load_mnist, make_splits, normalize
from trainer.errors import UserError
from trainer.fetch import resolve_data_dir
from trainer.models import build_model, count_params, get_spec
from trainer.summary import format_table, layer_table

# On resume, everything comes from the run's config.json except these: flags about this invocation,
# and flags that may differ on the machine it continues on (taken only when given).
INVOCATION_FLAGS = {"resume", "stop_after", "progress", "report"}
RESUMABLE_OVERRIDES = {"device", "data_dir", "threads", "eval_batch_size"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- environment
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_state() -> dict[str, Any]:
    """The code's commit and whether the tree was dirty; $MNIST_CLOUD_GIT_SHA when synced without .git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": os.environ.get("MNIST_CLOUD_GIT_SHA"), "dirty": os.environ.get("MNIST_CLOUD_GIT_DIRTY") == "1"}
    return {"sha": sha, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cloud_info() -> dict[str, Any] | None:
    """Set by `mnist-cloud train --on` for the report: which machine, and what it costs per hour."""
    if not os.environ.get("MNIST_CLOUD_NAME"):
        return None
    price = os.environ.get("MNIST_CLOUD_PRICE")
    return {"name": os.environ["MNIST_CLOUD_NAME"], "instance_type": os.environ.get("MNIST_CLOUD_INSTANCE_TYPE"),
            "price_per_hour": float(price) if price else None}


def write_run_report(run: "rd.RunDir", log=print) -> None:
    """report.html at the end of a run; a failure here never costs the run its result."""
    from trainer.report import write_report

    try:
        log(f"report: {write_report(run.path)}")
    except UserError as e:
        log(f"report skipped: {e}")


def use_switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


# ---------------------------------------------------------------------------------- optimization
def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, True if it steps per batch)."""
    sgd = cfg.optimizer == "sgd"
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
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


@dataclass
class Engine:
    """What one step needs besides the model: device, precision, memory format, RNG."""

    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images).contiguous(memory_format=self.memory_format)


def steps_in_epoch(n: int, batch_size: int, max_steps: int | None) -> int:
    steps = n // batch_size + (1 if n % batch_size >= 2 else 0)  # a last batch of 1 would break BatchNorm
    return min(steps, max_steps) if max_steps else steps


def train_one_epoch(model, split: Split, optimizer, scheduler, per_step: bool, cfg: TrainConfig, engine: Engine,
                    epoch: int, show_progress: bool) -> dict[str, float]:
    model.train()
    n = len(split)
    steps = steps_in_epoch(n, cfg.batch_size, cfg.max_steps)
    aug = cfg.augment_config()
    perm = torch.randperm(n, generator=engine.generator, device=engine.device)
    loss_sum = torch.zeros((), device=engine.device)
    correct = torch.zeros((), device=engine.device, dtype=torch.long)
    seen = 0
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, file=sys.stderr,
                   dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(steps):
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = split.images[idx].float().div_(255.0)  # [0, 1] for augmentation
        x = engine.prepare(augment(x, aug, engine.generator))
        y = split.labels[idx]
        with engine.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if per_step:
            scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if bar is not None and (step % 20 == 0 or step == steps - 1):
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%",
                            img_s=f"{rate:,.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return {"loss": loss_sum.item() / seen, "acc": 100.0 * correct.item() / seen, "seconds": seconds,
            "img_per_s": seen / seconds}


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
            f"Test Acc: {row['test_acc']:.2f}% | LR: {row['lr']:.4g} | {row['seconds']:.1f}s")


# ---------------------------------------------------------------------------------- checkpoints
def rng_state(engine: Engine) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": engine.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], engine: Engine) -> None:
    torch.set_rng_state(state["torch"].cpu())
    engine.generator.set_state(state["generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def checkpoint_state(model, optimizer, scheduler, engine: Engine, cfg: TrainConfig, epoch: int,
                     best_val: float | None, best_epoch: int | None) -> dict[str, Any]:
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {
        "model_name": cfg.model,
        "model_state": raw.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "scaler_state": engine.scaler.state_dict() if engine.scaler is not None else None,
        "epoch": epoch,
        "best_val_acc": best_val,
        "best_epoch": best_epoch,
        "rng": rng_state(engine),
        "config": dataclasses.asdict(cfg),
    }


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
    """Train per `cfg` and return the result written to result.json. `explicit` = flags the user typed."""
    run = None
    if cfg.resume:
        cfg, run = resolve_resume(cfg, explicit)
    cfg.validate()
    spec = get_spec(cfg.model)
    if cfg.val_size == 0 and (cfg.target is not None or cfg.patience or cfg.schedule == "plateau"):
        raise UserError("--target, --patience and --schedule plateau read the validation split; "
                        "they cannot be used with --val-size 0")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # weights and dropout
    data_dir = resolve_data_dir(cfg.data_dir)
    data: DeviceData = make_splits(load_mnist(data_dir), cfg.val_size, cfg.seed, device, cfg.train_limit,
                                   cfg.eval_limit)

    model = spec.build()
    params = count_params(model)
    summary = format_table(layer_table(model), title=f"{cfg.model}: {spec.description}")
    use_cl = use_switch(cfg.channels_last, device.type in ("cpu", "cuda"))
    memory_format = torch.channels_last if use_cl else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    amp_dtype = None
    if use_switch(cfg.amp, device.type == "cuda"):
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            amp_dtype = torch.bfloat16
    engine = Engine(
        device=device, amp_dtype=amp_dtype, memory_format=memory_format,
        generator=torch.Generator(device=device).manual_seed(cfg.seed + 10_000),  # batch order + augmentation
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
    )
    optimizer = make_optimizer(cfg, model)
    steps = steps_in_epoch(len(data.train), cfg.batch_size, cfg.max_steps)
    scheduler, per_step = make_scheduler(cfg, optimizer, steps)
    step_model = torch.compile(model) if cfg.compile else model

    start_epoch, best_val, best_epoch = 1, None, None
    if run is not None:
        ckpt = load_checkpoint(run.file(rd.LAST), map_location=device)
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if scheduler is not None and ckpt["scheduler_state"] is not None:
            scheduler.load_state_dict(ckpt["scheduler_state"])
        if engine.scaler is not None and ckpt.get("scaler_state"):
            engine.scaler.load_state_dict(ckpt["scaler_state"])
        restore_rng(ckpt["rng"], engine)
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val_acc"], ckpt["best_epoch"]
        if start_epoch > cfg.epochs:
            raise UserError(f"{run.path} already finished all {cfg.epochs} epochs; nothing to resume")
        run.trim_metrics(ckpt["epoch"])
        run.log(f"Resumed from epoch {ckpt['epoch']} on {device_name(device)}")
        run.update_config(status="running", resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        print(f"resuming {run.path} after epoch {ckpt['epoch']}", flush=True)
    else:
        out_dir = Path(cfg.out_dir)
        cfg.run_id = cfg.run_id or rd.new_run_id(out_dir, cfg.model, cfg.seed)
        run = rd.RunDir.create(out_dir, cfg.run_id)
        run.write_config({
            "run_id": cfg.run_id,
            "status": "running",
            "config": dataclasses.asdict(cfg),
            "model": {"name": cfg.model, "params": params, "macs": sum(r.macs for r in layer_table(model))},
            "git": git_state(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": {"type": device.type, "name": device_name(device), "amp": str(amp_dtype).replace("torch.", "")
                       if amp_dtype else None, "channels_last": use_cl},
            "host": socket.gethostname(),
            "cloud": cloud_info(),
            "data": {"dir": str(data_dir), "train": len(data.train), "val": len(data.val) if data.val else 0,
                     "test": len(data.test)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        run.write_text(rd.SUMMARY, summary + "\n")
        print(summary, flush=True)
        print(f"run dir: {run.path}  |  device: {device_name(device)}  |  "
              f"train/val/test: {len(data.train)}/{len(data.val) if data.val else 0}/{len(data.test)}", flush=True)

    show_progress = cfg.progress and sys.stderr.isatty()
    stale = 0
    run_started = time.perf_counter()
    elapsed_before = (run.read_metrics() or [{}])[-1].get("elapsed", 0.0)
    epoch = start_epoch - 1
    stop_reason = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        train = train_one_epoch(step_model, data.train, optimizer, scheduler, per_step, cfg, engine, epoch,
                                show_progress)
        val_loss, val_acc = evaluate(model, data.val, engine, cfg.eval_batch_size) if data.val else (None, None)
        test_loss, test_acc = evaluate(model, data.test, engine, cfg.eval_batch_size)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None and not per_step:
            scheduler.step(val_acc) if cfg.schedule == "plateau" else scheduler.step()
        improved = val_acc is None or best_val is None or val_acc > best_val
        if improved:
            best_val, best_epoch, stale = val_acc, epoch, 0
        else:
            stale += 1
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val_loss,
               "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
               "seconds": time.perf_counter() - t0, "train_seconds": train["seconds"],
               "img_per_s": train["img_per_s"],
               "elapsed": elapsed_before + time.perf_counter() - run_started}
        state = checkpoint_state(model, optimizer, scheduler, engine, cfg, epoch, best_val, best_epoch)
        save_checkpoint(run.file(rd.LAST), state)
        if improved:
            save_checkpoint(run.file(rd.BEST), state)
        run.append_metrics(row)
        line = log_line(row, best_val)
        run.log(line)
        print(line, flush=True)

        if cfg.target is not None and val_acc >= cfg.target:
            stop_reason = f"validation accuracy {val_acc:.2f}% reached --target {cfg.target}"
        elif cfg.patience and stale >= cfg.patience:
            stop_reason = f"no better validation accuracy for {stale} epochs (--patience {cfg.patience})"
        elif cfg.stop_after and epoch - start_epoch + 1 >= cfg.stop_after and epoch < cfg.epochs:
            run.update_config(status="stopped")
            msg = f"stopped after epoch {epoch} (--stop-after {cfg.stop_after}); continue with --resume {run.path}"
            run.log(msg)
            print(msg, flush=True)
            if cfg.report:
                write_run_report(run)
            return {"status": "stopped", "epoch": epoch, "run_dir": str(run.path)}
        if stop_reason:
            run.log(f"Early stop at epoch {epoch}: {stop_reason}")
            print(f"early stop: {stop_reason}", flush=True)
            break

    result = {
        "status": "completed",
        "run_id": run.path.name,
        "run_dir": str(run.path),
        "model": cfg.model,
        "params": params,
        "epochs": epoch,
        "stop_reason": stop_reason,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "best_val_acc": best_val,
        "best_epoch": best_epoch,
        "seconds": (run.read_metrics() or [{}])[-1].get("elapsed"),
    }
    rd.write_json(run.file(rd.RESULT), result)
    run.update_config(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    run.log(f"Test accuracy: {test_acc:.2f}% (final model, epoch {epoch})")
    print(f"test accuracy: {test_acc:.2f}% (final model, epoch {epoch}; best val {best_val if best_val is None else f'{best_val:.2f}%'} "
          f"at epoch {best_epoch})  |  {run.path}", flush=True)
    if cfg.report:
        write_run_report(run)
    return result

