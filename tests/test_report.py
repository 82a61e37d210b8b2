"""report.html and compare, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fixtures.cli import assert_user_error, run_cli
from runspec.config import TrainConfig
from trainer.train import fit

CHROMIUM = shutil.which("chromium") or shutil.which("google-chrome") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


def _browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "needs the playwright package (test extra)"
    if not Path(CHROMIUM).exists():
        return "needs chromium or google-chrome (.ci/run installs Debian's chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason:
        if os.environ.get("MNIST_CLOUD_CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    """Load a local file; returns (page, every URL the page requested)."""
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, requests


def small_run(tmp_path, mnist_dir, run_id, **overrides):
    cfg = dict(data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"), train_limit=2048, eval_limit=1000, epochs=2,
               progress=False, run_id=run_id, threads=2)
    cfg.update(overrides)
    fit(TrainConfig(**cfg))
    return tmp_path / "runs" / run_id


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dir):
    """The defaults: a validation split, the test set evaluated once at the end (per-epoch test is null)."""
    return small_run(tmp_path_factory.mktemp("report"), mnist_dir, "done")


@pytest.fixture(scope="module")
def delivered_ema(tmp_path_factory, mnist_dir):
    """A run whose delivered weights differ from last.pt's (their EMA) and that sees 24x24 centre crops,
    tested on the full 10k test set, like the report's confusion matrix."""
    return small_run(tmp_path_factory.mktemp("report-ema"), mnist_dir, "ema", ema=0.9, input_size=24, val_size=0,
                     eval_limit=None)


@pytest.mark.slow
def test_report_is_written_with_plots(finished):
    assert (finished / "report.html").is_file()
    assert sorted(p.name for p in (finished / "plots").glob("*.png")) == [
        "accuracy.png", "confusion.png", "loss.png", "lr.png", "worst.png"]


def test_report_renders_offline_with_every_plot_and_the_right_numbers(browser, finished):
    page, requests = open_page(browser, finished / "report.html")
    images = page.evaluate("[...document.images].map(i => [i.dataset.plot, i.complete, i.naturalWidth, i.naturalHeight])")
    assert sorted(i[0] for i in images) == ["accuracy", "confusion", "loss", "lr", "worst"]
    assert all(complete and w > 100 and h > 100 for _, complete, w, h in images), images
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # no network at all

    rows = [json.loads(l) for l in (finished / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((finished / "result.json").read_text())
    field = lambda name: page.locator(f'[data-field="{name}"]').inner_text()
    # the headline is result.json's: the delivered weights, tested once at the end
    assert field("test accuracy") == f"{result['test_acc']:.2f}%"
    assert field("delivered") == "final weights, epoch 2"
    assert field("val accuracy") == f"{result['val_acc']:.2f}%"
    assert field("epochs") == f"{len(rows)} / 2"
    # no per-epoch test without --test-every-epoch: nothing to peek at
    assert field("first epoch with test >= 99.40% (peeking, not a decision)") == "n/a"
    assert page.locator('[data-field="best test acc"]').count() == 0  # a max over epochs of test is a peek
    config = json.loads((finished / "config.json").read_text())
    assert field("params") == f"{config['model']['params']:,}"
    table = page.evaluate("[...document.querySelectorAll('#epochs tr')].slice(1).map(r => "
                          "[...r.cells].map(c => c.innerText))")
    assert [int(r[0]) for r in table] == [r["epoch"] for r in rows]
    assert [r[4] for r in table] == [f"{r['val_acc']:.2f}" for r in rows]
    assert [(r[5], r[6]) for r in table] == [("-", "-")] * len(rows)  # null per-epoch test
    text = page.inner_text("body")
    assert config["git"]["sha"] is None or config["git"]["sha"][:12] in text
    assert "Partial report" not in text and "torch" in text
    page.close()


@pytest.mark.slow
def test_the_reports_cost_says_where_the_price_came_from(finished):
    from trainer.report import load_run, render

    run = load_run(finished)  # as `train --on` records it (runspec.cloud_info)
    run.config["cloud"] = {"name": "m", "instance_type": "g4dn.xlarge", "price_per_hour": 0.631,
                           "price_source": "live, AWS Price List"}
    page = render(run, {})
    assert f'data-field="est. cost">${run.cost:.3f} (live, AWS Price List)</div>' in page
    assert "m g4dn.xlarge ($0.631/h, live, AWS Price List)" in page


def test_confusion_matrix_is_the_delivered_weights_at_their_input_size(delivered_ema):
    from trainer.report import load_run, test_predictions

    result = json.loads((delivered_ema / "result.json").read_text())
    assert result["weights"] == "ema"
    pred = test_predictions(load_run(delivered_ema))
    assert pred.checkpoint == "model.pt" and len(pred.labels) == 10_000
    errors = int((pred.probs.argmax(1) != pred.labels).sum())
    # exactly the mistakes behind result.json's number (not last.pt's final weights, not uncropped 28x28 images)
    assert errors == round(10_000 - 100 * result["test_acc"]), (errors, result["test_acc"])


def test_report_names_the_delivered_weights(browser, delivered_ema):
    page, _ = open_page(browser, delivered_ema / "report.html")
    field = lambda name: page.locator(f'[data-field="{name}"]').inner_text()
    result = json.loads((delivered_ema / "result.json").read_text())
    assert field("test accuracy") == f"{result['test_acc']:.2f}%" and field("delivered") == "EMA weights, epoch 2"
    assert field("val accuracy") == "-"  # no validation split
    images = page.evaluate("[...document.images].map(i => i.dataset.plot)")
    assert "confusion" in images and "worst" in images
    page.close()


def test_partial_run_gets_a_partial_report(browser, tmp_path, mnist_dir):
    run = small_run(tmp_path, mnist_dir, "half", epochs=3, stop_after=1)
    page, _ = open_page(browser, run / "report.html")
    text = page.inner_text("body")
    assert "Partial report" in text and "stopped after 1 of 3 epochs" in text
    # no model.pt yet: no confusion matrix from some other checkpoint, and it says why
    assert "confusion matrix and mistakes skipped: they come from the delivered weights (model.pt)" in text
    assert page.locator('[data-field="test accuracy"]').inner_text() == "-"
    assert page.locator('[data-field="delivered"]').inner_text() == "not delivered yet"
    page.close()


@pytest.mark.slow
def test_report_regenerates_and_compare_overlays(browser, tmp_path, mnist_dir, finished, mnist_cloud):
    other = small_run(tmp_path, mnist_dir, "other", model="seed002-gap", epochs=1, report=False, test_every_epoch=True)
    assert not (other / "report.html").exists()
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    made = run_cli([*mnist_cloud, "report", str(other)], env_extra=env)
    assert made.returncode == 0, made.stderr
    assert (other / "report.html").exists()
    page, _ = open_page(browser, other / "report.html")
    rows = [json.loads(l) for l in (other / "metrics.jsonl").read_text().splitlines()]
    table = page.evaluate("[...document.querySelectorAll('#epochs tr')].slice(1).map(r => "
                          "[...r.cells].map(c => c.innerText))")
    assert [r[6] for r in table] == [f"{r['test_acc']:.2f}" for r in rows]  # --test-every-epoch fills them
    assert page.locator('[data-field="first epoch with test >= 99.40% (peeking, not a decision)"]').inner_text() \
        == "not reached"  # 1 epoch on 2k images
    page.close()
    out = tmp_path / "cmp.html"
    cmp = run_cli([*mnist_cloud, "compare", str(finished), str(other), "--out", str(out)])
    assert cmp.returncode == 0, cmp.stderr
    header = cmp.stdout.splitlines()[0].split()
    assert header[:6] == ["run", "model", "params", "epochs", "test", "delivered"] and "best" not in header
    assert "test>=99.40% (peek)" in cmp.stdout.splitlines()[0]
    for run, peek in ((finished, "n/a"), (other, "not reached")):
        line = next(l for l in cmp.stdout.splitlines() if l.startswith(run.name + " "))
        result = json.loads((run / "result.json").read_text())
        assert f"{result['test_acc']:.2f}%" in line and "final weights, epoch" in line and peek in line, line
    assert "net8k" in cmp.stdout and "seed002-gap" in cmp.stdout
    page, requests = open_page(browser, out)
    images = page.evaluate("[...document.images].map(i => i.naturalWidth)")
    assert len(images) == 4 and all(w > 100 for w in images)
    assert page.locator("#compare tr").count() == 3
    assert all(u.startswith(("file:", "data:")) for u in requests)
    page.close()


def test_compare_draws_no_test_curve_without_per_epoch_test(tmp_path, finished, delivered_ema):
    from trainer.report import write_compare

    write_compare([finished, delivered_ema], tmp_path / "cmp.html")
    assert sorted(p.name for p in tmp_path.glob("cmp-*.png")) == ["cmp-train_loss.png", "cmp-val_acc.png",
                                                                "cmp-val_loss.png"]


def test_compare_draws_no_empty_validation_curves_for_runs_without_one(tmp_path):
    """The default recipe trains on all 60k (--val-size 0): no validation plots, and no matplotlib warning."""
    import warnings

    from trainer.report import write_compare

    runs = [forge_run(tmp_path / name, "net8k", [None, None], 99.1, "final") for name in ("a", "b")]
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if not k.startswith("val")})
                                                   + "\n" for row in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        write_compare(runs, tmp_path / "cmp.html")
    assert [p.name for p in tmp_path.glob("cmp-*.png")] == ["cmp-train_loss.png"]


def forge_run(path: Path, model: str, tests: list[float | None], delivered: float, weights: str,
              price: float | None = None) -> Path:
    """A finished run directory as the trainer leaves it, without training: compare reads only these files."""
    path.mkdir(parents=True)
    config = {"run_id": path.name, "status": "completed", "config": {"model": model}, "model": {"params": 7738}}
    if price is not None:
        config["cloud"] = {"price_per_hour": price, "price_source": "live, AWS Price List"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": i + 1, "train_loss": 0.5 / (i + 1), "val_loss": 0.4 / (i + 1), "val_acc": 98.0 + i,
         "test_acc": t, "elapsed": 30.0 * (i + 1)}) + "\n" for i, t in enumerate(tests)))
    (path / "result.json").write_text(json.dumps({"status": "completed", "test_acc": delivered, "weights": weights,
                                                  "epochs": len(tests)}))
    return path


def test_compare_json_carries_every_column_of_the_table(tmp_path, capsys):
    from trainer.cli import main

    a = forge_run(tmp_path / "a", "net8k", [None, None], 99.12, "final", price=0.6)
    b = forge_run(tmp_path / "b", "seed002-gap", [98.7, 99.41, 99.5], 99.47, "ema")
    out = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {l.split()[0]: l for l in table[1:3]}
    assert main(["compare", str(a), str(b), "--out", str(out), "--json"]) == 0
    printed, err = capsys.readouterr()
    records = json.loads(printed)  # the JSON alone on stdout; where the page is, on stderr
    assert f"overlaid curves: {out}" in err and out.is_file()
    assert [list(r) for r in records] == [["run_id", "path", "model", "params", "epochs", "test_acc", "delivered",
                                           "target_acc", "tested_each_epoch", "first_epoch_at_target", "seconds",
                                           "cost_usd", "price_source", "status"]] * 2
    ra, rb = records
    assert (ra["run_id"], ra["path"], ra["model"], ra["params"], ra["epochs"], ra["test_acc"], ra["delivered"]) == (
        "a", str(a), "net8k", 7738, 2, 99.12, "final weights, epoch 2")
    assert (ra["tested_each_epoch"], ra["first_epoch_at_target"], ra["seconds"], ra["status"]) == (
        False, None, 60.0, "completed")
    assert ra["cost_usd"] == pytest.approx(0.6 * 60 / 3600) and ra["price_source"] == "live, AWS Price List"
    assert (rb["delivered"], rb["tested_each_epoch"], rb["first_epoch_at_target"], rb["cost_usd"]) == (
        "EMA weights, epoch 3", True, 2, None)
    # the table shows the same facts
    assert rows["a"].split() == ["a", "net8k", "7,738", "2", "99.12%", "final", "weights,", "epoch", "2", "n/a",
                                 "1m00s", "$0.010"], rows["a"]
    assert "epoch 2" in rows["b"] and "99.47%" in rows["b"] and rows["b"].rstrip().endswith("-")


@pytest.mark.slow
def test_report_bad_input(tmp_path, mnist_cloud, finished):
    assert_user_error(run_cli([*mnist_cloud, "report", str(tmp_path / "missing")]), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli([*mnist_cloud, "report", str(tmp_path / "empty")]), "not a run directory")
    cut = tmp_path / "cut"
    shutil.copytree(finished, cut)
    text = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(text[: len(text) - 40])
    assert_user_error(run_cli([*mnist_cloud, "report", str(cut)]), "metrics.jsonl is truncated")
    assert_user_error(run_cli([*mnist_cloud, "compare", str(finished)]), "at least two")
