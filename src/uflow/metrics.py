"""The field's metrics: pixel and image AUROC, AUPRO, F1-max and mIoU at three thresholds.

With them, how sure a test set lets one be: each AUROC's and AUPRO's 95 % interval (Newcombe's
for image AUROC; whole images resampled for the pixel metrics), and the paired difference
between two systems on the same images (DeLong for image AUROC; whole images resampled again).

Definitions follow the MVTec-AD evaluation and the U-Flow paper:

* pixel AUROC over all test pixels pooled, image AUROC over image scores
  (scikit-learn computes both exactly);
* AUPRO: per-region overlap (each connected ground-truth region, 8-connected,
  counts equally) against the false positive rate on normal pixels, integrated
  up to FPR 0.3 and divided by 0.3;
* F1-max: the best pixel F1 over all thresholds of the anomaly map;
* mIoU: IoU per test image, normal images included (1 when nothing is
  detected, else 0), averaged; at the automatic threshold log10 NFA < 0, at
  the best threshold on the test set ("oracle", an upper bound, never a
  selection), and at a "fair" threshold set on held-out normal training
  images only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage, optimize, stats
from sklearn.metrics import roc_auc_score, roc_curve

PRO_FPR_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Curve:
    """A curve as (x, y) arrays, for plotting."""

    x: np.ndarray
    y: np.ndarray


def image_auroc(scores: Sequence[float], anomalous: Sequence[bool]) -> float:
    """Area under the ROC of image scores; ``anomalous`` is the ground truth per image."""
    labels = np.asarray(anomalous, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


@dataclass(frozen=True)
class AurocDifference:
    """Image AUROC of system a minus system b on the same images, with DeLong's standard error.

    ``low`` and ``high`` bound the 95 % confidence interval of the difference; ``p_value`` is the two-sided
    p-value of "both AUROCs are equal".
    """

    auroc_a: float
    auroc_b: float
    difference: float
    standard_error: float
    low: float
    high: float
    p_value: float


def _delong(scores: np.ndarray, anomalous: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k systems' scores (k, N) on the same images and DeLong's covariance of them (k, k)."""
    labels = np.asarray(anomalous, dtype=bool)
    if scores.shape[1] != len(labels):
        raise ValueError(f"{scores.shape[1]} scores for {len(labels)} images")
    m, n = int(labels.sum()), int((~labels).sum())
    if m < 2 or n < 2:
        raise ValueError(f"an AUROC's standard error needs 2 anomalous and 2 normal images at least; got {m} and {n}")
    positives, negatives = scores[:, labels], scores[:, ~labels]
    # For each anomalous image, the share of normal images it outscores (ties count half), and for each normal
    # image the share of anomalous images that outscore it; the AUROC is the mean of either.
    combined = stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    above = (combined[:, :m] - stats.rankdata(positives, axis=1)) / n
    below = 1.0 - (combined[:, m:] - stats.rankdata(negatives, axis=1)) / m
    return above.mean(axis=1), np.atleast_2d(np.cov(above) / m + np.cov(below) / n)


@dataclass(frozen=True)
class Interval:
    """A metric with its standard error and 95 % confidence interval (clipped to [0, 1])."""

    value: float
    standard_error: float
    low: float
    high: float

    def to_list(self) -> list[float]:
        return [round(self.low, 6), round(self.high, 6)]


def auroc_interval(scores: Sequence[float], anomalous: Sequence[bool]) -> Interval:
    """Image AUROC with a 95 % interval by Newcombe's method 5 (Statistics in Medicine, 2006).

    The interval holds every value t whose Hanley-McNeil variance, computed at t itself, puts the
    observed AUROC within 1.96 standard errors: like Wilson's interval for a proportion, it stays
    inside [0, 1] and does not shrink to a point at an AUROC of 1, where DeLong's does (every pair
    ordered right leaves DeLong no variance). On simulated test sets of 40 anomalous and 100 normal
    images (``tests/test_metrics.py``) it covered the true AUROC 95.4 % of the time at 0.856 and
    98.2 % at 0.993, where DeLong's covered 92.8 % and 76.8 %. ``standard_error`` is DeLong's, at
    the observed AUROC.
    """
    labels = np.asarray(anomalous, dtype=bool)
    auroc, covariance = _delong(np.asarray(scores, dtype=np.float64)[None], labels)
    value = float(auroc[0])
    m, n = int(labels.sum()), int((~labels).sum())
    half_n = (m + n) / 2.0  # Newcombe's N*: the mean group size
    z2 = float(stats.norm.ppf(0.975)) ** 2

    def outside(t: float) -> float:  # > 0 where t is outside the interval
        variance = t * (1 - t) / (m * n) * (1 + (half_n - 1) * (1 - t) / (2 - t) + (half_n - 1) * t / (1 + t))
        return (value - t) ** 2 - z2 * variance

    # t = the AUROC itself is inside; at an AUROC of 0 or 1 the variance vanishes there too, so bracket just off it.
    low = optimize.brentq(outside, 0.0, min(value, 1.0 - 1e-9)) if value > 0.0 else 0.0
    high = optimize.brentq(outside, max(value, 1e-9), 1.0) if value < 1.0 else 1.0
    return Interval(value, float(np.sqrt(max(covariance[0, 0], 0.0))), float(low), float(high))


def paired_auroc_difference(scores_a: Sequence[float], scores_b: Sequence[float], anomalous: Sequence[bool]) -> AurocDifference:
    """Compare two systems' image AUROCs on the same test images (DeLong, DeLong and Clarke-Pearson 1988).

    Needs 2 anomalous and 2 normal images at least (``ValueError`` otherwise).

    The two AUROCs are correlated (same images), so their difference has a smaller variance than two
    independent estimates would; DeLong's structural components estimate it from each image's share of the
    AUROC, with midranks for ties. Written by hand because neither scikit-learn nor scipy offers it.
    """
    auroc, covariance = _delong(np.stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)]), anomalous)
    variance = max(float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]), 0.0)
    difference, error = float(auroc[0] - auroc[1]), float(np.sqrt(variance))
    p_value = 1.0 if error == 0.0 else float(2 * stats.norm.sf(abs(difference) / error))
    half = float(stats.norm.ppf(0.975)) * error
    return AurocDifference(float(auroc[0]), float(auroc[1]), difference, error, difference - half, difference + half, p_value)


def image_roc(scores: Sequence[float], anomalous: Sequence[bool]) -> Curve:
    fpr, tpr, _ = roc_curve(np.asarray(anomalous, dtype=bool), np.asarray(scores, dtype=np.float64))
    return Curve(fpr, tpr)


class PixelStatistics:
    """Every pixel-level curve of a test set from one pass: ROC, F1 and per-region overlap.

    Written by hand because the library route is too slow at this size:
    scikit-learn's exact ROC and precision-recall curves argsort every pixel
    (tens of millions for a few hundred 256 px images, about 20 s each). Here
    only the defective pixels (a few percent) are argsorted; the normal ones
    are sorted by value alone, which is an order of magnitude faster, and
    every count "how many normal pixels are >= t" is a binary search. All
    results are exact, ties included; the tests compare them with
    scikit-learn and with brute-force thresholding.
    """

    def __init__(self, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
        values, truth, weight = [], [], []
        self.n_regions = 0
        for m, g in zip(maps, masks):
            g = np.asarray(g, dtype=bool)
            labels, count = ndimage.label(g, structure=_EIGHT_CONNECTED)
            sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
            m = np.asarray(m, dtype=np.float32)
            values.append(m[~g])
            truth.append(m[g])
            weight.append(1.0 / sizes[labels[g]])  # each region counts once, whatever its size
            self.n_regions += count
        self.negatives = np.sort(np.concatenate(values)) if values else np.empty(0, np.float32)
        positives = np.concatenate(truth) if truth else np.empty(0, np.float32)
        order = np.argsort(-positives, kind="stable")
        ordered = positives[order]
        last_of_tie = np.r_[ordered[1:] != ordered[:-1], True] if ordered.size else np.empty(0, bool)
        # Distinct defective values, descending, with the counts at ">= t".
        self.thresholds = ordered[last_of_tie]
        self.pos_ge = np.flatnonzero(last_of_tie) + 1.0
        weights = np.concatenate(weight)[order] if weight else np.empty(0)
        self.overlap_ge = np.cumsum(weights)[last_of_tie] / max(self.n_regions, 1)
        n = self.negatives.size
        self.neg_ge = n - np.searchsorted(self.negatives, self.thresholds, side="left").astype(np.float64)
        self.neg_gt = n - np.searchsorted(self.negatives, self.thresholds, side="right").astype(np.float64)

    @property
    def n_positive(self) -> int:
        return int(self.pos_ge[-1]) if self.pos_ge.size else 0

    @property
    def n_negative(self) -> int:
        return int(self.negatives.size)

    def auroc(self) -> float:
        """Mann-Whitney form: the share of (defective, normal) pairs ordered right, ties counting half."""
        if not self.n_positive or not self.n_negative:
            return float("nan")
        count_at = np.diff(np.r_[0.0, self.pos_ge])
        below = self.n_negative - self.neg_ge
        tied = self.neg_ge - self.neg_gt
        return float((count_at * (below + 0.5 * tied)).sum() / (self.n_positive * self.n_negative))

    def roc(self, points: int = 2000) -> Curve:
        """ROC vertices at every defective value, thinned to about ``points`` for plotting."""
        fpr = np.r_[0.0, self.neg_ge / max(self.n_negative, 1), 1.0]
        tpr = np.r_[0.0, self.pos_ge / max(self.n_positive, 1), 1.0]
        keep = np.unique(np.linspace(0, fpr.size - 1, min(points, fpr.size)).astype(int))
        return Curve(fpr[keep], tpr[keep])

    def f1_max(self) -> float:
        """Best F1; it is reached at a defective value (lowering t further only adds false positives)."""
        if not self.n_positive:
            return float("nan")
        return float((2 * self.pos_ge / (self.pos_ge + self.neg_ge + self.n_positive)).max())

    def pro_curve(self) -> Curve:
        """(FPR on normal pixels, mean overlap of ground-truth regions) at every distinct value.

        Between two defective values the curve runs flat (only normal pixels
        join); at a defective value t it moves from (#normal > t, overlap
        before) to (#normal >= t, overlap at t).
        """
        if not self.n_regions or not self.n_negative:
            return Curve(np.array([0.0, 1.0]), np.array([np.nan, np.nan]))
        before = np.r_[0.0, self.overlap_ge[:-1]]
        x = np.empty(2 * self.thresholds.size)
        y = np.empty_like(x)
        x[0::2], y[0::2] = self.neg_gt / self.n_negative, before
        x[1::2], y[1::2] = self.neg_ge / self.n_negative, self.overlap_ge
        return Curve(np.r_[0.0, x, 1.0], np.r_[0.0, y, y[-1]])

    def aupro(self, fpr_limit: float = PRO_FPR_LIMIT) -> float:
        """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec's normalisation)."""
        curve = self.pro_curve()
        if np.isnan(curve.y).any():
            return float("nan")
        return integrate_to(curve, fpr_limit) / fpr_limit


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Area under the ROC of every test pixel pooled."""
    return PixelStatistics(maps, masks).auroc()


def f1_max(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Best pixel F1 over all thresholds."""
    return PixelStatistics(maps, masks).f1_max()


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Curve:
    """Per-region-overlap curve: FPR on normal pixels against the mean overlap of ground-truth regions."""
    return PixelStatistics(maps, masks).pro_curve()


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec's normalisation)."""
    return PixelStatistics(maps, masks).aupro(fpr_limit)


def integrate_to(curve: Curve, limit: float) -> float:
    """Trapezoidal area under a monotone curve from x = 0 to ``limit``, interpolating the end point."""
    x, y = curve.x, curve.y
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < x.size:
        end = np.searchsorted(x, limit)
        t = (limit - x[end - 1]) / (x[end] - x[end - 1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, y[end - 1] + t * (y[end] - y[end - 1])]
    return float(np.trapezoid(ys, xs))


@dataclass(frozen=True)
class PixelDifference:
    """A pixel metric of system a minus system b on the same test images, its spread from resampling images.

    ``low`` and ``high`` bound the 95 % confidence interval of the difference and ``p_value`` is the two-sided
    p-value of "both are equal", both from the resampled standard error with a small-sample correction (see
    :func:`paired_pixel_differences`).
    """

    metric: str
    value_a: float
    value_b: float
    difference: float
    standard_error: float
    low: float
    high: float
    p_value: float
    resamples: int


class _PerImagePixels:
    """One system's pixel statistics kept per image, so that any resample of the images costs no pixel work.

    ``pairs[i, j]`` counts the (defective pixel of image i, normal pixel of image j) pairs ordered right, ties
    half: any weighting of the images gives the pooled pixel AUROC exactly. For AUPRO, the share of each
    image's normal pixels and of each defect region's pixels at or above thresholds set at a fine grid of
    pooled false positive rates (``grid`` steps up to ``top``): a resample's PRO curve through those points.
    """

    def __init__(self, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], grid: int, top: float, pooled: np.ndarray | None = None):
        values = [np.asarray(m, dtype=np.float32).ravel() for m in maps]
        truth = [np.asarray(g, dtype=bool) for g in masks]
        negatives = [np.sort(v[~g.ravel()]) for v, g in zip(values, truth)]
        positives = [v[g.ravel()] for v, g in zip(values, truth)]
        n = len(values)
        self.n_negative = np.array([x.size for x in negatives], dtype=np.float64)
        self.n_positive = np.array([x.size for x in positives], dtype=np.float64)
        # Sorted once: a binary search over sorted needles starts where the last one ended (benchmarks/metrics.py).
        every_positive = np.concatenate(positives)
        order = np.argsort(every_positive, kind="stable")
        every_positive, owner = every_positive[order], np.repeat(np.arange(n), self.n_positive.astype(int))[order]
        self.pairs = np.empty((n, n))
        for j, normal in enumerate(negatives):
            below = np.searchsorted(normal, every_positive, side="left")
            not_above = np.searchsorted(normal, every_positive, side="right")
            self.pairs[:, j] = np.bincount(owner, weights=(below + not_above) / 2.0, minlength=n)
        pooled = np.sort(np.concatenate(negatives)) if pooled is None else pooled  # every normal pixel, sorted
        counts = np.ceil(np.linspace(0.0, top, grid + 1) * pooled.size).astype(int)
        # Descending thresholds: above every normal pixel, then the value that flags each grid count.
        thresholds = np.r_[np.nextafter(pooled[-1], np.inf), pooled[pooled.size - counts[1:]]]
        self.normal_at_or_above = np.stack([x.size - np.searchsorted(x, thresholds, side="left") for x in negatives])
        overlaps, self.region_image = [], []
        for i, (v, g) in enumerate(zip(values, truth)):
            labels, count = ndimage.label(g, structure=_EIGHT_CONNECTED)
            flat = labels.ravel()
            for region in range(1, count + 1):
                inside = np.sort(v[flat == region])
                overlaps.append((inside.size - np.searchsorted(inside, thresholds, side="left")) / inside.size)
                self.region_image.append(i)
        self.overlap = np.stack(overlaps) if overlaps else np.empty((0, thresholds.size))
        self.region_image = np.asarray(self.region_image, dtype=int)

    def auroc(self, weights: np.ndarray) -> np.ndarray:
        """Pooled pixel AUROC for each row of image ``weights`` (B, N)."""
        ordered = ((weights @ self.pairs) * weights).sum(axis=1)
        return ordered / ((weights @ self.n_positive) * (weights @ self.n_negative))

    def aupro(self, weights: np.ndarray, fpr_limit: float) -> np.ndarray:
        """AUPRO up to ``fpr_limit`` for each row of image ``weights`` (B, N), through the grid's points."""
        fpr = (weights @ self.normal_at_or_above) / (weights @ self.n_negative)[:, None]
        region_weights = weights[:, self.region_image]
        pro = (region_weights @ self.overlap) / region_weights.sum(axis=1)[:, None]
        if (fpr[:, -1] < fpr_limit).any():
            raise ValueError("the threshold grid stops short of the FPR limit; raise its top")
        # integrate_to on every row at once: trapezoids from (0, 0), the one across the limit cut there.
        x = np.concatenate([np.zeros((len(fpr), 1)), fpr], axis=1)
        y = np.concatenate([np.zeros((len(pro), 1)), pro], axis=1)
        step = np.diff(x, axis=1)
        width = np.clip(np.minimum(x[:, 1:], fpr_limit) - x[:, :-1], 0.0, None)
        end = y[:, :-1] + np.divide(width, step, out=np.zeros_like(step), where=step > 0) * np.diff(y, axis=1)
        return (width * (y[:, :-1] + end) / 2).sum(axis=1) / fpr_limit


def _image_draws(masks: Sequence[np.ndarray], resamples: int, seed: int) -> tuple[np.ndarray, int]:
    """Bootstrap draws of whole images (resamples, N) as counts, images with and without a defect drawn separately,
    and G, the smaller group's size (see :func:`_corrected`)."""
    defective = np.array([np.asarray(g, dtype=bool).any() for g in masks])
    if defective.sum() < 2 or (~defective).sum() < 2:
        raise ValueError("resampling pixel metrics needs 2 images with a defect and 2 without at least")
    rng = np.random.default_rng(seed)
    draws = np.zeros((resamples, len(masks)))
    for group in (np.flatnonzero(defective), np.flatnonzero(~defective)):
        picked = group[rng.integers(0, group.size, size=(resamples, group.size))]
        np.add.at(draws, (np.arange(resamples)[:, None], picked), 1.0)
    return draws, int(min(defective.sum(), (~defective).sum()))


def _corrected(resampled: np.ndarray, clusters: int) -> tuple[float, float]:
    """(standard error, the 97.5 % quantile it is read against) from resampled values.

    Few images carry the defects, and with G of them the plain bootstrap is too sure of itself (in the tests'
    simulation, 20 defective images of 60, a normal-approximation test rejected 9.7 % (pixel AUROC) and 8.3 %
    (AUPRO) of equally good pairs at 5 %): as for cluster-robust errors, the variance is inflated by G / (G - 1)
    and read against Student's t with G - 1 degrees.
    """
    error = float(np.std(resampled, ddof=1)) * np.sqrt(clusters / (clusters - 1))
    return error, float(stats.t.ppf(0.975, clusters - 1))


_AUPRO_GRID = 4000  # pooled false positive rates a resampled AUPRO goes through (within 0.001 of exact, tested)


def pixel_intervals(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
    fpr_limit: float = PRO_FPR_LIMIT,
    exact: PixelStatistics | None = None,
) -> dict[str, Interval]:
    """Pixel AUROC and AUPRO with 95 % intervals from resampling whole test images (see :func:`paired_pixel_differences`).

    ``exact``: the same maps' and masks' :class:`PixelStatistics`, when the caller has them already.
    """
    draws, clusters = _image_draws(masks, resamples, seed)
    exact = exact or PixelStatistics(maps, masks)
    tables = _PerImagePixels(maps, masks, _AUPRO_GRID, min(1.0, 2 * fpr_limit), exact.negatives)
    out = {}
    for metric, value, resampled in (("pixel_auroc", exact.auroc(), tables.auroc(draws)), ("aupro", exact.aupro(fpr_limit), tables.aupro(draws, fpr_limit))):
        error, quantile = _corrected(resampled, clusters)
        out[metric] = Interval(value, error, max(value - quantile * error, 0.0), min(value + quantile * error, 1.0))
    return out


def paired_pixel_differences(
    maps_a: Sequence[np.ndarray],
    maps_b: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
    fpr_limit: float = PRO_FPR_LIMIT,
) -> dict[str, PixelDifference]:
    """Compare two systems' pixel AUROC and AUPRO on the same test images, resampling whole images.

    Pixels of one image are not independent (a defect, a lighting change or a texture patch moves many at
    once), so a pixel-level test would take millions of pixels for millions of observations; the paired
    bootstrap over images (normal and defective images resampled separately, the same draw for both systems)
    keeps each image's pixels together. Written by hand because no library resamples clustered pixel metrics.
    The values reported are exact; resampled AUPROs go through a grid of pooled false positive rates.
    """
    if not len(maps_a) == len(maps_b) == len(masks):
        raise ValueError(f"{len(maps_a)} and {len(maps_b)} maps for {len(masks)} masks")
    draws, clusters = _image_draws(masks, resamples, seed)
    exact = [PixelStatistics(maps, masks) for maps in (maps_a, maps_b)]
    systems = [_PerImagePixels(maps, masks, _AUPRO_GRID, min(1.0, 2 * fpr_limit), e.negatives) for maps, e in zip((maps_a, maps_b), exact)]
    out = {}
    for metric, value, resampled in (
        ("pixel_auroc", lambda s: s.auroc(), lambda s: s.auroc(draws)),
        ("aupro", lambda s: s.aupro(fpr_limit), lambda s: s.aupro(draws, fpr_limit)),
    ):
        a, b = value(exact[0]), value(exact[1])
        error, quantile = _corrected(resampled(systems[0]) - resampled(systems[1]), clusters)
        difference = a - b
        p_value = 1.0 if error == 0.0 else float(2 * stats.t.sf(abs(difference) / error, clusters - 1))
        out[metric] = PixelDifference(metric, a, b, difference, error, difference - quantile * error, difference + quantile * error, p_value, resamples)
    return out


def iou_per_image(detected: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    """IoU of each image's detection mask; 1 for an empty prediction on an empty ground truth."""
    out = np.empty(len(masks))
    for i, (d, g) in enumerate(zip(detected, masks)):
        d, g = np.asarray(d, dtype=bool), np.asarray(g, dtype=bool)
        union = np.count_nonzero(d | g)
        out[i] = 1.0 if union == 0 else np.count_nonzero(d & g) / union
    return out


def miou_curve(
    log10_nfa: Sequence[np.ndarray], masks: Sequence[np.ndarray], also: Sequence[float] = (), max_thresholds: int = 50_000
) -> Curve:
    """mIoU of ``log10_nfa < t`` for candidate thresholds t (x), exact at each candidate.

    Candidates are just above each distinct finite value (so that value's
    pixels are included), plus the thresholds in ``also``. A log NFA map has
    one value per detected region, so the candidates are every threshold
    that changes a mask unless there are more than ``max_thresholds`` (then
    quantiles). Per image, the pixels of each class are histogrammed over the
    candidates once, so all thresholds cost one pass.
    """
    finite = np.concatenate([np.asarray(v, dtype=np.float64)[np.isfinite(v)] for v in log10_nfa] + [np.empty(0)])
    distinct = np.unique(finite)
    if distinct.size > max_thresholds:
        distinct = np.unique(np.quantile(distinct, np.linspace(0, 1, max_thresholds)))
    thresholds = np.unique(np.r_[-np.inf, np.nextafter(distinct, np.inf), np.asarray(also, dtype=np.float64)])
    total = np.zeros(thresholds.size)
    for v, g in zip(log10_nfa, masks):
        v = np.asarray(v, dtype=np.float64).ravel()
        g = np.asarray(g, dtype=bool).ravel()
        # bin k holds values in [thresholds[k-1], thresholds[k]): detected for every t above them
        bins = np.searchsorted(thresholds, v, side="right")
        tp = np.cumsum(np.bincount(bins[g], minlength=thresholds.size + 1))[: thresholds.size]
        fp = np.cumsum(np.bincount(bins[~g], minlength=thresholds.size + 1))[: thresholds.size]
        n_true = int(g.sum())
        union = n_true + fp
        total += np.where(union == 0, 1.0, tp / np.maximum(union, 1))
    return Curve(thresholds, total / max(len(masks), 1))


def miou_at(log10_nfa: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> float:
    """mIoU of the masks ``log10_nfa < threshold``."""
    return float(iou_per_image([np.asarray(v) < threshold for v in log10_nfa], masks).mean())


def fair_threshold(normal_log10_nfa: Sequence[np.ndarray], false_pixels_per_image: float = 1.0) -> float:
    """The log10 NFA threshold that flags about ``false_pixels_per_image`` pixels per normal image.

    Set on held-out normal training images only: no test image is involved.
    """
    values = np.sort(np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in normal_log10_nfa]))
    k = int(round(false_pixels_per_image * len(normal_log10_nfa)))
    if k >= values.size:
        return float("inf")
    # Detection is strict (value < t): t = the k-th smallest value flags the k values below it.
    return float(values[k])
