"""What rank 0 writes, one method per event of a run: started, resumed, each epoch, interrupted, stopped,
finished. Rank 0 has a `Recorder`, the other ranks a `Silent` one, so the loop never asks which rank it is.

The run directory's writes go through rd.RunDir (runspec's atomic_write and append_jsonl), and rank 0
alone reads the directory back: the config and checkpoint that a resume starts from (found by
trainer/resume.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import runspec
from runspec.config import TrainConfig
from trainer import rundir as rd
from trainer.board import Board, require_tensorboard
from trainer.checkpoint import move_checkpoint, save_checkpoint
from trainer.device import device_name
from trainer.errors import UserError
from trainer.models import get_spec
from trainer.resume import load_resume_checkpoint, resolve_resume

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def recorder(main: bool) -> Recorder:
    return Recorder() if main else Silent()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class Recorder:
    """Rank 0's: the run directory and the console."""

    def __init__(self) -> None:
        self.run: rd.RunDir | None = None  # from the resumed run, or made by started()
        self.board: Board | None = None  # with --tensorboard

    def say(self, line: str) -> None:
        print(line, flush=True)

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    @property
    def run_dir(self) -> str | None:
        return str(self.run.path)

    def run_id(self, cfg: TrainConfig) -> str | None:
        return self.run.path.name

    # reading the run back ----------------------------------------------------------------
    def resumed_config(self, cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
        """The config to run: a resumed run's own, read here (the other ranks get it by broadcast)."""
        if not cfg.resume:
            return cfg
        cfg, self.run = resolve_resume(cfg, explicit)
        return cfg

    def read_checkpoint(self) -> tuple[dict[str, Any] | None, str | None]:
        return load_resume_checkpoint(self.run)

    def epochs(self) -> list[dict[str, Any]]:
        return self.run.read_epochs()

    def seconds(self) -> float | None:
        return self.run.read_epochs()[-1].get("elapsed")

    # events ------------------------------------------------------------------------------
    def mark_rank0(self) -> None:
        """Tells `train --on --nodes` where rank 0 runs."""
        if os.environ.get(runspec.ENV_RANK0_FILE):
            Path(os.environ[runspec.ENV_RANK0_FILE]).write_text(f"{socket.gethostname()} {os.getpid()}\n")

    def started(self, cfg: TrainConfig, model: dict[str, Any], environment: dict[str, Any], data: dict[str, Any],
                summary: str, line: str) -> None:
        """A new run directory: config.json (with the git commit), summary.txt, and the console's header."""
        if cfg.tensorboard:
            require_tensorboard()  # before the run directory exists
        out_dir = Path(cfg.out_dir)
        cfg.run_id = cfg.run_id or rd.new_run_id(out_dir, cfg.model, cfg.seed)
        self.run = rd.RunDir.create(out_dir, cfg.run_id)
        self.run.write_config({
            "run_id": cfg.run_id,
            "status": "running",
            "config": dataclasses.asdict(cfg),
            "model": model,
            "git": runspec.git_state(PROJECT_ROOT),
            **environment,
            "data": data,
            "started": _now(),
        })
        self.run.write_text(rd.SUMMARY, summary + "\n")
        self.say(summary)
        self.say(f"run dir: {self.run.path}  |  {line}")
        if plan_line(cfg):
            self.say(plan_line(cfg))
        if cfg.tensorboard:
            self.board = Board(self.run.path)
            self.board.hparams(cfg)
            line = f"tensorboard: {self.board.dir} (`tensorboard --logdir {cfg.out_dir}` shows it)"
            self.run.log(line)
            self.say(line)

    def resumed(self, cfg: TrainConfig, epoch_done: int, source: str, where: str, step: int,
                device: torch.device) -> None:
        """Metrics cut back to the checkpoint's epoch, so that each epoch is recorded exactly once."""
        self.run.trim_metrics(epoch_done)
        self.run.log(f"Resumed from {source} at {where} on {device_name(device)}")
        self.run.append_metrics({"event": "resumed", "epoch": epoch_done + 1, "from": source, "step": step,
                                 "time": _now()})
        self.run.update_config(status="running", resumed_at=_now())
        self.say(f"resuming {cfg.resume} from {source} at {where}")
        if cfg.tensorboard:  # the curves go on from the epoch trained again; events at or after it are dropped
            self.board = Board(self.run.path, purge_step=epoch_done + 1)
            if self.board.fresh:  # --tensorboard first typed on this resume: the epochs so far, from metrics.jsonl
                self.board.hparams(cfg)
                for row in self.run.read_epochs():
                    self.board.epoch(row)

    def graph(self, model: nn.Module, input_size: int) -> None:
        """The model's graph, once per run: by the process that opened its TensorBoard directory."""
        if self.board is not None and self.board.fresh:
            self.board.graph(model, input_size, log=self.note)

    def epoch(self, row: dict[str, Any], best_val: float | None) -> None:
        """Called before the epoch's checkpoint: a kill between them redoes the epoch, never loses its row."""
        self.run.append_metrics(row)
        if self.board is not None:
            self.board.epoch(row)
        line = log_line(row, best_val)
        self.run.log(line)
        self.say(line)

    def checkpoint(self, state: Callable[[], dict[str, Any]], improved: bool) -> None:
        """last.pt, and best.pt if validation improved. `state` is assembled here: the other ranks never do."""
        state = state()
        # last.pt -> prev.pt first: if the new last.pt is ever damaged, resume still has the one before
        if self.run.file(rd.LAST).exists():
            move_checkpoint(self.run.file(rd.LAST), self.run.file(rd.PREV))
        save_checkpoint(self.run.file(rd.LAST), state)
        if improved:
            save_checkpoint(self.run.file(rd.BEST), state)

    def interrupted(self, signum: int | None, where: str) -> None:
        name = signal.Signals(signum).name if signum else "SIGTERM"
        self.run.append_metrics({"event": "interrupted", "signal": name, "at": where, "time": _now()})
        self.run.update_config(status="interrupted", interrupted_at=_now())
        msg = f"interrupted by {name} at {where}; last.pt is saved: continue with --resume {self.run.path}"
        self.run.log(msg)
        self.say(msg)
        self._close_board()

    def stopped(self, cfg: TrainConfig, epoch: int) -> None:
        self.run.update_config(status="stopped")
        msg = f"stopped after epoch {epoch} (--stop-after {cfg.stop_after}); continue with --resume {self.run.path}"
        self.run.log(msg)
        self.say(msg)
        self._close_board()
        if cfg.report:
            write_run_report(self.run)

    def early_stop(self, epoch: int, reason: str) -> None:
        self.run.log(f"Early stop at epoch {epoch}: {reason}")
        self.say(f"early stop: {reason}")

    def finished(self, cfg: TrainConfig, result: dict[str, Any], delivered: nn.Module) -> None:
        """model.pt (the delivered weights), result.json, and the report."""
        weights, epoch, test_acc, val_acc = result["weights"], result["epochs"], result["test_acc"], result["val_acc"]
        raw = getattr(delivered, "_orig_mod", delivered)
        save_checkpoint(self.run.file(rd.MODEL), {"model_name": cfg.model, "model_source": get_spec(cfg.model).source,
                                                  "model_state": raw.state_dict(),
                                                  "weights": weights, "epoch": epoch,
                                                  "config": dataclasses.asdict(cfg)})
        rd.write_json(self.run.file(rd.RESULT), result)
        self.run.update_config(status="completed", finished=_now())
        what = f"{'EMA of the' if weights == 'ema' else 'final'} weights, epoch {epoch}"
        what += f", {cfg.tta} test-time views" if cfg.tta > 1 else ""
        self.run.log(f"Test accuracy: {test_acc:.2f}% ({what}, in {rd.MODEL})")
        val = "" if val_acc is None else f"; val {val_acc:.2f}%"
        self.say(f"test accuracy: {test_acc:.2f}% ({what}{val}, in {rd.MODEL})  |  {self.run.path}")
        if self.board is not None:
            self.board.result(result)
        self._close_board()
        if cfg.report:
            write_run_report(self.run)


    def _close_board(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


class Silent(Recorder):
    """The other ranks': hears every event, writes nothing, has no run directory."""

    def say(self, line: str) -> None:
        pass

    def note(self, line: str) -> None:
        pass

    @property
    def run_dir(self) -> str | None:
        return None

    def run_id(self, cfg: TrainConfig) -> str | None:
        return cfg.run_id

    def resumed_config(self, cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
        return cfg

    def read_checkpoint(self) -> tuple[dict[str, Any] | None, str | None]:
        return None, None

    def epochs(self) -> list[dict[str, Any]]:
        return []

    def seconds(self) -> float | None:
        return None

    def mark_rank0(self) -> None:
        pass

    def graph(self, model: nn.Module, input_size: int) -> None:
        pass

    def started(self, cfg: TrainConfig, model: dict[str, Any], environment: dict[str, Any], data: dict[str, Any],
                summary: str, line: str) -> None:
        pass

    def resumed(self, cfg: TrainConfig, epoch_done: int, source: str, where: str, step: int,
                device: torch.device) -> None:
        pass

    def epoch(self, row: dict[str, Any], best_val: float | None) -> None:
        pass

    def checkpoint(self, state: Callable[[], dict[str, Any]], improved: bool) -> None:
        pass

    def interrupted(self, signum: int | None, where: str) -> None:
        pass

    def stopped(self, cfg: TrainConfig, epoch: int) -> None:
        pass

    def early_stop(self, epoch: int, reason: str) -> None:
        pass

    def finished(self, cfg: TrainConfig, result: dict[str, Any], delivered: nn.Module) -> None:
        pass


def plan_line(cfg: TrainConfig) -> str:
    """What a recipe does that the epoch lines do not show: its early epochs' size and its test-time views."""
    parts = []
    if cfg.early_epochs:
        epochs = "epoch 1" if cfg.early_epochs == 1 else f"epochs 1-{cfg.early_epochs}"
        parts.append(f"{epochs} at {cfg.early_size} px, then {cfg.input_size} px (progressive resizing)")
    if cfg.tta > 1:
        parts.append(f"answers with {cfg.tta} test-time views ({cfg.tta} passes per image)")
    return "  |  ".join(parts)


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


def write_run_report(run: rd.RunDir, log=print) -> None:
    """report.html at the end of a run; a failure here never costs the run its result."""
    from trainer.report import write_report

    try:
        log(f"report: {write_report(run.path)}")
    except UserError as e:
        log(f"report skipped: {e}")
