"""The anomaly map, its smoothing and the image score, against plain independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from conftest import plain_centre_weight, plain_shrunk_statistics
from uflow.anomaly_map import (
    ALIGNED_WEIGHT,
    SMOOTHING_SIGMA,
    PositionAccumulator,
    PositionStatistics,
    display_map,
    image_score,
    likelihood_map,
    map_and_raw_scores,
    parts_for,
)


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


def _pattern_and_noise(rng, n, side, amplitude):
    """Maps (n, side, side): a fixed per-position pattern of the given amplitude plus independent noise of spread 0.05."""
    pattern = amplitude * np.sin(np.linspace(0, 3 * np.pi, side))[:, None] * np.cos(np.linspace(0, 2 * np.pi, side))[None, :]
    return 0.5 + pattern + 0.05 * rng.standard_normal((n, side, side)), pattern


def test_position_statistics_match_a_plain_computation_batch_by_batch():
    rng = np.random.default_rng(0)
    parts = [_pattern_and_noise(rng, 30, 16, amplitude)[0] for amplitude in (0.0, 0.02, 0.2)]
    accumulator = PositionAccumulator()
    for start in range(0, 30, 7):  # uneven batches, as the last batch of a fit is
        accumulator.add([torch.from_numpy(part[start : start + 7]).float() for part in parts])
    stats = accumulator.statistics()
    assert stats.centres.shape == stats.spreads.shape == (3, 16, 16)
    for i, part in enumerate(parts):
        centre, spread = plain_shrunk_statistics(part.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(stats.centres[i].numpy(), centre, rtol=0, atol=1e-6)
        np.testing.assert_allclose(stats.spreads[i].numpy(), spread, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2 training images"):
        PositionAccumulator().statistics()


def test_position_statistics_fall_back_to_global_on_noise_and_keep_a_real_pattern():
    rng = np.random.default_rng(1)
    noise, _ = _pattern_and_noise(rng, 100, 32, 0.0)
    aligned, pattern = _pattern_and_noise(rng, 100, 32, 0.05)
    accumulator_noise, accumulator_aligned = PositionAccumulator(), PositionAccumulator()
    accumulator_noise.add([torch.from_numpy(noise)])
    accumulator_aligned.add([torch.from_numpy(aligned)])
    flat, kept = accumulator_noise.statistics().centres[0].numpy(), accumulator_aligned.statistics().centres[0].numpy()
    # Computed here: on noise the raw per-position means spread 0.0051 between positions and the shrunk centres
    # 0.0002; with a pattern of spread 0.025 the centres keep 99 % of its spread and follow it with correlation
    # 0.979, as closely as the raw per-position means do (0.979): the weight there is near 1.
    assert flat.std() < 0.1 * noise.mean(axis=0).std()
    raw = aligned.mean(axis=0)
    assert np.corrcoef(kept.ravel(), pattern.ravel())[0, 1] >= np.corrcoef(raw.ravel(), pattern.ravel())[0, 1] - 1e-3
    assert 0.9 < kept.std() / pattern.std() < 1.1


def test_centre_weights_tell_a_stable_pattern_from_noise_and_choose_the_parts():
    rng = np.random.default_rng(3)
    noise, _ = _pattern_and_noise(rng, 100, 32, 0.0)
    faint, _ = _pattern_and_noise(rng, 100, 32, 0.002)
    aligned, _ = _pattern_and_noise(rng, 100, 32, 0.05)
    accumulator = PositionAccumulator()
    accumulator.add([torch.from_numpy(m) for m in (noise, faint, aligned)])
    weights = accumulator.centre_weights()
    np.testing.assert_allclose(weights, [plain_centre_weight(m) for m in (noise, faint, aligned)], rtol=1e-9, atol=1e-12)
    # Computed here: 0.00, 0.10 and 0.96. A pattern 0.002 high under noise of spread 0.05 is mostly noise in a
    # hundred images' means; one of 0.05 is the aligned case.
    assert weights[0] < 0.05 and weights[1] < 0.5 < ALIGNED_WEIGHT < weights[2]
    assert [parts_for(w) for w in weights] == ["scales", "scales", "flows"]
    assert parts_for(ALIGNED_WEIGHT) == "flows" and parts_for(np.nextafter(ALIGNED_WEIGHT, 0)) == "scales"


def test_per_position_parts_are_standardised_before_their_top_percent():
    rng = np.random.default_rng(2)
    latents = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    coarse = [torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))]
    size = (32, 32)
    flow_map, plain = map_and_raw_scores(latents, coarse, size, "scales")
    centres = torch.from_numpy(rng.uniform(0.2, 0.8, (4, 32, 32))).float()
    spreads = torch.from_numpy(rng.uniform(0.05, 0.2, (4, 32, 32))).float()
    same_map, scores = map_and_raw_scores(latents, coarse, size, "scales", PositionStatistics(centres, spreads))
    assert torch.equal(same_map, flow_map)  # the map a person sees does not move
    part_maps = [1 - torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)) for z in latents]
    expected = [image_score((torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0] - c) / w)
                for m, c, w in zip(part_maps, centres, spreads)]
    expected.append(image_score((likelihood_map(coarse, size) - centres[3]) / spreads[3]))
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(scores[0], plain[0])
