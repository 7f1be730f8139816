"""Training's feature cache: RAM in full or half precision, or disk, by size."""

import gc
import os
import tempfile
from pathlib import Path

import torch
from conftest import SMALL

import uflow
import uflow.train
from uflow.train import FeatureCache


def test_feature_cache_degrades_to_half_precision_then_disk():
    shapes = [(4, 8, 8), (8, 4, 4)]
    per_image = 4 * 64 + 8 * 16
    assert FeatureCache(shapes, 10, budget=per_image * 10 * 4).kind == "ram float32"
    assert FeatureCache(shapes, 10, budget=per_image * 10 * 2).kind == "ram float16"
    disk = FeatureCache(shapes, 10, budget=per_image * 10)
    assert disk.kind == "disk float16"
    values = torch.randn(10, 4, 8, 8)
    disk.scales[0][:] = values.half()
    back = disk.batch(slice(2, 5), torch.device("cpu"))[0]
    assert back.dtype == torch.float32 and torch.allclose(back, values[2:5], atol=1e-2)
    folder = disk.folder
    assert os.path.isdir(folder)
    del disk, back
    gc.collect()
    assert not os.path.exists(folder), "the disk cache is removed with the cache"


def test_fit_with_a_disk_cache_gives_a_working_model(brick, tmp_path, monkeypatch):
    monkeypatch.setattr(uflow.train, "FEATURE_CACHE_BUDGET", 1)
    before = set(Path(tempfile.gettempdir()).glob("uflow-features-*"))
    model = uflow.fit(brick, tmp_path / "run", **SMALL)
    gc.collect()
    assert model.training["feature_cache"] == "disk float16"
    prediction = model.predict(sorted((brick / "test" / "blob").glob("*.png"))[0])[0]
    assert 0.0 <= prediction.score <= 1.0
    assert set(Path(tempfile.gettempdir()).glob("uflow-features-*")) <= before, "no disk cache left behind"
