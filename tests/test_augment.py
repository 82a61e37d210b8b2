"""Batched augmentation: shapes, determinism, identity at zero strength, and the geometry is right."""

import math

import pytest
import torch

from trainer.augment import AugmentConfig, affine_matrices, augment, warp

ALL = AugmentConfig(rotate=15, translate=0.1, scale=0.1, shear=10, perspective=0.5, brightness=0.2,
                    contrast=0.2, crop=0.5)


def batch(n=16, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_zero_strength_is_exact_identity():
    x = batch()
    assert augment(x, AugmentConfig(), gen()) is x


@pytest.mark.parametrize("knob", [
    dict(rotate=7), dict(translate=0.1), dict(scale=0.1), dict(shear=10), dict(perspective=1.0),
    dict(brightness=0.3), dict(contrast=0.3), dict(crop=1.0),
])
def test_each_knob_changes_images_and_keeps_shape_and_range(knob):
    x = batch()
    y = augment(x, AugmentConfig(**knob), gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(x, y, atol=1e-3)
    assert y.min() >= 0 and y.max() <= 1 + 1e-6


def test_same_seed_same_output_other_seed_other_output():
    x = batch()
    assert torch.equal(augment(x, ALL, gen(1)), augment(x, ALL, gen(1)))
    assert not torch.equal(augment(x, ALL, gen(1)), augment(x, ALL, gen(2)))


def test_images_in_a_batch_get_different_transforms():
    x = batch(1).expand(8, 1, 28, 28).contiguous()
    y = augment(x, AugmentConfig(rotate=20), gen())
    assert not torch.allclose(y[0], y[1])


def test_rotation_by_90_degrees_matches_rot90():
    x = batch(2)
    theta = math.pi / 2
    m = torch.eye(3).repeat(2, 1, 1)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = math.cos(theta), -math.sin(theta), math.sin(theta), math.cos(theta)
    rotated = warp(x, m, projective=False)
    # output (x, y) samples input (-y, x): exactly torch.rot90 with k=1 on a square pixel grid
    assert torch.allclose(rotated, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5)
    # the projective path agrees with affine_grid on an affine matrix
    assert torch.allclose(warp(x, m, projective=True), rotated, atol=1e-5)


def test_translation_moves_mass_by_the_requested_pixels():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10:14, 10:14] = 1.0
    m = torch.eye(3)[None].clone()
    m[0, 0, 2] = -2 * 3 / 28  # shift content 3 px right
    y = warp(x, m, projective=False)
    cols = torch.arange(28.0)
    cx_before = (x[0, 0].sum(0) * cols).sum() / x.sum()
    cx_after = (y[0, 0].sum(0) * cols).sum() / y.sum()
    assert abs((cx_after - cx_before).item() - 3.0) < 1e-4


def test_rotation_stays_within_its_bound():
    cfg = AugmentConfig(rotate=7)
    m = affine_matrices(cfg, 1000, gen(), torch.device("cpu"))
    angles = torch.atan2(m[:, 1, 0], m[:, 0, 0]) * 180 / math.pi
    assert angles.abs().max() <= 7.0 + 1e-4 and angles.abs().max() > 6.0


def test_crop_zooms_in():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0
    y = augment(x, AugmentConfig(crop=1.0, crop_size=0.5), gen())
    assert (y > 0.5).sum() > (x > 0.5).sum()  # the blob got bigger


def test_large_batch_stays_on_its_device():
    x = batch(512)
    y = augment(x, ALL, gen())
    assert y.device == x.device and y.shape == (512, 1, 28, 28)


@pytest.mark.parametrize("size", [24, 20])
@pytest.mark.parametrize("knobs", [dict(), dict(rotate=1e-6), dict(perspective=1.0, perspective_scale=1e-7)])
def test_input_size_is_the_centre_crop_at_the_same_pixel_scale(size, knobs):
    """--input-size cuts the centre inside the one grid_sample: a (near-)identity warp gives exactly
    the centre pixels, not the whole image shrunk to size x size."""
    x = batch(4)
    out = augment(x, AugmentConfig(input_size=size, **knobs), gen())
    off = (28 - size) // 2
    assert out.shape == (4, 1, size, size)
    torch.testing.assert_close(out, x[..., off:off + size, off:off + size], atol=1e-5, rtol=0)


def test_input_size_rotation_turns_about_the_image_centre():
    """A 90-degree turn of the centre crop equals the centre crop of the turned image."""
    x = batch(2)
    cfg = AugmentConfig(rotate=90, input_size=20)
    m = affine_matrices(cfg, 2, gen(), x.device)
    full = warp(x, m, projective=False)
    cut = warp(x, m, projective=False, size=20)
    torch.testing.assert_close(cut, full[..., 4:24, 4:24], atol=1e-5, rtol=0)


@pytest.mark.parametrize("knobs", [dict(), dict(rotate=1e-6)])
def test_an_early_size_is_the_same_region_with_fewer_pixels(knobs):
    """Progressive resizing (--early-size 12 with --input-size 24) samples the centre 24 px at 12 x 12: each
    output pixel is the mean of a 2 x 2 block of the region (bilinear at the blocks' centres), so the whole
    digit is there, not its centre 12 px."""
    x = batch(4)
    out = augment(x, AugmentConfig(input_size=24, sample_size=12, **knobs), gen())
    region = x[..., 2:26, 2:26]
    assert out.shape == (4, 1, 12, 12)
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(region, 2), atol=1e-5, rtol=0)


def test_only_the_early_epochs_get_the_early_size():
    from runspec.config import TrainConfig

    cfg = TrainConfig(input_size=24, early_size=16, early_epochs=3, epochs=10)
    assert [cfg.augment_config(e).sample_size for e in (1, 3, 4, 10)] == [16, 16, 0, 0]
    assert cfg.augment_config().sample_size == 0  # no epoch: evaluation's size
