"""Overlays and PNG encoding: the fast paths give what the plain formulas and a standard decoder give."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from uflow.visualize import colorize, overlay, png_bytes


def _decoded(payload: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(payload)) as img:
        img.load()
        return np.asarray(img)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (37, 53, 3), (1, 1), (40, 31)])
def test_png_round_trips_through_pillow(shape):
    picture = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(_decoded(png_bytes(picture)), picture)


def test_png_of_a_photograph_and_a_mask_round_trip_and_compress():
    photo = data.astronaut()
    encoded = png_bytes(photo)
    assert np.array_equal(_decoded(encoded), photo)
    assert len(encoded) < photo.nbytes  # compressed, not stored
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[40:90, 100:180] = 255
    encoded = png_bytes(mask)
    assert np.array_equal(_decoded(encoded), mask)
    assert len(encoded) < mask.nbytes // 20


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8), np.zeros((4,), np.uint8)])
def test_png_refuses_what_it_cannot_encode(bad):
    with pytest.raises(ValueError, match="png_bytes"):
        png_bytes(bad)


def test_overlay_matches_the_per_pixel_blend_within_a_colour_step():
    rng = np.random.default_rng(0)
    image = data.astronaut()[::2, ::2].astype(np.float32) / 255
    anomaly_map = rng.random(image.shape[:2]).astype(np.float32)
    low, high = 0.2, 0.6
    scaled = (anomaly_map.astype(np.float64) - low) / (2 * (high - low))
    alpha = 0.25 + 0.45 * np.clip(scaled, 0, 1)[..., None]
    expected = np.clip(np.round((image * (1 - alpha) + colorize(scaled) * alpha) * 255), 0, 255)
    got = overlay(image, anomaly_map, low, high)
    assert got.dtype == np.uint8 and got.shape == image.shape
    assert np.abs(got.astype(int) - expected).max() <= 2  # 256 colour steps instead of a continuous ramp


def test_overlay_outlines_the_mask_in_cyan_and_leaves_the_rest():
    image = np.full((64, 64, 3), 0.5, dtype=np.float32)
    anomaly_map = np.zeros((64, 64), dtype=np.float32)
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 10:30] = True
    plain, outlined = overlay(image, anomaly_map, 0.0, 1.0), overlay(image, anomaly_map, 0.0, 1.0, mask)
    edge = np.zeros_like(mask)
    edge[20:40, 10:30] = True
    edge[21:39, 11:29] = False
    assert (outlined[edge] == (0, 255, 255)).all()
    assert np.array_equal(outlined[~edge], plain[~edge])
