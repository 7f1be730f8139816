"""Pictures a person can look at: anomaly-map overlays with the detected regions outlined."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# A perceptually ordered dark-to-bright ramp (black, purple, orange, yellow), enough for a heat map
# without pulling in matplotlib for inference.
_RAMP = np.array(
    [[0.0, 0.0, 0.02], [0.25, 0.04, 0.45], [0.62, 0.13, 0.42], [0.93, 0.38, 0.18], [0.99, 0.82, 0.2], [1.0, 1.0, 0.75]],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB float image via the ramp."""
    t = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (t - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[hi] * frac


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the anomaly map over the image and outline ``mask`` in cyan; returns uint8 RGB.

    The colour scale runs from ``low`` (typical normal pixel) to twice the
    normal images' largest score, so normal images stay dim and anomalies glow.
    """
    scaled = (anomaly_map - low) / max(2.0 * (high - low), 1e-6)
    heat = colorize(scaled)
    alpha = 0.25 + 0.45 * np.clip(scaled, 0, 1)[..., None]
    out = image * (1 - alpha) + heat * alpha
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 256))
        out[edge] = (0.0, 1.0, 1.0)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
