"""TrainConfig: every training knob, its default and its help text, in one place.

Each field becomes one `python -m trainer train` flag (underscores become dashes), so the CLI, the
saved `config.json` and the code can never disagree about a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from runspec import UserError
from runspec.recipes import CUDA_DEFAULT_SETS, RECIPES, SGD_ONLY

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cyclic", "step", "plateau", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
SWITCHES = ("auto", "on", "off")
REFERENCE_BATCH = 128  # the batch size the recipes' learning rates were tuned at
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TTA_VIEWS = (1, 5, 9)  # --tta: the centre crop; and the four 1-px shifts; and the diagonals (trainer/tta.py)


@dataclass(frozen=True)
class AugmentConfig:
    """The knobs trainer.augment reads, a subset of TrainConfig. It lives here, not in augment.py, because
    this module must not import torch: `python -m trainer` checks its flags before torch's 3 s import."""

    rotate: float = 0.0  # max degrees, uniform in [-rotate, rotate]
    translate: float = 0.0  # max shift as a fraction of the image side
    scale: float = 0.0  # zoom uniform in [1 - scale, 1 + scale]
    shear: float = 0.0  # max degrees of x-shear
    perspective: float = 0.0  # probability of a perspective warp
    perspective_scale: float = 0.2  # how far each corner may move, as a fraction of the half-side
    brightness: float = 0.0  # multiply by uniform [1 - b, 1 + b]
    contrast: float = 0.0  # scale around the image mean by uniform [1 - c, 1 + c]
    crop: float = 0.0  # probability of a random square crop, resized back to 28x28 (seed 004)
    crop_size: float = 22 / 28  # smallest crop side, as a fraction of the image side
    input_size: int = 28  # the centre input_size x input_size region of the warped image that is kept
    sample_size: int = 0  # output side in pixels that region is resampled to; 0: input_size (progressive resizing)

    @property
    def geometric(self) -> bool:
        return any((self.rotate, self.translate, self.scale, self.shear, self.perspective, self.crop))

    @property
    def photometric(self) -> bool:
        return bool(self.brightness or self.contrast)

    @property
    def active(self) -> bool:
        return self.geometric or self.photometric


def knob(default: Any, help: str, unset: str | None = None, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field and its flag. unset: what a None default means, for --help ("torch's choice")."""
    return field(default=default, metadata={"help": help, **({"unset": unset} if unset else {}), **argparse_kwargs})


@dataclass
class TrainConfig:
    # model and schedule
    model: str = knob("net8k", "model name from `mnist-cloud models`")
    recipe: str = knob("default", "the model's named recipe: flag defaults measured for it (`mnist-cloud models "
                       "--summary` lists them); flags you type win. net8k: default (accuracy first) or fast")
    epochs: int = knob(15, "number of epochs")
    batch_size: int = knob(REFERENCE_BATCH, "training batch size; with SGD and no --lr, the recipe's learning rate "
                           f"is scaled by batch/{REFERENCE_BATCH} (the linear rule)")
    optimizer: str = knob("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = knob(0.1, "peak learning rate (the max of OneCycle/Cyclic, the start of Step/plateau)")
    momentum: float = knob(0.9, "SGD momentum (OneCycle cycles it between 0.85 and this)")
    nesterov: bool = knob(True, "Nesterov momentum for SGD")
    weight_decay: float = knob(5e-4, "weight decay (decoupled for AdamW)")
    schedule: str = knob("onecycle", "learning-rate schedule", choices=SCHEDULES)
    pct_start: float = knob(0.25, "OneCycle: fraction of steps spent warming up")
    step_size: int = knob(5, "Step: epochs between LR drops")
    gamma: float = knob(0.1, "Step/plateau: LR multiplier at each drop")
    label_smoothing: float = knob(0.0, "label smoothing for the cross-entropy loss")
    ema: float = knob(0.0, "decay of an exponential moving average of the weights and BN statistics, updated "
                      "every step; > 0 delivers the EMA instead of the final weights (0 = off)")
    seed: int = knob(1, "random seed: weights, validation split, batch order, augmentation, dropout")
    # data
    data_dir: str | None = knob(None, "directory with the MNIST IDX files",
                                unset="$MNIST_DATA_DIR, else the cache, else a download")
    val_size: int = knob(10000, "validation images held out of the 60k training set; 0 trains on all 60k")
    train_limit: int | None = knob(None, "use only the first N training images (smoke tests)", unset="all")
    eval_limit: int | None = knob(None, "evaluate on only the first N validation and test images (smoke tests)",
                                 unset="all")
    # augmentation
    rotate: float = knob(7.0, "random rotation, max degrees")
    translate: float = knob(0.0, "random translation, max fraction of the image side")
    scale: float = knob(0.0, "random zoom in [1 - s, 1 + s]")
    shear: float = knob(0.0, "random x-shear, max degrees")
    perspective: float = knob(0.0, "probability of a random perspective warp")
    perspective_scale: float = knob(0.2, "perspective distortion strength")
    brightness: float = knob(0.0, "brightness jitter, multiply by [1 - b, 1 + b]")
    contrast: float = knob(0.0, "contrast jitter, [1 - c, 1 + c] around the image mean")
    crop: float = knob(0.0, "probability of a random crop resized back to 28x28")
    crop_size: float = knob(22 / 28, "smallest crop side as a fraction of 28")
    input_size: int = knob(28, "train and evaluate on the centre SxS pixels (even, 16-28), cut inside the "
                           "augmentation's one grid_sample: MNIST digits sit in the centre 20x20")
    early_size: int = knob(0, "progressive resizing: the first --early-epochs train on the same centre region "
                           "resampled to SxS pixels (fewer pixels, the whole digit), cheaper per step; the later "
                           "epochs and every evaluation use --input-size (0 = off)")
    early_epochs: int = knob(0, "epochs at --early-size before the rest at --input-size; a recipe's share follows a "
                             "typed --epochs (4 of 10: 6 of 15), and 0 turns a recipe's resizing off (with "
                             "--compile, the step compiles once per size; not with --cuda-graph)")
    # stopping
    target: float | None = knob(None, "stop early once validation accuracy (%%) reaches this, e.g. 99.4")
    patience: int = knob(0, "stop after this many epochs without a better validation accuracy; 0 = never")
    stop_after: int | None = knob(None, "stop after this many epochs of this invocation; resume later with --resume")
    max_steps: int | None = knob(None, "cap the batches per epoch (smoke tests)")
    # hardware
    device: str = knob("auto", "auto picks cuda, then mps, then cpu", choices=DEVICES)
    amp: str = knob("auto", "mixed precision: on = bf16 on CPU and CUDA sm80+, fp16 with a loss scaler on older "
                    "GPUs (a T4) and MPS; auto = off (fp32), since these small nets are launch-bound",
                    choices=SWITCHES)
    channels_last: str = knob("auto", "channels-last memory format: auto = on for CPU and CUDA", choices=SWITCHES)
    compile: bool = knob(False, "torch.compile the training step; the last partial batch of an epoch is dropped "
                         "so shapes stay static, and compile time is reported apart from epoch time")
    compile_mode: str = knob("default", "torch.compile mode (with --compile)", choices=COMPILE_MODES)
    cuda_graph: bool = knob(False, "experimental, CUDA only: capture the whole training step (gather, augment, "
                            "forward, backward, SGD) as one CUDA graph replayed every step")
    deterministic: bool = knob(False, "deterministic algorithms (cuDNN benchmark off): the same numbers on a rerun "
                               "on the same device; across devices a seed gives the same recipe, not the same bits")
    threads: int | None = knob(None, "CPU threads for torch", unset="torch's choice")
    eval_batch_size: int = knob(256, "batch size for validation and test (256 is the fastest on a laptop CPU)")
    tta: int = knob(1, "test-time augmentation: what the run delivers answers with the mean softmax of N views, "
                    "the centre crop and 1-px shifts (5: up, down, left, right; 9: and the diagonals); its "
                    "validation, test, `evaluate`, `predict` and report all use them, at N passes per image",
                    choices=TTA_VIEWS)
    test_every_epoch: bool = knob(False, "also evaluate the test set after every epoch, for the curves; the "
                                  "delivered weights are always tested once, at the end")
    # output
    out_dir: str = knob("runs", "where run directories are created")
    run_id: str | None = knob(None, "run directory name", unset="<time>-<model>-s<seed>")
    resume: str | None = knob(None, "continue the run in this directory from its last.pt")
    progress: bool = knob(True, "show a progress bar per epoch (off when stderr is not a terminal)")
    report: bool = knob(True, "write report.html and plots/ into the run directory at the end")
    tensorboard: bool = knob(False, "also write TensorBoard event files into the run directory's tb/ "
                             "(needs pip install 'mnist-cloud[tensorboard]'); `tensorboard --logdir runs` shows them")

    def augment_config(self, epoch: int | None = None) -> AugmentConfig:
        """The augmentation of an epoch (1-based): at --early-size for the first --early-epochs."""
        names = {f.name for f in dataclasses.fields(AugmentConfig)}
        aug = AugmentConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        early = epoch is not None and epoch <= self.early_epochs
        return dataclasses.replace(aug, sample_size=self.early_size) if early else aug

    def validate(self) -> None:
        """Reject values that cannot be right, with the flag's name in the message."""
        def bad(flag: str, why: str) -> UserError:
            return UserError(f"--{flag} {why}")

        if self.epochs < 1:
            raise bad("epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise bad("batch-size", f"must be at least 2 (BatchNorm needs a batch), got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise bad("eval-batch-size", f"must be at least 1, got {self.eval_batch_size}")
        if self.lr <= 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise bad("weight-decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label-smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema < 1:
            raise bad("ema", f"is a decay in [0, 1), e.g. 0.999; got {self.ema}")
        if self.target is not None and not 0 < self.target <= 100:
            raise bad("target", f"is a validation accuracy in percent, in (0, 100]; got {self.target}")
        if not 0 < self.pct_start < 1:
            raise bad("pct-start", f"must be in (0, 1), got {self.pct_start}")
        for name in ("perspective", "crop"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, f"is a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.crop_size <= 1:
            raise bad("crop-size", f"must be in (0, 1], got {self.crop_size}")
        for name in ("rotate", "translate", "scale", "shear", "perspective_scale", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise bad(name.replace("_", "-"), f"must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1 or self.brightness > 1:
            raise bad("scale" if self.scale >= 1 else "brightness", "must be below 1")
        for name in ("train_limit", "eval_limit", "stop_after", "max_steps", "threads", "step_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name.replace("_", "-"), f"must be at least 1, got {value}")
        check_input_size(self.input_size)
        if bool(self.early_size) != bool(self.early_epochs):
            raise bad("early-size" if not self.early_size else "early-epochs",
                      "is needed too: progressive resizing takes --early-size PX and --early-epochs N")
        if self.early_epochs and not 8 <= self.early_size < self.input_size:
            raise bad("early-size", f"must be from 8 to below --input-size ({self.input_size}), got {self.early_size}")
        if self.early_epochs and not 0 < self.early_epochs < self.epochs:
            raise bad("early-epochs", f"must leave at least the last of the {self.epochs} epochs at --input-size, "
                      f"got {self.early_epochs}")
        if self.early_epochs and self.cuda_graph:
            raise bad("early-size", "is not for --cuda-graph (one captured step has one input size): drop one")
        if self.tta not in TTA_VIEWS:  # argparse checks a typed flag; this, a config.json edited by hand
            raise bad("tta", f"takes {', '.join(map(str, TTA_VIEWS))} views, got {self.tta}")
        if self.patience < 0:
            raise bad("patience", f"must be >= 0, got {self.patience}")
        if self.compile_mode != "default" and not self.compile:
            raise bad("compile-mode", "needs --compile")

    @property
    def static_shapes(self) -> bool:
        """Every batch the same size: compiled or graph-captured steps recompile on a ragged last batch."""
        return self.compile or self.cuda_graph


def check_input_size(size: int) -> None:
    """--input-size (train, and `models --summary`): even, so that the centre crop of 28 is centred."""
    if not 16 <= size <= 28 or size % 2:
        raise UserError(f"--input-size must be an even number of pixels from 16 to 28, got {size}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(f: dataclasses.Field) -> type:
    text = str(f.type)
    for t in (int, float, str):
        if text.startswith(t.__name__):
            return t
    raise TypeError(f"unsupported config type {f.type} for {f.name}")


def default_recipe(model: str | None = None, recipe: str = "default") -> dict[str, Any]:
    """The flags a model's recipe sets (the default model's default recipe: what a plain `train` gets)."""
    return RECIPES.get(model or TrainConfig.model, {}).get(recipe, {})


def default_value(name: str, model: str | None = None, recipe: str = "default") -> Any:
    """A flag's value where it is not typed (off CUDA): the model's recipe's, else TrainConfig's."""
    return default_recipe(model, recipe).get(name, getattr(TrainConfig, name))


def default_help(name: str) -> str:
    """How a flag's help ends: the default a run of the default model really gets. Where a recipe sets
    the flag, that is the default model's recipe value (runspec/recipes.py), not TrainConfig's."""
    model, recipe = TrainConfig.model, default_recipe()
    cuda = "; on a CUDA GPU the CUDA default may set it" if name in CUDA_DEFAULT_SETS else ""
    unset = TrainConfig.__dataclass_fields__[name].metadata.get("unset")
    if unset:  # a None default, in words: "(default: None)" tells a user nothing
        return f" (default: {unset.replace('%', '%%')})"
    if name in recipe:  # the value is a plain number or string: argparse's %-formatting leaves it alone
        sgd = (" and SGD", " or with adam/adamw") if name in SGD_ONLY else ("", "")
        return (f" (default: {recipe[name]} with {model}'s recipe{sgd[0]}; other recipes may differ; "
                f"%(default)s without one{sgd[1]}{cuda})")
    if any(name in r for recipes in RECIPES.values() for r in recipes.values()):
        return f" (default: %(default)s; other models' recipes may set it{cuda})"
    return f" (default: %(default)s{cuda})"


def add_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One flag per TrainConfig field; help strings show the default. defaults=False: a flag not
    typed is left out of the namespace (what parse_train_args needs to tell typed from default)."""
    for f in dataclasses.fields(TrainConfig):
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "unset")}
        help_text = f.metadata["help"] + default_help(f.name)
        default = f.default if defaults else argparse.SUPPRESS
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=_type_of(f), default=default, help=help_text,
                                metavar=f.name.upper() if "choices" not in extra else None, **extra)


def from_namespace(ns: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(ns).items() if k in names})


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a saved config.json; unknown keys (from newer versions) are ignored."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def fit_recipe_resizing(values: dict[str, Any], typed: set[str], recipe: dict[str, Any]) -> None:
    """A recipe's progressive resizing follows the flags typed around it: the same share of a typed
    --epochs (4 of 10 -> 6 of 15; none of 1), and off where a typed --input-size is not above its size
    or a typed --cuda-graph captures one size. A typed `--early-epochs 0` (or `--early-size 0`) turns it
    off; other typed --early-* flags are the user's, and checked as typed."""
    given = {"early_size", "early_epochs"} & typed
    if given and not all(values.get(k) for k in given):
        values.update(early_size=0, early_epochs=0)
        return
    if not recipe.get("early_epochs"):
        return
    epochs = values.get("epochs", TrainConfig.epochs)
    if "epochs" in typed and "early_epochs" not in given:
        values["early_epochs"] = min(round(recipe["early_epochs"] * epochs / recipe["epochs"]), epochs - 1)
    size = values.get("input_size", TrainConfig.input_size)
    if not given and (values["early_epochs"] <= 0 or values.get("early_size", 0) >= size or values.get("cuda_graph")):
        values.update(early_size=0, early_epochs=0)


def recipe_config(typed: dict[str, Any]) -> TrainConfig:
    """The config a run of these typed flags gets off CUDA: the typed flags over the model's recipe over
    TrainConfig's defaults (trainer.cli.apply_recipe does the same on the machine, then the CUDA default)."""
    recipe = default_recipe(typed.get("model"), typed.get("recipe", "default"))
    sgd = typed.get("optimizer", TrainConfig.optimizer) == "sgd"
    values = {**{k: v for k, v in recipe.items() if sgd or k not in SGD_ONLY}, **typed}
    fit_recipe_resizing(values, set(typed), recipe)
    return from_dict(values)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see `python -m trainer train --help`)")


def parse_train_args(argv: list[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """Trainer flags checked as `python -m trainer train` checks them before it imports torch (types,
    ranges, combinations), the typed flags over the model's recipe (recipe_config). Returns that config
    and the flags as typed ({field: value}, `dry_run` included), so that the laptop can say what is
    wrong in one line before any sync or setup, and hand the machine exactly what was asked for
    (to_argv): the machine applies the recipe again (and its CUDA default) to the typed flags."""
    parser = _Parser(prog="python -m trainer train", add_help=False)
    add_arguments(parser, defaults=False)
    parser.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS)
    typed = vars(parser.parse_args(argv))
    config = from_dict(typed) if typed.get("resume") else recipe_config(typed)  # a resumed run keeps its own
    config.validate()
    return config, typed


def check_train_args(argv: list[str]) -> TrainConfig:
    return parse_train_args(argv)[0]


def to_argv(typed: dict[str, Any]) -> list[str]:
    """The `python -m trainer train` flags that set these fields (parse_train_args' inverse)."""
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    argv: list[str] = []
    for name, value in typed.items():
        if name == "dry_run" or kinds.get(name) in ("bool", bool):
            argv.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        else:  # one argument: a value that starts with "-" stays a value
            argv.append(f"{_flag(name)}={value}")
    return argv
