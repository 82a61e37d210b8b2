"""On the real devices: CUDA (an EC2 GPU) and MPS (an Apple-silicon laptop). These run only where the
device exists and are reported as skipped elsewhere; CI has neither. tests/test_devices.py proves on the
CPU what can be proved without them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer import device as dev
from runspec.config import TrainConfig
from trainer.train import fit

ACCELERATORS = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("mps", marks=pytest.mark.mps)]
TIMING = {"seconds", "train_seconds", "img_per_s", "elapsed", "compile_seconds"}


def small(tmp_path, mnist_dir, device, **overrides) -> TrainConfig:
    base = dict(data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"), train_limit=8192, eval_limit=2000,
                epochs=2, batch_size=128, progress=False, report=False, device=device)
    return TrainConfig(**{**base, **overrides})


def epochs(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def config(run_dir):
    return json.loads((run_dir / "config.json").read_text())


@pytest.mark.parametrize("accel", ACCELERATORS)
def test_a_two_epoch_run_learns_on_the_device(tmp_path, mnist_dir, accel):
    result = fit(small(tmp_path, mnist_dir, accel, run_id="r"))
    assert result["status"] == "completed" and result["test_acc"] > 90, result
    saved = config(tmp_path / "runs" / "r")
    assert saved["device"]["type"] == accel and saved["device"]["amp"] is None  # fp32 unless asked


@pytest.mark.parametrize("accel", ACCELERATORS)
def test_amp_on_picks_the_dtype_the_hardware_has(tmp_path, mnist_dir, accel):
    device = torch.device(accel)
    if accel == "mps" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8):
        pytest.skip("GradScaler on MPS needs torch 2.8")
    expected = dev.amp_dtype(accel, "on", dev.capability(device))
    result = fit(small(tmp_path, mnist_dir, accel, run_id="amp", amp="on"))
    saved = config(tmp_path / "runs" / "amp")
    assert saved["device"]["amp"] == str(expected).replace("torch.", "")
    if accel == "cuda" and dev.capability(device)[0] < 8:
        assert expected == torch.float16  # a T4: never its emulated bf16
    assert all(math.isfinite(r["train_loss"]) for r in epochs(tmp_path / "runs" / "amp"))
    assert result["test_acc"] > 90, result


@pytest.mark.parametrize("accel", ACCELERATORS)
@pytest.mark.parametrize("direction", ["to-cpu", "from-cpu"])
def test_resume_moves_between_the_device_and_the_cpu(tmp_path, mnist_dir, capfd, accel, direction):
    first, then = (accel, "cpu") if direction == "to-cpu" else ("cpu", accel)
    fit(small(tmp_path, mnist_dir, first, run_id="moved", stop_after=1))
    capfd.readouterr()
    result = fit(TrainConfig(resume=str(tmp_path / "runs" / "moved"), device=then, progress=False),
                 explicit={"resume", "device", "progress"})
    assert result["status"] == "completed" and result["epochs"] == 2 and result["test_acc"] > 90
    notes = [l for l in capfd.readouterr().err.splitlines() if "random state" in l]
    assert len(notes) == 1 and f"continuing on {then}" in notes[0]


@pytest.mark.cuda
def test_compile_on_cuda_keeps_one_graph(tmp_path, mnist_dir):
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    result = fit(small(tmp_path, mnist_dir, "cuda", run_id="c", train_limit=8000, compile=True))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    rows = epochs(tmp_path / "runs" / "c")
    assert rows[0]["compile_seconds"] > 0 and rows[1]["seconds"] < rows[0]["compile_seconds"]
    assert result["test_acc"] > 90


@pytest.mark.cuda
def test_deterministic_repeats_on_cuda(tmp_path, mnist_dir):
    for run_id in ("a", "b"):
        fit(small(tmp_path, mnist_dir, "cuda", run_id=run_id, deterministic=True, rotate=10))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(epochs(tmp_path / "runs" / "a")) == strip(epochs(tmp_path / "runs" / "b"))
