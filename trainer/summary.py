"""A torchsummary-style layer table and a multiply-accumulate count, both measured by one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.errors import UserError


@dataclass
class LayerRow:
    name: str  # e.g. "Conv2d-1"
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def layer_table(model: nn.Module, input_size: int = 28, flag: str = "--input-size") -> list[LayerRow]:
    """One row per leaf module, in execution order, for a single input_size x input_size image (a run
    with --input-size S sees the centre SxS pixels: every conv's output, and its MACs, shrink with it)."""
    rows: list[LayerRow] = []
    hooks = []

    def hook(module, _inputs, output):
        rows.append(LayerRow(
            name=f"{type(module).__name__}-{len(rows) + 1}",
            output_shape=tuple(output.shape[1:]),
            params=sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad),
            macs=_macs(module, output),
        ))

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, input_size, input_size, device=device))
    except RuntimeError as e:
        if input_size == 28:  # every model takes MNIST's own size: this is a bug, keep its traceback
            raise
        # e.g. seed001's fixed 4x4 average pool needs 28 px; this is the run's first forward, so the
        # user hears it before any training
        raise UserError(f"this model cannot take {input_size}x{input_size} images ({str(e).splitlines()[0]}); "
                        f"try a larger {flag} (every model takes 28) or another model (`python -m trainer models "
                        f"--input-size {input_size}` lists those that fit)") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def count_macs(model: nn.Module, input_size: int = 28) -> int:
    """Multiply-accumulates of one input_size x input_size image through the convs and linears."""
    return sum(r.macs for r in layer_table(model, input_size))


def format_table(rows: list[LayerRow], title: str = "") -> str:
    width = 68
    lines = []
    if title:
        lines.append(title)
    lines += [
        "-" * width,
        f"{'Layer (type)':>25}  {'Output Shape':>20}  {'Param #':>10}",
        "=" * width,
    ]
    for r in rows:
        shape = str([-1, *r.output_shape])
        lines.append(f"{r.name:>25}  {shape:>20}  {r.params:>10,}")
    total = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    lines += [
        "=" * width,
        f"Total params: {total:,}",
        f"Trainable params: {total:,}",
        f"Non-trainable params: 0",
        f"MACs per image: {macs:,}",
        "-" * width,
    ]
    return "\n".join(lines)
