"""The seed projects' CI checks as a function and a command: parameters, MACs, receptive field, and
the BatchNorm / Dropout / GAP / FC flags, counted from the module, then checked against what you claim.

    mnist-cloud check mynet.py:Net --max-params 8000 --require bn,dropout,gap --no-fc

From your own pytest:

    from trainer.check import check_model

    def test_my_net_meets_the_brief():
        result = check_model("mynet.py:Net", max_params=8000, require=("bn", "dropout", "gap"), no_fc=True)
        assert result.ok, result.failures
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from trainer.errors import UserError
from trainer.models import count_params, get_spec, structure_flags
from trainer.summary import count_macs

FEATURES = {"bn": "batchnorm", "dropout": "dropout", "gap": "gap", "fc": "fc"}


@dataclass
class Claim:
    name: str
    wanted: str
    actual: str
    ok: bool


@dataclass
class CheckResult:
    model: str
    params: int
    macs: int
    # pixels, along the chain of Conv2d / pooling modules forward() runs, up to the global pooling: a
    # net with branches, or pooling written as a function call, is not counted exactly
    receptive_field: int
    batchnorm: bool
    dropout: bool
    gap: bool
    fc: bool
    claims: list[Claim] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.claims)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: wanted {c.wanted}, got {c.actual}" for c in self.claims if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def receptive_field(model: nn.Module, input_size: int = 28) -> int:
    """The receptive field in pixels of the last feature map before global pooling, from each conv's
    and pool's kernel, stride and dilation in the order forward() runs them (the seed READMEs' table)."""
    import torch

    rf, jump, order = 1, 1, []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append((m, i[0], o)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, input_size, input_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    def first(v) -> int:
        return v[0] if isinstance(v, tuple) else v

    if not any(isinstance(m, nn.Conv2d) for m, _, _ in order):
        return input_size  # no convolution: its first Linear already sees the whole image
    for m, inputs, output in order:
        pooling = not isinstance(m, nn.Conv2d)
        if pooling and output.dim() == 4 and output.shape[-2:] == (1, 1) and inputs.shape[-1] > 1:
            break  # global pooling: everything after it sees the whole image
        if isinstance(m, nn.AdaptiveAvgPool2d):
            k = s = inputs.shape[-1] // output.shape[-1]  # a fixed-size average of k x k blocks
        else:
            k, s = first(m.kernel_size), first(m.stride) or first(m.kernel_size)
        d = first(getattr(m, "dilation", 1))
        rf += (k - 1) * d * jump  # the standard recurrence: r += (k - 1) * d * j, then j *= s
        jump *= s
    return rf


def check_model(model: str | nn.Module, max_params: int | None = None, require: tuple[str, ...] | list[str] = (),
                no_fc: bool = False, input_size: int = 28) -> CheckResult:
    """Count and check a model: a zoo name, `file.py:Name`, `package.module:Name`, or a module itself."""
    name = model if isinstance(model, str) else type(model).__name__
    module = get_spec(model).build() if isinstance(model, str) else model
    unknown = [r for r in require if r not in FEATURES or r == "fc"]
    if unknown:
        raise UserError(f"--require {','.join(unknown)}: choose from bn, dropout, gap (and --no-fc for FC)")
    flags = structure_flags(module)
    result = CheckResult(name, count_params(module), count_macs(module, input_size),
                         receptive_field(module, input_size), **flags)
    if max_params is not None:
        result.claims.append(Claim("params", f"<= {max_params:,}", f"{result.params:,}", result.params <= max_params))
    for r in require:
        has = flags[FEATURES[r]]
        result.claims.append(Claim(FEATURES[r], "yes", "yes" if has else "no", has))
    if no_fc:
        result.claims.append(Claim("fc", "no", "yes" if flags["fc"] else "no", not flags["fc"]))
    return result
