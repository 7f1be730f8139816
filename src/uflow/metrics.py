"""The field's metrics: pixel and image AUROC, AUPRO, F1-max and mIoU at three thresholds.

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
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

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


def image_roc(scores: Sequence[float], anomalous: Sequence[bool]) -> Curve:
    fpr, tpr, _ = roc_curve(np.asarray(anomalous, dtype=bool), np.asarray(scores, dtype=np.float64))
    return Curve(fpr, tpr)


def _pooled(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    truth = np.concatenate([np.asarray(g, dtype=bool).ravel() for g in masks])
    return values, truth


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Area under the ROC of every test pixel pooled."""
    values, truth = _pooled(maps, masks)
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, values))


def pixel_roc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], points: int = 2000) -> Curve:
    """The pixel ROC, thinned to about ``points`` vertices for plotting."""
    values, truth = _pooled(maps, masks)
    fpr, tpr, _ = roc_curve(truth, values, drop_intermediate=True)
    keep = np.unique(np.linspace(0, fpr.size - 1, min(points, fpr.size)).astype(int))
    return Curve(fpr[keep], tpr[keep])


def f1_max(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Best pixel F1 over all thresholds."""
    values, truth = _pooled(maps, masks)
    if not truth.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(truth, values)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Curve:
    """Exact per-region-overlap curve: (FPR on normal pixels, mean overlap over ground-truth regions).

    One sort of all pixels replaces a sweep over thresholds: lowering the
    threshold past a pixel adds 1/N_normal to the FPR if it is normal, or
    1/(|R| K) to the mean overlap if it lies in region R (one of K regions).
    Ties are resolved together, so the curve has one vertex per distinct value.
    """
    values, truth = _pooled(maps, masks)
    region_size: list[np.ndarray] = []
    n_regions = 0
    for g in masks:
        labels, count = ndimage.label(np.asarray(g, dtype=bool), structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        region_size.append(sizes[labels.ravel()])  # each pixel's region size (background entries unused)
        n_regions += count
    sizes = np.concatenate(region_size)
    n_normal = int((~truth).sum())
    if n_regions == 0 or n_normal == 0:
        return Curve(np.array([0.0, 1.0]), np.array([np.nan, np.nan]))
    fp_step = np.where(truth, 0.0, 1.0 / n_normal)
    pro_step = np.where(truth, 1.0 / (np.where(truth, sizes, 1.0) * n_regions), 0.0)
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]
    fpr = np.cumsum(fp_step[order])
    pro = np.cumsum(pro_step[order])
    last_of_tie = np.r_[sorted_values[1:] != sorted_values[:-1], True]
    return Curve(np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]])


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec's normalisation)."""
    curve = pro_curve(maps, masks)
    if np.isnan(curve.y).any():
        return float("nan")
    return integrate_to(curve, fpr_limit) / fpr_limit


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
