"""The model zoo: the seed projects' nets, rebuilt from their READMEs and honestly counted, plus our own.

Every model maps a normalized [N, 1, 28, 28] batch to [N, 10] logits (no log_softmax: the loss
is cross-entropy on logits). What a model *claims* (a parameter budget, BatchNorm, Dropout, GAP,
no FC) is declared in its spec and checked against the module itself by the tests.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from runspec.recipes import RECIPES
from trainer.errors import UserError


def conv(cin: int, cout: int, k: int = 3, padding: int = 0, bn: bool = True, dropout: float = 0.0,
         relu_first: bool = False) -> list[nn.Module]:
    """Conv (no bias when BN follows) -> BN -> ReLU -> Dropout; seed 001 puts ReLU before BN."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=padding, bias=not bn)]
    act = nn.ReLU(inplace=True)
    if bn:
        layers += [act, nn.BatchNorm2d(cout)] if relu_first else [nn.BatchNorm2d(cout), act]
    else:
        layers.append(act)
    if dropout:
        layers.append(nn.Dropout(dropout))
    return layers


# ---------------------------------------------------------------- seed 000 / 001
def seed001() -> nn.Module:
    """Seed 001's layer table: four Conv-ReLU-BN-Dropout blocks at 28 and 14 px, two max-pools,
    an unpadded conv to 5x5, AvgPool2d(5) as GAP and a 1x1 conv head."""
    d = 0.05  # seed 000's dropout
    return nn.Sequential(
        *conv(1, 16, padding=1, dropout=d, relu_first=True),  # 28
        *conv(16, 32, padding=1, dropout=d, relu_first=True),
        nn.MaxPool2d(2),  # 14
        *conv(32, 32, padding=1, dropout=d, relu_first=True),
        *conv(32, 16, padding=1, dropout=d, relu_first=True),
        nn.MaxPool2d(2),  # 7
        *conv(16, 32, dropout=d, relu_first=True),  # 5
        nn.AvgPool2d(5),
        nn.Conv2d(32, 10, 1, bias=False),
        nn.Flatten(),
    )


# ---------------------------------------------------------------- seed 002: the under-8k ablation
def _seed002(bn: bool, dropout: float, gap: bool) -> nn.Module:
    """One skeleton, one change per step: ReLU -> +BatchNorm -> +Dropout -> GAP instead of the FC head."""
    body = [
        *conv(1, 8, bn=bn, dropout=dropout),  # 26
        *conv(8, 12, bn=bn, dropout=dropout),  # 24
        nn.MaxPool2d(2),  # 12
        *conv(12, 16, bn=bn, dropout=dropout),  # 10
        *conv(16, 16, bn=bn, dropout=dropout),  # 8
        nn.MaxPool2d(2),  # 4
        nn.Conv2d(16, 10, 1, bias=not bn),  # 1x1 transition to 10 channels
    ]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if gap else [nn.Flatten(), nn.Linear(10 * 4 * 4, 10)]
    return nn.Sequential(*body, *head)


# ---------------------------------------------------------------- seed 003
def seed003() -> nn.Module:
    """Seed 003's 10,170-parameter net: BN throughout, two dropouts, GAP and a Linear(16, 10) head."""
    d = 0.1
    return nn.Sequential(
        *conv(1, 8, padding=1),  # 28
        *conv(8, 12, padding=1),
        nn.MaxPool2d(2),  # 14
        nn.Dropout(d),
        *conv(12, 16, padding=1),
        nn.MaxPool2d(2),  # 7
        nn.Dropout(d),
        nn.Conv2d(16, 16, 1, bias=False),
        *conv(16, 16, padding=1),
        *conv(16, 16, padding=1),
        *conv(16, 16, padding=1),
        nn.Dropout(d),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


# ---------------------------------------------------------------- seed 004
def seed004() -> nn.Module:
    """Seed 004's 24,552-parameter net: four biased convs, no BN, one Linear.

    Its README draws a pool after conv1 too, but then the Linear could not see 56x4x4 = 896
    features; pools after conv2 and conv4 are the layout that matches its own parameter table."""
    return nn.Sequential(
        *conv(1, 8, bn=False),  # 26
        *conv(8, 16, bn=False),  # 24
        nn.MaxPool2d(2),  # 12
        *conv(16, 22, bn=False),  # 10
        *conv(22, 56, bn=False),  # 8
        nn.MaxPool2d(2),  # 4
        nn.Flatten(),
        nn.Linear(56 * 4 * 4, 10),
    )


# ---------------------------------------------------------------- ours
def net8k() -> nn.Module:
    """Our under-8k net (7,738 params). Everything expensive happens once at full resolution: a
    BN-free 1->12 conv (BN on 12 channels at 26x26 costs more CPU time than it gives), one 12->16
    conv, then max-pool to 12 px, a 1x1 squeeze and three 3x3 blocks, GAP and a 1x1 head. Dropout
    only at 10 and 8 px, where it is cheap. Measured over seeds 1-3 in the README."""
    d = 0.05
    return nn.Sequential(
        *conv(1, 12, bn=False),  # 26
        *conv(12, 16),  # 24
        nn.MaxPool2d(2),  # 12
        *conv(16, 8, k=1),
        *conv(8, 16, dropout=d),  # 10
        *conv(16, 16, dropout=d),  # 8
        *conv(16, 14),  # 6
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(14, 10, 1),
        nn.Flatten(),
    )


def net20k() -> nn.Module:
    """Our under-20k net (18,314 params): the same plan, wider (16/24 channels, BN everywhere).
    Trained with a little more augmentation (its recipe adds translate and scale)."""
    d = 0.05
    return nn.Sequential(
        *conv(1, 16),  # 26
        *conv(16, 24),  # 24
        nn.MaxPool2d(2),  # 12
        *conv(24, 16, k=1),
        *conv(16, 24, dropout=d),  # 10
        *conv(24, 24, dropout=d),  # 8
        *conv(24, 24),  # 6
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(24, 10, 1),
        nn.Flatten(),
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    origin: str
    description: str
    budget: int | None  # the parameter budget the model claims to meet, if any
    batchnorm: bool  # claims, checked against the module by tests/test_models.py
    dropout: bool
    gap: bool
    fc: bool
    note: str = ""
    # named sets of train flags this model defaults to (a flag the user types wins): its measured
    # recipes, picked with --recipe; "default" is the one a plain `train --model NAME` gets
    recipes: dict[str, dict] = field(default_factory=dict)
    # a model of the user's (`--model FILE.py:Name`): {"file", "sha256"}, saved with the run
    source: dict | None = None
    # batches other than 128 its default recipe was validated at (peak LR scaled linearly): a CUDA
    # default (trainer.device.CUDA_VARIANTS) may train at one of them
    validated_batches: tuple[int, ...] = ()

    def recipe(self, name: str = "default") -> dict:
        if name == "default" or name in self.recipes:
            return self.recipes.get(name, {})
        choices = ", ".join(["default", *[r for r in self.recipes if r != "default"]])
        raise UserError(f"model {self.name} has no recipe {name!r}; choose one of: {choices}")


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("net8k", net8k, "mnist-cloud", "our under-8k GAP net, the default", 8000,
                  batchnorm=True, dropout=True, gap=True, fc=False, recipes=RECIPES["net8k"], validated_batches=(256,)),
        ModelSpec("net20k", net20k, "mnist-cloud", "our under-20k GAP net (its recipe adds translate 0.1 and scale 0.1)", 20000,
                  batchnorm=True, dropout=True, gap=True, fc=False, recipes=RECIPES["net20k"]),
        ModelSpec("seed001", seed001, "seed 000/001", "Conv-ReLU-BN-Dropout blocks, 2 max-pools, GAP, 1x1 head",
                  None, batchnorm=True, dropout=True, gap=True, fc=False,
                  note="its README claims 19,768 params (<20k); its own layer table sums to 23,760"),
        ModelSpec("seed002-relu", lambda: _seed002(False, 0.0, False), "seed 002", "step 1: plain ReLU convs + FC",
                  8000, batchnorm=False, dropout=False, gap=False, fc=True),
        ModelSpec("seed002-bn", lambda: _seed002(True, 0.0, False), "seed 002", "step 2: + BatchNorm",
                  8000, batchnorm=True, dropout=False, gap=False, fc=True),
        ModelSpec("seed002-dropout", lambda: _seed002(True, 0.05, False), "seed 002", "step 3: + Dropout",
                  8000, batchnorm=True, dropout=True, gap=False, fc=True),
        ModelSpec("seed002-gap", lambda: _seed002(True, 0.05, True), "seed 002", "step 4: GAP replaces the FC",
                  8000, batchnorm=True, dropout=True, gap=True, fc=False),
        ModelSpec("seed003", seed003, "seed 003", "BN, Dropout, GAP, Linear(16, 10) head", 20000,
                  batchnorm=True, dropout=True, gap=True, fc=True),
        ModelSpec("seed004", seed004, "seed 004", "four convs and one Linear, no BN", None,
                  batchnorm=False, dropout=False, gap=False, fc=True),
    ]
}


def get_spec(name: str, source: dict | None = None) -> ModelSpec:
    """A model of the zoo by name, or the user's own: `path/to/file.py:Name` or `package.module:Name`.
    `source`: what a run recorded about its file ({"file": absolute path}), used when a relative spec
    does not resolve from the current directory (evaluate or report run from elsewhere)."""
    if ":" in name:
        target, _, attr = name.rpartition(":")
        if _is_path(target) and not Path(target).expanduser().is_file() and (source or {}).get("file") \
                and Path(source["file"]).is_file():
            name = f"{source['file']}:{attr}"
        return load_external(name, _stamp(name))
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}, or your own as "
                        "path/to/file.py:Name (see `mnist-cloud models`)") from None


# ---------------------------------------------------------------- your own model
def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _stamp(spec: str) -> tuple:
    """What the cached import depends on: the directory a relative spec is read from, and the file's
    size and mtime, so an edited file is imported again (in a notebook, say)."""
    target = spec.rpartition(":")[0]
    path = Path(target).expanduser()
    try:
        st = path.resolve().stat() if _is_path(target) else None
    except OSError:
        st = None
    return os.getcwd(), (st.st_size, st.st_mtime_ns) if st else None


def _import(target: str, spec: str):
    """The module of `spec`: a .py file (its directory is importable, for its own helpers) or a
    dotted module on sys.path (the current directory included). Any failure is one line."""
    try:
        if _is_path(target):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"--model {spec}: {target} does not exist (relative to {os.getcwd()})")
            if path.suffix != ".py":
                raise UserError(f"--model {spec}: {target} is not a .py file")
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            name = f"mnist_cloud_model_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module, path
        if os.getcwd() not in sys.path:  # the trainer runs without the current directory on its path
            sys.path.append(os.getcwd())
        module = importlib.import_module(target)
        return module, Path(module.__file__) if getattr(module, "__file__", None) else None
    except UserError:
        raise
    except Exception as e:  # the user's code: a SyntaxError, an ImportError, anything it raises
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"--model {spec}: importing {target} failed: {type(e).__name__}: {first}") from None


@functools.lru_cache(maxsize=None)
def load_external(spec: str, stamp: tuple = ()) -> ModelSpec:
    """`FILE.py:Name` or `package.module:Name`, where Name is an nn.Module class or a function that
    returns one, taking no arguments. It must map a [N, 1, 28, 28] batch to [N, 10] logits."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise UserError(f"--model {spec!r}: give path/to/file.py:Name or package.module:Name")
    module, path = _import(target, spec)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UserError(f"--model {spec}: {target} has no class or function {attr!r}")

    def build() -> nn.Module:
        try:
            model = factory()
        except Exception as e:
            raise UserError(f"--model {spec}: {attr}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--model {spec}: {attr}() returned a {type(model).__name__}, not an nn.Module")
        return model

    probe = build()
    was_training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(2, 1, 28, 28))
    except Exception as e:
        raise UserError(f"--model {spec}: a [2, 1, 28, 28] batch fails in forward(): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    probe.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 10):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {spec}: a [2, 1, 28, 28] batch gives {shape}; mnist-cloud needs [N, 10] logits")
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    flags = structure_flags(probe)
    return ModelSpec(spec, build, origin=target, description=doc[0] if doc else f"your model from {target}",
                     budget=None, **flags, source={"file": str(path) if path else target,
                                                   "sha256": sha256_of(path) if path else None})


def source_changed(saved: dict | None, spec: ModelSpec) -> str | None:
    """One line when the model's file differs from the one a run was trained with, else None."""
    if not saved or not spec.source or not saved.get("sha256") or not spec.source.get("sha256") \
            or saved.get("sha256") == spec.source.get("sha256"):
        return None
    return (f"note: {spec.source['file']} has changed since this run was trained (sha256 {saved['sha256'][:12]} "
            f"then, {spec.source['sha256'][:12]} now): these weights are loaded into today's code")


def build_model(name: str) -> nn.Module:
    return get_spec(name).build()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def structure_flags(model: nn.Module) -> dict[str, bool]:
    """What the module actually contains. GAP: a pooling layer whose output is 1x1 on a 28x28 input."""
    gap = False
    hooks = []

    def on_pool(module, inputs, output):
        nonlocal gap
        if output.dim() == 4 and output.shape[-2:] == (1, 1) and inputs[0].shape[-1] > 1:
            gap = True

    for m in model.modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            hooks.append(m.register_forward_hook(on_pool))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    for h in hooks:
        h.remove()
    kinds = [type(m) for m in model.modules()]
    return {
        "batchnorm": any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "dropout": any(issubclass(k, nn.modules.dropout._DropoutNd) for k in kinds),
        "gap": gap,
        "fc": any(isinstance(m, nn.Linear) for m in model.modules()),  # a subclass of Linear is one too
    }
