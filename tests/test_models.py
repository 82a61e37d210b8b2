"""The zoo's constraint checks, as seed 001's CI did, but against what each model claims."""

import pytest
import torch

from trainer.models import REGISTRY, count_params, get_spec, structure_flags
from trainer.errors import UserError
from trainer.summary import count_macs, format_table, layer_table

NAMES = list(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_ten_logits(name):
    model = REGISTRY[name].build().eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].budget])
def test_params_under_claimed_budget(name):
    spec = REGISTRY[name]
    assert count_params(spec.build()) < spec.budget


@pytest.mark.parametrize("name", NAMES)
def test_structure_matches_claims(name):
    spec = REGISTRY[name]
    flags = structure_flags(spec.build())
    claimed = {"batchnorm": spec.batchnorm, "dropout": spec.dropout, "gap": spec.gap, "fc": spec.fc}
    assert flags == claimed


def test_target_nets_have_bn_dropout_gap_and_no_fc():
    for name, budget in (("net8k", 8000), ("net20k", 20000)):
        model = get_spec(name).build()
        assert count_params(model) < budget
        assert structure_flags(model) == {"batchnorm": True, "dropout": True, "gap": True, "fc": False}


@pytest.mark.parametrize("name,expected", [
    ("seed001", 23_760),  # its README states 19,768; its own layer table sums to this
    ("seed003", 10_170),
    ("seed004", 24_552),
])
def test_seed_nets_match_their_layer_tables(name, expected):
    assert count_params(REGISTRY[name].build()) == expected


def test_seed001_is_not_claimed_under_20k():
    spec = REGISTRY["seed001"]
    assert spec.budget is None and "23,760" in spec.note


def test_seed002_ablation_changes_one_thing_per_step():
    flags = [structure_flags(REGISTRY[f"seed002-{s}"].build()) for s in ("relu", "bn", "dropout", "gap")]
    assert [f["batchnorm"] for f in flags] == [False, True, True, True]
    assert [f["dropout"] for f in flags] == [False, False, True, True]
    assert [f["gap"] for f in flags] == [False, False, False, True]


def test_structure_flags_detect_missing_parts():
    from torch import nn

    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert structure_flags(plain) == {"batchnorm": False, "dropout": False, "gap": False, "fc": True}
    # an AvgPool2d that does not reduce to 1x1 is not global average pooling
    local = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AvgPool2d(2), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    assert structure_flags(local)["gap"] is False


def test_layer_table_totals_and_macs():
    model = REGISTRY["seed001"].build()
    rows = layer_table(model)
    assert sum(r.params for r in rows) == count_params(model)
    first = rows[0]
    assert first.name == "Conv2d-1" and first.output_shape == (16, 28, 28) and first.params == 144
    assert first.macs == 16 * 28 * 28 * 9
    assert count_macs(model) == sum(r.macs for r in rows) > 0
    text = format_table(rows)
    assert "Total params: 23,760" in text and "Conv2d-24" in text


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet'.*net8k"):
        get_spec("resnet")


def test_model_recipe_fills_only_the_flags_not_typed():
    import argparse

    from trainer.cli import apply_recipe

    ns = argparse.Namespace(model="net20k", rotate=5.0, translate=0.0, scale=0.0, resume=None)
    apply_recipe(ns, explicit={"model", "rotate"})
    assert (ns.rotate, ns.translate, ns.scale) == (5.0, 0.1, 0.1)
    ns = argparse.Namespace(model="net8k", rotate=7.0, translate=0.0, scale=0.0, resume=None)
    apply_recipe(ns, explicit=set())
    assert (ns.rotate, ns.translate, ns.scale) == (7.0, 0.0, 0.0)  # net8k's recipe keeps the default augmentation


@pytest.mark.parametrize("model,recipe", [(m, r) for m, spec in REGISTRY.items() for r in spec.recipes])
def test_named_recipe_sets_its_flags_and_a_typed_flag_wins(model, recipe):
    from trainer.cli import parse_train_args

    flags = REGISTRY[model].recipe(recipe)
    args, _ = parse_train_args(["--model", model, "--recipe", recipe])
    assert {k: getattr(args, k) for k in flags} == flags
    key = next(iter(flags))
    typed = 3 if isinstance(flags[key], int) else 0.03
    args, _ = parse_train_args(["--model", model, "--recipe", recipe, "--" + key.replace("_", "-"), str(typed)])
    assert getattr(args, key) == typed


def test_the_fast_and_default_recipes_of_net8k_differ_and_a_missing_recipe_is_a_user_error():
    from trainer.cli import parse_train_args

    default, _ = parse_train_args([])
    fast, _ = parse_train_args(["--recipe", "fast"])
    assert fast.epochs < default.epochs and default.input_size == fast.input_size == 24
    with pytest.raises(UserError, match="model seed001 has no recipe 'fast'; choose one of: default"):
        parse_train_args(["--model", "seed001", "--recipe", "fast"])
