"""The a contrario segmentation, tested as a statistical procedure."""

import numpy as np
import pytest
from scipy import stats
from skimage.morphology import max_tree

from uflow.segmentation import (
    _log_upper_gamma_cf,
    build_max_tree,
    chi2_log_sf,
    correlation_area,
    log10_paper_test_count,
    node_nfa,
    segment,
    simplify_tree,
    smallest_log10_nfa,
    upsample_for_threshold,
)


def _chi2_maps(rng, batch, channels, side, scale=1.0):
    z = rng.standard_normal((batch, channels, side, side)) * scale
    return (z**2).sum(axis=1)


@pytest.mark.parametrize("dof", [1, 2, 7, 30, 56, 192, 816])
def test_log_survival_matches_scipy_on_a_grid(dof):
    x = np.linspace(0, 6 * dof + 40, 400)
    ours = chi2_log_sf(x, dof)
    ref = stats.chi2.logsf(x, dof)
    finite = np.isfinite(ref)
    assert np.allclose(ours[finite], ref[finite], rtol=1e-10, atol=1e-12)
    assert np.isfinite(ours).all(), "no underflow to -inf in the far tail"
    assert np.all(np.diff(ours) <= 1e-12), "a survival function is non-increasing"


@pytest.mark.parametrize("dof", [4, 30, 192])
def test_continued_fraction_agrees_with_scipy_where_both_are_valid(dof):
    # Q in [1e-250, 1e-100]: scipy is still finite, and this is where the far-tail branch takes over.
    x = np.array([stats.chi2.isf(10.0**-k, dof) for k in (100, 150, 200, 250)])
    ref = stats.chi2.logsf(x, dof)
    assert np.allclose(_log_upper_gamma_cf(dof / 2, x / 2), ref, rtol=1e-10)


def test_chernoff_misfire_is_gone_below_the_mean():
    # For m <= C the exact tail probability is large; the reference bound claimed it was tiny.
    assert chi2_log_sf(np.array([20.0, 30.0]), 30).min() > np.log(0.4)


def test_max_tree_is_scikit_images_max_tree():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (7, 5), (3, 9)]:
        for ties in (False, True):
            image = rng.random(shape) * 10
            image = np.round(image) if ties else image
            parent, traverser, area = build_max_tree(image)
            ref_parent, ref_traverser = max_tree(image, connectivity=1)
            assert np.array_equal(parent, ref_parent.ravel())
            assert np.array_equal(traverser, ref_traverser)
            assert area[traverser[0]] == image.size


def test_paper_test_count_is_astronomical():
    assert log10_paper_test_count([(28, 28), (14, 14)]) == pytest.approx(477, abs=1.5)


@pytest.mark.parametrize("mode", ["per_size", "paper"])
@pytest.mark.parametrize("side,channels", [(16, 8), (32, 30), (14, 192), (64, 24)])
@pytest.mark.parametrize("epsilon", [1.0, 100.0])
def test_false_alarms_on_pure_noise_are_at_most_epsilon(mode, side, channels, epsilon):
    rng = np.random.default_rng(side * 1000 + channels)
    batch = 150 if side < 64 else 60
    maps = _chi2_maps(rng, batch, channels, side)
    results = segment([maps], [channels], [(side, side)] * batch, log10_epsilon=np.log10(epsilon), test_count=mode)
    mean_detections = np.mean([len(r.regions) for r in results])
    assert mean_detections <= epsilon


def test_multi_scale_false_alarms_stay_below_epsilon():
    rng = np.random.default_rng(7)
    batch = 80
    maps = [_chi2_maps(rng, batch, c, s) for c, s in ((30, 32), (30, 16), (56, 8))]
    results = segment(maps, [30, 30, 56], [(128, 128)] * batch, log10_epsilon=1.0)
    assert np.mean([len(r.regions) for r in results]) <= 10.0


@pytest.mark.parametrize("scale", [0.9, 1.1])
def test_uniformly_mis_scaled_latents_do_not_flag_whole_images(scale):
    rng = np.random.default_rng(11)
    batch = 40
    maps = [_chi2_maps(rng, batch, 30, 32, scale), _chi2_maps(rng, batch, 56, 16, scale)]
    results = segment(maps, [30, 56], [(128, 128)] * batch)
    worst = max(r.mask.mean() for r in results)
    assert worst < 0.5
    if scale < 1:
        assert all(not r.regions for r in results), "smaller-than-normal latents carry no evidence of anomaly"


def test_planted_region_with_inflated_variance_is_found_with_its_area():
    rng = np.random.default_rng(5)
    batch, side, channels = 30, 32, 30
    z = rng.standard_normal((batch, channels, side, side))
    z[:, :, 10:16, 20:26] *= np.sqrt(1.5)  # 36 pixels, variance x1.5
    results = segment([(z**2).sum(axis=1)], [channels], [(128, 128)] * batch)
    truth = np.zeros((128, 128), bool)
    truth[40:64, 80:104] = True
    found = [r for r in results if (r.mask & truth).sum() > 0]
    assert len(found) >= 0.8 * batch
    for r in found:
        assert r.mask[~truth].mean() < 0.02, "detections stay on the planted region"
    ratios = [r.mask.sum() / truth.sum() for r in found]
    # The most significant node of a branch is the core of the region: measured median 25-40% of it.
    assert 0.15 < np.median(ratios) < 1.5, "the detected area is on the scale of the planted area"
    iou = [(r.mask & truth).sum() / (r.mask | truth).sum() for r in results]
    # Measured: median IoU 0.28 over the 30 images (0 where nothing was found), mean 0.31.
    assert np.median(iou) > 0.2


def test_outputs_are_consistent():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 20, 16, 16))
    z[0, :, 4:9, 4:9] *= 2.0
    maps = [(z**2).sum(axis=1)]
    results = segment(maps, [20], [(48, 64), (16, 16)])
    first = results[0]
    assert first.log10_nfa.shape == (48, 64) and first.mask.shape == (48, 64)
    assert np.array_equal(first.mask, first.log10_nfa < 0)
    assert first.regions, "the planted region must be detected"
    r = first.regions[0]
    x0, y0, x1, y1 = r.bbox
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
    assert r.log10_nfa < 0 and r.scale == 0
    assert first.mask[y0:y1, x0:x1].sum() >= r.area
    with pytest.raises(ValueError):
        segment(maps, [20], [(16, 16)] * 2, log10_epsilon=float("nan"))


def _correlated_chi2_maps(rng, batch, channels, side, width):
    """Latents that are N(0, 1) per element but averaged over a width x width window: correlated neighbours."""
    from scipy.ndimage import uniform_filter

    z = rng.standard_normal((batch, channels, side + 2 * width, side + 2 * width))
    z = uniform_filter(z, size=(1, 1, width, width), mode="constant") * width  # unit variance again
    z = z[:, :, width:-width, width:-width]
    return (z**2).sum(axis=1)


def test_correlation_area_is_one_for_independent_pixels_and_the_window_for_a_moving_average():
    rng = np.random.default_rng(3)
    assert correlation_area(_chi2_maps(rng, 16, 8, 32)) == pytest.approx(1.0, abs=0.15)
    # The chi2 statistic of a 3x3 moving-average field has autocorrelation rho_z(h)^2, summing to 1 + 4(4/9)^2 ... = 3.57.
    lags = np.array([1, 2 / 3, 1 / 3])
    expected = float(np.outer(lags, lags)[np.ix_([2, 1, 0, 1, 2], [2, 1, 0, 1, 2])].__pow__(2).sum())
    assert correlation_area(_correlated_chi2_maps(rng, 16, 8, 48, 3)) == pytest.approx(expected, rel=0.1)


def test_correlated_noise_false_alarms_are_held_at_epsilon_only_with_the_correlation_area():
    rng = np.random.default_rng(4)
    channels, side = 16, 32
    calibration = correlation_area(_correlated_chi2_maps(rng, 16, channels, side, 5))
    maps = _correlated_chi2_maps(rng, 40, channels, side, 5)
    sizes = [(side, side)] * len(maps)
    naive = np.mean([len(s.regions) for s in segment([maps], [channels], sizes)])
    corrected = np.mean([len(s.regions) for s in segment([maps], [channels], sizes, pixels_per_sample=[calibration])])
    assert naive > 2.0, "correlated pixels treated as independent over-detect"
    assert corrected <= 0.25


# --------------------------------------------------------------------------- the paper's tree, against a plain reference


def _random_map(rng: np.random.Generator, case: int) -> tuple[np.ndarray, int]:
    """A chi-square map of a random size and channel count; every third with ties, every third with a planted region."""
    h, w = (int(v) for v in rng.integers(1, 13, size=2))
    channels = int(rng.choice([1, 2, 5, 16]))
    z = rng.standard_normal((channels, h, w))
    if case % 3 == 1:  # few distinct values: equal levels, equal NFAs (z = 0 gives P = 1 at every area)
        z = np.round(z)
    elif case % 3 == 2:
        y, x, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(1, 4))
        z[:, max(0, y - r) : y + r, max(0, x - r) : x + r] *= 2.0
    return (z**2).sum(axis=0), channels


@pytest.mark.parametrize("mode", ["per_size", "paper"])
def test_tree_simplification_is_the_papers_on_random_maps(mode):
    from nfa_reference import simplify_reference

    rng = np.random.default_rng(12 if mode == "paper" else 21)
    tied = 0
    for case in range(160):
        stat, channels = _random_map(rng, case)
        h, w = stat.shape
        scorer = node_nfa(channels, h * w, 1, mode, log10_paper_test_count([(h, w)]), float(rng.choice([1.0, 2.5])))
        # The reference calls the same formula one node at a time, so equal values are equal bit for bit.
        expected = simplify_reference(stat, lambda level, area: float(scorer(np.array([level]), np.array([area]))[0]))
        leaves = simplify_tree(stat, scorer)
        pixels, leaf = leaves.pixel_runs()
        ours = sorted(
            ((frozenset(pixels[leaf == k].tolist()), float(leaves.log10_nfa[k])) for k in range(leaves.sizes.size)),
            key=lambda item: (item[1], min(item[0])),
        )
        assert [p for p, _ in ours] == [p for p, _ in expected], f"case {case}: {h}x{w}, {channels} channels"
        assert np.allclose([v for _, v in ours], [v for _, v in expected], rtol=0, atol=1e-9)
        tied += len({v for _, v in expected}) < len(expected)
    assert tied >= 10, "the cases exercise equal NFAs among the survivors"


def test_tree_follows_the_tie_rules_on_a_hand_made_map():
    # A 1x5 ridge: levels 1 < 2 < 3 on the left peak (one branch), 1 < 3 on the right one.
    stat = np.array([[3.0, 2.0, 1.0, 3.0, 3.0]])
    # Every node has the same NFA: the branch keeps its node nearest the root and the root absorbs both peaks.
    flat = simplify_tree(stat, lambda levels, areas: np.zeros(len(levels)))
    assert flat.sizes.tolist() == [5]
    # NFA = -area: bigger is better, so the merge wins and the whole map survives, as the reference says.
    bigger = simplify_tree(stat, lambda levels, areas: -np.asarray(areas, dtype=float))
    assert bigger.sizes.tolist() == [5]
    # NFA = +area: the smallest nodes win; the root (5 px) is worse than its children, so both peaks survive.
    smaller = simplify_tree(stat, lambda levels, areas: np.asarray(areas, dtype=float))
    assert sorted(smaller.sizes.tolist()) == [1, 2]


# --------------------------------------------------------------------------- masks a person would draw


@pytest.mark.parametrize("grid_shape,out", [((8, 8), (32, 32)), ((5, 7), (23, 40)), ((16, 16), (256, 256)), ((6, 4), (3, 5)), ((7, 9), (1021, 1019))])
def test_upsampled_map_thresholds_like_a_bilinear_mask(grid_shape, out):
    # The last size has too many phases for one table (75 x 1021 x 1019 > 2^23): the row-by-row path.
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(sum(out))
    grid = np.round(rng.standard_normal(grid_shape) * 2).astype(np.float32)
    grid[rng.random(grid_shape) < 0.3] = np.inf
    labels = np.arange(grid.size).reshape(grid_shape)
    values, source = upsample_for_threshold(grid, out, labels)
    assert np.array_equal(grid.ravel()[source], values), "every value is one of its source samples'"
    for t in np.r_[np.unique(grid[np.isfinite(grid)]) + 1e-3, np.inf]:
        mask = torch.from_numpy((grid < t).astype(np.float64))[None, None]
        smooth = F.interpolate(mask, size=out, mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
        assert np.array_equal(values < t, smooth), f"threshold {t}"


def test_masks_are_not_blocks_of_the_stride():
    # One 4x4 detection on a 16x16 map brought to 256 px: a nearest-neighbour mask is a 64 px square;
    # the bilinear outline cuts its corners (measured: 3,720 px, corners of 6 px cut on each side).
    grid = np.full((16, 16), np.inf, dtype=np.float32)
    grid[6:10, 6:10] = -5.0
    values, _ = upsample_for_threshold(grid, (256, 256))
    mask = values < 0
    assert mask[96:160, 96:160].mean() > 0.85 and not mask[:88].any() and not mask[168:].any()
    assert not mask[96, 96] and mask[128, 128], "corners rounded, centre kept"


def test_keep_most_significant_flags_the_image_even_when_nothing_passes_the_threshold():
    rng = np.random.default_rng(11)
    stats = (rng.standard_normal((2, 8, 32, 32)) ** 2).sum(axis=1)
    smallest = smallest_log10_nfa([stats], [8])
    plain, kept = (segment([stats], [8], [(32, 32)] * 2, log10_epsilon=[-np.inf, -np.inf], keep_most_significant=k) for k in ([False, False], [False, True]))
    assert not any(s.flagged or s.regions for s in plain)
    assert not kept[0].flagged and kept[1].flagged
    assert [r.log10_nfa for r in kept[1].regions] == pytest.approx([smallest[1]])  # the most significant leaf alone
    assert kept[1].mask.any() and np.array_equal(kept[1].log10_nfa, plain[1].log10_nfa)  # the NFA map is unchanged
