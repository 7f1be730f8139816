"""Shared fixtures (a small real-texture dataset and one model trained on it, reused across tests) and plain references."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying a download for a minute

import uflow  # noqa: E402
from uflow.textures import make_texture_dataset  # noqa: E402

SMALL = dict(image_size=64, epochs=3, batch_size=8, progress=False, allow_download=False)


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory) -> Path:
    return make_texture_dataset(tmp_path_factory.mktemp("textures"), categories=("brick",), n_train=16, n_good=3, n_per_defect=1, size=96)


@pytest.fixture(scope="session")
def brick(texture_root) -> Path:
    return texture_root / "brick"


@pytest.fixture(scope="session")
def run_dir(brick, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    uflow.fit(brick, out, **SMALL)
    return out


@pytest.fixture(scope="session")
def model(run_dir):
    return uflow.load(run_dir, allow_download=False)


def _plain_weight(local, noise):
    """Per position, the moment weight of its own estimate: between-position spread beyond noise, over that plus noise."""
    between = max(local.var() - noise.mean(), 0.0)
    return between / (between + noise + 1e-12)


def plain_shrunk_statistics(maps):
    """Per position, mean and variance pulled toward the global ones, written out for one part (N, H, W) in NumPy."""
    n = len(maps)
    mean, var = maps.mean(axis=0), maps.var(axis=0, ddof=1)

    def toward_global(local, noise):
        return local.mean() + _plain_weight(local, noise) * (local - local.mean())

    centre = toward_global(mean, var / n)
    spread = np.sqrt(np.maximum(toward_global(var, 2 * var**2 / (n - 1)), 0.0))
    return centre, np.maximum(spread, 0.1 * spread.mean())


def plain_centre_weight(maps):
    """The mean over positions of the weight each position's own mean gets in :func:`plain_shrunk_statistics`."""
    return float(_plain_weight(maps.mean(axis=0), maps.var(axis=0, ddof=1) / len(maps)).mean())
