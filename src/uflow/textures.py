"""A small MVTec-style dataset built from scikit-image's bundled real textures (no download).

brick, grass and gravel are real 512x512 photographs (CC0). Training crops
come from the upper part of each photograph; test crops, and the held-out
crops of ``validation/good`` when asked for, from the lower part. Training
crops overlap each other, so held-out images drawn from among them would be
more familiar to the model than the test images; crops from the lower part
are as new to it as the test images are, which is what calibrating a
false-alarm rate needs. Defects are
synthetic, so their masks are exact: foreign-texture blobs with irregular
outlines, thin scratches, stains, and shifted patches of the material itself.
Everything is seeded: the same call gives the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CATEGORIES = ("brick", "grass", "gravel")
DEFECTS = ("blob", "scratch", "stain", "shift")


def _texture(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img.astype(np.float32) / 255.0


def _crop(img: np.ndarray, rng: np.random.Generator, rows: tuple[int, int], size: int) -> np.ndarray:
    top = int(rng.integers(rows[0], rows[1] - size + 1))
    left = int(rng.integers(0, img.shape[1] - size + 1))
    return img[top : top + size, left : left + size].copy()


def _irregular_blob(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """A random blob with a wobbly outline: a disk whose radius is perturbed by smooth noise."""
    cy, cx = rng.uniform(radius + 4, size - radius - 4, size=2)
    yy, xx = np.mgrid[:size, :size]
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.05, 0.25) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(yy - cy, xx - cx) < radius * (1 + wobble)


def _scratch(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin curved line, 2-3 px wide, 40-70% of the crop long."""
    length = rng.uniform(0.4, 0.7) * size
    start = rng.uniform(0.2 * size, 0.8 * size, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.02, 0.02)
    points = []
    y, x = start
    for _ in range(int(length)):
        points.append((y, x))
        heading += bend
        y, x = y + np.sin(heading), x + np.cos(heading)
    mask = np.zeros((size, size), bool)
    pts = np.clip(np.round(np.array(points)).astype(int), 0, size - 1)
    mask[pts[:, 0], pts[:, 1]] = True
    return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 2)))


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (defective image, exact boolean mask)."""
    size = img.shape[0]
    out = img.copy()
    if kind == "blob":
        mask = _irregular_blob(size, rng, rng.uniform(0.08, 0.14) * size)
        patch = _crop(donor, rng, (0, donor.shape[0]), size)
        out[mask] = patch[mask]
    elif kind == "scratch":
        mask = _scratch(size, rng)
        shade = rng.choice([0.25, 1.8])
        out[mask] = np.clip(out[mask] * shade + (0.15 if shade > 1 else 0.0), 0, 1)
    elif kind == "stain":
        mask = _irregular_blob(size, rng, rng.uniform(0.10, 0.16) * size)
        tint = np.array(rng.choice([[1.35, 1.0, 0.55], [0.55, 0.7, 1.2], [0.5, 0.45, 0.4]]), dtype=np.float32)
        out[mask] = np.clip(out[mask] * tint, 0, 1)
    elif kind == "shift":
        mask = np.zeros((size, size), bool)
        side = int(rng.uniform(0.18, 0.26) * size)
        top, left = rng.integers(4, size - side - 4, size=2)
        dy, dx = rng.integers(side // 3, side // 2 + 1, size=2) * rng.choice([-1, 1], size=2)
        sy = int(np.clip(top + dy, 0, size - side))
        sx = int(np.clip(left + dx, 0, size - side))
        block = img[sy : sy + side, sx : sx + side][::-1]  # moved and flipped: the pattern breaks at its edges
        out[top : top + side, left : left + side] = block
        mask[top : top + side, left : left + side] = np.abs(block - img[top : top + side, left : left + side]).max(axis=2) > 0.02
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return out, mask


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    Image.fromarray(arr.squeeze()).save(path)


def make_texture_dataset(
    root: str | os.PathLike,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = 60,
    n_good: int = 8,
    n_per_defect: int = 4,
    size: int = 128,
    seed: int = 0,
    n_validation: int = 0,
) -> Path:
    """Write an MVTec-style dataset under ``root``; returns ``root``.

    Layout per category: ``train/good``, ``test/good``, ``test/<defect>`` and
    ``ground_truth/<defect>/<stem>_mask.png``, and ``validation/good`` with
    ``n_validation`` > 0.
    """
    root = Path(root)
    for c_index, name in enumerate(categories):
        rng = np.random.default_rng(seed * 1000 + c_index)
        img = _texture(name)
        donor = _texture(categories[(c_index + 1) % len(categories)] if len(categories) > 1 else CATEGORIES[(CATEGORIES.index(name) + 1) % 3])
        split = img.shape[0] - max(size, int(0.4 * img.shape[0]))  # lower 40% (at least one crop) is test-only
        base = root / name
        for i in range(n_train):
            _save(base / "train" / "good" / f"{i:03d}.png", _crop(img, rng, (0, split), size))
        for i in range(n_good):
            _save(base / "test" / "good" / f"{i:03d}.png", _crop(img, rng, (split, img.shape[0]), size))
        for kind in DEFECTS:
            for i in range(n_per_defect):
                clean = _crop(img, rng, (split, img.shape[0]), size)
                bad, mask = add_defect(clean, kind, rng, donor)
                _save(base / "test" / kind / f"{i:03d}.png", bad)
                _save(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.float32))
        held_out_rng = np.random.default_rng([seed, c_index, 1])  # its own stream: the other files stay as they were
        for i in range(n_validation):
            _save(base / "validation" / "good" / f"{i:03d}.png", _crop(img, held_out_rng, (split, img.shape[0]), size))
    return root
