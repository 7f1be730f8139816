"""Training: the feature cache (RAM in full or half precision, or disk), the plateau schedule, the choice of flow by held-out NLL."""

import gc
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, plain_centre_weight, plain_shrunk_statistics

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
    assert np.isfinite(prediction.score) and 0.0 <= prediction.anomaly_map.min() <= prediction.anomaly_map.max() <= 1.0
    assert set(Path(tempfile.gettempdir()).glob("uflow-features-*")) <= before, "no disk cache left behind"


@pytest.mark.parametrize("decision", ["region", "score"])
def test_a_validation_folder_holds_out_its_images_and_the_whole_training_folder_trains(tmp_path, decision):
    from uflow.textures import make_texture_dataset

    root = make_texture_dataset(tmp_path / "data", categories=("gravel",), n_train=8, n_good=1, n_per_defect=1, size=64, n_validation=7)
    category = root / "gravel"
    model = uflow.fit(category, decision=decision, **SMALL)
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
    assert promise.decision == decision and (promise.score_threshold is not None) == (decision == "score")
    predictions = model.predict(t["verification_images"])
    assert sum(p.is_anomalous for p in predictions) == promise.verification_flagged
    assert all(p.mask.any() for p in predictions if p.is_anomalous)  # a flagged image always shows where
    if decision == "score":
        assert [p.is_anomalous for p in predictions] == [p.score > promise.score_threshold for p in predictions]
    k = round(promise.rate * (promise.calibration_images + 1))
    assert sum(p.is_anomalous for p in model.predict(t["calibration_images"])) <= k - 1
    if decision == "score":  # labels without segmentation are the same, verified ones
        images = t["calibration_images"] + t["verification_images"] + sorted(map(str, (category / "test").rglob("*.png")))
        with_masks = [p.label for p in model.predict(images)]
        assert [p.label for p in model.predict(images, segmentation=False)] == with_masks
        assert {"normal", "anomalous"} == set(with_masks), with_masks  # both kinds, so the comparison means something
        from uflow.evaluate import evaluate

        result = evaluate(model, category, tmp_path / "evaluation", progress=False)
        tests = sorted((category / "test").rglob("*.png"))
        flagged = {str(p.path) for p in model.predict(tests) if p.is_anomalous}
        assert {r["path"] for r in result.images if r["flagged"]} == flagged  # evaluate flags as predict decides
        assert "Automatic threshold: image score &gt;" in (tmp_path / "evaluation" / "report.html").read_text()


def _random_cache(n: int, seed: int) -> FeatureCache:
    cache = FeatureCache([(4, 8, 8), (6, 4, 4)], n)
    gen = torch.Generator().manual_seed(seed)
    for store in cache.scales:
        store[:] = torch.randn(store.shape, generator=gen)
    return cache


def test_learning_rate_is_cut_on_a_plateau_and_training_stops_on_a_longer_one():
    from uflow.flow import FlowConfig
    from uflow.train import LR_CUT, FlowTrainer, Schedule

    # A learning rate so small the held-out NLL never improves by the 1e-4 that counts: epoch 1 stays the best.
    schedule = Schedule(max_epochs=50, lr=1e-12, weight_decay=0.0, batch_size=4, patience=6)
    trainer = FlowTrainer(FlowConfig(feature_channels=(4, 6), n_steps=2), _random_cache(8, 0), _random_cache(4, 1), schedule,
                          torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    trainer.advance()
    run = trainer.result()
    assert (run.best_epoch, run.epochs_run, run.stopped) == (1, 7, "plateau")
    lrs = [h["lr"] for h in run.history]
    # plateau = patience // 3 = 2 epochs without improvement: cut after epochs 3 and 5.
    assert lrs == [1e-12] * 3 + [1e-12 * LR_CUT] * 2 + [1e-12 * LR_CUT**2] * 2


def test_a_flow_trained_in_steps_ends_as_one_trained_in_one_go():
    from uflow.flow import FlowConfig
    from uflow.train import FlowTrainer, Schedule

    schedule = Schedule(max_epochs=7, lr=1e-3, weight_decay=0.0, batch_size=4, patience=10)

    def trainer() -> FlowTrainer:
        torch.manual_seed(0)
        return FlowTrainer(FlowConfig(feature_channels=(4, 6), n_steps=2), _random_cache(8, 0), _random_cache(4, 1), schedule,
                           torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)

    whole, steps = trainer(), trainer()
    whole.advance()
    steps.advance(3)
    assert (steps.epochs_run, steps.stopped) == (3, None)
    steps.advance(2)
    steps.advance()
    assert (whole.epochs_run, whole.stopped, steps.stopped) == (7, "max_epochs", "max_epochs")
    assert steps.history == whole.history
    for a, b in zip(whole.result().flow.state_dict().values(), steps.result().flow.state_dict().values()):
        assert torch.equal(a, b)


def test_auto_position_races_the_flows_and_only_the_likelier_trains_on(brick):
    epochs = 8
    model = uflow.fit(brick, **{**SMALL, "epochs": epochs, "position": "auto"})
    candidates = model.training["candidates"]
    assert sorted(c["positional"] for c in candidates) == [0, uflow.train.POSITIONAL_FREQUENCIES]
    race = uflow.train.race_epochs(epochs)  # 3 of 8
    leader = min(candidates, key=lambda c: c["best_val_nll"])
    (other,) = [c for c in candidates if c is not leader]
    assert model.flow.config.positional == model.training["positional"] == leader["positional"]
    assert model.training["best_val_nll"] == leader["best_val_nll"]
    assert leader["epochs_run"] == epochs and leader["stopped"] == "max_epochs"
    assert other["epochs_run"] == race and other["stopped"] == "raced"


def test_aligned_images_are_scored_by_the_flows_whole_maps_and_the_run_reloads(brick, tmp_path):
    # Aligned parts as a production line photographs them: the same object in the same place, only the sensor
    # noise differs. Every position keeps its own level across images, so the whole map's centre weight is
    # near 1 and the run scores with the two flows' whole maps (uflow.anomaly_map.parts_for).
    from PIL import Image

    from uflow.anomaly_map import ALIGNED_WEIGHT, likelihood_map
    from uflow.export import export_onnx
    from uflow.images import read_image
    from uflow.model import to_model_input
    from uflow.onnx_model import OnnxModel

    part = np.asarray(Image.open(sorted((brick / "train" / "good").glob("*.png"))[0]).convert("RGB"), dtype=np.float64)
    rng = np.random.default_rng(0)
    folder = tmp_path / "aligned"
    folder.mkdir()
    for i in range(16):
        noisy = np.clip(part + rng.normal(0.0, 3.0, part.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    model = uflow.fit(folder, out, **SMALL)
    assert model.training["whole_map_centre_weight"] >= ALIGNED_WEIGHT
    assert (model.calibration.score_parts, model.calibration.score_combination) == ("flows", "mean")
    assert len(model.calibration.score_centres) == 2
    # The statistics kept are the whole map's, then the score flow's, as NumPy computes them from the training images.
    held_out = {Path(p).name for key in ("val_images", "calibration_images", "verification_images") for p in model.training[key]}
    trained = [p for p in sorted(folder.glob("*.png")) if p.name not in held_out]
    assert len(trained) == model.training["n_train"]
    grid = model.image_size
    with torch.no_grad():
        features = model.extractor(torch.stack([to_model_input(read_image(p), grid) for p in trained]))
        latents, _ = model.flow(features[:3])
        coarse, _ = model.score_flow(features[1:])
    whole, coarse_map = (likelihood_map(z, (grid, grid)).double().numpy() for z in (latents, coarse))
    assert plain_centre_weight(whole) >= ALIGNED_WEIGHT
    assert len(model.score_positions.centres) == 2
    for kept, maps in zip(model.score_positions.centres, (whole, coarse_map)):
        np.testing.assert_allclose(kept.numpy(), plain_shrunk_statistics(maps)[0], atol=1e-4)
    image = np.asarray(Image.open(sorted(folder.glob("*.png"))[0]).convert("RGB"))
    score = model.predict([image])[0].score
    # The score is the mean of the two parts: each map standardised per position, its top 1 % (655 of 256 x 256
    # pixels), standardised by the stopping images' centre and spread, written out here in NumPy.
    with torch.no_grad():
        features = model.extractor(to_model_input(read_image(sorted(folder.glob("*.png"))[0]), grid)[None])
        one = [likelihood_map(z, (grid, grid)).double().numpy()[0] for z in (model.flow(features[:3])[0], model.score_flow(features[1:])[0])]
    standardised = []
    for m, c, w, centre, spread in zip(one, model.score_positions.centres, model.score_positions.spreads, model.calibration.score_centres, model.calibration.score_spreads):
        per_position = ((m - c.numpy()) / w.numpy()).ravel()
        top = np.sort(per_position)[-int(np.ceil(0.01 * per_position.size)):].mean()
        standardised.append((top - centre) / spread)
    assert score == pytest.approx(np.mean(standardised), abs=1e-4)
    assert abs(standardised[0] - standardised[1]) > 1e-3  # the mean and the larger differ here, so the check can fail
    assert uflow.load(out, allow_download=False).predict([image])[0].score == pytest.approx(score, abs=1e-5)
    # The exported graph carries the whole map's statistics as constants and scores the same (1e-4 in raw units).
    exported = OnnxModel.load(export_onnx(model, tmp_path / "m.onnx"))
    assert exported.predict([image])[0].score == pytest.approx(score, abs=1e-4 / min(model.calibration.score_spreads))
    # The same run as the version before wrote it (format 3, no combination recorded) scores with the larger part.
    config_path = out / "uflow.json"
    config = json.loads(config_path.read_text())
    del config["calibration"]["score_combination"]
    config_path.write_text(json.dumps(dict(config, format=3)))
    assert uflow.load(out, allow_download=False).predict([image])[0].score == pytest.approx(max(standardised), abs=1e-4)
