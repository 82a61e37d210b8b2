"""What a run is on disk, in one place for the trainer, the laptop side, the scripts and the agents.

A run directory, `runs/<run-id>/`, is the same on a laptop and on an instance:

    config.json    the resolved config, git SHA, torch version, device, status
    metrics.jsonl  one JSON line per epoch, each epoch exactly once, plus event lines (interrupted, resumed)
    train.log      one human-readable line per epoch
    summary.txt    the layer table
    model.pt       the weights the run delivers: what result.json, evaluate, predict and the report read
    best.pt        best validation accuracy so far (a resume fallback, never delivered)
    last.pt        the newest state; prev.pt the one before it, in case last.pt is damaged
    result.json    the delivered weights' test (and validation) accuracy, written when the run ends
    tb/            TensorBoard event files, with --tensorboard (or `mnist-cloud export-tb` afterwards)

Standard library only, and one file: `python3 -c` runs it on a machine where nothing is installed
(`mnist-cloud runs NAME` lists the machine's runs with list_runs()).
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG, METRICS, LOG, SUMMARY, RESULT = "config.json", "metrics.jsonl", "train.log", "summary.txt", "result.json"
BEST, LAST, PREV, MODEL = "best.pt", "last.pt", "prev.pt", "model.pt"
REPORT, PLOTS = "report.html", "plots"  # the run's HTML report and its figures (trainer/report.py)
TENSORBOARD = "tb"  # the run's TensorBoard event files (trainer/board.py): `tensorboard --logdir runs`
# config.json's "status", from start to end: running, then completed, stopped (--stop-after / a plateau
# stop) or interrupted (a signal; resumable)
STATUSES = ("running", "completed", "stopped", "interrupted")
TARGET = 99.4  # the seed projects' test accuracy goal (%): reported against, never used to decide anything


# What `mnist-cloud train --on` tells the trainer on the machine, through its environment (set by
# infra/targets.py and infra/runner.py, read by trainer/env.py and trainer/recorder.py into config.json):
ENV_GIT_SHA = "MNIST_CLOUD_GIT_SHA"  # the laptop checkout's commit: the synced code has no .git
ENV_GIT_DIRTY = "MNIST_CLOUD_GIT_DIRTY"  # "1" when that checkout had uncommitted changes
ENV_NAME = "MNIST_CLOUD_NAME"  # the machine's name in `mnist-cloud ls`, for the report
ENV_INSTANCE_TYPE = "MNIST_CLOUD_INSTANCE_TYPE"
ENV_PRICE = "MNIST_CLOUD_PRICE"  # $/hour of the machine, for the report's cost line
ENV_PRICE_SOURCE = "MNIST_CLOUD_PRICE_SOURCE"  # where that price came from (live spot, the Price List, a fallback)
ENV_RANK0_FILE = "MNIST_CLOUD_RANK0_FILE"  # `train --on --nodes`: rank 0 writes "HOST PID" here


class UserError(Exception):
    """Bad input from the user: a flag, a name, a file, credentials. The message says what to do next.

    The one such type on both sides: `python -m trainer` and `mnist-cloud` print it as one line on
    stderr and exit with code 2. Anything else is a bug and keeps its traceback."""


class ExitCode(enum.IntEnum):
    """The exit statuses of `mnist-cloud`, `python -m trainer` and scripts/, named in one place. A remote
    run's own status passes through `train --on` as the trainer's process gave it. (The agents under
    infra/agent/ run alone on the instance, without runspec, and spell theirs as numbers.)"""

    OK = 0
    FAILED = 1  # a run, a sweep's run, a model's claims, a benchmark or `pull --every-machine` (a machine) failed
    BAD_INPUT = 2  # a UserError: one line on stderr
    KILLED_BY_SIGNAL = 128  # plus N: killed by signal N (the shell's convention); a run stopped this way resumes
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, the user's stop, not a failure
    CONNECTION_LOST = 255  # as ssh says when the connection fails: the run goes on on the machine


# ---------------------------------------------------------------------------------- files
def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same directory, fsync, chmod, rename: a reader sees the old file or the new one.
    `mode` None: what open() would give (0o666 less the umask). The temp file is `.NAME.tmpXXXXXXXX`, a
    name the pull record leaves out (infra/agent/autostop.py is_temp)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        umask = os.umask(0o022)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """One line, on disk before this returns: a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------- names
def model_slug(model: str) -> str:
    """A model as it appears in a run id: a zoo name as is, your own `dir/mynet.py:Net` as `mynet-Net`
    (a run id is a directory name: no slashes, no colons)."""
    target, _, attr = model.rpartition(":")
    if target:
        stem = target.rsplit("/", 1)[-1].removesuffix(".py").rsplit(".", 1)[-1]
        model = f"{stem}-{attr}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in model)


# ---------------------------------------------------------------------------------- tables
def table(header: list[str], rows: list[list[Any]], right: tuple[int, ...] = ()) -> list[str]:
    """The lines of a plain-text table, columns two spaces apart, as wide as their widest cell; the
    columns numbered in `right` are right-aligned (numbers), the rest left-aligned. Every table the
    tools print (status, runs, sweep summaries, compare, the model zoo) is made here."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


# ---------------------------------------------------------------------------------- provenance
def git_commit(directory: str | Path) -> dict[str, Any] | None:
    """{"sha", "dirty"} of the git checkout at DIRECTORY, or None when it is not one (or git is missing).
    Dirty counts tracked files only: an untracked runs/ or data/ does not make a run's code differ."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None
    return {"sha": sha, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def git_env(directory: str | Path) -> dict[str, str]:
    """The laptop side: DIRECTORY's commit as environment variables, for a machine that gets the code
    without .git ({} when DIRECTORY is not a checkout)."""
    commit = git_commit(directory)
    if commit is None:
        return {}
    return {ENV_GIT_SHA: commit["sha"], ENV_GIT_DIRTY: "1" if commit["dirty"] else "0"}


def git_state(directory: str | Path) -> dict[str, Any]:
    """The trainer's side, for config.json: the checkout's commit, else what git_env() passed along."""
    return git_commit(directory) or {"sha": os.environ.get(ENV_GIT_SHA),
                                     "dirty": os.environ.get(ENV_GIT_DIRTY) == "1"}


def cloud_info() -> dict[str, Any] | None:
    """Which machine a `train --on` run ran on, and what it costs per hour; None for a local run."""
    if not os.environ.get(ENV_NAME):
        return None
    price = os.environ.get(ENV_PRICE)
    return {"name": os.environ[ENV_NAME], "instance_type": os.environ.get(ENV_INSTANCE_TYPE),
            "price_per_hour": float(price) if price else None,
            "price_source": os.environ.get(ENV_PRICE_SOURCE) if price else None}


# ---------------------------------------------------------------------------------- reading a run
def read_metrics(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """metrics.jsonl's records, event lines included; [] when there is none yet.

    Lenient (the trainer resuming its own run): a line cut short by a crash ends the file, and what
    came before it is good. Strict (reports, benchmarks, sweeps): a damaged line is one clear error."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if strict and not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if not strict:
                break
            raise UserError(f"{path} is truncated or damaged at line {n}; the run's checkpoints are intact: "
                            f"`mnist-cloud train --resume {path.parent}` rewrites it") from None
        if strict and not isinstance(row, dict):
            raise UserError(f"{path} line {n} is not a record")
        if strict and "event" not in row and ("epoch" not in row or "test_acc" not in row):
            raise UserError(f"{path} line {n} is not an epoch record")
        rows.append(row)
    return rows


def epochs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch records only (not the interrupted / resumed events)."""
    return [r for r in rows if "event" not in r]


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # epoch records, in order
    result: dict[str, Any] | None  # result.json: None until the run ends

    def completed(self) -> dict[str, Any]:
        """result.json of a run that completed, or one line saying why this one does not count."""
        if self.result is None:
            raise UserError(f"{self.path} has no {RESULT}: the run did not complete (see its {LOG})")
        if self.result.get("status", "completed") != "completed" or self.result.get("test_acc") is None:
            raise UserError(f"{self.path}/{RESULT} is not a completed run's result "
                            f"(status {self.result.get('status')!r})")
        if not self.rows:
            raise UserError(f"{self.path}/{METRICS} has no epoch rows")
        return self.result

    @property
    def tested_each_epoch(self) -> bool:
        """Whether the epochs carry a test accuracy (--test-every-epoch): a peek, see first_epoch_at_target."""
        return any(r.get("test_acc") is not None for r in self.rows)


def read_run(path: str | Path, strict: bool = True) -> Run:
    """A run directory's config, epochs and result, with one clear line for whatever is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass runs/<run-id>")
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a run directory (no {CONFIG}); pass runs/<run-id>")
    result = read_json(path / RESULT) if (path / RESULT).is_file() else None
    return Run(path, read_json(path / CONFIG), epochs(read_metrics(path / METRICS, strict)), result)


def first_epoch_at_target(rows: list[dict[str, Any]], target: float = TARGET) -> int | None:
    """The first epoch whose per-epoch test accuracy reached `target`; None when none did, or when no
    epoch was tested (per-epoch test needs --test-every-epoch). For reports only: it peeks at the test
    set, and nothing is ever decided on it."""
    return next((r["epoch"] for r in rows if r.get("test_acc") is not None and r["test_acc"] >= target), None)


def list_runs(root: str) -> list[dict[str, Any]]:
    """A summary of every run under ROOT/runs, as `mnist-cloud runs` shows them. Never raises on a
    damaged run: its fields are "?", 0 or None. test_acc and weights are the delivered weights'
    (result.json), never a per-epoch row's."""
    root = os.path.expanduser(root)
    runs = os.path.join(root, "runs")
    out = []
    for rid in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        d = os.path.join(runs, rid)
        row: dict[str, Any] = {"run_id": rid}
        damaged = (OSError, ValueError, AttributeError, TypeError, UserError)  # a half-written or foreign run
        try:
            row["status"] = read_json(Path(d, CONFIG)).get("status")
        except damaged:
            row["status"] = "?"
        try:
            row["epochs"] = len(epochs(read_metrics(Path(d, METRICS))))
        except damaged:
            row["epochs"] = 0
        try:
            result = read_json(Path(d, RESULT))
            row["test_acc"], row["weights"] = result.get("test_acc"), result.get("weights", "final")
        except damaged:
            row["test_acc"] = row["weights"] = None
        try:
            with open(os.path.join(root, "jobs", rid + ".pid")) as f:
                os.kill(int(f.read()), 0)
            alive = True
        except (OSError, ValueError):  # no pid file, or the job is gone
            alive = False
        row["alive"] = alive
        row["mtime"] = os.path.getmtime(d)
        out.append(row)
    return out


if __name__ == "__main__":  # python3 -c "<this file>" ROOT: one JSON line per run (see list_runs)
    for summary in list_runs(sys.argv[1]):
        print(json.dumps(summary))
