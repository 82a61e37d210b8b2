"""Checkpoints: written atomically with a sha256 beside them, checked before torch reads a byte of
them, and loaded with weights_only, so that a damaged or foreign file is one clear error.

`best.pt` gets `best.pt.sha256` ("<hex>  best.pt", as `sha256sum` writes it). torch.load checks
no CRC, so without this check a flipped byte inside a tensor loads silently as different weights.
A checkpoint without its .sha256 (copied alone, or saved before the sidecar existed) is checked by
the CRCs of its zip members instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from runspec import atomic_write
from trainer.errors import CheckpointError

FORMAT = "mnist-cloud/1"
CHECKSUM_SUFFIX = ".sha256"
MODEL_KEYS = ("model_name", "model_state")  # what every reader of a checkpoint needs
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
DAMAGED_ADVICE = "use the run's prev.pt or best.pt, pull the run again, or retrain"
FOREIGN_ADVICE = "pass a best.pt or last.pt that `mnist-cloud train` wrote"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp name, fsync, rename, then write the sha256 beside it.

    The old sidecar goes before the new file comes in, and the new sidecar only after it: a crash
    at any point leaves a checkpoint either with its own sha256 or with none (then the zip CRCs
    vouch for it), never one with another file's sha256, which would make a good file look damaged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w+b") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        digest = sha256_of(f)
    checksum_path(path).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _write_checksum(path, digest)


def move_checkpoint(src: Path, dst: Path) -> None:
    """Rename a checkpoint (last.pt -> prev.pt) together with its sha256, in the same safe order.

    The digest is carried over, not recomputed: recomputing would bless a file damaged on disk."""
    old = checksum_path(src)
    digest = (old.read_text(errors="replace").split() or [""])[0] if old.is_file() else None
    checksum_path(dst).unlink(missing_ok=True)
    _fsync_dir(dst.parent)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if digest is not None:
        _write_checksum(dst, digest)
    old.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load one of our checkpoints after checking its integrity. Tensors and plain containers only
    (weights_only): no code runs. Any damage, any foreign file, any missing key is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist", "pass a .pt checkpoint or a run directory")
    try:
        # one open file for the check and the load: a file renamed over it meanwhile is not read unchecked
        with open(path, "rb") as f:
            check_integrity(f, path)
            f.seek(0)
            state = _torch_load(f, path, map_location)
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    missing = [k for k in (*MODEL_KEYS, *needs) if k not in state]
    if missing or not isinstance(state.get("model_state"), dict) or not isinstance(state.get("model_name"), str):
        what = f"lacks {', '.join(missing)}" if missing else "has a malformed model_name or model_state"
        raise CheckpointError(path, f"is not a complete mnist-cloud checkpoint ({what})", DAMAGED_ADVICE)
    return state


def check_integrity(f: IO[bytes], path: Path) -> None:
    """The file's sha256 against its sidecar, or without one, every zip member against its CRC."""
    sidecar = checksum_path(path)
    if sidecar.is_file():
        with open(sidecar, "rb") as s:
            expected = s.read(200).decode("ascii", errors="replace").split(maxsplit=1)
        if not expected or not _HEX64.fullmatch(expected[0]):
            _damaged(path, f"{sidecar.name} holds no sha256; delete it to check the zip CRCs instead")
        if sha256_of(f) != expected[0]:
            _damaged(path, f"its sha256 does not match {sidecar.name}")
        return
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    # zipfile parses whatever bytes it is given: on a damaged header it can raise more than BadZipFile
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError, IndexError,
            NotImplementedError, RuntimeError, UnicodeDecodeError) as e:
        _damaged(path, f"not a readable zip archive: {_first_line(e)}")
    if bad is not None:
        _damaged(path, f"bad CRC in {bad}")


def sha256_of(f: IO[bytes]) -> str:
    """Hex sha256 of an open file from its current position, read in chunks (a checkpoint can be GBs)."""
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _torch_load(f: IO[bytes], path: Path, map_location) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            # on a foreign pickle the unpickler warns (odd protocol) before it fails: one line, not three
            warnings.simplefilter("ignore")
            state = torch.load(f, map_location=map_location, weights_only=True)
    # The bytes passed the integrity check, so this is a file torch cannot read as ours (a foreign zip,
    # a pickled class, a newer format): the weights-only unpickler then raises almost anything
    # (UnpicklingError, RuntimeError, IndexError, KeyError, EOFError...). All of them mean the same.
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, f"is not an mnist-cloud checkpoint torch can load ({_torch_reason(e)})",
                              FOREIGN_ADVICE) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"is not an mnist-cloud checkpoint (no '{FORMAT}' marker)", FOREIGN_ADVICE)
    return state


def _damaged(path: Path, why: str) -> None:
    raise CheckpointError(path, f"is corrupt or truncated ({why})", DAMAGED_ADVICE)


def _torch_reason(e: Exception) -> str:
    """The useful part of torch's message, without its advice to load with weights_only=False."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\.\s|$)", text, re.MULTILINE)
    if found:
        return found.group(1).strip()
    line = _first_line(e, text)
    return type(e).__name__ if "weights_only" in line else line


def _first_line(e: Exception, text: str | None = None) -> str:
    lines = [line.strip() for line in (str(e) if text is None else text).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _write_checksum(path: Path, digest: str) -> None:
    atomic_write(checksum_path(path), f"{digest}  {path.name}\n".encode())


def _fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable in order. Not possible on every OS (Windows): skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
