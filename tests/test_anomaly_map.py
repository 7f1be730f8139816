"""The anomaly map, its smoothing and the image score, against plain independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from uflow.anomaly_map import SMOOTHING_SIGMA, display_map, image_score, likelihood_map, map_and_raw_scores


def test_likelihood_map_is_one_minus_the_mean_likelihood_over_scales():
    gen = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 8, 16, 16, generator=gen)
    coarse = torch.ones(2, 16, 8, 8)  # a constant map upsamples to the same constant whatever the interpolation
    want = 1 - (torch.exp(-0.5 * fine.pow(2).mean(1)) + torch.exp(torch.tensor(-0.5))) / 2
    got = likelihood_map([fine, coarse], (16, 16))
    assert got.shape == (2, 16, 16) and torch.allclose(got, want, atol=1e-6)


def test_each_scale_is_its_own_part_of_the_image_score_and_the_map_is_unchanged():
    # A defect only the finest scale sees: that scale's map alone shows it in full, the whole map (the mean of the
    # three scales' maps, two of which see nothing) at a third of it.
    fine = torch.zeros(1, 8, 32, 32)
    fine[:, :, 10:14, 20:24] = 3.0
    latents = [fine, torch.zeros(1, 16, 16, 16), torch.zeros(1, 32, 8, 8)]
    coarse = [torch.full((1, 16, 16, 16), 0.5)]
    size = (32, 32)
    whole_map, flows = map_and_raw_scores(latents, coarse, size, "flows")
    same_map, scales = map_and_raw_scores(latents, coarse, size, "scales")
    assert torch.equal(whole_map, same_map) and torch.equal(whole_map, likelihood_map(latents, size))
    coarse_score = image_score(likelihood_map(coarse, size))
    assert len(flows) == 2 and torch.equal(flows[0], image_score(whole_map)) and torch.equal(flows[1], coarse_score)
    assert len(scales) == 4 and torch.equal(scales[3], coarse_score)
    # 16 of 1,024 pixels hold 1 - exp(-4.5) = 0.989; the top 1 % (11 pixels) are all inside.
    assert scales[0].item() == pytest.approx(1 - np.exp(-4.5), abs=1e-6)
    assert scales[1].item() == scales[2].item() == 0.0
    assert flows[0].item() == pytest.approx(scales[0].item() / 3, abs=1e-6)
    _, alone = map_and_raw_scores(latents, None, size, "scales")
    assert len(alone) == 3


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
