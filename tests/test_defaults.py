"""Help that tells the truth: every `(default: ...)` in `python -m trainer train --help` (which
`mnist-cloud train --help` prints) is the value a plain run gets, recipe and all."""

from __future__ import annotations

import json
import re

import pytest

from fixtures.cli import run_cli
from runspec.config import TrainConfig, default_recipe
from runspec.recipes import RECIPES, SGD_ONLY
from trainer.cli import DRY_RUN, parse_train_args, train_parser

# "(default: 10 with net8k's recipe; other recipes may differ; 15 without one)" or "(default: 7.0; ...)"
# or, for a None default, what it means: "(default: torch's choice)"
SHOWN = re.compile(r"\(default: (?P<value>[^;)]+?)(?P<recipe> with \S+'s recipe[^;)]*)?(?:;(?P<rest>[^)]*))?\)$")
WITHOUT = re.compile(r" (?P<value>\S+) without one")


def shown_defaults() -> dict[str, re.Match]:
    """Each trainer flag's `(default: ...)`, as its --help prints it."""
    found = {}
    for action in train_parser()._actions:
        if action.dest in {f.name for f in TrainConfig.__dataclass_fields__.values()}:
            match = SHOWN.search(action.help % {"default": action.default})
            assert match, f"--{action.dest}'s help shows no default: {action.help}"
            assert action.help.count("(default:") == 1, f"--{action.dest}'s help shows two defaults: {action.help}"
            found[action.dest] = match
    return found


def test_every_shown_default_is_what_a_plain_run_gets():
    shown = shown_defaults()
    args, _ = parse_train_args(["--device", "cpu"])  # off CUDA, where the CUDA default sets nothing
    recipe = default_recipe()
    assert recipe and {"epochs", "lr"} <= set(recipe)
    for name, match in shown.items():
        value = getattr(args, name)
        unset = TrainConfig.__dataclass_fields__[name].metadata.get("unset")
        if value is None and unset:  # in words, not "None"
            assert match["value"] == unset, f"--{name}: help says {match[0]}"
        elif name != "device":
            assert match["value"] == str(value), f"--{name}: help says {match[0]}"
        assert bool(match["recipe"]) == (name in recipe), f"--{name}: {match[0]}"
        assert bool(match["rest"] and "recipes" in match["rest"]) == any(
            name in r for model in RECIPES.values() for r in model.values()), f"--{name}: {match[0]}"


def test_the_value_without_a_recipe_is_what_a_model_without_one_gets():
    from trainer.models import REGISTRY

    bare = next(name for name in REGISTRY if name not in RECIPES)
    args, _ = parse_train_args(["--device", "cpu", "--model", bare])
    adam, _ = parse_train_args(["--device", "cpu", "--optimizer", "adam"])
    for name, match in shown_defaults().items():
        if match["recipe"]:
            without = WITHOUT.search(match["rest"])["value"]
            assert without == str(getattr(args, name)), f"--{name} with {bare}: help says {match[0]}"
            if name in SGD_ONLY:
                assert "adam" in match["rest"] and without == str(getattr(adam, name))


@pytest.mark.slow
def test_a_dry_runs_config_json_holds_the_defaults_the_help_shows(mnist_cloud, mnist_dir, tmp_path):
    """A dry run is a quick smoke test, in a throwaway directory, of the defaults --help states (except
    those the dry run sets itself: 1 epoch of 2 batches, and one more for the recipe's progressive resizing,
    one epoch at each size; the first test checks epochs)."""
    proc = run_cli([*mnist_cloud, "train", "--dry-run"], cwd=tmp_path,
                   env_extra={"MNIST_DATA_DIR": str(mnist_dir), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "Epoch: 2 |" in proc.stdout and not (tmp_path / "runs").exists()  # throwaway dir, not ./runs
    (config_file,) = tmp_path.glob("mnist-cloud-dry-run-*/*/config.json")
    config = json.loads(config_file.read_text())["config"]
    assert {k: config[k] for k in DRY_RUN} == {**DRY_RUN, "epochs": DRY_RUN["epochs"] + 1}
    assert config["early_epochs"] == 1 and config["early_size"] == default_recipe()["early_size"]
    shown = shown_defaults()
    for name in set(default_recipe()) - set(DRY_RUN) - {"early_epochs"}:
        assert str(config[name]) == shown[name]["value"], f"--{name}: help says {shown[name][0]}, config {config[name]}"
