"""The run directory, `runs/<run-id>/`, the same on a laptop and on an instance.

    config.json    resolved config, git SHA, torch version, device, status
    metrics.jsonl  one JSON line per epoch, each epoch exactly once (resume trims what it redoes)
    train.log      seed 000's human-readable line per epoch
    summary.txt    the layer table
    model.pt       the weights the run delivers (the final weights, or their EMA with --ema): what
                   result.json, `evaluate RUN`, `predict`, the report and the sweep all read
    best.pt        best validation accuracy so far (with a validation split; a resume fallback, not delivered)
    last.pt        the newest state: the end of the last epoch, or mid-epoch if interrupted
    prev.pt        the checkpoint before last.pt, in case last.pt is ever damaged
    result.json    the delivered weights' test (and validation) accuracy, written when the run ends
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.data import atomic_write_bytes
from trainer.errors import UserError

CONFIG, METRICS, LOG, SUMMARY, RESULT = "config.json", "metrics.jsonl", "train.log", "summary.txt", "result.json"
BEST, LAST, PREV, MODEL = "best.pt", "last.pt", "prev.pt", "model.pt"


def new_run_id(out_dir: Path, model: str, seed: int) -> str:
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-s{seed}"
    run_id, n = base, 1
    while (out_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, out_dir: Path, run_id: str) -> "RunDir":
        path = Path(out_dir) / run_id
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise UserError(f"run directory {path} already exists; pick another --run-id or --resume it") from None
        return cls(path)

    @classmethod
    def existing(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is not a run directory (no {CONFIG}); pass runs/<run-id>")
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # config.json ---------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return read_json(self.file(CONFIG))

    def write_config(self, data: dict[str, Any]) -> None:
        write_json(self.file(CONFIG), data)

    def update_config(self, **changes: Any) -> None:
        data = self.read_config()
        data.update(changes)
        self.write_config(data)

    # metrics.jsonl --------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it is good
        return rows

    def read_epochs(self) -> list[dict[str, Any]]:
        """Only the per-epoch records (not the interrupted/resumed events)."""
        return [r for r in self.read_metrics() if "event" not in r]

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.file(METRICS), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def trim_metrics(self, last_epoch: int) -> None:
        """Keep epochs <= last_epoch (and every event line), so a resumed run records each epoch exactly once."""
        rows = [r for r in self.read_metrics() if "event" in r or r.get("epoch", 0) <= last_epoch]
        atomic_write_bytes(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())

    # train.log ------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        with open(self.file(LOG), "a") as f:
            f.write(line + "\n")

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.file(name), text.encode())
