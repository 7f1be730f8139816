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


def test_a_validation_folder_holds_out_its_images_and_the_whole_training_folder_trains(tmp_path):
    from uflow.textures import make_texture_dataset

    root = make_texture_dataset(tmp_path / "data", categories=("gravel",), n_train=8, n_good=1, n_per_defect=1, size=64, n_validation=7)
    category = root / "gravel"
    model = uflow.fit(category, **SMALL)
    t = model.training
    held_out = {str(p.resolve()) for p in (category / "validation" / "good").glob("*.png")}
    used = set(t["val_images"]) | set(t["calibration_images"]) | set(t["verification_images"])
    assert used == held_out  # every held-out image has exactly one role, none comes from train/good
    assert t["n_val"] + t["n_calibration"] + t["n_verification"] == 7
    assert min(t["n_val"], t["n_calibration"], t["n_verification"]) >= 1
    assert t["n_train"] == 8
    # What the run records is what predict then does: its verification images flagged as counted at fit time,
    # and at most k - 1 of its calibration images (the threshold is the k-th smallest of their values).
    promise = model.calibration.promise
    flagged = sum(p.is_anomalous for p in model.predict(t["verification_images"]))
    assert flagged == promise.verification_flagged
    k = round(promise.rate * (promise.calibration_images + 1))
    assert sum(p.is_anomalous for p in model.predict(t["calibration_images"])) <= k - 1
