"""--tensorboard: RUN/tb/ (runspec.TENSORBOARD) as TensorBoard's own EventAccumulator reads it (scalars, the HParams
plugin, the graph), a resume that continues the curves, export-tb for an old run, and a run without the
flag (or without the package) that never imports it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import runspec
from fixtures import REPO
from runspec.config import TrainConfig
from trainer.cli import main as trainer_main
from trainer.train import fit

pytest.importorskip("tensorboard")  # the test extra has it; CI installs it

STRAY = -1.0  # a value no real accuracy takes


def tiny(tmp_path, mnist_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"), train_limit=512, eval_limit=256,
                val_size=1000, epochs=2, batch_size=128, progress=False, threads=2, report=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


def events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return acc


def curve(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, mnist_dir):
    """Epoch 1, stopped (--stop-after 1); a stray epoch-2 event as a kill between the event and the
    checkpoint leaves it; then a resume that trains epoch 2 again and finishes."""
    tmp = tmp_path_factory.mktemp("tb")
    fit(tiny(tmp, mnist_dir, run_id="tb", tensorboard=True, stop_after=1))
    run = tmp / "runs" / "tb"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / runspec.TENSORBOARD)) as stray:
        stray.add_scalar("accuracy/val", STRAY, 2)
    # --tensorboard is not typed again: the run's saved config has it
    result = fit(TrainConfig(resume=str(run), progress=False, report=False), explicit={"resume", "report"})
    return run, result


def test_the_run_writes_scalars_hparams_and_graph_and_a_resume_continues_the_curves(resumed_run):
    run, result = resumed_run
    acc = events(run / runspec.TENSORBOARD)
    rows = [r for r in map(json.loads, (run / runspec.METRICS).read_text().splitlines()) if "event" not in r]
    # the stray epoch-2 value is purged: each curve is metrics.jsonl's, one point per epoch
    assert curve(acc, "accuracy/val") == [(r["epoch"], round(r["val_acc"], 4)) for r in rows]
    assert [s for s, _ in curve(acc, "accuracy/val")] == [1, 2]
    for tag in ("loss/train", "accuracy/train", "loss/val", "lr", "throughput/img_per_s"):
        assert [s for s, _ in curve(acc, tag)] == [1, 2], tag
    assert curve(acc, "result/test_acc") == [(2, round(result["test_acc"], 4))]
    hp = acc.PluginTagToContent("hparams")
    assert set(hp) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    assert b"batch_size" in hp["_hparams_/session_start_info"] and b"net8k" in hp["_hparams_/session_start_info"]
    assert acc.Tags()["graph"] is True
    # in the run's own directory, not add_hparams' timestamped subfolder: one run in TensorBoard per run
    assert [p for p in (run / runspec.TENSORBOARD).iterdir() if p.is_dir()] == []


def test_writing_the_graph_and_events_changes_no_number(resumed_run, tmp_path, mnist_dir):
    """The graph is traced in eval mode without gradients: BatchNorm's running statistics, the weights
    and the random streams are as a run without --tensorboard leaves them."""
    run, result = resumed_run
    plain = fit(tiny(tmp_path, mnist_dir, run_id="plain"))
    assert (plain["test_acc"], plain["val_acc"]) == (result["test_acc"], result["val_acc"])
    rows = [(r["train_loss"], r["val_loss"]) for r in map(json.loads, (run / runspec.METRICS).read_text().splitlines())
            if "event" not in r]
    assert rows == [(r["train_loss"], r["val_loss"]) for r in map(
        json.loads, (tmp_path / "runs" / "plain" / runspec.METRICS).read_text().splitlines())]
    # where the event files are, said once as the run starts; a run without the flag says nothing of them
    assert f"tensorboard: {run / runspec.TENSORBOARD} (`tensorboard --logdir" in (run / runspec.LOG).read_text()
    assert "tensorboard" not in (tmp_path / "runs" / "plain" / runspec.LOG).read_text()


def test_export_tb_writes_what_the_run_wrote(resumed_run, tmp_path, capsys):
    run, _ = resumed_run
    old = tmp_path / "old"
    old.mkdir()
    for name in (runspec.CONFIG, runspec.METRICS, runspec.RESULT):
        (old / name).write_bytes((run / name).read_bytes())
    assert trainer_main(["export-tb", str(old)]) == 0
    live, exported = events(run / runspec.TENSORBOARD), events(old / runspec.TENSORBOARD)
    for tag in ("accuracy/val", "loss/train", "lr", "result/test_acc"):
        assert curve(exported, tag) == curve(live, tag), tag
    assert exported.Tags()["graph"] is True and "_hparams_/experiment" in exported.PluginTagToContent("hparams")
    assert trainer_main(["export-tb", str(old)]) == 2  # never over event files unasked
    assert "--force replaces them" in capsys.readouterr().err
    assert trainer_main(["export-tb", str(old), "--force"]) == 0


def test_export_tb_without_the_package_names_itself_not_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec says None
    assert trainer_main(["export-tb", str(tmp_path)]) == runspec.ExitCode.BAD_INPUT
    assert capsys.readouterr().err.strip() == ("error: export-tb needs the tensorboard package: "
                                               "pip install 'mnist-cloud[tensorboard]'")


BLOCKED = """
import sys
sys.modules["tensorboard"] = None  # as if the package were not installed: an import of it fails
from trainer.cli import main
code = main(sys.argv[1:] + ["--no-tensorboard"])
loaded = sorted(m for m in sys.modules if "tensorboard" in m and sys.modules[m] is not None)
assert code == 0 and not loaded, (code, loaded)
sys.exit(main(sys.argv[1:] + ["--tensorboard"]))
"""


def test_a_run_without_the_flag_never_imports_tensorboard_and_needs_no_package(tmp_path, mnist_dir):
    out = subprocess.run([sys.executable, "-c", BLOCKED, "train", "--dry-run", "--no-report", "--threads", "2",
                          "--device", "cpu", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == runspec.ExitCode.BAD_INPUT, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: --tensorboard needs the tensorboard package: "
                                                   "pip install 'mnist-cloud[tensorboard]'")
    assert "test accuracy" in out.stdout  # the run without the flag trained to its end
