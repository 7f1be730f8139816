"""What held-out normal images said at training time, and how predictions use it.

Torch-free, so the ONNX inference path shares it with the PyTorch engine:
both turn scores, maps and chi-square statistic maps into the same
:class:`~uflow.result.Prediction` objects.

The false-alarm promise. A normal image gets a false alarm when its most
significant region (its smallest log10 NFA over the simplified tree) falls
below the detection threshold. Neither the textbook null (independent chi2
pixels) nor a null fitted on normal images describes a trained flow's latents
exactly, so the threshold is not taken from the NFA's nominal meaning but set
on *calibration* normal images the flow never fit and that neither chose the
epoch nor fitted the null: with their smallest log10 NFAs sorted, T_(1) <= ...
<= T_(n), detecting below T_(k) with k = floor(rate (n + 1)) flags a new normal
image with probability at most k / (n + 1) <= rate (split conformal: only
exchangeability of normal images is assumed; the threshold stays a log10 NFA,
regions keep their NFA and ranking). Then the promise is *measured* on further
*verification* images that played no role at all, and recorded with a
one-sided 95 % Clopper-Pearson upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats as scipy_stats

from .errors import UFlowError
from .result import Prediction
from .segmentation import TEST_COUNTS, Segmentation, TestCount, segment, smallest_log10_nfa

Null = Literal["calibrated", "theoretical"]
NULLS: tuple[str, ...] = ("calibrated", "theoretical")
FALSE_ALARM_RATE = 0.05  # default promise: at most 5 % of normal images get any detection
CONFIDENCE = 0.95


def check_options(epsilon: float | None, test_count: str, null: str) -> None:
    """Refuse bad segmentation options at once, with one line."""
    if epsilon is not None and not epsilon > 0:
        raise UFlowError(f"epsilon must be positive, got {epsilon}")
    if test_count not in TEST_COUNTS:
        raise UFlowError(f"test count must be one of {', '.join(TEST_COUNTS)}, got {test_count!r}")
    if null not in NULLS:
        raise UFlowError(f"null must be one of {', '.join(NULLS)}, got {null!r}")


def check_rate(rate: float) -> None:
    if not 0 < rate < 1:
        raise UFlowError(f"false-alarm rate must be between 0 and 1 (a share of normal images), got {rate}")


def conformal_threshold(smallest: Sequence[float], rate: float) -> tuple[float, float]:
    """(log10 NFA threshold, rate it certifies) from calibration images' smallest log10 NFAs.

    Detecting below the k-th smallest of n values, k = floor(rate (n + 1)),
    flags an exchangeable new image with probability k / (n + 1) <= rate.
    With fewer than 1 / rate - 1 images no such k exists; then k = 1 and the
    certified rate is 1 / (n + 1), larger than asked: the caller says so.
    """
    values = np.sort(np.asarray(smallest, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no calibration images")
    k = max(1, math.floor(rate * (values.size + 1) + 1e-9))
    return float(values[k - 1]), k / (values.size + 1)


def binomial_upper_bound(flagged: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``flagged`` out of ``n``."""
    if n == 0 or flagged >= n:
        return 1.0
    return float(scipy_stats.beta.ppf(confidence, flagged + 1, n - flagged))


def images_to_verify(rate: float, confidence: float = CONFIDENCE) -> int:
    """Fewest images whose upper bound can be at most ``rate``: all of them clean, (1 - rate)^n <= 1 - confidence."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate))


def _pct(rate: float) -> str:
    return f"{100 * rate:.3g} %"


@dataclass
class Promise:
    """What a run promises about false alarms on normal images, and what images it never used said about it."""

    requested_rate: float  # share of normal images allowed any detection, as asked at fit time
    rate: float  # what the calibration images certify: k / (n + 1), at most the request when they suffice
    log10_nfa_threshold: float  # regions with log10 NFA below it are detected
    test_count: str  # the segmentation settings the threshold was set for
    null: str
    calibration_images: int
    verification_images: int
    verification_flagged: int
    verification_rate: float | None  # flagged / images; None without verification images
    verification_upper_95: float  # one-sided 95 % Clopper-Pearson bound (1.0 without images)
    note: str  # one line for people

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def make_promise(
    calibration: Sequence[float], verification: Sequence[float], requested: float, test_count: str, null: str
) -> Promise:
    """Set the threshold on the calibration images' smallest log10 NFAs and measure it on the verification images'."""
    threshold, rate = conformal_threshold(calibration, requested)
    flagged = int((np.asarray(verification, dtype=np.float64) < threshold).sum())
    n_ver = len(verification)
    upper = binomial_upper_bound(flagged, n_ver)
    measured = flagged / n_ver if n_ver else None
    needed = images_to_verify(rate)
    if rate > requested + 1e-12:
        where = f"at the smallest of {len(calibration)} calibration values ({_pct(requested)} needs {math.ceil(1 / requested) - 1} images)"
    else:
        where = f"on {len(calibration)} calibration images"
    note = f"promise: at most {_pct(rate)} of normal images flagged, threshold set {where}; "
    note += f"verified on {n_ver}: {flagged} flagged, 95 % bound {_pct(upper)}" if n_ver else "not verified (no verification images)"
    if 0 < n_ver < needed:
        note += f" (too few to confirm {_pct(rate)}: that needs {needed} with none flagged)"
    return Promise(requested, rate, threshold, test_count, null, len(calibration), n_ver, flagged, measured, upper, note)


@dataclass
class Calibration:
    """What held-out normal images said at training time (no anomalies involved)."""

    score_threshold: float  # largest validation image score: above it, "anomalous" without segmentation
    display_low: float  # median validation map value, the bottom of the overlay colour scale
    display_high: float
    # Per scale, S = sum_c z^2 on held-out normal images matched by a * chi2(nu) in mean and
    # variance. A trained flow's latents are never exactly white: their per-pixel
    # spread is wider than chi2(C) even on training images, and the exact chi2(C)
    # null then flags normal texture. None means the theoretical chi2(C).
    chi2_scale: list[float] | None = None
    chi2_dof: list[float] | None = None
    # Per scale, pixels per independent sample of S on held-out normal images
    # (see segmentation.correlation_area); None means independent pixels.
    pixels_per_sample: list[float] | None = None
    # The false-alarm promise and its verification; None for runs made before it existed.
    promise: Promise | None = None

    def __post_init__(self) -> None:
        if isinstance(self.promise, dict):  # read back from uflow.json or ONNX metadata
            self.promise = Promise(**self.promise)

    def to_dict(self) -> dict:
        out = dict(vars(self))
        out["promise"] = self.promise.to_dict() if self.promise is not None else None
        return out

    def log10_threshold(self, epsilon: float | None, test_count: TestCount, null: Null) -> float:
        """The detection threshold on log10 NFA: log10 epsilon when given (the paper's rule), else the promise's."""
        check_options(epsilon, test_count, null)
        if epsilon is not None:
            return math.log10(epsilon)
        if self.promise is None:
            return 0.0  # a run from before the promise: the paper's epsilon = 1
        if (test_count, null) != (self.promise.test_count, self.promise.null):
            raise UFlowError(
                f"the run's verified threshold holds for test count {self.promise.test_count} and null {self.promise.null}; "
                f"with test count {test_count} and null {null} give epsilon explicitly"
            )
        return self.promise.log10_nfa_threshold

    def _null(self, stats: Sequence[np.ndarray], channels: Sequence[int], null: Null) -> tuple[list[np.ndarray], Sequence[float], Sequence[float] | None]:
        if null == "calibrated" and self.chi2_scale is not None:
            return [s / a for s, a in zip(stats, self.chi2_scale)], self.chi2_dof, self.pixels_per_sample
        return list(stats), channels, None

    def segment(
        self,
        stats: Sequence[np.ndarray],
        channels: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        epsilon: float | None,
        test_count: TestCount,
        null: Null,
    ) -> list[Segmentation]:
        """A contrario segmentation of a batch of chi-square statistic maps under the chosen null.

        ``epsilon`` None detects at the run's verified threshold (see :class:`Promise`).
        """
        threshold = self.log10_threshold(epsilon, test_count, null)
        stats, dofs, per_sample = self._null(stats, channels, null)
        return segment(stats, dofs, sizes, log10_epsilon=threshold, test_count=test_count, pixels_per_sample=per_sample)

    def smallest_log10_nfa(self, stats: Sequence[np.ndarray], channels: Sequence[int], test_count: TestCount, null: Null) -> np.ndarray:
        """Per image, the log10 NFA of its most significant region: it is flagged iff this is below the threshold."""
        stats, dofs, per_sample = self._null(stats, channels, null)
        return smallest_log10_nfa(stats, dofs, test_count=test_count, pixels_per_sample=per_sample)

    def predictions(
        self,
        scores: Sequence[float],
        maps: Sequence[np.ndarray],
        paths: Sequence[Path | None],
        segs: Sequence[Segmentation] | None,
        images: Sequence[np.ndarray] | None = None,
    ) -> list[Prediction]:
        """One Prediction per image: labelled by its detections, or by the score threshold without segmentation."""
        out = []
        for i, path in enumerate(paths):
            image = None if images is None else images[i]
            if segs is not None:
                seg = segs[i]
                label = "anomalous" if seg.regions else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path, seg.mask, seg.log10_nfa, seg.regions, image))
            else:
                label = "anomalous" if scores[i] > self.score_threshold else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path, image=image))
        return out
