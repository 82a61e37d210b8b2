"""TensorBoard event files in a run directory's tb/ (runspec.TENSORBOARD), with --tensorboard.

The same numbers as metrics.jsonl and the report, one step per epoch: train/val loss and accuracy, the
learning rate, images per second, and the delivered weights' test accuracy at the end. The hyperparameters
go into the run's own event file (the HParams plugin's summaries, not add_hparams' timestamped
subfolder), so TensorBoard's HParams tab compares the runs under `tensorboard --logdir runs`. A resume
opens the directory with purge_step at the first epoch it trains again: its curves continue the old ones.

Opt-in: torch.utils.tensorboard (and tensorboard, its protobufs) is imported only here, only when asked;
a run without the flag never loads it. `export-tb` writes the same files from an old run's metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path
from typing import Any

import runspec
from runspec.config import TrainConfig, from_dict
from trainer.errors import UserError

INSTALL_HINT = "pip install 'mnist-cloud[tensorboard]'"
# metrics.jsonl's keys and their TensorBoard tags: the report's curves
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
           "train_acc": "accuracy/train", "val_acc": "accuracy/val", "test_acc": "accuracy/test",
           "lr": "lr", "img_per_s": "throughput/img_per_s", "seconds": "time/epoch_seconds"}
# what the HParams tab shows beside each run's hyperparameters: the tags' last values
METRICS = ("result/test_acc", "result/best_val_acc", "accuracy/val", "loss/val")
# the hyperparameters worth comparing; the rest of config.json are paths and switches of the invocation
HPARAMS = ("model", "recipe", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
           "pct_start", "label_smoothing", "ema", "seed", "val_size", "rotate", "translate", "scale", "shear",
           "perspective", "brightness", "contrast", "crop", "input_size", "amp", "compile", "cuda_graph")


def require_tensorboard(asker: str = "--tensorboard") -> None:
    """One line, before any work, when --tensorboard (or export-tb) is asked for without the package."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"{asker} needs the tensorboard package: {INSTALL_HINT}")


def hparams_of(cfg: TrainConfig) -> dict[str, Any]:
    """The HParams plugin takes numbers, strings and booleans: a None (no --target, say) becomes "none"."""
    values = {k: getattr(cfg, k) for k in HPARAMS}
    return {k: "none" if v is None else v for k, v in values.items()}


class Board:
    """One writer on RUN/tb/: rank 0's, opened when the run starts or resumes."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / runspec.TENSORBOARD
        self.fresh = not self.dir.is_dir() or not any(self.dir.iterdir())  # nothing written by an earlier process
        self.writer = SummaryWriter(str(self.dir), purge_step=None if self.fresh else purge_step)

    def hparams(self, cfg: TrainConfig) -> None:
        """The HParams plugin's experiment and session summaries, in this directory's own event file."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(hparams_of(cfg), {tag: 0.0 for tag in METRICS}):
            self.writer.file_writer.add_summary(summary)

    def graph(self, model, input_size: int, log=print) -> None:
        """The model's graph, traced from the plain module (never the compiled or graph-captured step) in
        eval mode without gradients: tracing in train mode would move BatchNorm's running statistics. A
        model the tracer cannot follow loses its graph, never the run."""
        import torch

        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        example = torch.zeros(2, 1, input_size, input_size, device=device)  # zeros: no draw from the seed's stream
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace_method is deprecated": add_graph's
                self.writer.add_graph(model, example)
        except Exception as e:  # the tracer's failures have no common type
            log(f"note: TensorBoard graph skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        finally:
            model.train(was_training)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()  # each epoch on disk as it ends: TensorBoard shows a live run

    def result(self, result: dict[str, Any]) -> None:
        """The delivered weights' numbers, at the last epoch's step."""
        for key in ("test_acc", "best_val_acc"):
            if result.get(key) is not None:
                self.writer.add_scalar(f"result/{key}", result[key], result.get("epochs") or 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export(run: str | Path, force: bool = False, log=print) -> Path:
    """An old run's tb/ from its config.json, metrics.jsonl and result.json (and the graph of its
    model, where the model can still be built)."""
    from trainer import rundir as rd

    run_dir = rd.RunDir.existing(run)
    target = run_dir.file(runspec.TENSORBOARD)
    if target.exists() and any(target.iterdir()):
        if not force:
            raise UserError(f"{target} already holds event files; --force replaces them")
        shutil.rmtree(target)
    config = run_dir.read_config()
    cfg = from_dict(config.get("config") or {})
    board = Board(run_dir.path)
    try:
        board.hparams(cfg)
        try:
            from trainer.models import get_spec

            board.graph(get_spec(cfg.model).build(), cfg.input_size, log=log)
        except UserError as e:  # your own model's file moved or changed: the curves still come
            log(f"note: TensorBoard graph skipped ({e})")
        rows = run_dir.read_epochs()
        for row in rows:
            board.epoch(row)
        result_file = run_dir.file(runspec.RESULT)
        if result_file.exists():
            board.result(rd.read_json(result_file))
    finally:
        board.close()
    log(f"{target}: {len(rows)} epoch(s)" + (", the result" if result_file.exists() else ""))
    return target
