"""--input-size S beyond training: the layer table and MACs are counted at S, and a checkpoint is
evaluated (evaluate, predict, the report's confusion matrix) on the centre SxS pixels it was trained on."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trainer import inference
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.cli import main
from runspec.config import TrainConfig
from trainer.errors import UserError
from trainer.models import REGISTRY
from trainer.summary import count_macs, layer_table


@pytest.mark.parametrize("name", ["net8k", "net20k", "seed002-gap", "seed003"])
def test_macs_per_image_shrink_with_the_input_size(name):
    model = REGISTRY[name].build()
    at24, at28 = layer_table(model, 24), layer_table(model, 28)
    assert [r.params for r in at24] == [r.params for r in at28]  # the same layers, fewer pixels
    assert at24[0].output_shape[-1] == at28[0].output_shape[-1] - 4
    assert 0 < count_macs(model, 24) < count_macs(model, 28) == count_macs(model)


def test_a_model_that_cannot_take_the_input_size_is_a_user_error():
    model = REGISTRY["seed001"].build()  # its fixed 4x4 average pool needs 28 px
    with pytest.raises(UserError, match="cannot take 24x24 images.*--input-size"):
        layer_table(model, 24)
    assert count_macs(model) > 0


def test_models_summary_and_list_count_at_the_input_size(capsys):
    net8k = REGISTRY["net8k"].build()
    assert main(["models", "--summary", "net8k", "--input-size", "24"]) == 0
    assert f"MACs per image: {count_macs(net8k, 24):,}\n" in capsys.readouterr().out
    assert main(["models", "--summary", "net8k"]) == 0
    assert f"MACs per image: {count_macs(net8k, 28):,}\n" in capsys.readouterr().out
    assert main(["models", "--json", "--input-size", "24"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["net8k"]["macs"] == count_macs(net8k, 24)
    assert rows["seed001"]["macs"] is None  # listed, but it cannot take 24 px
    assert main(["models", "--summary", "seed001", "--input-size", "24"]) == 2
    assert "cannot take 24x24 images" in capsys.readouterr().err
    assert main(["models", "--input-size", "25"]) == 2
    assert "--input-size must be an even number" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run24(tmp_path_factory, mnist_dir):
    """A 2-step run of net8k at --input-size 24 (it need not learn: only its sizes are checked)."""
    from trainer.train import fit

    tmp = tmp_path_factory.mktemp("s24")
    cfg = TrainConfig(data_dir=str(mnist_dir), out_dir=str(tmp / "runs"), run_id="s24", input_size=24, epochs=1,
                      max_steps=2, train_limit=512, eval_limit=256, progress=False, threads=1, report=False,
                      device="cpu")
    fit(cfg)
    return tmp / "runs" / "s24"


def test_summary_and_config_count_macs_at_the_runs_input_size(run24):
    macs = count_macs(REGISTRY["net8k"].build(), 24)
    assert f"MACs per image: {macs:,}\n" in (run24 / "summary.txt").read_text()
    assert json.loads((run24 / "config.json").read_text())["model"]["macs"] == macs


@pytest.fixture
def seen(monkeypatch):
    """The [h, w] of every batch the loaded model is given."""
    sizes: list[tuple[int, int]] = []
    load = inference.load_model

    def spying_load_model(*args, **kwargs):
        model, ckpt = load(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, inputs: sizes.append(tuple(inputs[0].shape[-2:])))
        return model, ckpt

    monkeypatch.setattr(inference, "load_model", spying_load_model)
    return sizes


def test_evaluate_and_predict_crop_to_the_checkpoints_input_size(run24, seen, mnist_dir, tmp_path, capsys):
    from PIL import Image

    from trainer.data import load_mnist

    assert main(["evaluate", str(run24), "--data-dir", str(mnist_dir), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 10000
    assert seen and set(seen) == {(24, 24)}
    seen.clear()
    png = tmp_path / "digit.png"
    Image.fromarray(load_mnist(mnist_dir).test_images[0].numpy()).save(png)
    assert main(["predict", str(run24), str(png), "--device", "cpu"]) == 0
    assert seen == [(24, 24)]


def test_the_reports_predictions_crop_to_the_checkpoints_input_size(run24, seen):
    from trainer.report import load_run, test_predictions

    pred = test_predictions(load_run(run24))
    assert pred.probs.shape == (10000, 10) and pred.images.shape[-2:] == (28, 28)  # plots show the whole digit
    assert seen and set(seen) == {(24, 24)}


def test_a_checkpoint_from_before_input_size_is_evaluated_at_28(run24, seen, mnist_dir, tmp_path, capsys):
    state = load_checkpoint(run24 / "best.pt")
    state.pop("format")
    del state["config"]["input_size"]  # as saved before --input-size existed
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    assert inference.trained_input_size(load_checkpoint(old)) == 28
    assert main(["evaluate", str(old), "--data-dir", str(mnist_dir), "--device", "cpu"]) == 0
    assert set(seen) == {(28, 28)}
    assert inference.trained_input_size({}) == 28  # no config at all


def test_training_a_model_at_a_size_it_cannot_take_stops_before_the_run_dir(tmp_path, mnist_dir):
    from trainer.train import fit

    cfg = TrainConfig(model="seed001", input_size=24, data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"),
                      train_limit=512, progress=False, threads=1, report=False, device="cpu")
    with pytest.raises(UserError, match="cannot take 24x24 images"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()


def test_progressive_resizing_trains_the_early_epochs_smaller_and_evaluates_at_the_input_size(tmp_path, mnist_dir,
                                                                                              monkeypatch):
    """--early-size 20 --early-epochs 1 of 2: the first epoch's batches are 20 px, the second's and every
    evaluation's 24 px (all that the model is given); config.json records it. A size the model cannot take
    is one line before any training."""
    from trainer.engine import Engine
    from trainer.train import fit

    given: list[int] = []  # the side of each batch the model is given, in order (training and evaluation)
    model_input = Engine.model_input
    monkeypatch.setattr(Engine, "model_input",
                        lambda self, x: given.append((out := model_input(self, x)).shape[-1]) or out)
    cfg = TrainConfig(data_dir=str(mnist_dir), out_dir=str(tmp_path), run_id="early", input_size=24, epochs=2,
                      early_size=20, early_epochs=1, max_steps=2, train_limit=512, eval_limit=256, progress=False,
                      threads=1, report=False, device="cpu")
    fit(cfg)
    assert given[:2] == [20, 20] and len(given) > 4 and set(given[2:]) == {24}, given
    config = json.loads((tmp_path / "early" / "config.json").read_text())
    assert (config["config"]["early_size"], config["config"]["early_epochs"]) == (20, 1)
    given.clear()
    with pytest.raises(UserError, match=r"cannot take 16x16 images .*try a larger --early-size"):
        fit(dataclasses.replace(cfg, run_id="early16", early_size=16))
    assert given == []
