"""report.html and compare, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from trainer.config import TrainConfig
from trainer.train import fit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


def _browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "needs the playwright package (test extra)"
    if not Path(CHROMIUM).exists():
        return "needs Debian's chromium (.ci/run installs it)"
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
    return small_run(tmp_path_factory.mktemp("report"), mnist_dir, "done")


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
    field = lambda name: page.locator(f'[data-field="{name}"]').inner_text()
    assert field("final test acc") == f"{rows[-1]['test_acc']:.2f}%"
    assert field("best test acc") == f"{max(r['test_acc'] for r in rows):.2f}%"
    assert field("epochs") == f"{len(rows)} / 2"
    assert field("99.40% reached") == "not reached"  # 2 epochs on 2k images
    config = json.loads((finished / "config.json").read_text())
    assert field("params") == f"{config['model']['params']:,}"
    table = page.evaluate("[...document.querySelectorAll('#epochs tr')].slice(1).map(r => "
                          "[...r.cells].map(c => c.innerText))")
    assert [int(r[0]) for r in table] == [r["epoch"] for r in rows]
    assert [r[6] for r in table] == [f"{r['test_acc']:.2f}" for r in rows]
    text = page.inner_text("body")
    assert config["git"]["sha"] is None or config["git"]["sha"][:12] in text
    assert "Partial report" not in text and "torch" in text
    page.close()


def test_partial_run_gets_a_partial_report(browser, tmp_path, mnist_dir):
    run = small_run(tmp_path, mnist_dir, "half", epochs=3, stop_after=1)
    page, _ = open_page(browser, run / "report.html")
    assert "Partial report" in page.inner_text("body") and "stopped after 1 of 3 epochs" in page.inner_text("body")
    page.close()


def test_report_regenerates_and_compare_overlays(browser, tmp_path, mnist_dir, finished, mnist_cloud):
    other = small_run(tmp_path, mnist_dir, "other", model="seed002-gap", epochs=1, report=False)
    assert not (other / "report.html").exists()
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    made = run_cli([*mnist_cloud, "report", str(other)], env_extra=env)
    assert made.returncode == 0, made.stderr
    assert (other / "report.html").exists()
    out = tmp_path / "cmp.html"
    cmp = run_cli([*mnist_cloud, "compare", str(finished), str(other), "--out", str(out)])
    assert cmp.returncode == 0, cmp.stderr
    header = cmp.stdout.splitlines()[0].split()
    assert header[:4] == ["run", "model", "params", "epochs"]
    assert "net8k" in cmp.stdout and "seed002-gap" in cmp.stdout
    page, requests = open_page(browser, out)
    images = page.evaluate("[...document.images].map(i => i.naturalWidth)")
    assert len(images) == 4 and all(w > 100 for w in images)
    assert page.locator("#compare tr").count() == 3
    assert all(u.startswith(("file:", "data:")) for u in requests)
    page.close()


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
