"""The typed results: a prediction, one per image, and an evaluation, one per category."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .segmentation import Region

if TYPE_CHECKING:  # metrics needs scikit-learn, which an inference-only install lacks
    from .metrics import Curve


@dataclass
class Prediction:
    """What U-Flow says about one image.

    ``anomaly_map`` is (H, W) in [0, 1] at the input image's size, smoothed;
    ``score`` says how many spreads of held-out normal images' scores the image
    lies above their mean, by the part of the model that finds it most unusual
    (each part's raw score is the mean of the highest 1 % of an unsmoothed map on
    the model's input grid, standardised per pixel position on the training
    images: each of the map flow's scales alone, and the score flow's map; see
    :mod:`uflow.anomaly_map`). With segmentation on, ``log10_nfa`` is the per-pixel log10
    Number of False Alarms (inf where no candidate region covers the pixel),
    ``mask`` the detections' pixels and ``regions`` the detections; ``label``
    is "anomalous" when the image is flagged. By default the run's promise
    decides (see :mod:`uflow.calibration`): on regions, the mask is
    ``log10_nfa`` below its threshold and an image is flagged when it has a
    detection; on the score, a flagged image's mask is its regions below that
    threshold, or its most significant one. With ``epsilon`` the mask is
    ``log10_nfa < log10(epsilon)``. Without segmentation the label compares
    ``score`` with the run's score threshold (see
    :attr:`uflow.calibration.Calibration.image_threshold`). ``image`` is the RGB image as
    scored, float32 (H, W, 3) in [0, 1], kept only when asked for
    (``keep_images=True``), to draw overlays without reading the file again.
    """

    score: float
    anomaly_map: np.ndarray
    label: str
    path: Path | None = None
    mask: np.ndarray | None = None
    log10_nfa: np.ndarray | None = None
    regions: list[Region] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_anomalous(self) -> bool:
        return self.label == "anomalous"

    def summary(self) -> dict:
        """JSON-ready summary (no arrays)."""
        return {
            "path": str(self.path) if self.path is not None else None,
            "score": round(float(self.score), 6),
            "label": self.label,
            "regions": [r.to_dict() for r in self.regions],
        }


@dataclass
class Evaluation:
    """Metrics of one model on one category, with per-image results and the curves behind them."""

    category: str
    metrics: dict[str, Any]
    thresholds: dict[str, float]
    images: list[dict[str, Any]]
    settings: dict[str, Any]
    curves: dict[str, Curve] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uflow_version": __version__,
            "category": self.category,
            "settings": self.settings,
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "images": self.images,
        }
