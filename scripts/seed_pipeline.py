#!/usr/bin/env python3
"""The seed pipeline: what the seed projects ran, as one program, the baseline scripts/benchmark.py
measures our recipes against.

    python scripts/seed_pipeline.py                 # seed001 until 99.40% test: about 20 min on 2 cores
    python scripts/seed_pipeline.py --dry-run       # one batch, one epoch: does it run at all

Seed 001's net (the zoo's `seed001`) and recipe: SGD with Nesterov momentum 0.95 and weight decay 1e-4,
OneCycle to a peak LR of 0.1, batch 128, on a torchvision-style DataLoader that turns every uint8 image
into a PIL image and rotates it by up to 7 degrees, with 2 workers. As the seed projects did, it tests
after every epoch and stops once the test accuracy reaches 99.40%: that stop, and its seconds, are the
seed projects' own measure. Our trainer never decides anything on the test set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the script runs from a checkout: trainer/ is beside it, not installed

import runspec  # noqa: E402
from trainer.data import load_mnist, split_indices  # noqa: E402
from trainer.fetch import resolve_data_dir  # noqa: E402
from trainer.models import count_params, seed001  # noqa: E402

TARGET = runspec.TARGET


class Net(nn.Sequential):
    """Seed 001's layer table, as trainer/models.py rebuilds it: four Conv-ReLU-BN-Dropout blocks, two
    max-pools, an unpadded conv to 5x5, AvgPool2d(5) as GAP and a 1x1 conv head (23,760 parameters)."""

    def __init__(self):
        super().__init__(*seed001())


class PilMnist(torch.utils.data.Dataset):
    """torchvision-MNIST-style: uint8 array -> a PIL image per item -> transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i].numpy(), mode="L")), int(self.labels[i])


def loaders(data_dir: str | None, seed: int, batch_size: int = 128, workers: int = 2):
    """(train, val, test) DataLoaders: the trainer's 50,000/10,000 split of the training set for `seed`,
    RandomRotation(7) on train only."""
    mnist = load_mnist(resolve_data_dir(data_dir))
    train_idx, val_idx = split_indices(60000, 10000, seed)
    norm = [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    train_tf = transforms.Compose([transforms.RandomRotation(7), *norm])
    eval_tf = transforms.Compose(norm)

    def loader(images, labels, tf, shuffle):
        return torch.utils.data.DataLoader(PilMnist(images, labels, tf), batch_size=batch_size, shuffle=shuffle,
                                           num_workers=workers, persistent_workers=workers > 0,
                                           generator=torch.Generator().manual_seed(seed))

    return (loader(mnist.train_images[train_idx], mnist.train_labels[train_idx], train_tf, True),
            loader(mnist.train_images[val_idx], mnist.train_labels[val_idx], eval_tf, False),
            loader(mnist.test_images, mnist.test_labels, eval_tf, False))


def train(model: nn.Module, loader, optimizer, scheduler, dry_run: bool = False) -> None:
    """One epoch; the OneCycle schedule steps after every batch."""
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if dry_run:
            break


def test(model: nn.Module, loader) -> float:
    """Accuracy in % over the loader's whole dataset."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return 100.0 * correct / len(loader.dataset)


def run(data_dir: str | None, seed: int, max_epochs: int, workers: int, dry_run: bool = False) -> dict:
    """Seed 001's net and recipe on the seed pipeline, tested after every epoch until TARGET; the clock
    starts at its first batch. Returns the epochs' rows and their summary."""
    torch.manual_seed(seed)
    train_loader, val_loader, test_loader = loaders(data_dir, seed, workers=workers)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.95, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=max_epochs,
                                                    steps_per_epoch=len(train_loader))
    rows, started = [], time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        train(model, train_loader, optimizer, scheduler, dry_run)
        train_s = time.perf_counter() - t0
        row = {"epoch": epoch, "val_acc": test(model, val_loader), "test_acc": test(model, test_loader),
               "train_seconds": train_s, "img_per_s": len(train_loader.dataset) / train_s,
               "seconds": time.perf_counter() - t0, "elapsed": time.perf_counter() - started}
        rows.append(row)
        print(f"  seed pipeline epoch {epoch}: val {row['val_acc']:.2f}% test {row['test_acc']:.2f}% "
              f"({train_s:.0f}s train, {row['elapsed']:.0f}s total)", flush=True)
        if row["test_acc"] >= TARGET or dry_run:  # the seed projects' stop: on the test set
            break
    epoch_to_target = runspec.first_epoch_at_target(rows, TARGET)
    return {"model": "seed001", "seed": seed, "workers": workers,
            "params": count_params(model), "epochs": len(rows), "epoch_to_target": epoch_to_target,
            "seconds_to_target": rows[epoch_to_target - 1]["elapsed"] if epoch_to_target is not None else None,
            "final_test": rows[-1]["test_acc"],
            "best_test": max(r["test_acc"] for r in rows),
            "seconds_per_epoch": statistics.median(r["seconds"] for r in rows),
            "train_seconds_per_epoch": statistics.median(r["train_seconds"] for r in rows),
            "img_per_s": statistics.median(r["img_per_s"] for r in rows), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="seed of the weights, the split and the batch order "
                                                       "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=19,
                   help="epoch budget, the OneCycle schedule's length (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"),
                   help="MNIST IDX directory (default: $MNIST_DATA_DIR, else the trainer's choice)")
    p.add_argument("--json", default=None, help="also write the result, every epoch's row included, here "
                                                "(default: none)")
    p.add_argument("--dry-run", action="store_true",
                   help="one batch of one epoch, then the tests: a smoke test, its timings mean nothing (default: off)")
    args = p.parse_args(argv)
    result = run(args.data_dir, args.seed, args.epochs, args.workers, args.dry_run)
    reached = (f"{TARGET:.2f}% test at epoch {result['epoch_to_target']} after {result['seconds_to_target']:.0f} s"
               if result["seconds_to_target"] is not None else
               f"did not reach {TARGET:.2f}% test in {result['epochs']} epochs (best {result['best_test']:.2f}%)")
    print(f"seed pipeline ({result['params']:,} parameters, seed {args.seed}, {args.workers} workers): {reached}; "
          f"{result['seconds_per_epoch']:.0f} s/epoch, {result['img_per_s']:,.0f} img/s")
    if args.json:
        runspec.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
