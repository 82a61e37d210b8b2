"""Test-time augmentation (`--tta N`) is part of what a run delivers: its views are exactly the shifted
crops, and the run's own test, `evaluate`, `predict` and the report all give the same answer from them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from runspec import UserError
from runspec.config import TrainConfig, parse_train_args
from trainer import inference, tta
from trainer.cli import main
from trainer.data import centre_crop, normalize


def test_each_view_is_the_crop_shifted_by_one_pixel():
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).reshape(2, 1, 28, 28)
    assert torch.equal(tta.shifted_crop(images, 24), centre_crop(images, 24))
    assert torch.equal(tta.shifted_crop(images, 24, -1, 0), images[..., 1:25, 2:26])  # up
    assert torch.equal(tta.shifted_crop(images, 24, 0, 1), images[..., 2:26, 3:27])  # right
    assert torch.equal(tta.shifted_crop(images, 24, 1, -1), images[..., 3:27, 1:25])
    # at the whole 28 px a shifted view runs off the image: that side is black, MNIST's background
    down = tta.shifted_crop(images, 28, 1, 0)
    assert torch.equal(down[..., :27, :], images[..., 1:, :]) and not down[..., 27, :].any()
    assert [o for o in tta.offsets(5)] == [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    assert len(set(tta.offsets(9))) == 9


class Probe(torch.nn.Module):
    """A fixed net whose answer depends on where the digit sits, so that every view counts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(24 * 24, 10)

    def forward(self, x):
        return self.head(x.flatten(1))


def test_the_answer_is_the_mean_softmax_over_the_views():
    model = Probe()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        one = tta.log_probs(model, images, 24, 1, normalize)
        assert torch.allclose(one, F.log_softmax(model(normalize(centre_crop(images, 24))), 1))
        five = tta.log_probs(model, images, 24, 5, normalize)
        by_hand = sum(F.softmax(model(normalize(images[..., 2 + dy:26 + dy, 2 + dx:26 + dx])), 1)
                      for dy, dx in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]) / 5
    assert torch.allclose(five.exp(), by_hand, atol=1e-6)
    assert not torch.allclose(five, one, atol=1e-3)  # the views differ: the probe sees where pixels are


def test_a_class_whose_probability_underflows_in_every_view_has_a_finite_log_probability():
    """A confident net (logit gaps over ~100: early epochs at a high LR) must not write an infinite loss."""
    loud = Probe()
    with torch.no_grad():
        loud.head.weight.mul_(1e4)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        five = tta.log_probs(loud, images, 24, 5, normalize)
    assert torch.isfinite(five).all() and five.min() < -100


def test_a_view_count_the_trainer_does_not_take_is_one_line():
    with pytest.raises(UserError, match=r"--tta: invalid choice: 3 \(choose from 1, 5, 9\)"):
        parse_train_args(["--tta", "3"])  # what the laptop checks before anything is synced
    with pytest.raises(UserError, match=r"--tta takes 1, 5, 9 views, got 4"):
        TrainConfig(tta=4).validate()  # a config.json edited by hand


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory, mnist_dir):
    """A short net8k run that delivers 5 views; the whole 10k test set, so its number is the real one."""
    from trainer.train import fit

    tmp = tmp_path_factory.mktemp("tta")
    cfg = TrainConfig(data_dir=str(mnist_dir), out_dir=str(tmp), run_id="five", input_size=24, epochs=1,
                      train_limit=2048, val_size=0, tta=5, progress=False, threads=1, report=False, device="cpu")
    fit(cfg)
    return tmp / "five"


@pytest.fixture
def passes(monkeypatch):
    """How many images the loaded model is given, over all its forward calls."""
    seen: list[int] = []
    load = inference.load_model

    def counting_load_model(*args, **kwargs):
        model, ckpt = load(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[0]))
        return model, ckpt

    monkeypatch.setattr(inference, "load_model", counting_load_model)
    return seen


def test_the_run_records_its_views_and_evaluate_gives_its_very_number(tta_run, mnist_dir, capsys, passes):
    result = json.loads((tta_run / "result.json").read_text())
    config = json.loads((tta_run / "config.json").read_text())
    assert result["tta"] == config["config"]["tta"] == 5
    args = ["evaluate", str(tta_run), "--data-dir", str(mnist_dir), "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] == 5 and out["images"] == 10000 and sum(passes) == 5 * 10000
    assert out["test_acc"] == result["test_acc"]  # the same views of the same weights in the same batches
    assert out["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)
    assert main(args) == 0
    assert f"test accuracy {result['test_acc']:.2f}%" in capsys.readouterr().out
    passes.clear()
    assert main([*args, "--json", "--tta", "1"]) == 0  # the centre crop alone: another model, another number
    plain = json.loads(capsys.readouterr().out)
    assert plain["tta"] == 1 and sum(passes) == 10000 and plain["test_loss"] != out["test_loss"]


def test_predict_and_the_report_answer_with_the_same_views(tta_run, mnist_dir, tmp_path, capsys, passes):
    from PIL import Image

    from trainer.data import load_mnist
    from trainer.report import load_run, test_predictions

    png = tmp_path / "digit.png"
    Image.fromarray(load_mnist(mnist_dir).test_images[0].numpy()).save(png)
    assert main(["predict", str(tta_run), str(png), "--device", "cpu"]) == 0
    assert "net8k: 5 passes per image (test-time augmentation" in capsys.readouterr().out
    assert passes == [1] * 5
    passes.clear()
    pred = test_predictions(load_run(tta_run))
    result = json.loads((tta_run / "result.json").read_text())
    errors = int((pred.probs.argmax(1) != pred.labels).sum())
    assert sum(passes) == 5 * 10000 and errors == round(100 * (100 - result["test_acc"]))


def test_the_console_says_what_the_recipe_does_that_the_epoch_lines_do_not():
    from trainer.recorder import plan_line

    assert plan_line(TrainConfig(input_size=24, early_size=20, early_epochs=4, tta=5)) == (
        "epochs 1-4 at 20 px, then 24 px (progressive resizing)  |  answers with 5 test-time views (5 passes per image)")
    assert plan_line(TrainConfig(input_size=24, early_size=20, early_epochs=1)).startswith("epoch 1 at 20 px")
    assert plan_line(TrainConfig()) == ""


def test_the_default_recipe_delivers_five_views_and_a_plain_run_one():
    from trainer.cli import parse_train_args as machine_args

    assert machine_args([])[0].tta == 5
    assert machine_args(["--tta", "1"])[0].tta == 1
    assert machine_args(["--model", "net20k"])[0].tta == 1


# ---------------------------------------------------------------- the default recipe's resizing
@pytest.mark.parametrize("typed, expected", [
    ([], (20, 4)),
    (["--epochs", "15"], (20, 6)),  # the recipe's share of the epochs
    (["--epochs", "2"], (20, 1)),
    (["--epochs", "1"], (0, 0)),  # no room: off, rather than an error about flags nobody typed
    (["--input-size", "20"], (0, 0)),
    (["--cuda-graph"], (0, 0)),  # one captured graph, one size
    (["--early-epochs", "0"], (0, 0)),  # the way to turn it off
    (["--early-size", "0"], (0, 0)),
    (["--early-size", "16"], (16, 4)),
    (["--early-size", "16", "--epochs", "5"], (16, 2)),  # the recipe's share, with the size typed
    (["--model", "net20k"], (0, 0)),  # its recipe has none
])
def test_the_recipes_resizing_follows_the_typed_flags_on_the_machine_and_the_laptop(typed, expected):
    from trainer.cli import parse_train_args as on_the_machine

    args = on_the_machine([*typed, "--device", "cpu"])[0]  # a CUDA machine's default would capture instead
    assert (args.early_size, args.early_epochs) == expected
    laptop = parse_train_args(typed)[0]  # what `mnist-cloud train --on` checks before it syncs
    assert (laptop.early_size, laptop.early_epochs) == expected


def test_a_typed_early_flag_the_run_cannot_take_is_still_an_error():
    with pytest.raises(UserError, match=r"--early-epochs must leave at least the last of the 4 epochs"):
        parse_train_args(["--epochs", "4", "--early-epochs", "4"])


def test_on_a_cuda_gpu_the_captured_graph_replaces_the_recipes_resizing(monkeypatch, capsys):
    """One captured step has one input size: the CUDA default keeps the graph and drops the recipe's
    early epochs, and says so; resizing the user typed keeps the eager step."""
    from trainer import device as dev
    from trainer.cli import parse_train_args as on_the_machine

    monkeypatch.setattr(dev, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(dev, "capability", lambda device: (9, 0))
    args = on_the_machine([])[0]
    assert args.cuda_graph and (args.early_size, args.early_epochs) == (0, 0) and args.tta == 5
    assert "--early-size 0 --early-epochs 0" in capsys.readouterr().err
    args = on_the_machine(["--early-epochs", "3"])[0]
    assert not args.cuda_graph and (args.early_size, args.early_epochs) == (20, 3)


def test_check_and_models_say_what_inference_costs(capsys):
    from trainer.summary import count_macs
    from trainer.models import REGISTRY

    macs = count_macs(REGISTRY["net8k"].build(), 24)
    assert main(["check", "net8k", "--input-size", "24"]) == 0  # the size its recipe trains and answers at
    assert f"inference: 5 passes per image (test-time augmentation: the centre crop and 4 one-pixel shifts), " \
           f"{5 * macs:,} MACs per 24x24 image" in capsys.readouterr().out
    assert main(["check", "net8k", "--tta", "1"]) == 0
    assert "inference:" not in capsys.readouterr().out
    assert main(["check", "net20k", "--json"]) == 0  # its recipe answers with the centre crop alone
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] == 1 and out["inference_macs"] == out["macs"]
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["net8k"]["tta"] == 5 and rows["net20k"]["tta"] == rows["seed001"]["tta"] == 1
    assert main(["models"]) == 0
    assert "inference: 5 passes per image" in capsys.readouterr().out
