"""What held-out normal images said at training time, and how predictions use it.

Torch-free, so the ONNX inference path shares it with the PyTorch engine:
both turn scores, maps and chi-square statistic maps into the same
:class:`~uflow.result.Prediction` objects.

The false-alarm promise. A normal image gets a false alarm when it is
flagged, and which statistic flags it is the run's *decision*:

* ``"region"``: its most significant region (its smallest log10 NFA over the
  simplified tree) falls below the detection threshold;
* ``"score"``: its image score is above the score threshold; the mask of a
  flagged image is its regions below the region threshold, or its most
  significant region when none is (unflagged images have no regions), and
  images scored without segmentation get the same verified labels.

The default is the region: on the ELPV poly development set it detected
59.2 % of the defective cells at its threshold against the score's 46.0 %
(``benchmarks/decisions.py``, chosen by a rule fixed before the run).

Neither the textbook null (independent chi2 pixels) nor a null fitted on
normal images describes a trained flow's latents exactly, so no threshold is
taken from the NFA's nominal meaning: each is set on *calibration* normal
images the flow never fit and that neither chose the epoch nor fitted the
null. With their values sorted, T_(1) <= ... <= T_(n), detecting beyond T_(k)
flags a new normal image with probability R_k, a random variable over
calibration sets with law Beta(k, n + 1 - k) (tied values only make it
smaller; only exchangeability of normal images is assumed; the region
threshold stays a log10 NFA, so regions keep their NFA and ranking).

By default k is the largest rank with P(R_k > rate) = P(Binom(n, rate) <= k - 1)
<= 1 - confidence: *this run's* rate is at most ``rate`` with that confidence
(a training-conditional, or PAC, threshold). The split conformal rule
k = floor(rate (n + 1)) only bounds the rate on average over runs, E R_k =
k / (n + 1): with 40 calibration images a single run's rate then exceeds 5 %
with probability 0.4, and a line lives with one run. Then the promise is
*measured* on further *verification* images that played no role at all, and
recorded with a one-sided 95 % Clopper-Pearson upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats as scipy_stats

from .errors import UFlowError
from .result import Prediction
from .segmentation import TEST_COUNTS, Segmentation, TestCount, segment, smallest_log10_nfa

Null = Literal["calibrated", "theoretical"]
NULLS: tuple[str, ...] = ("calibrated", "theoretical")
Decision = Literal["region", "score"]
DECISIONS: tuple[str, ...] = ("region", "score")
DECISION: Decision = "region"  # see the module docstring
FALSE_ALARM_RATE = 0.05  # default promise: at most 5 % of normal images get any detection
PROMISE_CONFIDENCE = 0.9  # ... with this probability for the run at hand (None: on average over runs)
CONFIDENCE = 0.95  # of the upper bound on the rate measured on verification images


def check_options(epsilon: float | None, test_count: str, null: str) -> None:
    """Refuse bad segmentation options at once, with one line."""
    if epsilon is not None and not epsilon > 0:
        raise UFlowError(f"epsilon must be positive, got {epsilon}")
    if test_count not in TEST_COUNTS:
        raise UFlowError(f"test count must be one of {', '.join(TEST_COUNTS)}, got {test_count!r}")
    if null not in NULLS:
        raise UFlowError(f"null must be one of {', '.join(NULLS)}, got {null!r}")


def check_rate(rate: float, confidence: float | None = None) -> None:
    if not 0 < rate < 1:
        raise UFlowError(f"false-alarm rate must be between 0 and 1 (a share of normal images), got {rate}")
    if confidence is not None and not 0 < confidence < 1:
        raise UFlowError(f"confidence must be between 0 and 1 (or none, for the rate on average over runs), got {confidence}")


@dataclass(frozen=True)
class Rank:
    """Which calibration value is the threshold, and what that rank guarantees."""

    k: int  # detect below the k-th smallest calibration value
    mean_rate: float  # k / (n + 1): the rate on average over calibration sets
    confidence: float | None  # P(this run's rate <= the requested rate); None for the average-only rule


def threshold_rank(n: int, rate: float, confidence: float | None) -> Rank:
    """The rank whose calibration value bounds the false-alarm rate, for ``n`` calibration images.

    With ``confidence``, the largest k with P(Binom(n, rate) <= k - 1) <= 1 - confidence:
    this run's rate is at most ``rate`` with at least that probability. When even k = 1
    falls short (fewer than log(1 - confidence) / log(1 - rate) images, 45 for 5 % at
    90 %), k = 1 and the confidence reached is 1 - (1 - rate)^n. Without ``confidence``,
    split conformal: k = floor(rate (n + 1)), at least 1.
    """
    if n < 1:
        raise ValueError("no calibration images")
    if confidence is None:
        k = max(1, math.floor(rate * (n + 1) + 1e-9))
        return Rank(k, k / (n + 1), None)
    exceed = scipy_stats.binom.cdf(np.arange(n), n, rate)  # index k - 1: P(the run's rate > rate) at rank k
    k = max(1, int(np.count_nonzero(exceed <= 1 - confidence + 1e-12)))
    return Rank(k, k / (n + 1), float(1 - exceed[k - 1]))


def conformal_threshold(values: Sequence[float], rate: float, confidence: float | None = PROMISE_CONFIDENCE) -> tuple[float, Rank]:
    """(threshold, its rank) from calibration images' values, flagged *below* it (see :func:`threshold_rank`).

    For smallest log10 NFAs as they are; for image scores, flagged above, pass them negated.
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    rank = threshold_rank(values.size, rate, confidence)
    return float(values[rank.k - 1]), rank


def binomial_upper_bound(flagged: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``flagged`` out of ``n``."""
    if n == 0 or flagged >= n:
        return 1.0
    return float(scipy_stats.beta.ppf(confidence, flagged + 1, n - flagged))


def images_to_verify(rate: float, confidence: float = CONFIDENCE) -> int:
    """Fewest images whose upper bound can be at most ``rate``: all of them clean, (1 - rate)^n <= 1 - confidence.

    The same count is the fewest calibration images for a threshold whose rate is at most ``rate``
    with probability ``confidence`` (k = 1 in :func:`threshold_rank`).
    """
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate) - 1e-9)


def _pct(rate: float) -> str:
    return f"{100 * rate:.3g} %"


def confidence_pct(confidence: float) -> str:
    """A confidence in percent, rounded down, so one short of 90 % never reads as 90 %."""
    return f"{math.floor(1000 * confidence + 1e-9) / 10:.1f} %"


@dataclass
class Promise:
    """What a run promises about false alarms on normal images, and what images it never used said about it."""

    requested_rate: float  # share of normal images allowed any detection, as asked at fit time
    rate: float  # k / (n + 1): the rate on average over calibration sets
    log10_nfa_threshold: float  # regions with log10 NFA below it are detected
    test_count: str  # the segmentation settings the threshold was set for
    null: str
    calibration_images: int
    verification_images: int
    verification_flagged: int
    verification_rate: float | None  # flagged / images; None without verification images
    verification_upper_95: float  # one-sided 95 % Clopper-Pearson bound (1.0 without images)
    note: str  # one line for people
    # P(this run's rate <= requested_rate) over calibration sets, as asked and as reached with the
    # images there were; None for the average-only rule (and for runs made before the PAC threshold).
    requested_confidence: float | None = None
    confidence: float | None = None
    # What flags an image (see the module docstring); runs made before the choice existed decided on regions.
    decision: Decision = "region"
    score_threshold: float | None = None  # images scoring above it are flagged (decision "score")

    def flags(self, scores: Sequence[float], smallest_log10_nfa: Sequence[float]) -> np.ndarray:
        """Which images the promise's decision flags, from their image scores and smallest log10 NFAs."""
        if self.decision == "score" and self.score_threshold is not None:
            return np.asarray(scores, dtype=np.float64) > self.score_threshold
        return np.asarray(smallest_log10_nfa, dtype=np.float64) < self.log10_nfa_threshold

    @property
    def target_rate(self) -> float:
        """The rate verification should confirm: the requested one when promised per run, else the average."""
        return self.requested_rate if self.confidence is not None else self.rate

    @property
    def shortfall(self) -> bool:
        """True when the calibration images could not give what was asked."""
        if self.rate > self.requested_rate + 1e-12:
            return True
        return self.requested_confidence is not None and (self.confidence or 0.0) < self.requested_confidence - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class HeldOut:
    """Per held-out normal image, the two statistics a decision can use."""

    scores: np.ndarray  # image scores (flagged above a threshold)
    smallest_log10_nfa: np.ndarray  # most significant region's log10 NFA (flagged below a threshold)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float64))
        object.__setattr__(self, "smallest_log10_nfa", np.asarray(self.smallest_log10_nfa, dtype=np.float64))
        if self.scores.shape != self.smallest_log10_nfa.shape:
            raise ValueError(f"{self.scores.size} scores for {self.smallest_log10_nfa.size} smallest log10 NFAs")

    def __len__(self) -> int:
        return len(self.smallest_log10_nfa)


def make_promise(
    calibration: HeldOut,
    verification: HeldOut,
    requested: float,
    test_count: str,
    null: str,
    confidence: float | None = PROMISE_CONFIDENCE,
    decision: Decision = DECISION,
) -> Promise:
    """Set the thresholds on the calibration images and measure the decision on the verification images.

    The region threshold is always set (it draws the masks); with ``decision="score"`` the score
    threshold, at the same rank rule, decides which images are flagged.
    """
    if decision not in DECISIONS:
        raise UFlowError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    threshold, rank = conformal_threshold(calibration.smallest_log10_nfa, requested, confidence)
    score_threshold, side = None, "smallest"
    if decision == "score":
        negated, rank = conformal_threshold(-calibration.scores, requested, confidence)
        score_threshold, side = -negated, "largest"
    n_cal, n_ver = len(calibration), len(verification)
    promise = Promise(
        requested_rate=requested, rate=rank.mean_rate, log10_nfa_threshold=threshold, test_count=test_count, null=null,
        calibration_images=n_cal, verification_images=n_ver, verification_flagged=0, verification_rate=None, verification_upper_95=1.0,
        note="", requested_confidence=confidence, confidence=rank.confidence, decision=decision, score_threshold=score_threshold,
    )  # fmt: skip
    flagged = int(promise.flags(verification.scores, verification.smallest_log10_nfa).sum())
    promise.verification_flagged = flagged
    promise.verification_rate = flagged / n_ver if n_ver else None
    promise.verification_upper_95 = upper = binomial_upper_bound(flagged, n_ver)
    what = "image score" if decision == "score" else "most significant region"
    where = f"decided on the {what}, at the {_ordinal(rank.k)}{side} of {n_cal} calibration values"
    if rank.confidence is None:
        note = f"promise: at most {_pct(rank.mean_rate)} of normal images flagged on average over runs, {where}"
        if rank.mean_rate > requested + 1e-12:
            note += f" ({_pct(requested)} needs {math.ceil(1 / requested) - 1} images)"
    else:
        note = f"promise: at most {_pct(requested)} of normal images flagged, with {confidence_pct(rank.confidence)} confidence for this run"
        note += f" ({_pct(rank.mean_rate)} on average), {where}"
        if rank.confidence < confidence - 1e-12:
            note += f" ({confidence_pct(confidence)} confidence needs {images_to_verify(requested, confidence)} images)"
    note += f"; verified on {n_ver}: {flagged} flagged, 95 % bound {_pct(upper)}" if n_ver else "; not verified (no verification images)"
    needed = images_to_verify(promise.target_rate)
    if 0 < n_ver < needed:
        note += f" (too few to confirm {_pct(promise.target_rate)}: that needs {needed} with none flagged)"
    promise.note = note
    return promise


def _ordinal(k: int) -> str:
    """'' for 1 (the smallest), else '2nd ', '3rd ', '11th ', ..."""
    if k == 1:
        return ""
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')} "


@dataclass
class Calibration:
    """What held-out normal images said at training time (no anomalies involved)."""

    score_threshold: float  # largest validation image score: above it, "anomalous" without segmentation when the promise has no score threshold
    display_low: float  # median validation map value, the bottom of the overlay colour scale
    display_high: float  # largest top-1 % mean of a validation image's smoothed map: the scale's top is twice it
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
    # Per part of the image score (uflow.anomaly_map.map_and_raw_scores: each map-flow scale, then the score
    # flow, or with score_parts "flows" each flow's whole map), the mean and spread of its raw score on the
    # held-out stopping images: the image score combines the standardised ones (uflow.anomaly_map.combined_score).
    score_centres: list[float] = field(default_factory=lambda: [0.0])
    score_spreads: list[float] = field(default_factory=lambda: [1.0])
    score_parts: str = "flows"  # uflow.anomaly_map.ScoreParts; "flows" for runs made before it was recorded
    score_combination: str = "largest"  # uflow.anomaly_map.ScoreCombination; "largest" for runs made before it was recorded
    # Whether each part's map is standardised per pixel position first (uflow.anomaly_map.PositionStatistics,
    # kept with the weights); False for runs made before it existed.
    score_per_position: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.promise, dict):  # read back from uflow.json or ONNX metadata
            self.promise = Promise(**self.promise)

    def to_dict(self) -> dict:
        out = dict(vars(self))
        out["promise"] = self.promise.to_dict() if self.promise is not None else None
        return out

    @property
    def image_threshold(self) -> float:
        """The score above which an image is anomalous when it is not segmented: the promise's, else the largest validation score."""
        if self.promise is not None and self.promise.score_threshold is not None:
            return self.promise.score_threshold
        return self.score_threshold

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
        scores: Sequence[float] | None = None,
    ) -> list[Segmentation]:
        """A contrario segmentation of a batch of chi-square statistic maps under the chosen null.

        ``epsilon`` None detects as the run's promise decides (see :class:`Promise`),
        which needs the images' ``scores`` when it decides on them.
        """
        threshold = self.log10_threshold(epsilon, test_count, null)
        stats, dofs, per_sample = self._null(stats, channels, null)
        thresholds, keep = threshold, None
        promise = self.promise
        if epsilon is None and promise is not None and promise.decision == "score" and promise.score_threshold is not None:
            if scores is None:
                raise ValueError("this run decides on image scores: pass them")
            keep = np.asarray(scores, dtype=np.float64) > promise.score_threshold
            thresholds = np.where(keep, threshold, -np.inf)  # only flagged images have regions
        return segment(stats, dofs, sizes, log10_epsilon=thresholds, test_count=test_count, pixels_per_sample=per_sample, keep_most_significant=keep)

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
                label = "anomalous" if seg.flagged else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path, seg.mask, seg.log10_nfa, seg.regions, image))
            else:
                label = "anomalous" if scores[i] > self.image_threshold else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path, image=image))
        return out
