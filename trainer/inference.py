"""Use trained weights: test accuracy of a checkpoint, and the digit in a PNG/JPEG."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer import rundir as rd
from trainer import tta
from trainer.checkpoint import load_checkpoint
from trainer.data import load_mnist, make_splits, normalize
from trainer.errors import UserError
from trainer.fetch import resolve_data_dir
from trainer.models import get_spec, source_changed


def resolve_weights(path: str | Path) -> Path:
    """A checkpoint file, or a run directory: the weights it delivers (its model.pt), the same ones
    its result.json reports. Never best.pt or last.pt by default: those are a resume's, not the run's answer."""
    path = Path(path)
    if path.is_dir():
        delivered = path / rd.MODEL
        if not delivered.is_file():
            raise UserError(f"{path} has no delivered weights ({rd.MODEL}) yet: the run has not finished, or an "
                            f"older version made it; pass {path / rd.LAST} (or {rd.BEST}) explicitly")
        return delivered
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a .pt checkpoint or a run directory")
    return path


def load_model(weights: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(resolve_weights(weights), map_location=device)
    spec = get_spec(ckpt["model_name"], ckpt.get("model_source"))
    changed = source_changed(ckpt.get("model_source"), spec)
    if changed:
        print(changed, file=sys.stderr, flush=True)
    model = spec.build()
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise UserError(f"{weights}: weights do not fit model {ckpt['model_name']!r} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt


def trained_input_size(ckpt: dict) -> int:
    """The image side the checkpoint's model was trained on (`--input-size`); 28 for checkpoints saved
    before that flag existed. Evaluated on any other size, its accuracy would be a different number."""
    return int((ckpt.get("config") or {}).get("input_size", 28))


def trained_views(ckpt: dict) -> int:
    """The test-time views the checkpoint's run delivers (`--tta`); 1 for checkpoints saved before it."""
    return int((ckpt.get("config") or {}).get("tta", 1))


def log_probs(model: nn.Module, images: torch.Tensor, input_size: int, views: int = 1) -> torch.Tensor:
    """uint8 [n, 1, 28, 28] -> log-probabilities as the run delivers them: the model on its centre crop
    (and the shifted crops of its test-time views), normalized as in training (Engine.model_input)."""
    return tta.log_probs(model, images, input_size, views, normalize)


@torch.inference_mode()
def test_accuracy(model: nn.Module, data_dir: str | None, device: torch.device, batch_size: int = 1000,
                  input_size: int = 28, views: int = 1) -> tuple[float, float, int]:
    """(loss, accuracy %, number of images) on the 10k MNIST test set, seen as input_size x input_size
    through `views` test-time views."""
    data = make_splits(load_mnist(resolve_data_dir(data_dir)), val_size=0, seed=0, device=device)
    out = torch.cat([log_probs(model, data.test.images[i:i + batch_size], input_size, views)
                     for i in range(0, len(data.test), batch_size)])
    loss = F.nll_loss(out, data.test.labels).item()
    acc = 100.0 * (out.argmax(1) == data.test.labels).float().mean().item()
    return loss, acc, len(data.test)


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file (PNG, JPEG, ...) to a grayscale uint8 [H, W] tensor.

    PIL is fine here: one image per call, far from the training hot path."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot decode as an image ({e})") from None
    return torch.from_numpy(gray)


def to_mnist(image: torch.Tensor) -> torch.Tensor:
    """Any grayscale digit image -> a [1, 28, 28] uint8 MNIST-style image.

    MNIST digits are white on black, fit in a 20x20 box and are centred by their centre of mass in
    28x28; a photo or a drawing is brought to the same form before the net sees it."""
    img = image.float()
    border = torch.cat([img[0], img[-1], img[:, 0], img[:, -1]])
    if border.mean() > 127:  # dark digit on a light background
        img = 255 - img
    img = (img - img.min()).clamp_min(0)
    if img.max() > 0:
        img = img * (255.0 / img.max())
    ys, xs = torch.nonzero(img > 32, as_tuple=True)
    if ys.numel():
        img = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = img.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    digit = F.interpolate(img[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    canvas = torch.zeros(28, 28)
    total = digit.sum()
    if total > 0:
        yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
        cy, cx = (digit * yy).sum() / total, (digit * xx).sum() / total
    else:
        cy, cx = torch.tensor(size[0] / 2), torch.tensor(size[1] / 2)
    top = int(round(14 - cy.item()))
    left = int(round(14 - cx.item()))
    top, left = min(max(top, 0), 28 - size[0]), min(max(left, 0), 28 - size[1])
    canvas[top:top + size[0], left:left + size[1]] = digit
    return canvas.clamp(0, 255).round().to(torch.uint8)[None]


@torch.inference_mode()
def predict(model: nn.Module, image: torch.Tensor, device: torch.device, input_size: int = 28,
            views: int = 1) -> torch.Tensor:
    """Class probabilities [10] for one [1, 28, 28] uint8 image, seen as input_size x input_size."""
    return log_probs(model, image[None].to(device), input_size, views).exp()[0].cpu()
