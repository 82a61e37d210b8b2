"""runspec: the one reader of a run directory. Lenient for the trainer resuming its own run, strict for
every report; and list_runs as the instance runs it, with `python3 -I -c` and nothing installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runspec
from runspec import UserError

EPOCH = {"epoch": 1, "test_acc": None, "train_loss": 0.5, "elapsed": 3.0}


def forge(root: Path, rid: str, config=None, metrics: str | None = None, result=None) -> Path:
    d = root / "runs" / rid
    d.mkdir(parents=True)
    if config is not None:
        (d / runspec.CONFIG).write_text(config if isinstance(config, str) else json.dumps(config))
    if metrics is not None:
        (d / runspec.METRICS).write_text(metrics)
    if result is not None:
        (d / runspec.RESULT).write_text(json.dumps(result))
    return d


def lines(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_lenient_stops_at_a_line_cut_short_strict_names_it(tmp_path):
    cut = lines(EPOCH, {"event": "interrupted"}, {**EPOCH, "epoch": 2}) + '{"epoch": 3, "te'
    d = forge(tmp_path, "cut", {"status": "interrupted"}, cut)
    rows = runspec.read_metrics(d / runspec.METRICS)
    assert [r.get("epoch", r.get("event")) for r in rows] == [1, "interrupted", 2]
    with pytest.raises(UserError, match=r"metrics.jsonl is truncated or damaged at line 4; .*train --resume"):
        runspec.read_metrics(d / runspec.METRICS, strict=True)
    with pytest.raises(UserError, match="line 1 is not an epoch record"):
        runspec.read_metrics(forge(tmp_path, "odd", {}, lines({"epoch": 1})) / runspec.METRICS, strict=True)


def test_read_run_says_what_is_missing_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        runspec.read_run(tmp_path / "nope")
    with pytest.raises(UserError, match=r"not a run directory \(no config.json\)"):
        runspec.read_run(forge(tmp_path, "empty"))
    with pytest.raises(UserError, match="is not valid JSON"):
        runspec.read_run(forge(tmp_path, "badcfg", "{", lines(EPOCH)))
    run = runspec.read_run(forge(tmp_path, "live", {"status": "running"}, lines(EPOCH)))
    assert run.result is None and len(run.rows) == 1
    with pytest.raises(UserError, match="has no result.json: the run did not complete"):
        run.completed()
    stopped = runspec.read_run(forge(tmp_path, "stopped", {}, lines(EPOCH), {"status": "interrupted"}))
    with pytest.raises(UserError, match="is not a completed run's result"):
        stopped.completed()
    done = runspec.read_run(forge(tmp_path, "done", {}, lines(EPOCH), {"status": "completed", "test_acc": 99.5}))
    assert done.completed()["test_acc"] == 99.5


def test_list_runs_runs_alone_on_a_bare_python_and_survives_damage(tmp_path):
    forge(tmp_path, "a-done", {"status": "completed"}, lines(EPOCH, {**EPOCH, "epoch": 2}),
          {"test_acc": 99.1, "weights": "ema"})
    forge(tmp_path, "b-cut", {"status": "interrupted"}, lines(EPOCH) + '{"epo')
    forge(tmp_path, "c-garbled", "\x00\x01not json", "\xff")
    forge(tmp_path, "d-live", {"status": "running"}, "")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "d-live.pid").write_text(str(os.getpid()))  # a process that is alive
    (tmp_path / "jobs" / "b-cut.pid").write_text("not a pid")
    source = Path(runspec.__file__).read_text()
    # -I: no site-packages, no PYTHONPATH, no current directory: the standard library only, as on the instance
    proc = subprocess.run([sys.executable, "-I", "-c", source, str(tmp_path)], capture_output=True, text=True,
                          cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run_id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert list(rows) == ["a-done", "b-cut", "c-garbled", "d-live"]
    assert {k: rows["a-done"][k] for k in ("status", "epochs", "test_acc", "weights", "alive")} == \
        {"status": "completed", "epochs": 2, "test_acc": 99.1, "weights": "ema", "alive": False}
    assert (rows["b-cut"]["status"], rows["b-cut"]["epochs"], rows["b-cut"]["test_acc"]) == ("interrupted", 1, None)
    assert (rows["c-garbled"]["status"], rows["c-garbled"]["epochs"]) == ("?", 0)
    assert rows["d-live"]["alive"] is True


def test_atomic_write_leaves_a_temp_name_the_pull_record_skips_and_keeps_the_umask(tmp_path, monkeypatch):
    """A write cut off before its rename leaves `.NAME.tmp*`, which the on-instance pull record treats as
    a write in progress, not a run file; a finished write has open()'s mode under the caller's umask."""
    import importlib.util

    from fixtures import REPO

    spec = importlib.util.spec_from_file_location("autostop", REPO / "infra" / "agent" / "autostop.py")
    autostop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(autostop)
    target = tmp_path / "config.json"

    def crash(*args):
        raise KeyboardInterrupt  # killed between the write and the rename

    with monkeypatch.context() as m:
        m.setattr(runspec.os, "fsync", crash)
        m.setattr(runspec.Path, "unlink", lambda *a, **k: None)  # a SIGKILL runs no cleanup
        with pytest.raises(KeyboardInterrupt):
            runspec.atomic_write(target, b"{}")
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".config.json.tmp") and not target.exists(), left
    assert autostop.is_temp(left[0])
    old = os.umask(0o077)
    try:
        runspec.atomic_write(target, b"{}")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o600
    runspec.atomic_write(tmp_path / "key", b"k", mode=0o640)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o640


def test_git_provenance_crosses_to_a_machine_without_git(tmp_path, monkeypatch):
    """The laptop's commit (dirty or not) reaches config.json of a run on a machine whose synced code
    has no .git; a directory that is not a checkout passes nothing along."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "train.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "untracked.txt").write_text("not code\n")
    assert runspec.git_env(repo) == {runspec.ENV_GIT_SHA: sha, runspec.ENV_GIT_DIRTY: "0"}
    (repo / "train.py").write_text("x = 2\n")
    env = runspec.git_env(repo)
    assert env == {runspec.ENV_GIT_SHA: sha, runspec.ENV_GIT_DIRTY: "1"}

    synced = tmp_path / "synced"  # what the machine has: the files, no .git
    synced.mkdir()
    assert runspec.git_env(synced) == {}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runspec.git_state(synced) == {"sha": sha, "dirty": True}
    monkeypatch.setenv(runspec.ENV_GIT_SHA, "0" * 40)
    assert runspec.git_state(repo) == {"sha": sha, "dirty": True}  # a checkout speaks for itself


def test_trainer_flags_cross_to_the_machine_as_parsed_and_only_those_typed():
    """`train --on` parses the trainer's flags on the laptop and hands the machine exactly those typed
    (a flag left out must stay out: the model's recipe fills it in there), in any spelling the
    trainer accepts."""
    from runspec.config import parse_train_args, to_argv

    config, typed = parse_train_args(["--model=net20k", "--epoch", "3", "--no-nesterov", "--lr", "0.05",
                                      "--ema", "0.999", "--report", "--dry-run"])
    assert typed == {"model": "net20k", "epochs": 3, "nesterov": False, "lr": 0.05, "ema": 0.999, "report": True,
                     "dry_run": True}
    assert (config.model, config.epochs, config.nesterov, config.batch_size) == ("net20k", 3, False, 128)
    argv = to_argv(typed)
    assert argv == ["--model=net20k", "--epochs=3", "--no-nesterov", "--lr=0.05", "--ema=0.999", "--report",
                    "--dry-run"]
    assert parse_train_args(argv) == (config, typed)
    assert parse_train_args([]) == (parse_train_args([])[0], {})
    odd = parse_train_args(["--data-dir=-mnist", "--seed", "-1"])[1]  # values that look like flags
    assert parse_train_args(to_argv(odd))[1] == odd == {"data_dir": "-mnist", "seed": -1}
    with pytest.raises(UserError, match="--epochs"):
        parse_train_args(["--epochs", "-3"])


def test_one_table_printer_sizes_columns_to_their_widest_cell():
    lines = runspec.table(["RUN", "EPOCHS", "WEIGHTS"], [["a-long-run-id", 2, "ema"], ["b", 15, "-"]], right=(1,))
    assert lines == ["RUN            EPOCHS  WEIGHTS",
                     "a-long-run-id       2  ema",
                     "b                  15  -"]
