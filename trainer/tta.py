"""Test-time augmentation: the delivered model's answer is the mean of its softmax over a few views.

A view is the trained `--input-size` crop shifted by one pixel (up, down, left, right, then the
diagonals), the centre crop first. MNIST's digits sit in the centre 20x20 of the 28x28 image, so a 24-px
crop shifted by 1 px still holds the whole digit; a 28-px one is padded with black, MNIST's background.

`--tta N` is part of what a run delivers: its config.json records N, and the final test, validation,
`evaluate`, `predict` and the report all use the same N views of the same weights. One view is the plain
model: `log_probs` is then log_softmax of its logits, which gives the same argmax and cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (dy, dx) of each view, in the order --tta takes them: the centre, the four 1-px shifts, the diagonals
OFFSETS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def offsets(views: int) -> tuple[tuple[int, int], ...]:
    return OFFSETS[:views]


def shifted_crop(images: torch.Tensor, size: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """The size x size crop of [..., h, w] images whose centre is (dy, dx) pixels off the image's centre;
    what falls outside the image is 0 (black). (0, 0) is the centre crop, a view as `centre_crop` gives."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2 + dy, (w - size) // 2 + dx
    pad = max(0, -top, -left, top + size - h, left + size - w)
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
        top, left = top + pad, left + pad
    return images[..., top:top + size, left:left + size]


def log_probs(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int, views: int,
              prepare: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """log of the model's softmax averaged over `views` crops of uint8 images [n, 1, H, W]: [n, classes].

    `prepare` turns a uint8 crop into the model's input (normalize; the engine also sets the memory format)."""
    each = [F.log_softmax(model(prepare(shifted_crop(images, size, dy, dx))).float(), dim=1)
            for dy, dx in offsets(views)]
    if views == 1:
        return each[0]
    # log(mean(softmax)) in log space: finite even where a class's probability underflows in every view
    return torch.logsumexp(torch.stack(each), dim=0) - math.log(views)


def describe(views: int, short: bool = False) -> str:
    """What a run's inference costs, for the console: 'one pass per image', or '5 passes per image' and
    (unless short) which views they are."""
    if views == 1:
        return "one pass per image"
    what = "" if short else f" (test-time augmentation: the centre crop and {views - 1} one-pixel shifts)"
    return f"{views} passes per image{what}"
