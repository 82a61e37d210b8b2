"""The run report: one self-contained report.html per run directory (images inlined, no network),
plus plots/*.png beside it; and `compare`, the same curves for several runs on one page.

Everything is read back from the run directory (config.json, metrics.jsonl, result.json, summary.txt,
model.pt), so a report can be made at any time: at the end of a run, for a run still going, or later.
The headline test accuracy is result.json's: the delivered weights (model.pt), tested once at the end.
Per-epoch test accuracy exists only with --test-every-epoch; whatever is read from it (the first epoch
at 99.40%) is a peek at the test set, labelled as one, and decides nothing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import runspec
from trainer import rundir as rd
from trainer.errors import UserError

DEFAULT_TARGET = runspec.TARGET
PLOTS = runspec.PLOTS
REPORT = runspec.REPORT


# ---------------------------------------------------------------------------------- reading a run
class Run(runspec.Run):
    """A run as the report shows it: runspec's reading of it, plus what the pages need."""

    @property
    def run_id(self) -> str:
        return self.config.get("run_id", self.path.name)

    @property
    def cfg(self) -> dict[str, Any]:
        return self.config.get("config", {})

    @property
    def status(self) -> str:
        return self.config.get("status", "unknown")

    @property
    def partial(self) -> bool:
        return self.status != "completed" or self.result is None

    @property
    def target(self) -> float:
        return self.cfg.get("target") or DEFAULT_TARGET

    @property
    def test_acc(self) -> float | None:
        """The delivered weights' test accuracy (result.json); None until the run has finished."""
        return (self.result or {}).get("test_acc")

    @property
    def weights(self) -> str:
        """What the run delivers, in words: 'final weights, epoch 15' or 'EMA weights, epoch 15'."""
        if not self.result:
            return "not delivered yet"
        kind = {"ema": "EMA weights", "final": "final weights"}.get(self.result.get("weights"), "final weights")
        return f"{kind}, epoch {self.result.get('epochs')}"

    @property
    def test_peek(self) -> str:
        """The first epoch whose test accuracy reached the target: a peek at the test set, 'n/a' without
        per-epoch test (--test-every-epoch)."""
        if not self.tested_each_epoch:
            return "n/a"
        epoch = runspec.first_epoch_at_target(self.rows, self.target)
        return "not reached" if epoch is None else f"epoch {epoch}"

    @property
    def seconds(self) -> float | None:
        return self.rows[-1].get("elapsed") if self.rows else None

    @property
    def cost(self) -> float | None:
        price = (self.config.get("cloud") or {}).get("price_per_hour")
        return None if price is None or self.seconds is None else price * self.seconds / 3600


def load_run(path: str | Path) -> Run:
    r = runspec.read_run(path, strict=True)
    return Run(r.path, r.config, r.rows, r.result)


# ---------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9})
    return plt


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return data


def _series(rows, key):
    return [r["epoch"] for r in rows if r.get(key) is not None], [r[key] for r in rows if r.get(key) is not None]


def plot_loss(run: Run, out: Path) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        x, y = _series(run.rows, key)
        if x:
            ax.plot(x, y, marker="o", ms=3, label=label, ls="--" if key == "test_loss" else "-")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax.legend()
    return _save(fig, out)


def plot_accuracy(run: Run, out: Path) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, label in (("train_acc", "train (augmented)"), ("val_acc", "validation"), ("test_acc", "test")):
        x, y = _series(run.rows, key)
        if x:
            ax.plot(x, y, marker="o", ms=3, label=label, ls="--" if key == "test_acc" else "-")
    if run.test_acc is not None:  # the headline: tested once, at the end
        ax.plot([run.result.get("epochs", len(run.rows))], [run.test_acc], marker="*", ms=11, ls="none",
                color="black", label=f"test, delivered ({run.weights.split(',')[0]})")
    ax.axhline(run.target, color="crimson", lw=1, ls=":", label=f"target {run.target:.2f}%")
    lows = [r[k] for r in run.rows for k in ("val_acc", "test_acc") if r.get(k) is not None]
    lows += [run.test_acc] if run.test_acc is not None else []
    if lows:  # zoom on the top, where the target is, without cutting off any point
        ax.set_ylim(max(0.0, min(min(lows), run.target - 1.0) - 0.3), 100.05)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    ax.legend(loc="lower right")
    return _save(fig, out)


def lr_curve(run: Run) -> tuple[list[float], list[float]]:
    """(x in epochs, lr) per step, by replaying the run's own scheduler; per epoch for epoch-wise schedules."""
    from runspec.config import from_dict
    from trainer.optim import epoch_steps, schedule_table

    cfg = from_dict(run.cfg)
    train_n = (run.config.get("data") or {}).get("train")
    if not train_n or cfg.schedule in ("step", "plateau", "none"):
        return [r["epoch"] for r in run.rows], [r["lr"] for r in run.rows]
    world = (run.config.get("distributed") or {}).get("world_size", 1)
    steps = epoch_steps(cfg, train_n, world)
    lrs, _ = schedule_table(cfg, steps)
    return [i / steps for i in range(len(lrs))], lrs


def plot_lr(run: Run, out: Path) -> bytes:
    plt = _pyplot()
    xs, lrs = lr_curve(run)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(xs, lrs, color="tab:purple")
    done = len(run.rows)
    if xs and done < run.cfg.get("epochs", done):
        ax.axvline(done, color="gray", ls=":", lw=1, label="now")
        ax.legend()
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"Learning rate ({run.cfg.get('schedule', '?')})")
    return _save(fig, out)


@dataclass
class Predictions:
    images: Any  # uint8 [N, 28, 28]
    labels: Any  # int64 [N]
    probs: Any  # float [N, 10]
    checkpoint: str


def test_predictions(run: Run) -> Predictions:
    """The delivered weights (model.pt) on the 10k test set, cut to the input size they were trained on,
    through the run's test-time views, in its own eval batches: the mistakes behind result.json's test
    accuracy."""
    import torch

    from trainer.data import load_mnist
    from trainer.fetch import resolve_data_dir
    from trainer.inference import load_model, log_probs, trained_input_size, trained_views

    ckpt_path = run.path / rd.MODEL
    if not ckpt_path.is_file():
        raise UserError(f"they come from the delivered weights ({rd.MODEL}), which the run writes when it finishes")
    model, ckpt = load_model(ckpt_path, torch.device("cpu"))  # checked, and weights that do not fit are one line
    size, views = trained_input_size(ckpt), trained_views(ckpt)
    batch = (ckpt.get("config") or {}).get("eval_batch_size", 256)
    data_dir = run.cfg.get("data_dir") or (run.config.get("data") or {}).get("dir")
    if data_dir and not Path(data_dir).is_dir():
        data_dir = None
    mnist = load_mnist(resolve_data_dir(data_dir))
    images, labels = mnist.test_images, mnist.test_labels.long()
    with torch.inference_mode():
        probs = torch.cat([log_probs(model, images[i:i + batch].unsqueeze(1), size, views).exp()
                           for i in range(0, len(labels), batch)])
    return Predictions(images, labels, probs, ckpt_path.name)


def plot_confusion(pred: Predictions, out: Path) -> bytes:
    import torch

    plt = _pyplot()
    matrix = torch.zeros(10, 10, dtype=torch.long)
    predicted = pred.probs.argmax(1)
    matrix.index_put_((pred.labels, predicted), torch.ones_like(predicted), accumulate=True)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    shown = torch.log1p(matrix.float()).numpy()
    ax.imshow(shown, cmap="Blues")
    for t in range(10):
        for p in range(10):
            n = int(matrix[t, p])
            if n:
                ax.text(p, t, str(n), ha="center", va="center", fontsize=7,
                        color="white" if t == p else ("crimson" if n else "black"))
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"Test confusion matrix ({int((predicted != pred.labels).sum())} errors, {pred.checkpoint})")
    ax.grid(False)
    return _save(fig, out)


def plot_worst(pred: Predictions, out: Path, count: int = 24) -> bytes:
    import torch

    plt = _pyplot()
    predicted = pred.probs.argmax(1)
    wrong = torch.nonzero(predicted != pred.labels).flatten()
    confidence = pred.probs[wrong, predicted[wrong]]
    order = wrong[torch.argsort(confidence, descending=True)][:count]
    cols = 8
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.35))
    axes = axes.flatten() if hasattr(axes, "flatten") else [axes]
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, order.tolist()):
        ax.imshow(pred.images[i].numpy(), cmap="gray")
        ax.set_title(f"{int(pred.labels[i])}→{int(predicted[i])} {100 * float(pred.probs[i, predicted[i]]):.0f}%",
                     fontsize=7, color="crimson")
    fig.suptitle("Most confident test mistakes (true→predicted, confidence)", fontsize=9)
    if not len(order):
        fig.text(0.5, 0.5, "no mistakes", ha="center")
    return _save(fig, out)


# ---------------------------------------------------------------------------------- html
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}
.banner{background:#fff4d6;border:1px solid #e6c200;padding:8px 12px;border-radius:4px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:130px}
.card .k{color:#666;font-size:11px;text-transform:uppercase;letter-spacing:.04em}.card .v{font-size:18px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f6f6f6}td.l,th.l{text-align:left} pre{background:#f8f8f8;padding:8px;overflow:auto;font-size:11px}
.good{color:#11772d}.bad{color:#b00020}
"""


def _img(data: bytes, alt: str, name: str) -> str:
    return (f'<img alt="{html.escape(alt)}" data-plot="{name}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _fmt(v, spec=".2f", suffix=""):
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def peek_label(target: float) -> str:
    return f"first epoch with test >= {target:.2f}% (peeking, not a decision)"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def render(run: Run, plots: dict[str, bytes], note: str = "") -> str:
    cfg, device = run.cfg, run.config.get("device", {})
    cloud = run.config.get("cloud") or {}
    where = device.get("name", "?")
    if cloud.get("instance_type"):
        where += f" on {cloud['instance_type']}"
    cards = [
        ("model", f"{cfg.get('model', '?')}"),
        ("params", f"{(run.config.get('model') or {}).get('params', 0):,}"),
        ("test accuracy", _fmt(run.test_acc, suffix="%")),
        ("delivered", run.weights),
        ("val accuracy", _fmt((run.result or {}).get("val_acc"), suffix="%")),
        (peek_label(run.target), run.test_peek),
        ("epochs", f"{len(run.rows)} / {cfg.get('epochs', '?')}"),
        ("wall time", _duration(run.seconds)),
    ]
    if run.cost is not None:
        source = cloud.get("price_source")
        cards.append(("est. cost", f"${run.cost:.3f}" + (f" ({source})" if source else "")))
    card_html = "".join(f'<div class="card"><div class="k">{html.escape(k)}</div>'
                        f'<div class="v" data-field="{html.escape(k)}">{html.escape(str(v))}</div></div>'
                        for k, v in cards)
    banner = ""
    if run.partial:
        banner = (f'<div class="banner" data-partial="1"><b>Partial report</b>: this run is '
                  f'<b>{html.escape(run.status)}</b> after {len(run.rows)} of {cfg.get("epochs", "?")} epochs. '
                  f'Regenerate with <code>mnist-cloud report {html.escape(str(run.path))}</code>.</div>')
    if note:
        banner += f'<div class="banner">{html.escape(note)}</div>'

    head = ("<tr><th>epoch</th><th>train loss</th><th>train acc</th><th>val loss</th><th>val acc</th>"
            "<th>test loss</th><th>test acc</th><th>lr</th><th>seconds</th><th>img/s</th></tr>")
    body = "".join(
        f"<tr><td>{r['epoch']}</td><td>{_fmt(r.get('train_loss'), '.4f')}</td><td>{_fmt(r.get('train_acc'))}</td>"
        f"<td>{_fmt(r.get('val_loss'), '.4f')}</td><td>{_fmt(r.get('val_acc'))}</td>"
        f"<td>{_fmt(r.get('test_loss'), '.4f')}</td>"
        f"<td class=\"{'good' if (r.get('test_acc') or 0.0) >= run.target else ''}\">{_fmt(r.get('test_acc'))}</td>"
        f"<td>{_fmt(r.get('lr'), '.5f')}</td><td>{_fmt(r.get('seconds'), '.1f')}</td>"
        f"<td>{_fmt(r.get('img_per_s'), ',.0f')}</td></tr>" for r in run.rows)
    config_rows = "".join(f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(json.dumps(v))}</td></tr>'
                          for k, v in cfg.items())
    git = run.config.get("git") or {}
    env = {
        "torch": run.config.get("torch"), "python": run.config.get("python"),
        "git SHA": git.get("sha") or "unknown", "working tree": "dirty" if git.get("dirty") else "clean",
        "device": where, "host": run.config.get("host"), "AMP": device.get("amp") or "off",
        "channels_last": device.get("channels_last"), "started": run.config.get("started"),
        "finished": run.config.get("finished") or "-", "status": run.status,
        "data": json.dumps(run.config.get("data")),
    }
    if cloud:
        priced_by = f", {cloud['price_source']}" if cloud.get("price_source") else ""
        priced = f"${cloud.get('price_per_hour')}/h{priced_by}"
        env["instance"] = f"{cloud.get('name')} {cloud.get('instance_type')} ({priced})"
    env_rows = "".join(f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(str(v))}</td></tr>'
                       for k, v in env.items())
    summary = (run.path / rd.SUMMARY).read_text() if (run.path / rd.SUMMARY).exists() else "(no summary.txt)"
    titles = {"loss": "train vs validation loss", "accuracy": "train vs validation accuracy",
              "lr": "learning-rate schedule", "confusion": "test confusion matrix",
              "worst": "most confident test mistakes"}
    figures = "".join(_img(data, titles.get(name, name), name) for name, data in plots.items()
                      if name in ("loss", "accuracy", "lr", "confusion"))
    worst = _img(plots["worst"], titles["worst"], "worst") if "worst" in plots else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(run.run_id)} · mnist-cloud report</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(run.run_id)}</h1>
<p class="sub">{html.escape(cfg.get('model', '?'))} on {html.escape(where)} · host {html.escape(str(run.config.get('host')))}
 · {html.escape(str(run.config.get('started')))}</p>
{banner}
<div class="cards">{card_html}</div>
<h2>Curves</h2><div class="grid">{figures}</div>
<h2>Mistakes</h2>{worst or '<p>(no test predictions: ' + html.escape(note or 'unavailable') + ')</p>'}
<h2>Per epoch</h2><p class="sub">The same numbers as metrics.jsonl. Validation drives best.pt, --target and early
stopping. The test columns are filled only with --test-every-epoch and decide nothing; the test accuracy above is the
delivered weights' ({html.escape(rd.MODEL)}), tested once at the end.</p>
<table id="epochs">{head}{body}</table>
<h2>Layers</h2><pre>{html.escape(summary)}</pre>
<h2>Config</h2><table>{config_rows}</table>
<h2>Environment</h2><table>{env_rows}</table>
</body></html>
"""


def write_report(path: str | Path, predictions: bool = True) -> Path:
    """(Re)generate report.html and plots/*.png in a run directory; returns the report's path."""
    run = load_run(path)
    if not run.rows:
        raise UserError(f"{run.path} has no finished epoch yet (empty metrics.jsonl); nothing to report")
    plots_dir = run.path / PLOTS
    plots = {
        "loss": plot_loss(run, plots_dir / "loss.png"),
        "accuracy": plot_accuracy(run, plots_dir / "accuracy.png"),
        "lr": plot_lr(run, plots_dir / "lr.png"),
    }
    note = ""
    if predictions:
        try:
            pred = test_predictions(run)
            plots["confusion"] = plot_confusion(pred, plots_dir / "confusion.png")
            plots["worst"] = plot_worst(pred, plots_dir / "worst.png")
        except UserError as e:
            note = f"confusion matrix and mistakes skipped: {e}"
    out = run.path / REPORT
    runspec.atomic_write(out, render(run, plots, note).encode())
    return out


# ---------------------------------------------------------------------------------- compare
def compare_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One record per run: what the table and the page show, under the keys `compare --json` prints
    (docs/reference.md)."""
    return [{
        "run_id": r.run_id, "path": str(r.path), "model": r.cfg.get("model"),
        "params": (r.config.get("model") or {}).get("params"), "epochs": len(r.rows), "test_acc": r.test_acc,
        "delivered": r.weights, "target_acc": r.target, "tested_each_epoch": r.tested_each_epoch,
        "first_epoch_at_target": runspec.first_epoch_at_target(r.rows, r.target) if r.tested_each_epoch else None,
        "seconds": r.seconds, "cost_usd": r.cost, "price_source": (r.config.get("cloud") or {}).get("price_source"),
        "status": r.status,
    } for r in runs]


def compare_cells(r: dict[str, Any]) -> list[str]:
    """A record's cells: run, model, params, epochs, test, delivered, peek, time, cost."""
    peek = "n/a" if not r["tested_each_epoch"] else \
        "not reached" if r["first_epoch_at_target"] is None else f"epoch {r['first_epoch_at_target']}"
    return [r["run_id"], r["model"] or "?", f"{r['params']:,}" if r["params"] else "?", str(r["epochs"]),
            _fmt(r["test_acc"], suffix="%"), r["delivered"], peek, _duration(r["seconds"]),
            "-" if r["cost_usd"] is None else f"${r['cost_usd']:.3f}"]


def compare_table(rows: list[dict[str, Any]]) -> str:
    header = ["run", "model", "params", "epochs", "test", "delivered", f"test>={DEFAULT_TARGET:.2f}% (peek)", "time",
              "cost"]
    return "\n".join(runspec.table(header, [compare_cells(r) for r in rows]))


def write_compare(paths: list[str | Path], out: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """compare.html at `out` (the overlaid curves beside it), and the runs' records (compare_rows)."""
    runs = [load_run(p) for p in paths]
    if len(runs) < 2:
        raise UserError("compare needs at least two run directories")
    empty = [str(r.path) for r in runs if not r.rows]
    if empty:
        raise UserError(f"no finished epoch in {', '.join(empty)}; nothing to compare")
    plt = _pyplot()
    out = Path(out)
    plots = {}
    curves = (("val_acc", "Validation accuracy", "accuracy (%)"),
              ("test_acc", "Test accuracy per epoch (--test-every-epoch; peeking)", "accuracy (%)"),
              ("train_loss", "Training loss", "cross-entropy"), ("val_loss", "Validation loss", "cross-entropy"))
    for key, title, ylabel in curves:
        if key == "test_acc" and not any(r.tested_each_epoch for r in runs):
            continue  # tested once at the end: the table has that number
        if not any(_series(r.rows, key)[0] for r in runs):
            continue  # no run has it (the default recipe holds out no validation set): no empty plot
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for r in runs:
            x, y = _series(r.rows, key)
            if x:
                ax.plot(x, y, marker="o", ms=3, label=f"{r.cfg.get('model')} · {r.run_id}")
        if key.endswith("acc"):
            ax.axhline(DEFAULT_TARGET, color="crimson", lw=1, ls=":", label=f"{DEFAULT_TARGET:.2f}%")
            values = [v for r in runs for v in _series(r.rows, key)[1]] or [DEFAULT_TARGET]
            ax.set_ylim(max(0.0, min(min(values), DEFAULT_TARGET - 1.0) - 0.3), 100.05)
        else:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=7)
        plots[key] = _save(fig, out.parent / f"{out.stem}-{key}.png")
    rows = compare_rows(runs)
    table = "".join("<tr>" + "".join(f"<td class=\"l\">{html.escape(str(v))}</td>"
                                     for v in (*compare_cells(r), r["status"])) + "</tr>" for r in rows)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mnist-cloud compare</title>
<style>{CSS}</style></head><body><h1>Comparing {len(runs)} runs</h1>
<p class="sub">test: the delivered weights' (model.pt) test accuracy, from result.json. The first epoch with test
&gt;= {DEFAULT_TARGET:.2f}% needs --test-every-epoch and is a peek at the test set, not a decision.</p>
<table id="compare"><tr><th class="l">run</th><th class="l">model</th><th class="l">params</th><th class="l">epochs</th>
<th class="l">test</th><th class="l">delivered</th><th class="l">{html.escape(peek_label(DEFAULT_TARGET))}</th>
<th class="l">time</th><th class="l">cost</th><th class="l">status</th></tr>{table}</table>
<div class="grid">{''.join(_img(d, k, k) for k, d in plots.items())}</div></body></html>
"""
    runspec.atomic_write(out, page.encode())
    return out, rows
