"""What held-out normal images said at training time, and how predictions use it.

Torch-free, so the ONNX inference path shares it with the PyTorch engine:
both turn scores, maps and chi-square statistic maps into the same
:class:`~uflow.result.Prediction` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from .errors import UFlowError
from .result import Prediction
from .segmentation import TEST_COUNTS, Segmentation, TestCount, segment

Null = Literal["calibrated", "theoretical"]
NULLS: tuple[str, ...] = ("calibrated", "theoretical")


def check_options(epsilon: float, test_count: str, null: str) -> None:
    """Refuse bad segmentation options at once, with one line."""
    if epsilon <= 0:
        raise UFlowError(f"epsilon must be positive, got {epsilon}")
    if test_count not in TEST_COUNTS:
        raise UFlowError(f"test count must be one of {', '.join(TEST_COUNTS)}, got {test_count!r}")
    if null not in NULLS:
        raise UFlowError(f"null must be one of {', '.join(NULLS)}, got {null!r}")


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

    def to_dict(self) -> dict:
        return dict(vars(self))

    def segment(
        self,
        stats: Sequence[np.ndarray],
        channels: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        epsilon: float,
        test_count: TestCount,
        null: Null,
    ) -> list[Segmentation]:
        """A contrario segmentation of a batch of chi-square statistic maps under the chosen null."""
        if null == "calibrated" and self.chi2_scale is not None:
            stats = [s / a for s, a in zip(stats, self.chi2_scale)]
            return segment(stats, self.chi2_dof, sizes, log10_epsilon=math.log10(epsilon), test_count=test_count, pixels_per_sample=self.pixels_per_sample)
        return segment(stats, channels, sizes, log10_epsilon=math.log10(epsilon), test_count=test_count)

    def predictions(
        self, scores: Sequence[float], maps: Sequence[np.ndarray], paths: Sequence[Path | None], segs: Sequence[Segmentation] | None
    ) -> list[Prediction]:
        """One Prediction per image: labelled by its detections, or by the score threshold without segmentation."""
        out = []
        for i, path in enumerate(paths):
            if segs is not None:
                seg = segs[i]
                label = "anomalous" if seg.regions else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path, seg.mask, seg.log10_nfa, seg.regions))
            else:
                label = "anomalous" if scores[i] > self.score_threshold else "normal"
                out.append(Prediction(float(scores[i]), maps[i], label, path))
        return out
