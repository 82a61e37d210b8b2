"""The run directory, `runs/<run-id>/`, as the trainer writes it. Its files and how they are read are
runspec's (the vocabulary every reader shares)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import runspec
from runspec import (
    BEST,
    CONFIG,
    LAST,
    LOG,
    METRICS,
    MODEL,
    PREV,
    RESULT,
    SUMMARY,
    append_jsonl,
    atomic_write,
    epochs,
    read_json,
    read_metrics,
    write_json,
)
from trainer.errors import UserError

__all__ = ["BEST", "CONFIG", "LAST", "LOG", "METRICS", "MODEL", "PREV", "RESULT", "SUMMARY", "RunDir", "new_run_id",
           "read_json", "write_json"]


def new_run_id(out_dir: Path, model: str, seed: int) -> str:
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{runspec.model_slug(model)}-s{seed}"
    run_id, n = base, 1
    while (out_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


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
        return read_metrics(self.file(METRICS))  # lenient: a line cut short by a crash ends it

    def read_epochs(self) -> list[dict[str, Any]]:
        """Only the per-epoch records (not the interrupted/resumed events)."""
        return epochs(self.read_metrics())

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.file(METRICS), row)

    def trim_metrics(self, last_epoch: int) -> None:
        """Keep epochs <= last_epoch (and every event line), so a resumed run records each epoch exactly once."""
        rows = [r for r in self.read_metrics() if "event" in r or r.get("epoch", 0) <= last_epoch]
        atomic_write(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())

    # train.log ------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        with open(self.file(LOG), "a") as f:
            f.write(line + "\n")

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), text.encode())
