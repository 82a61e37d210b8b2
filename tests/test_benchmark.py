"""scripts/benchmark.py: its tables and summaries come from what the runs deliver (result.json) and the
wall time the script measured, on forged run directories; no training except one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import rundir as rd
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()

HOST = {"cpu": "Test CPU", "cores": 2, "torch": "9.9", "node": "box", "command": "python scripts/benchmark.py"}


def forge_run(path: Path, delivered: float, epoch_tests: list[float | None], weights: str | None = "ema",
              params: int = 7738, seconds: float = 10.0) -> Path:
    """A completed run directory as the trainer leaves it; the per-epoch test accuracies differ on purpose
    from the delivered one, so that reading the wrong file shows."""
    path.mkdir(parents=True)
    rd.write_json(path / rd.CONFIG, {"model": {"name": "net8k", "params": params, "macs": 1}, "status": "completed"})
    rows = [{"epoch": i + 1, "val_acc": 99.0, "test_acc": t, "seconds": seconds + i, "train_seconds": seconds - 1,
             "img_per_s": 1000.0 * (i + 1), "elapsed": (seconds + 1) * (i + 1)} for i, t in enumerate(epoch_tests)]
    (path / rd.METRICS).write_text("".join(json.dumps(r) + "\n" for r in
                                           [rows[0], {"event": "resumed", "epoch": 2}, *rows[1:]]))
    result = {"status": "completed", "test_acc": delivered, "epochs": len(rows)}
    if weights is not None:
        result["weights"] = weights
    rd.write_json(path / rd.RESULT, result)
    return path


def forged_report(tmp_path: Path) -> dict:
    """net8k: 3 seeds, test only at the end (per-epoch null); net20k: 2 seeds tested every epoch."""
    runs = []
    for seed, delivered, wall in [(1, 99.45, 100.0), (2, 99.38, 130.0), (3, 99.52, 110.0)]:
        run = forge_run(tmp_path / f"net8k-{seed}", delivered, [None, None, None])
        runs.append({"recipe": "net8k", "seed": seed, "flags": [], **bench.run_numbers(run), "wall_seconds": wall})
    for seed, delivered, wall in [(1, 99.61, 200.0), (2, 99.55, 240.0)]:
        run = forge_run(tmp_path / f"net20k-{seed}", delivered, [98.0, 99.41, 99.9], weights="final", params=18314)
        runs.append({"recipe": "net20k", "seed": seed, "flags": ["--model", "net20k"], **bench.run_numbers(run),
                     "wall_seconds": wall})
    seed_pipeline = {"recipe": bench.SEED_PIPELINE, "model": "seed001", "seed": 1, "workers": 2, "params": 23760,
                     "epochs": 11, "epoch_to_target": 11, "seconds_to_target": 990.0, "final_test": 99.41,
                     "best_test": 99.41, "seconds_per_epoch": 90.0, "img_per_s": 640.0}
    return {"host": HOST, "target": bench.TARGET, "runs": runs, "seed_pipeline": seed_pipeline, "throughput": []}


def test_read_run_takes_test_acc_from_result_json_and_medians_from_epoch_rows(tmp_path):
    run = bench.run_numbers(forge_run(tmp_path / "r", 99.47, [97.0, 98.0, 99.0], seconds=10.0))
    assert run["test_acc"] == 99.47  # result.json's delivered weights, not the last epoch row's 99.0
    assert run["weights"] == "ema"
    assert run["params"] == 7738
    assert run["epochs"] == 3  # the "resumed" event is not an epoch
    assert run["seconds_per_epoch"] == 11.0  # median of the rows' "seconds": 10, 11, 12
    assert run["img_per_s"] == 2000.0
    assert run["peek_epoch"] is None  # tested every epoch, never at 99.40%


def test_read_run_before_the_weights_key_existed(tmp_path):
    run = bench.run_numbers(forge_run(tmp_path / "r", 99.47, [None], weights=None))
    assert run["weights"] is None and run["peek_epoch"] == "n/a"


def test_read_run_refuses_a_run_without_result_json(tmp_path):
    path = forge_run(tmp_path / "r", 99.47, [None])
    (path / rd.RESULT).unlink()
    with pytest.raises(UserError, match="did not complete"):
        bench.run_numbers(path)


def test_summary_is_min_and_median_of_delivered_accuracy_and_speed_up_over_whole_run_wall(tmp_path):
    report = forged_report(tmp_path)
    net8k, net20k = bench.summarize(report["runs"], report["seed_pipeline"])
    assert (net8k["recipe"], net8k["runs"]) == ("net8k", 3)
    assert net8k["test_min"] == 99.38 and net8k["test_median"] == 99.45
    assert net8k["at_target"] == 2
    assert net8k["wall_median"] == 110.0 and net8k["wall_max"] == 130.0
    assert net8k["speed_up_median"] == pytest.approx(990.0 / 110.0)
    assert net8k["speed_up_slowest"] == pytest.approx(990.0 / 130.0)
    assert net20k["test_min"] == 99.55 and net20k["test_median"] == pytest.approx(99.58)
    assert net20k["speed_up_median"] == pytest.approx(990.0 / 220.0)

    text = bench.render(report)
    assert "host: Test CPU, 2 cores, torch 9.9\ncommand: `python scripts/benchmark.py`" in text
    assert "| net8k | 3 | 99.38% | 99.45% | 2/3 | 110 | 130 | 9.0x | 7.6x |" in text
    assert "| net20k | 2 | 99.55% | 99.58% | 2/2 | 220 | 240 | 4.5x | 4.1x |" in text
    assert "= **9.0x** (7.6x against its slowest seed, 130 s; delivered test min 99.38%; " \
           "only 2/3 seeds delivered >= 99.40% test)" in text
    assert "99.40% test at epoch 11 after **990 s**; 90 s/epoch, 640 img/s" in text
    assert "99.80%" not in text and "99.90%" not in text  # no best-of-epochs number anywhere


def test_peeking_column_is_na_without_per_epoch_test_and_the_epoch_with_it(tmp_path):
    lines = bench.render(forged_report(tmp_path)).splitlines()
    head = next(l for l in lines if l.startswith("| recipe | seed |"))
    assert head.endswith("| first epoch test >= 99.40% (peeks at test) |")
    assert "| net8k | 1 | 7,738 | 3 | ema | 99.45% | 100 | 11.0 | 2,000 | n/a |" in lines
    assert "| net20k | 2 | 18,314 | 3 | final | 99.55% | 240 | 11.0 | 2,000 | 2 |" in lines


def test_no_seed_pipeline_no_speed_up(tmp_path):
    report = {**forged_report(tmp_path), "seed_pipeline": None}
    assert all(s["speed_up_median"] is None for s in bench.summarize(report["runs"], None))
    assert "| net8k | 3 | 99.38% | 99.45% | 2/3 | 110 | 130 | n/a | n/a |" in bench.render(report)
    unreached = {**forged_report(tmp_path / "b"), }
    unreached["seed_pipeline"] = {**unreached["seed_pipeline"], "epoch_to_target": None, "seconds_to_target": None}
    text = bench.render(unreached)
    assert "did not reach 99.40% test in 11 epochs (best 99.41%)" in text
    assert "speed-up of net8k: n/a (the seed pipeline did not reach 99.40% test)" in text


def test_recipes_accept_any_key_and_ad_hoc_ones(monkeypatch):
    monkeypatch.setitem(bench.RECIPES, "net8k-fast", ["--recipe", "fast"])
    assert bench.parse_recipes("net8k-fast,net8k", []) == {"net8k-fast": ["--recipe", "fast"], "net8k": []}
    assert bench.parse_recipes("net20k", ["r10=--rotate 10 --epochs 3"]) == {
        "net20k": ["--model", "net20k"], "r10": ["--rotate", "10", "--epochs", "3"]}
    assert list(bench.parse_recipes("r10,net8k", ["r10=--rotate 10"])) == ["r10", "net8k"]
    with pytest.raises(UserError, match=r"unknown recipe 'net9k' in --recipes; choose from net8k, net8k-fast, net20k"):
        bench.parse_recipes("net8k,net9k", [])
    with pytest.raises(UserError, match="already exists"):
        bench.parse_recipes("net8k", ["net8k=--epochs 3"])
    for bad in ("--rotate 10", "a/b=--rotate 10", "=--rotate 10"):
        with pytest.raises(UserError, match="--extra-recipe takes NAME="):
            bench.parse_recipes("net8k", [bad])
    with pytest.raises(UserError, match="no recipe"):
        bench.parse_recipes("", [])


def test_bad_recipe_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--recipes", "net9k", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown recipe 'net9k' in --recipes; choose from net8k, net8k-fast, net20k, "
        "or add one with --extra-recipe NAME=\"trainer flags\""]


def test_an_existing_run_dir_is_refused_before_any_run(tmp_path):
    (tmp_path / "runs" / "bench-net20k-s2").mkdir(parents=True)
    with pytest.raises(UserError, match=r"bench-net20k-s2 already exists; pass a new --out"):
        bench.main(["benchmark.py", "--seeds", "1,2", "--out", str(tmp_path)])
    assert not (tmp_path / "benchmark.json").exists()


@pytest.mark.slow
def test_end_to_end_tiny_run(tmp_path, mnist_dir):
    """The real script and the real trainer, one seed of one recipe, two steps."""
    cmd = [sys.executable, "scripts/benchmark.py", "--seeds", "3", "--recipes", "net8k", "--seed-pipeline", "skip",
           "--data-dir", str(mnist_dir), "--out", str(tmp_path / "b"),
           "--extra", "--epochs 1 --train-limit 512 --eval-limit 256 --max-steps 2 --threads 1 --no-report"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    (run,) = report["runs"]
    result = json.loads((tmp_path / "b" / "runs" / "bench-net8k-s3" / rd.RESULT).read_text())
    assert (run["recipe"], run["seed"], run["epochs"]) == ("net8k", 3, 1)
    assert run["test_acc"] == result["test_acc"] and run["weights"] == result.get("weights")
    assert run["wall_seconds"] > 0
    assert report["host"]["command"].startswith("python scripts/benchmark.py --seeds 3")
    assert f"| net8k | 3 | {run['params']:,} | 1 |" in proc.stdout
    assert "| net8k | 1 |" in proc.stdout  # the per-recipe table
