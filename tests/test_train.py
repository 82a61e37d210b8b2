"""Real (short) training runs in-process: it learns, the run directory is complete, resume is exact."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from fixtures.cli import wait_for
from fixtures.runs import epochs_without_timing
from trainer import rundir as rd
from trainer.checkpoint import load_checkpoint
from runspec.config import TrainConfig
from trainer.errors import UserError
from trainer.train import fit

def small(tmp_path, mnist_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"), train_limit=4096, eval_limit=2000,
                epochs=2, batch_size=128, progress=False, threads=2, report=False, device="cpu")  # CPU-exact
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, mnist_dir):
    """2 epochs on 8,192 training images; evaluated on 2,000 validation and 2,000 test images."""
    tmp = tmp_path_factory.mktemp("learn")
    result = fit(small(tmp, mnist_dir, train_limit=8192, run_id="learn"))
    return tmp / "runs" / "learn", result


@pytest.mark.slow
def test_a_short_run_learns(learned_run):
    _, result = learned_run
    # 2 epochs on 8k images: a net that learns is far above chance on held-out test images
    assert result["test_acc"] > 95.0, result
    assert result["status"] == "completed" and result["epochs"] == 2


def test_run_directory_is_complete(learned_run):
    run_dir, result = learned_run
    for name in ("config.json", "metrics.jsonl", "train.log", "summary.txt", "best.pt", "last.pt", "model.pt",
                 "model.pt.sha256", "result.json"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["status"] == "completed"
    assert config["config"]["model"] == "net8k" and config["config"]["epochs"] == 2
    assert config["torch"] == torch.__version__ and config["device"]["type"] == "cpu"
    assert "sha" in config["git"] and "dirty" in config["git"]
    assert config["data"] == {"dir": config["data"]["dir"], "train": 8192, "val": 2000, "test": 2000}

    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"):
        assert isinstance(rows[-1][key], float), key
    # the test set is evaluated once, at the end, on the delivered weights (not per epoch by default)
    assert all(r["test_acc"] is None and r["test_loss"] is None for r in rows)
    assert result["weights"] == "final" and result["delivered"] == "model.pt" and isinstance(result["test_acc"], float)
    assert result["val_acc"] == rows[-1]["val_acc"]  # the final weights are the last epoch's

    log = (run_dir / "train.log").read_text().splitlines()
    pattern = re.compile(r"^Epoch: \d+ \| Train Loss: [\d.]+ \| Train Acc: [\d.]+% \| Val Loss: [\d.]+ \| "
                         r"Val Acc: [\d.]+% \| Best Val Acc: [\d.]+%")
    assert sum(bool(pattern.match(l)) for l in log) == 2

    summary = (run_dir / "summary.txt").read_text()
    assert "Total params:" in summary and "Conv2d-1" in summary

    last = load_checkpoint(run_dir / "last.pt")
    for key in ("model_state", "optimizer_state", "scheduler_state", "epoch", "rng"):
        assert key in last, key
    assert last["epoch"] == 2
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == result["best_epoch"]
    delivered = load_checkpoint(run_dir / "model.pt")
    assert delivered["weights"] == "final" and delivered["epoch"] == 2 and delivered["model_name"] == "net8k"
    assert delivered["config"]["input_size"] == 28
    assert delivered["model_state"].keys() == last["model_state"].keys()
    assert all(torch.equal(delivered["model_state"][k], last["model_state"][k]) for k in last["model_state"])


def test_best_checkpoint_follows_validation_not_test(learned_run):
    run_dir, result = learned_run
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_acc"])
    assert result["best_epoch"] == best["epoch"] and result["best_val_acc"] == best["val_acc"]


def _epochs(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, mnist_dir):
    cfg = dict(epochs=3, train_limit=2048, eval_limit=1000, rotate=10, translate=0.05)
    fit(small(tmp_path, mnist_dir, run_id="straight", **cfg))
    stopped = fit(small(tmp_path, mnist_dir, run_id="split", stop_after=1, **cfg))
    assert stopped["status"] == "stopped" and stopped["epoch"] == 1
    split_dir = tmp_path / "runs" / "split"
    assert json.loads((split_dir / "config.json").read_text())["status"] == "stopped"
    resumed = fit(TrainConfig(resume=str(split_dir), progress=False), explicit={"resume", "progress"})
    assert resumed["epochs"] == 3
    straight, split = epochs_without_timing(tmp_path / "runs" / "straight"), epochs_without_timing(split_dir)
    assert [r["epoch"] for r in split] == [1, 2, 3]
    assert split == straight  # bit-for-bit the same losses, accuracies and LRs on CPU


@pytest.mark.slow
def test_resume_redoes_a_half_recorded_epoch_exactly_once(tmp_path, mnist_dir):
    cfg = small(tmp_path, mnist_dir, run_id="r", epochs=2, train_limit=1024, eval_limit=500, stop_after=1)
    fit(cfg)
    run_dir = tmp_path / "runs" / "r"
    # a crash after metrics were written for an epoch whose checkpoint never landed
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 9.9}) + "\n")
    fit(TrainConfig(resume=str(run_dir), progress=False, report=False), explicit={"resume", "report"})
    assert [r["epoch"] for r in _epochs(run_dir)] == [1, 2]


@pytest.mark.slow
def test_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, mnist_dir, capfd):
    cfg = dict(epochs=3, train_limit=1024, eval_limit=300)
    fit(small(tmp_path, mnist_dir, run_id="c", stop_after=2, **cfg))
    run_dir = tmp_path / "runs" / "c"
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[:300])  # truncated, as a bad copy would leave it
    # best.pt may hold epoch 2 too (when validation improved), and would then rightly be preferred:
    # damage it as well, so that only prev.pt (epoch 1) is left to resume from
    (run_dir / "best.pt").write_bytes(b"garbage")
    result = fit(TrainConfig(resume=str(run_dir), progress=False, report=False), explicit={"resume", "report"})
    assert result["status"] == "completed" and result["epochs"] == 3
    err = capfd.readouterr().err
    assert "last.pt is corrupt or truncated" in err and "resuming from prev.pt (epoch 1)" in err
    assert [r["epoch"] for r in _epochs(run_dir)] == [1, 2, 3]  # epoch 2 redone once, not twice


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, mnist_dir):
    fit(small(tmp_path, mnist_dir, run_id="c", epochs=2, train_limit=512, eval_limit=200, stop_after=1))
    run_dir = tmp_path / "runs" / "c"
    for name in ("last.pt", "best.pt"):
        (run_dir / name).write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable checkpoint"):
        fit(TrainConfig(resume=str(run_dir), progress=False), explicit={"resume"})


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_fast_and_resume_is_exact(tmp_path, mnist_dir):
    """A spot notice: SIGTERM mid-epoch. The step finishes, last.pt lands, the run is
    marked interrupted, and --resume continues at the next step with the same numbers."""
    import signal
    import subprocess
    import sys

    args = ["--device", "cpu", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path / "runs"), "--train-limit", "6144",
            "--eval-limit", "500", "--epochs", "2", "--no-progress", "--no-report", "--threads", "2",
            "--input-size", "28", "--lr", "0.1", "--val-size", "10000", "--early-epochs", "0",
            "--tta", "1"]  # TrainConfig's values, not net8k's recipe
    fit(small(tmp_path, mnist_dir, run_id="straight", train_limit=6144, eval_limit=500, epochs=2))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--run-id", "spot"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "spot"

    def cpu_seconds() -> float:  # the trainer's CPU time: work done, whatever this machine's speed
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    wait_for(lambda: (run_dir / "last.pt").exists() or proc.poll() is not None, timeout=300, step=0.01)
    assert proc.poll() is None, proc.communicate()  # epoch 1 saved, epoch 2 starting
    begun = cpu_seconds()
    wait_for(lambda: cpu_seconds() - begun > 0.3, timeout=60, step=0.01)  # a few steps into epoch 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # stops at the next step: a hang fails here
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    metrics = run_dir / "metrics.jsonl"
    assert json.loads((run_dir / "config.json").read_text())["status"] == "interrupted"
    events = [r for r in map(json.loads, metrics.read_text().splitlines()) if "event" in r]
    assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == "SIGTERM"
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["partial"]["epoch"] == 2 and 0 < ckpt["partial"]["step"] < 48
    fit(TrainConfig(resume=str(run_dir), progress=False, report=False), explicit={"resume"})
    straight, resumed = epochs_without_timing(tmp_path / "runs" / "straight"), epochs_without_timing(run_dir)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:  # the running loss sum is split in two parts on resume: equal to rounding
            expected = None if a[k] is None else pytest.approx(a[k], rel=1e-9, abs=1e-12)  # null: no per-epoch test
            assert b[k] == expected, (k, a[k], b[k])
    # and the weights it delivers test the same
    results = [json.loads((d / "result.json").read_text()) for d in (tmp_path / "runs" / "straight", run_dir)]
    assert results[1]["test_acc"] == pytest.approx(results[0]["test_acc"], abs=1e-9)


def test_target_stops_on_validation(tmp_path, mnist_dir):
    result = fit(small(tmp_path, mnist_dir, epochs=6, train_limit=2048, eval_limit=500, target=60.0, run_id="t"))
    rows = [json.loads(l) for l in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    # it stopped at the first epoch whose *validation* accuracy reached the target, before the last epoch
    assert len(rows) == result["epochs"] < 6
    assert rows[-1]["val_acc"] >= 60.0 and all(r["val_acc"] < 60.0 for r in rows[:-1])
    assert "validation accuracy" in result["stop_reason"]


def test_target_needs_a_validation_split(tmp_path, mnist_dir):
    with pytest.raises(UserError, match="read the validation split"):
        fit(small(tmp_path, mnist_dir, val_size=0, target=99.0))


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs must be at least 1"),
    ("epochs", -3, "--epochs must be at least 1"),
    ("target", 100.5, "--target is a validation accuracy in percent"),
    ("batch_size", 1, "--batch-size"),
    ("lr", 0.0, "--lr must be positive"),
    ("perspective", 1.5, "--perspective is a probability"),
    ("model", "resnet50", "unknown model 'resnet50'"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, mnist_dir, field, value, message):
    with pytest.raises(UserError, match=message):
        fit(small(tmp_path, mnist_dir, **{field: value}))
    assert not (tmp_path / "runs").exists()  # nothing was created


# What each (optimizer, schedule) must leave behind, worked out by hand rather than by replaying the
# trainer's own make_scheduler (a replay would agree with a trainer that ignored --schedule). 2 epochs of
# 8 steps (1,024 images / 128); a row's "lr" is the optimizer's at the end of its epoch: after the
# epoch's steps of a per-step schedule, before a per-epoch schedule steps. "next" is what last.pt holds:
# the learning rate of the next step.
#   step (step_size 1, gamma 0.1): lr, then lr/10; the next epoch would get lr/100
#   cyclic (base lr/10, up over 2 epochs = 16 steps): half-way up after epoch 1, the peak after epoch 2
#   none: lr throughout; plateau (patience 2): no drop within 2 epochs, but its state is the plateau's
SCHEDULE_CASES = {
    ("adam", "step"): {"lr": 0.003, "rows": [1.0, 0.1], "next": 0.01},
    ("adamw", "cyclic"): {"lr": 0.003, "rows": [0.1 + 0.9 * 0.5, 1.0], "next": 1.0},
    ("sgd", "none"): {"lr": 0.05, "rows": [1.0, 1.0], "next": 1.0},
    ("sgd", "plateau"): {"lr": 0.05, "rows": [1.0, 1.0], "next": 1.0},
}


@pytest.mark.parametrize("optimizer,schedule", list(SCHEDULE_CASES))
def test_optimizers_and_schedules_run(tmp_path, mnist_dir, optimizer, schedule):
    case = SCHEDULE_CASES[optimizer, schedule]
    lr = case["lr"]
    result = fit(small(tmp_path, mnist_dir, optimizer=optimizer, schedule=schedule, lr=lr, epochs=2, step_size=1,
                       gamma=0.1, train_limit=1024, eval_limit=500, label_smoothing=0.1, run_id="o"))
    assert result["status"] == "completed" and 0 <= result["test_acc"] <= 100
    run_dir = tmp_path / "runs" / "o"
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert (config["optimizer"], config["schedule"]) == (optimizer, schedule)

    # the schedule: the learning rate each epoch trained at, and the one the next epoch would start at
    rows = _epochs(run_dir)
    assert [r["lr"] for r in rows] == pytest.approx([lr * f for f in case["rows"]], rel=1e-9)
    last = load_checkpoint(run_dir / "last.pt")
    group = last["optimizer_state"]["param_groups"][0]
    assert group["lr"] == pytest.approx(lr * case["next"], rel=1e-9)
    sched = last["scheduler_state"]
    if schedule == "none":
        assert sched is None
    elif schedule == "step":
        assert (sched["step_size"], sched["gamma"], sched["last_epoch"]) == (1, 0.1, 2)
    elif schedule == "cyclic":
        assert sched["total_size"] == 32 and sched["mode"] == "triangular2" and sched["last_epoch"] == 16
    else:  # plateau: fed the validation accuracy, maximized
        assert (sched["mode"], sched["patience"], sched["factor"]) == ("max", 2, 0.1)
        assert sched["best"] == max(r["val_acc"] for r in rows)

    # the optimizer: Adam's two moments, or SGD's momentum buffer; AdamW's weight decay decoupled
    states = last["optimizer_state"]["state"].values()
    if optimizer == "sgd":
        assert all(s.keys() == {"momentum_buffer"} for s in states)
        assert group["momentum"] == 0.9 and group["nesterov"] is True
    else:
        assert all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in states)
        assert "momentum" not in group and group["decoupled_weight_decay"] is (optimizer == "adamw")
    assert group["weight_decay"] == 5e-4


def test_val_size_zero_trains_on_60k_and_logs_na(tmp_path, mnist_dir):
    result = fit(small(tmp_path, mnist_dir, val_size=0, epochs=1, max_steps=3, eval_limit=200, run_id="noval"))
    run_dir = tmp_path / "runs" / "noval"
    assert json.loads((run_dir / "config.json").read_text())["data"]["train"] == 4096  # train_limit applies
    assert "Val Acc: n/a" in (run_dir / "train.log").read_text()
    assert result["best_val_acc"] is None and result["val_acc"] is None
    assert not (run_dir / "best.pt").exists() and (run_dir / "model.pt").is_file()  # best.pt needs validation


@pytest.mark.parametrize("epochs,steps", [(1, 1), (1, 3), (2, 2), (1, 5)])
def test_onecycle_on_a_run_of_a_few_steps(epochs, steps):
    """OneCycleLR divides by (warm-up steps - 1): a smoke run of 2 epochs x 2 steps used to raise
    ZeroDivisionError. Every step still gets a finite learning rate."""
    from runspec.config import TrainConfig
    from trainer.optim import schedule_table

    lrs, _ = schedule_table(TrainConfig(epochs=epochs), steps)
    assert len(lrs) == epochs * steps and all(0 < lr <= 0.1 + 1e-9 for lr in lrs)
