"""Metrics against independent brute-force references on small cases."""

import numpy as np
import pytest
from scipy import stats
from skimage.measure import label

from uflow.metrics import (
    _PerImagePixels,
    aupro,
    auroc_interval,
    f1_max,
    fair_threshold,
    image_auroc,
    integrate_to,
    miou_at,
    miou_curve,
    paired_auroc_difference,
    paired_pixel_differences,
    pixel_auroc,
    pixel_intervals,
    pro_curve,
)


def _toy_set(seed, n=6, side=12, levels=None):
    """Maps with a bump where the ground truth has regions; optionally quantised to force ties."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        g = np.zeros((side, side), bool)
        if i % 3:  # a third of the images are normal
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(0, side - 3, 2)
                g[y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
        m = rng.random((side, side)) + 0.8 * g
        if levels:
            m = np.round(m * levels) / levels
        maps.append(m.astype(np.float32))
        masks.append(g)
    return maps, masks


def _brute_auroc(scores, labels):
    """Mann-Whitney: the share of (positive, negative) pairs ordered right, ties counting half."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def _brute_pro(maps, masks, limit):
    """PRO by thresholding at every distinct value, one region at a time (skimage labels, 8-connected)."""
    values = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    regions = [(i, label(g, connectivity=2) == k) for i, g in enumerate(masks) for k in range(1, label(g, connectivity=2).max() + 1)]
    normal = sum((~g).sum() for g in masks)
    fprs, pros = [0.0], [0.0]
    for t in values:
        detected = [m >= t for m in maps]
        fprs.append(sum((d & ~g).sum() for d, g in zip(detected, masks)) / normal)
        pros.append(np.mean([(detected[i] & r).sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate up to the limit with linear interpolation of the crossing segment
    area = 0.0
    for k in range(1, fprs.size):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (limit - x0) / (x1 - x0) * (y1 - y0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("levels", [None, 5])
def test_pixel_and_image_auroc_match_pair_counting(levels):
    maps, masks = _toy_set(0, levels=levels)
    values = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(_brute_auroc(values, truth), abs=1e-12)
    scores = np.array([m.max() for m in maps])
    labels = np.array([g.any() for g in masks])
    assert image_auroc(scores, labels) == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_region_by_region_thresholding(levels, limit):
    maps, masks = _toy_set(1, levels=levels)
    assert aupro(maps, masks, limit) == pytest.approx(_brute_pro(maps, masks, limit), abs=1e-9)


def test_aupro_hand_checked_cases():
    g = np.zeros((4, 4), bool)
    g[0, 0] = True
    g[3, 2:] = True  # two regions: 1 and 2 pixels
    perfect = g.astype(np.float32)
    assert aupro([perfect], [g]) == pytest.approx(1.0)
    # Inverted map: every normal pixel comes first, so overlap is 0 until FPR reaches 1.
    assert aupro([1 - perfect], [g]) == pytest.approx(0.0)
    # Each region counts equally, whatever its size: finding only the single pixel gives PRO 0.5 at FPR 0.
    half = np.zeros((4, 4), np.float32)
    half[0, 0] = 2.0
    curve = pro_curve([half], [g])
    assert any(x == 0.0 and y == pytest.approx(0.5) for x, y in zip(curve.x, curve.y))


def test_integration_interpolates_the_limit():
    from uflow.metrics import Curve

    assert integrate_to(Curve(np.array([0.0, 1.0]), np.array([0.0, 1.0])), 0.3) == pytest.approx(0.045)


def test_pixel_statistics_agree_with_scikit_learn_on_a_larger_set():
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    maps, masks = _toy_set(6, n=30, side=32, levels=50)
    values = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(truth, values), abs=1e-12)
    precision, recall, _ = precision_recall_curve(truth, values)
    assert f1_max(maps, masks) == pytest.approx((2 * precision * recall / np.maximum(precision + recall, 1e-12)).max(), abs=1e-12)


def test_f1_max_matches_threshold_sweep():
    maps, masks = _toy_set(2, levels=6)
    values = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([g.ravel() for g in masks])
    best = 0.0
    for t in np.unique(values):
        d = values >= t
        tp = (d & truth).sum()
        best = max(best, 2 * tp / (d.sum() + truth.sum()))
    assert f1_max(maps, masks) == pytest.approx(best, abs=1e-9)


def test_miou_curve_is_exact_at_its_thresholds_and_counts_normal_images():
    rng = np.random.default_rng(3)
    maps, masks = _toy_set(3)
    nfa = [np.where(rng.random(m.shape) < 0.3, np.inf, -5 * m + rng.normal(0, 0.3, m.shape)) for m in maps]
    curve = miou_curve(nfa, masks)
    for t, value in zip(curve.x[::7], curve.y[::7]):
        assert value == pytest.approx(miou_at(nfa, masks, t), abs=1e-12)
    assert curve.y.max() >= max(miou_at(nfa, masks, t) for t in (-7.3, -2.0, 0.0)), "the curve's best is the oracle"
    with_extra = miou_curve(nfa, masks, also=[-2.5])
    assert -2.5 in with_extra.x
    # Nothing detected: normal images score 1, defective ones 0.
    assert curve.y[0] == pytest.approx(np.mean([not g.any() for g in masks]))
    # A detection on a normal image makes its IoU 0.
    empty = np.zeros((5, 5), bool)
    assert miou_at([np.full((5, 5), -1.0)], [empty], 0.0) == 0.0
    assert miou_at([np.full((5, 5), 1.0)], [empty], 0.0) == 1.0


def test_fair_threshold_flags_about_one_pixel_per_normal_image():
    rng = np.random.default_rng(4)
    normal = [rng.normal(3, 1, (16, 16)) for _ in range(10)]
    t = fair_threshold(normal)
    flagged = sum((v < t).sum() for v in normal)
    assert flagged == 10
    assert fair_threshold([np.full((4, 4), np.inf)]) == np.inf



def _two_systems(rng, n_normal=60, n_anomalous=40, gain_b=1.0, shared=1.0):
    """Two systems scoring the same images: a shared per-image part (what makes them correlated) and their own noise."""
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    common = rng.normal(size=labels.size) * shared + labels
    return common + rng.normal(size=labels.size), common + gain_b * labels + rng.normal(size=labels.size), labels


@pytest.mark.parametrize("levels", [None, 2])
def test_paired_auroc_difference_reads_the_same_aurocs_as_pair_counting(levels):
    rng = np.random.default_rng(5)
    a, b, labels = _two_systems(rng)
    if levels:  # quantised scores: many ties, which the midranks must count half
        a, b = np.round(a * levels), np.round(b * levels)
    result = paired_auroc_difference(a, b, labels)
    assert result.auroc_a == pytest.approx(_brute_auroc(a, labels), abs=1e-12)
    assert result.auroc_b == pytest.approx(_brute_auroc(b, labels), abs=1e-12)
    assert result.low < result.difference < result.high


def test_paired_auroc_standard_error_matches_a_paired_bootstrap():
    rng = np.random.default_rng(6)
    a, b, labels = _two_systems(rng, gain_b=0.5)
    result = paired_auroc_difference(a, b, labels)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    differences = []
    for _ in range(2000):  # resample each class, the same images for both systems
        pick = np.r_[rng.choice(negatives, negatives.size), rng.choice(positives, positives.size)]
        differences.append(_brute_auroc(a[pick], labels[pick]) - _brute_auroc(b[pick], labels[pick]))
    # Computed here: DeLong 0.0558, bootstrap 0.0569 (2 % apart); dropping the covariance of the pair gives 0.0712.
    assert result.standard_error == pytest.approx(np.std(differences), rel=0.10)


def test_paired_auroc_test_rejects_equal_systems_at_its_nominal_rate_and_finds_a_better_one():
    rng = np.random.default_rng(7)
    trials = [paired_auroc_difference(*_two_systems(rng, gain_b=0.0)) for _ in range(1000)]
    rejected = np.mean([t.p_value < 0.05 for t in trials])
    # Computed here: 4.6 % of 1,000 pairs of equally good systems rejected at 5 % (a binomial 95 % band is about
    # 3.7 % to 6.4 %); a test that ignored the pairing (independent variances) rejects 0.7 %, and one at twice the
    # nominal rate would fail the upper bound.
    assert 0.035 <= rejected <= 0.075
    covered = np.mean([t.low <= 0.0 <= t.high for t in trials])
    assert covered == pytest.approx(1 - rejected, abs=1e-12)
    better = paired_auroc_difference(*_two_systems(rng, n_normal=100, n_anomalous=100, gain_b=1.5))
    assert better.difference < 0 and better.p_value < 1e-3


def test_paired_auroc_difference_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="3 scores for 4 images"):
        paired_auroc_difference([0, 1, 2], [0, 1, 2], [True, False, True, False])
    with pytest.raises(ValueError, match="2 anomalous and 2 normal"):
        paired_auroc_difference([0, 1, 2], [0, 1, 2], [True, False, False])
    same = paired_auroc_difference([0.1, 0.4, 0.35, 0.8], [0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    assert same.difference == 0.0 and same.standard_error == 0.0 and same.p_value == 1.0


def _two_pixel_systems(rng, n_images=40, n_defective=12, side=24, gain_b=0.0):
    """Two systems' maps of the same images: a per-image offset both share and one each (pixels of an image move
    together), pixel noise, and a defect region raised in both (by 1 + ``gain_b`` in system b)."""
    masks = [np.zeros((side, side), bool) for _ in range(n_images)]
    for mask in masks[:n_defective]:
        y, x = rng.integers(0, side - 8, size=2)
        mask[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = True
    shared = rng.normal(size=n_images)

    def system(gain: float) -> list[np.ndarray]:
        return [0.7 * shared[i] + 0.7 * rng.normal() + rng.normal(size=(side, side)) + gain * mask for i, mask in enumerate(masks)]

    return system(1.0), system(1.0 + gain_b), masks


@pytest.mark.parametrize("levels", [None, 2])
def test_paired_pixel_differences_report_the_exact_metrics_and_resample_them_exactly(levels):
    rng = np.random.default_rng(8)
    a, b, masks = _two_pixel_systems(rng)
    if levels:  # quantised maps: ties between and within images
        a, b = [np.round(m * levels) for m in a], [np.round(m * levels) for m in b]
    result = paired_pixel_differences(a, b, masks, resamples=50)
    assert result["pixel_auroc"].value_a == pytest.approx(pixel_auroc(a, masks), abs=1e-12)
    assert result["aupro"].value_b == pytest.approx(aupro(b, masks), abs=1e-12)
    # A resample reweights whole images: the per-image tables must give what the duplicated image list gives.
    per_image = _PerImagePixels(a, masks, 4000, 0.6)
    for _ in range(5):
        pick = np.r_[rng.integers(0, 12, 12), rng.integers(12, 40, 28)]
        weights = np.bincount(pick, minlength=40)[None].astype(float)
        maps, truth = [a[i] for i in pick], [masks[i] for i in pick]
        assert per_image.auroc(weights)[0] == pytest.approx(pixel_auroc(maps, truth), abs=1e-12)
        assert per_image.aupro(weights, 0.3)[0] == pytest.approx(aupro(maps, truth), abs=1e-3)


def test_paired_pixel_test_rejects_equal_systems_at_its_nominal_rate_and_finds_a_better_one():
    rng = np.random.default_rng(9)
    trials = [paired_pixel_differences(*_two_pixel_systems(rng, n_images=60, n_defective=20), resamples=200, seed=k) for k in range(300)]
    rejected = {m: np.mean([t[m].p_value < 0.05 for t in trials]) for m in ("pixel_auroc", "aupro")}
    # Computed here: of 300 pairs of equally good systems, 5.7 % (pixel AUROC) and 6.3 % (AUPRO) rejected at 5 %
    # (a binomial 95 % band is about 2.7 % to 7.7 %). Without the small-sample correction
    # the same trials rejected 9.7 % and 8.3 %, and a test at twice the nominal rate would fail the upper bound.
    assert all(0.02 <= r <= 0.085 for r in rejected.values()), rejected
    better = paired_pixel_differences(*_two_pixel_systems(rng, n_images=80, n_defective=30, gain_b=1.0), resamples=400)
    assert all(r.difference < 0 and r.p_value < 1e-3 for r in better.values())


def test_paired_pixel_differences_refuse_what_they_cannot_compare():
    maps = [np.zeros((4, 4))] * 4
    with pytest.raises(ValueError, match="4 and 3 maps for 4 masks"):
        paired_pixel_differences(maps, maps[:3], [np.zeros((4, 4), bool)] * 4)
    one_defect = [np.eye(4, dtype=bool)] + [np.zeros((4, 4), bool)] * 3
    with pytest.raises(ValueError, match="needs 2 images with a defect and 2 without"):
        paired_pixel_differences(maps, maps, one_defect)


def test_auroc_interval_covers_the_true_auroc_even_near_one():
    # Binormal test sets of 40 anomalous and 100 normal images: the true AUROC is Phi(shift / sqrt 2).
    rng = np.random.default_rng(10)
    labels = np.r_[np.ones(40, bool), np.zeros(100, bool)]
    coverage, delong = {}, {}
    for shift in (1.5, 3.5):
        true = stats.norm.cdf(shift / np.sqrt(2))
        intervals = [auroc_interval(np.r_[rng.normal(shift, 1, 40), rng.normal(0, 1, 100)], labels) for _ in range(1000)]
        coverage[round(true, 4)] = np.mean([i.low <= true <= i.high for i in intervals])
        delong[round(true, 4)] = np.mean([abs(i.value - true) <= 1.959964 * i.standard_error for i in intervals])
        assert all(0.0 <= i.low <= i.value <= i.high <= 1.0 for i in intervals)
    # Computed here: 95.4 % at AUROC 0.856 and 98.2 % at 0.993; DeLong's normal interval on the same test sets
    # covered 92.8 % and 76.8 % (so it would fail the bound near one).
    assert all(c >= 0.93 for c in coverage.values()), coverage
    assert delong[0.9933] < 0.9, delong
    perfect = auroc_interval(np.r_[np.ones(40), np.zeros(100)], labels)
    assert perfect.value == perfect.high == 1.0 and 0.95 < perfect.low < 0.98  # 0.9655: not a point
    assert perfect.standard_error == 0.0  # DeLong's, at the observed value


def test_pixel_intervals_cover_the_population_value():
    rng = np.random.default_rng(11)
    population = _two_pixel_systems(rng, n_images=3000, n_defective=1000)
    truth = {"pixel_auroc": pixel_auroc(population[0], population[2]), "aupro": aupro(population[0], population[2])}
    covered = {m: [] for m in truth}
    for k in range(200):
        maps, _, masks = _two_pixel_systems(rng, n_images=60, n_defective=20)
        intervals = pixel_intervals(maps, masks, resamples=200, seed=k)
        for m in truth:
            covered[m].append(intervals[m].low <= truth[m] <= intervals[m].high)
        if k == 0:  # against a flat map (AUROC 0.5 and AUPRO 0.15 whatever the draw) the paired error is this one's
            flat = paired_pixel_differences(maps, [np.zeros_like(x) for x in maps], masks, resamples=200, seed=k)
            assert all(intervals[m].standard_error == pytest.approx(flat[m].standard_error, rel=1e-9) for m in truth)
            assert intervals["pixel_auroc"].value == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    coverage = {m: np.mean(v) for m, v in covered.items()}
    # Computed here: 94.5 % (pixel AUROC) and 94.0 % (AUPRO) of 200 test sets covered the value of a 3,000-image
    # population (93.0 and 92.5 % without the small-sample correction); an interval covering 85 % would fail.
    assert all(c >= 0.9 for c in coverage.values()), coverage
