#!/usr/bin/env python3
"""Accuracy and speed of our recipes over several seeds, against the seed projects' pipeline.

    python scripts/benchmark.py                      # 3 seeds x (net8k, net20k) + throughput + seed pipeline
    python scripts/benchmark.py --seeds 1 --recipes net8k --seed-pipeline throughput

For every (recipe, seed) it runs `python -m trainer train` in a fresh process and reads its
metrics.jsonl: epochs and seconds to 99.40% test accuracy, final and best test accuracy, params.
The test set is only read here, to report; training decisions use validation.

The seed-style pipeline is what the seed projects ran: a torchvision DataLoader over PIL images with
RandomRotation(7), ToTensor and Normalize, batch 128, on the same net. Its throughput is measured
side by side with ours, and `--seed-pipeline full` also trains it (seed 001's net and recipe) until
it reaches 99.40% on test, for the time-to-accuracy comparison.

Run it alone on the machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET = 99.40

# The recipes benchmarked: `python -m trainer train` flags on top of the defaults.
RECIPES = {
    "net8k": [],  # the defaults are the under-8k recipe
    "net20k": ["--model", "net20k"],  # + its recipe (ModelSpec.recipe): rotate 10, translate 0.1, scale 0.1
}


def time_to_target(rows: list[dict], target: float = TARGET) -> tuple[int | None, float | None]:
    """(first epoch whose test accuracy >= target, seconds elapsed by then) or (None, None)."""
    for r in rows:
        if r["test_acc"] >= target:
            return r["epoch"], r["elapsed"]
    return None, None


def run_recipe(name: str, seed: int, out_dir: Path, extra: list[str]) -> dict:
    run_id = f"bench-{name}-s{seed}"
    cmd = [sys.executable, "-m", "trainer", "train", *RECIPES[name], "--seed", str(seed), "--run-id", run_id,
           "--out-dir", str(out_dir), "--no-progress", *extra]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    run_dir = out_dir / run_id
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    epoch, seconds = time_to_target(rows)
    return {"recipe": name, "seed": seed, "params": config["model"]["params"], "epochs": len(rows),
            "epoch_to_target": epoch, "seconds_to_target": seconds, "final_test": rows[-1]["test_acc"],
            "best_test": max(r["test_acc"] for r in rows), "train_seconds": rows[-1]["elapsed"],
            "process_seconds": wall, "img_per_s": statistics.median(r["img_per_s"] for r in rows)}


# ---------------------------------------------------------------- the seed projects' pipeline
def seed_loaders(data_dir: str | None, seed: int, batch_size: int = 128, workers: int = 2):
    """torchvision-MNIST-style datasets: uint8 array -> PIL image per item -> transforms."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from trainer.data import load_mnist, split_indices
    from trainer.fetch import resolve_data_dir

    mnist = load_mnist(resolve_data_dir(data_dir))
    train_idx, val_idx = split_indices(60000, 10000, seed)
    norm = [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    train_tf = transforms.Compose([transforms.RandomRotation(7), *norm])
    eval_tf = transforms.Compose(norm)

    class PilMnist(torch.utils.data.Dataset):
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i].numpy(), mode="L")), int(self.labels[i])

    def loader(images, labels, tf, shuffle):
        return torch.utils.data.DataLoader(PilMnist(images, labels, tf), batch_size=batch_size, shuffle=shuffle,
                                           num_workers=workers, persistent_workers=workers > 0,
                                           generator=torch.Generator().manual_seed(seed))

    return (loader(mnist.train_images[train_idx], mnist.train_labels[train_idx], train_tf, True),
            loader(mnist.train_images[val_idx], mnist.train_labels[val_idx], eval_tf, False),
            loader(mnist.test_images, mnist.test_labels, eval_tf, False))


def seed_pipeline_run(data_dir: str | None, seed: int, max_epochs: int, workers: int) -> dict:
    """Seed 001's net and recipe (SGD Nesterov, OneCycle max_lr 0.1, wd 1e-4) on the seed pipeline."""
    import torch
    import torch.nn.functional as F

    from trainer.models import build_model, count_params

    torch.manual_seed(seed)
    train, val, test = seed_loaders(data_dir, seed, workers=workers)
    model = build_model("seed001")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.95, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, epochs=max_epochs, steps_per_epoch=len(train))

    def evaluate(loader):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(1) == y).sum().item()
        model.train()
        return 100.0 * correct / len(loader.dataset)

    rows, started = [], time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        train_s = time.perf_counter() - t0
        row = {"epoch": epoch, "val_acc": evaluate(val), "test_acc": evaluate(test),
               "train_seconds": train_s, "elapsed": time.perf_counter() - started}
        rows.append(row)
        print(f"  seed pipeline epoch {epoch}: val {row['val_acc']:.2f}% test {row['test_acc']:.2f}% "
              f"({train_s:.0f}s train, {row['elapsed']:.0f}s total)", flush=True)
        if row["test_acc"] >= TARGET:
            break
    epoch, seconds = time_to_target(rows)
    return {"recipe": "seed pipeline (seed001)", "seed": seed, "params": count_params(model), "epochs": len(rows),
            "epoch_to_target": epoch, "seconds_to_target": seconds, "final_test": rows[-1]["test_acc"],
            "best_test": max(r["test_acc"] for r in rows),
            "seconds_per_epoch": statistics.median(r["train_seconds"] for r in rows)}


def throughput(model_name: str, data_dir: str | None, steps: int, workers: int) -> dict:
    """Training img/s, batch 128, rotation 7: our device-resident pipeline vs the seed DataLoader."""
    import torch
    import torch.nn.functional as F

    from trainer.augment import AugmentConfig, augment
    from trainer.data import load_mnist, make_splits, normalize
    from trainer.fetch import resolve_data_dir
    from trainer.models import build_model

    def timed(batches, channels_last: bool) -> float:
        model = build_model(model_name)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        seen, start = 0, None
        for i, (x, y) in enumerate(batches()):
            if i == 5:  # warm-up excluded
                seen, start = 0, time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += y.shape[0]
            if i == steps + 5:
                break
        return seen / (time.perf_counter() - start)

    data = make_splits(load_mnist(resolve_data_dir(data_dir)), 10000, 1, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    aug = AugmentConfig(rotate=7)

    def ours():
        while True:
            perm = torch.randperm(len(data.train), generator=gen)
            for i in range(0, len(perm) - 127, 128):
                idx = perm[i:i + 128]
                x = augment(data.train.images[idx].float().div_(255), aug, gen)
                yield normalize(x).contiguous(memory_format=torch.channels_last), data.train.labels[idx]

    def seeds():
        train, _, _ = seed_loaders(data_dir, 1, workers=workers)
        while True:
            yield from train

    return {"model": model_name, "ours_img_per_s": timed(ours, True), "seed_img_per_s": timed(seeds, False)}


def fmt(v, spec=".2f", none="not reached"):
    return none if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: %(default)s)")
    p.add_argument("--seed-pipeline", choices=("full", "throughput", "skip"), default="full",
                   help="full: also train the seed pipeline to 99.40%% (about 20 min); default: %(default)s")
    p.add_argument("--seed-epochs", type=int, default=19, help="seed pipeline epoch budget (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="seed pipeline DataLoader workers (default: %(default)s)")
    p.add_argument("--throughput-steps", type=int, default=60, help="timed steps per pipeline (default: %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST IDX directory")
    p.add_argument("--out", default=None, help="directory for the runs and benchmark.json (default: a temp dir)")
    p.add_argument("--extra", default="", help="extra trainer flags for every recipe run, e.g. '--epochs 10'")
    args = p.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="mnist-cloud-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split() + (["--data-dir", args.data_dir] if args.data_dir else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"runs": [], "throughput": [], "seed_pipeline": None, "host": os.uname().nodename}

    for name in [r for r in args.recipes.split(",") if r]:
        for seed in seeds:
            report["runs"].append(run_recipe(name, seed, out / "runs", extra))
            (out / "benchmark.json").write_text(json.dumps(report, indent=2))

    if args.seed_pipeline != "skip":
        for model_name in ("seed001", "net8k"):
            print(f"throughput: {model_name}", flush=True)
            report["throughput"].append(throughput(model_name, args.data_dir, args.throughput_steps, args.workers))
    if args.seed_pipeline == "full":
        print("seed pipeline: training seed001 until 99.40% test", flush=True)
        report["seed_pipeline"] = seed_pipeline_run(args.data_dir, seeds[0], args.seed_epochs, args.workers)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))

    # ---------------------------------------------------------------- tables
    print(f"\nper run (target {TARGET:.2f}% test accuracy):\n")
    print("| recipe | seed | params | epochs to 99.40% | seconds to 99.40% | final test | best test | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['recipe']} | {r['seed']} | {r['params']:,} | {fmt(r['epoch_to_target'], 'd')} | "
              f"{fmt(r['seconds_to_target'], '.0f')} | {r['final_test']:.2f}% | {r['best_test']:.2f}% | "
              f"{r['img_per_s']:,.0f} |")
    print("\nover seeds (min / median):\n")
    print("| recipe | final test min | final test median | seeds reaching 99.40% | seconds to 99.40% median |")
    print("|---|---|---|---|---|")
    by_recipe: dict[str, list] = {}
    for r in report["runs"]:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for name, rows in by_recipe.items():
        finals = [r["final_test"] for r in rows]
        reached = [r["seconds_to_target"] for r in rows if r["seconds_to_target"] is not None]
        median_s = fmt(statistics.median(reached), ".0f") if len(reached) == len(rows) else "n/a (not all reached)"
        print(f"| {name} | {min(finals):.2f}% | {statistics.median(finals):.2f}% | {len(reached)}/{len(rows)} | "
              f"{median_s} |")
    if report["throughput"]:
        print("\ntraining throughput, batch 128, RandomRotation(7), same net:\n")
        print("| net | ours (img/s) | seed DataLoader + PIL (img/s) | speed-up |")
        print("|---|---|---|---|")
        for t in report["throughput"]:
            print(f"| {t['model']} | {t['ours_img_per_s']:,.0f} | {t['seed_img_per_s']:,.0f} | "
                  f"{t['ours_img_per_s'] / t['seed_img_per_s']:.1f}x |")
    sp = report["seed_pipeline"]
    if sp:
        print(f"\nseed pipeline (seed001 net, seed {sp['seed']}): {sp['seconds_per_epoch']:.0f} s/epoch, "
              f"99.40% at epoch {fmt(sp['epoch_to_target'], 'd')} after {fmt(sp['seconds_to_target'], '.0f')} s")
        ours = [r["seconds_to_target"] for r in report["runs"] if r["recipe"] == "net8k"]
        if sp["seconds_to_target"] and ours and all(s is not None for s in ours):
            print(f"time to 99.40%: seed pipeline {sp['seconds_to_target']:.0f} s vs net8k median "
                  f"{statistics.median(ours):.0f} s -> {sp['seconds_to_target'] / statistics.median(ours):.1f}x shorter "
                  f"(slowest seed: {sp['seconds_to_target'] / max(ours):.1f}x)")
    print(f"\nruns and benchmark.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
