"""Checkpoints: written atomically, loaded with weights_only and a clear error when damaged."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError

FORMAT = "mnist-cloud/1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp name, fsync, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints. Tensors and plain containers only (weights_only): no code runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first}); use the run's best.pt or retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model_state" not in state:
        raise UserError(f"{path} is not an mnist-cloud checkpoint (no '{FORMAT}' marker)")
    return state
