"""`mnist-cloud sweep`: the grid, the retry, the summary over seeds and the --max-cost guard, run
through the installed CLI. (The same sweep on an instance over SSH is in test_remote.py.)"""

from __future__ import annotations

import json
import statistics

import pytest

from fixtures.aws import aws_env, moto_server, seed_dlami
from fixtures.cli import assert_user_error, run_cli

TINY = ["--epochs", "1", "--train-limit", "1024", "--eval-limit", "300", "--no-report"]


def epochs(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def delivered_test_acc(run_dir) -> float:
    """The run's own headline: its delivered weights' test accuracy."""
    return json.loads((run_dir / "result.json").read_text())["test_acc"]


@pytest.mark.slow
def test_local_grid_summarizes_every_config_over_its_seeds(tmp_path, mnist_cloud, mnist_dir):
    # EMA weights are delivered, and per-epoch test is on (for the peek column)
    out = run_cli([*mnist_cloud, "sweep", "--local", "--seeds", "1,2", "--model", "net8k,seed001", *TINY,
                   "--ema", "0.9", "--test-every-epoch", "--data-dir", str(mnist_dir), "--name", "grid", "--to", "runs"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "grid: 4 run(s) = 2 model(s) x 1 setting(s) x 2 seed(s)" in out.stdout
    summary = json.loads((tmp_path / "runs" / "grid.json").read_text())
    points = summary["points"]
    assert len(points) == 4 and all(p["status"] == "completed" and p["attempts"] == 1 for p in points)
    assert sorted((p["config"], p["seed"]) for p in points) == [("net8k", 1), ("net8k", 2), ("seed001", 1),
                                                                 ("seed001", 2)]
    for model in ("net8k", "seed001"):
        runs = [tmp_path / "runs" / p["run_id"] for p in points if p["config"] == model]
        seeds = {json.loads((r / "config.json").read_text())["config"]["seed"] for r in runs}
        assert seeds == {1, 2}  # each seed really reached its trainer
        accs = [delivered_test_acc(r) for r in runs]
        line = next(l for l in out.stdout.splitlines() if l.startswith(model + " "))
        # min, median and max of what the runs themselves reported, not of anything the sweep made up
        cells = line.split()
        assert cells[1:6] == ["2/2", "ema", f"{min(accs):.2f}%", f"{statistics.median(accs):.2f}%",
                              f"{max(accs):.2f}%"], line
        assert cells[6:8] == ["not", "reached"], line  # the peek, from per-epoch test: 1 epoch on 1k images
    assert (tmp_path / "runs" / "grid.html").stat().st_size > 10_000  # the compare report over all four


@pytest.mark.slow
def test_a_failing_value_is_retried_once_then_reported(tmp_path, mnist_cloud, mnist_dir):
    out = run_cli([*mnist_cloud, "sweep", "--local", "--seeds", "1", "--set", "lr=0.05,-1", *TINY,
                   "--data-dir", str(mnist_dir), "--name", "bad", "--to", "runs"], cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    points = {p["config"]: p for p in json.loads((tmp_path / "runs" / "bad.json").read_text())["points"]}
    assert points["lr=0.05"]["status"] == "completed" and points["lr=0.05"]["attempts"] == 1
    assert points["lr=-1"]["status"] == "failed" and points["lr=-1"]["attempts"] == 2
    assert "retrying once" in out.stdout and "1 run(s) failed twice" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("lr=-1 "))
    assert "0/1 (1 failed)" in line
    ok = tmp_path / "runs" / points["lr=0.05"]["run_id"]
    cells = next(l for l in out.stdout.splitlines() if l.startswith("lr=0.05 ")).split()
    # no per-epoch test (the default): the delivered number, and no peek at all
    assert cells[1:4] == ["1/1", "final", f"{delivered_test_acc(ok):.2f}%"] and cells[6] == "n/a", cells


@pytest.mark.parametrize("bad, needle", [
    (["--seeds", "1,x"], "--seeds"),
    (["--seed", "3"], "set by the sweep itself"),
    (["--set", "lr"], "KEY=V1,V2"),
])
def test_bad_sweep_flags(tmp_path, mnist_cloud, bad, needle):
    assert_user_error(run_cli([*mnist_cloud, "sweep", "--local", *bad], cwd=tmp_path), needle)


def test_max_cost_refuses_before_anything_starts(tmp_path, mnist_cloud):
    with moto_server() as endpoint:
        seed_dlami()
        env = aws_env(tmp_path, AWS_ENDPOINT_URL=endpoint)
        launched = run_cli([*mnist_cloud, "launch", "--instance", "g4dn.xlarge", "--name", "pricey", "--ssh-cidr",
                            "192.0.2.1/32", "--no-wait-ssh"], env_extra=env, cwd=tmp_path)
        assert launched.returncode == 0, launched.stderr
        # 3 seeds x 15 epochs x 6 s on a $0.526/h g4dn.xlarge = $0.04
        refused = run_cli([*mnist_cloud, "sweep", "--on", "pricey", "--seeds", "1,2,3", "--epochs", "15",
                           "--max-cost", "0.01", "--name", "capped"], env_extra=env, cwd=tmp_path)
        assert_user_error(refused, "exceeds --max-cost $0.01")
        assert "estimate: 0.08 h of g4dn.xlarge ~ $0.04" in refused.stdout
        assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written


def test_the_estimate_counts_each_runs_own_epochs():
    """A run's epochs: typed, else its model's recipe's (net8k trains 10, --recipe fast 6), else 15."""
    from infra.sweep import epochs_of, estimate, expand, sweep_epochs
    from runspec.config import TrainConfig, default_value

    assert epochs_of([]) == default_value("epochs") == 10 and TrainConfig.epochs == 15
    assert epochs_of(["--recipe", "fast"]) == 6 and epochs_of(["--model", "seed001"]) == 15
    assert epochs_of(["--epochs", "7", "--model", "seed001"]) == 7
    points = expand(["net8k", "seed001"], [1, 2], {}, "s")
    assert sweep_epochs(points, []) == 2 * 10 + 2 * 15
    assert estimate(points, [], ["g4dn.xlarge"], slots=1, epoch_seconds=3600)[0] == pytest.approx(2 * 10 + 2 * 15)
    assert sweep_epochs(expand(None, [1], {"epochs": ["3", "4"]}, "s"), ["--epochs", "9"]) == 3 + 4  # --set wins


def test_estimate_counts_every_run_on_every_slot():
    from infra.sweep import Point, estimate

    points = [Point("c", seed, [], f"r{seed}") for seed in range(8)]
    hours, usd = estimate(points, ["--epochs", "10"], ["g4dn.xlarge", "g4dn.xlarge"], slots=2, epoch_seconds=9)
    assert hours == pytest.approx(8 * 10 * 9 / 3600 / 2)
    assert usd == pytest.approx(hours * 2 * 0.526)


def _forged_run(root, run_id, result, test_per_epoch, cloud=None):
    d = root / run_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"status": "completed", "config": {}, "cloud": cloud}))
    rows = [{"epoch": e, "test_acc": t, "elapsed": 10.0 * e} for e, t in enumerate(test_per_epoch, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "result.json").write_text(json.dumps(result))


def test_summary_is_the_delivered_weights_not_the_last_epochs_test(tmp_path):
    from infra.sweep import Point, summarize, table

    # EMA delivered (99.45) while the last epoch's final weights tested 99.30 (with --test-every-epoch);
    # a default run has no per-epoch test at all
    _forged_run(tmp_path, "a1", {"test_acc": 99.45, "weights": "ema"}, [99.1, 99.41, 99.30])
    _forged_run(tmp_path, "a2", {"test_acc": 99.35, "weights": "ema"}, [98.9, 99.2, 99.33])
    _forged_run(tmp_path, "b1", {"test_acc": 99.20, "weights": "final"}, [None, None])
    points = [Point("a", 1, [], "a1", status="completed"), Point("a", 2, [], "a2", status="completed"),
              Point("b", 1, [], "b1", status="completed"), Point("b", 2, [], "b2", status="failed")]
    a, b = summarize(points, tmp_path)
    assert (a.accs, a.weights, a.epochs_to_target) == ([99.45, 99.35], ["ema", "ema"], [2, None])
    assert (b.accs, b.weights, b.epochs_to_target, b.failed) == ([99.20], ["final"], [], 1)
    lines = table([a, b]).splitlines()
    assert lines[0].split()[:6] == ["config", "runs", "delivered", "min", "test", "median"]
    assert "first epoch test>=99.40% (peek, median)" in lines[0]
    assert lines[1].split()[:9] == ["a", "2/2", "ema", "99.35%", "99.40%", "99.45%", "2", "(1/2", "reached)"]
    assert lines[2].split()[:7] == ["b", "1/2", "(1", "failed)", "final", "99.20%", "99.20%"]
    assert lines[2].split()[8] == "n/a"  # nothing to peek at: not "not reached"


def test_the_summarys_cost_says_where_each_runs_price_came_from(tmp_path):
    from infra.sweep import Point, summarize, table

    spot = {"name": "m", "instance_type": "g4dn.xlarge", "price_per_hour": 0.36,
            "price_source": "live spot, us-east-1b, mean over uptime"}
    for run_id in ("s1", "s2"):
        _forged_run(tmp_path, run_id, {"test_acc": 99.4}, [None] * 10, cloud=spot)  # 100 s each
    [s] = summarize([Point("s", i, [], f"s{i}", status="completed") for i in (1, 2)], tmp_path)
    assert s.cost == pytest.approx(2 * 0.36 * 100 / 3600)
    assert table([s]).splitlines()[-1] == "cost priced by: live spot, us-east-1b, mean over uptime (2 run(s))"


@pytest.mark.slow
def test_ctrl_c_stops_a_local_sweep_after_the_trainer_has_saved(tmp_path, mnist_cloud, mnist_dir):
    """Ctrl-C at the terminal reaches the whole foreground process group: the trainer saves and exits,
    then the sweep stops, with no retry and no next run started behind the user's back."""
    import os
    import signal
    import subprocess
    import time

    from fixtures.cli import wait_for

    proc = subprocess.Popen([*mnist_cloud, "sweep", "--local", "--seeds", "1,2", "--epochs", "3", "--train-limit",
                             "8192", "--eval-limit", "300", "--no-report", "--data-dir", str(mnist_dir), "--name",
                             "cut", "--to", "runs"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first = tmp_path / "runs" / "cut-00-defaults-s1"
    try:
        wait_for(lambda: (first / "metrics.jsonl").exists(), timeout=300)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert json.loads((first / "config.json").read_text())["status"] == "interrupted"
    assert (first / "last.pt").exists()  # saved before the sweep exited
    time.sleep(2)  # a run started behind the user's back would have made its directory by now
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [first.name], out
    assert "retrying" not in out and "interrupted; the sweep stops here" in out
    assert subprocess.run(["pgrep", "-f", "--", "--run-id cut-"], capture_output=True).returncode == 1  # none left
