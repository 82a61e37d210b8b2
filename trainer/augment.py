"""Batched, seeded augmentation on the training device.

Every geometric knob (rotation, translate, scale, shear, perspective, crop-and-resize) becomes one 3x3
matrix per image; they are multiplied together and applied with a single `grid_sample` over the
batch. Photometric jitter is two broadcast multiplies. All randomness comes from one
`torch.Generator`, so a run is reproducible and resumable. Nothing here runs in eval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from runspec.config import AugmentConfig  # torch-free, for the CLI; importable from here as before
from trainer.data import centre_crop
from trainer.device import solves_on_device


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def affine_matrices(cfg: AugmentConfig, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, 3, 3] maps from output to input coordinates (normalized to [-1, 1]) for rotate/scale/shear/translate."""
    m = _eye(n, device)
    angle = _uniform(n, -cfg.rotate, cfg.rotate, gen, device) * (math.pi / 180)
    zoom = _uniform(n, 1 - cfg.scale, 1 + cfg.scale, gen, device)
    shear = torch.tan(_uniform(n, -cfg.shear, cfg.shear, gen, device) * (math.pi / 180))
    shift = _uniform(2 * n, -cfg.translate, cfg.translate, gen, device).view(n, 2) * 2  # [-1, 1] spans 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input = R(angle) @ Shear(shear) @ output / zoom - shift
    m[:, 0, 0] = cos / zoom
    m[:, 0, 1] = (cos * shear - sin) / zoom
    m[:, 1, 0] = sin / zoom
    m[:, 1, 1] = (sin * shear + cos) / zoom
    m[:, :2, 2] = -shift
    return m


_CORNERS: dict[str, torch.Tensor] = {}


def _corners(device: torch.device) -> torch.Tensor:
    """The image's four corners in normalized coordinates, made once per device (not per step)."""
    key = str(device)
    if key not in _CORNERS:
        _CORNERS[key] = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)
    return _CORNERS[key]


def perspective_matrices(cfg: AugmentConfig, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, 3, 3] homographies that move each corner inward by up to `perspective_scale`, with probability p."""
    corners = _corners(device)
    jitter = torch.rand(n, 4, 2, generator=gen, device=device) * cfg.perspective_scale
    moved = corners - corners.sign() * jitter  # inward, like torchvision's RandomPerspective
    apply = torch.rand(n, generator=gen, device=device) < cfg.perspective
    moved = torch.where(apply[:, None, None], moved, corners)
    # As torchvision does, the image's corners land on the moved points: solve H @ [x, y, 1] ~ [u, v, 1]
    # for output points (x, y) = moved and input points (u, v) = the original corners.
    x, y = moved[..., 0], moved[..., 1]
    u, v = corners[:, 0].expand(n, 4), corners[:, 1].expand(n, 4)
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # [n, 8, 8]
    b = torch.cat([u, v], dim=1)  # [n, 8]
    # solve_ex: solve() checks for singular systems with a host sync every step; these never are
    # (four distinct corners, each moved by less than half the side)
    if solves_on_device(device.type):
        h = torch.linalg.solve_ex(a, b.unsqueeze(-1))[0].squeeze(-1)
    else:  # MPS before torch 2.7 has no solve_ex: 8x8 systems, a few KB each way
        h = torch.linalg.solve_ex(a.cpu(), b.unsqueeze(-1).cpu())[0].squeeze(-1).to(device)
    return torch.cat([h, torch.ones(n, 1, device=device)], dim=1).view(n, 3, 3)


def crop_matrices(cfg: AugmentConfig, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, 3, 3] random square crops of side in [crop_size, 1], resized to the full image, with probability p."""
    side = _uniform(n, cfg.crop_size, 1.0, gen, device)
    centre = (torch.rand(n, 2, generator=gen, device=device) * 2 - 1) * (1 - side)[:, None]
    apply = torch.rand(n, generator=gen, device=device) < cfg.crop
    side = torch.where(apply, side, torch.ones_like(side))
    centre = torch.where(apply[:, None], centre, torch.zeros_like(centre))
    m = _eye(n, device)
    m[:, 0, 0] = side
    m[:, 1, 1] = side
    m[:, :2, 2] = centre
    return m


_BASE_GRIDS: dict[tuple, torch.Tensor] = {}


def _base_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """[h*w, 3] homogeneous pixel-centre coordinates, as grid_sample with align_corners=False expects."""
    key = (h, w, str(device))
    if key not in _BASE_GRIDS:
        ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
        xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        _BASE_GRIDS[key] = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(-1, 3)
    return _BASE_GRIDS[key]


def warp(images: torch.Tensor, matrices: torch.Tensor, projective: bool, size: int | None = None,
         out: int | None = None) -> torch.Tensor:
    """Resample [n, c, h, w] images through per-image 3x3 output->input maps; outside is black (0).

    With `size` < w the output is the centre size x size pixels of the warp at the same pixel scale:
    the crop is part of the one grid_sample, so a smaller input costs nothing extra. With `out`, that
    region is sampled at out x out pixels instead (progressive resizing's early epochs)."""
    n, _, h, w = images.shape
    size = size or w
    if size != w:
        # output coordinates span size/w of the input's [-1, 1]: scale the x and y columns by Python
        # floats, not by a tensor made from them (a host-to-device copy, which CUDA refuses inside
        # a graph capture: --cuda-graph)
        matrices = torch.cat([matrices[..., :1] * (size / w), matrices[..., 1:2] * (size / h), matrices[..., 2:]],
                             dim=-1)
    h = w = out or size
    if not projective:  # affine only: the fused built-in is cheaper
        grid = F.affine_grid(matrices[:, :2, :], [n, 1, h, w], align_corners=False)
    else:
        pts = _base_grid(h, w, images.device) @ matrices.transpose(1, 2)  # [n, h*w, 3]
        grid = (pts[..., :2] / pts[..., 2:].clamp_min(1e-6)).view(n, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch [n, c, h, w] of pixels in [0, 1]. With every knob at zero it returns `images`."""
    n, device = images.shape[0], images.device
    resample = bool(cfg.sample_size) and cfg.sample_size != cfg.input_size
    if not cfg.geometric and not resample:
        out = centre_crop(images, cfg.input_size)
    else:
        m = affine_matrices(cfg, n, gen, device)  # the identity with every geometric knob at zero
        if cfg.perspective:
            m = m @ perspective_matrices(cfg, n, gen, device)
        if cfg.crop:
            m = crop_matrices(cfg, n, gen, device) @ m
        out = warp(images, m, projective=bool(cfg.perspective), size=cfg.input_size, out=cfg.sample_size or None)
    if cfg.photometric:
        gain = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, gen, device).view(n, 1, 1, 1)
        contrast = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen, device).view(n, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out * gain - mean * gain) * contrast + mean * gain).clamp_(0.0, 1.0)
    return out
