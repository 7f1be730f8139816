"""The anomaly map, its smoothing and the image score, against plain independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from uflow.anomaly_map import SMOOTHING_SIGMA, display_map, image_score, likelihood_map


def test_likelihood_map_is_one_minus_the_mean_likelihood_over_scales():
    gen = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 8, 16, 16, generator=gen)
    coarse = torch.ones(2, 16, 8, 8)  # a constant map upsamples to the same constant whatever the interpolation
    want = 1 - (torch.exp(-0.5 * fine.pow(2).mean(1)) + torch.exp(torch.tensor(-0.5))) / 2
    got = likelihood_map([fine, coarse], (16, 16))
    assert got.shape == (2, 16, 16) and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("side", [256, 128])
def test_display_map_is_a_gaussian_blur_scaled_with_the_input(side):
    rng = np.random.default_rng(side)
    raw = rng.random((2, side, side)).astype(np.float32)
    sigma = SMOOTHING_SIGMA * side / 256  # 4 px at 256, 2 px at 128
    got = display_map(torch.from_numpy(raw), (side, side)).numpy()
    want = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="nearest", truncate=4.0) for m in raw])
    assert np.abs(got - want).max() < 1e-5


def test_display_map_keeps_a_flat_map_flat_and_resizes_the_blurred_map_bilinearly():
    flat = torch.full((1, 64, 64), 0.25)
    assert torch.allclose(display_map(flat, (64, 64)), flat, atol=1e-6)  # no darkened border
    raw = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    blurred = torch.from_numpy(ndimage.gaussian_filter(raw.astype(np.float64), 1.0, mode="nearest", truncate=4.0).astype(np.float32))
    want = F.interpolate(blurred[None, None], size=(50, 130), mode="bilinear", align_corners=False)[0, 0]
    got = display_map(torch.from_numpy(raw)[None], (50, 130))[0]
    assert got.shape == (50, 130) and torch.allclose(got, want, atol=1e-5)


def test_image_score_is_the_mean_of_the_top_percent():
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 40, 40, generator=gen)
    top = int(np.ceil(40 * 40 / 100))  # 16 pixels
    want = maps.flatten(1).sort(dim=1).values[:, -top:].mean(dim=1)
    assert torch.allclose(image_score(maps), want)
