"""Training, checkpoints and prediction through the Python API, on real texture images."""

import json
import shutil

import numpy as np
import pytest
import torch

import uflow
from safetensors.torch import load_file, save_file

from uflow.anomaly_map import ALIGNED_WEIGHT, display_map, image_score, likelihood_map
from uflow.checkpoint import CHECKPOINT_FORMAT, CONFIG_NAME, WEIGHTS_NAME
from uflow.files import file_sha256
from uflow.images import read_image
from uflow.model import POSITION_CENTRES, POSITION_SPREADS, to_model_input
from uflow.train import training_images

from conftest import SMALL, plain_centre_weight, plain_shrunk_statistics


def test_fit_writes_a_complete_run_folder(run_dir):
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    assert config["backbone"] == "tf_efficientnet_lite0" and config["image_size"] == 64
    assert config["uflow_version"] == uflow.__version__
    assert config["backbone_weights"][0]["kind"] == "package"
    t = config["training"]
    assert t["n_train"] + t["n_val"] + t["n_calibration"] + t["n_verification"] == 16 and t["n_val"] >= 1
    assert 1 <= t["best_epoch"] <= t["epochs_run"] and np.isfinite(t["best_val_nll"])
    assert (run_dir / WEIGHTS_NAME).is_file()
    assert not list(run_dir.glob(".*tmp")), "no temporary files left behind"
    # The score flow models the backbone's stride 8, 16 and 32 features and takes the race's choice of position.
    assert config["score_flow"]["feature_channels"] == [40, 112, 320]
    assert config["score_flow"]["positional"] == config["flow"]["positional"]
    assert 1 <= t["score_flow"]["best_epoch"] <= t["score_flow"]["epochs_run"] <= SMALL["epochs"]
    # A texture: the whole map's centre weight is under the aligned threshold, so one part per map-flow scale,
    # then the score flow's (tests/test_train.py fits aligned images, which take the whole maps).
    assert 0.0 <= t["whole_map_centre_weight"] < ALIGNED_WEIGHT
    assert config["calibration"]["score_parts"] == "scales"
    assert len(config["calibration"]["score_centres"]) == len(config["calibration"]["score_spreads"]) == 4
    assert config["calibration"]["score_combination"] == "largest"  # a small defect one scale sees counts in full
    assert config["calibration"]["score_per_position"] is True and config["format"] == CHECKPOINT_FORMAT


def test_predictions_have_maps_at_image_size_scores_and_segmentation(model, brick):
    paths = sorted((brick / "test").rglob("*.png"))
    preds = model.predict(paths, batch_size=4)
    assert len(preds) == len(paths)
    for p, path in zip(preds, paths):
        assert p.path == path
        assert p.anomaly_map.shape == (96, 96) and p.anomaly_map.dtype == np.float32
        assert 0.0 <= p.anomaly_map.min() and p.anomaly_map.max() <= 1.0
        # Each part's raw score is the mean of the top 1 % of a map on the input grid (before the smoothing of the
        # map shown at image size), standardised per position first: each map-flow scale's alone (this texture's
        # run's parts), then the score flow's; the image score is the largest after standardising each by the
        # calibration's centre and spread.
        # All recomputed here from the backbone's features.
        grid = model.image_size
        with torch.no_grad():
            features = model.extractor(to_model_input(read_image(path), grid)[None])
            latents, _ = model.flow(features[:3])
            coarse, _ = model.score_flow(features[1:])
        flow_map = likelihood_map(latents, (grid, grid))
        top = -(-grid * grid // 100)
        maps = [likelihood_map([z], (grid, grid))[0].numpy() for z in latents] + [likelihood_map(coarse, (grid, grid))[0].numpy()]
        centres, spreads = model.score_positions.centres.numpy(), model.score_positions.spreads.numpy()
        raw = [float(np.sort(((m - c) / w).ravel())[-top:].mean()) for m, c, w in zip(maps, centres, spreads, strict=True)]
        cal = model.calibration
        want = max((r - c) / w for r, c, w in zip(raw, cal.score_centres, cal.score_spreads))
        assert p.score == pytest.approx(want, abs=1e-4)
        assert np.allclose(p.anomaly_map, display_map(flow_map, (96, 96))[0].numpy(), atol=1e-5)
        assert p.mask.shape == (96, 96) and p.log10_nfa.shape == (96, 96)
        assert p.label == ("anomalous" if p.regions else "normal")
    no_seg = model.predict(paths[:2], segmentation=False)
    assert no_seg[0].mask is None and no_seg[0].score == pytest.approx(preds[0].score, abs=1e-6)


def test_the_score_flow_changes_the_score_only(model, brick, tmp_path):
    # Trained after the map flow, from the same seed: without it the maps, regions and masks are the same, and the
    # score is the largest of the map flow's scales alone, standardised as the two-flow model standardises them.
    alone = uflow.fit(brick, tmp_path / "alone", **{**SMALL, "score_flow": False})
    assert alone.score_flow is None and len(alone.calibration.score_centres) == 3
    np.testing.assert_allclose(alone.calibration.score_centres, model.calibration.score_centres[:3], rtol=1e-5)
    np.testing.assert_allclose(alone.calibration.score_spreads, model.calibration.score_spreads[:3], rtol=1e-5)
    reloaded = uflow.load(tmp_path / "alone", allow_download=False)
    for m in (alone, reloaded):
        assert m.extractor.spec.strides == (4, 8, 16), "without a score flow the stride-32 stages are never run"
    paths = sorted((brick / "test").rglob("*.png"))
    for a, b, c in zip(alone.predict(paths), model.predict(paths), reloaded.predict(paths), strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert np.array_equal(a.anomaly_map, c.anomaly_map) and a.score == c.score
        assert b.score >= a.score - 1e-4, "the score flow's part can only raise the largest standardised score"
        assert np.array_equal(a.mask, b.mask) and len(a.regions) == len(b.regions)


def test_arrays_and_gray_images_are_accepted_and_sized(model):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (50, 70), dtype=np.uint8)
    pred = model.predict(gray)[0]
    assert pred.anomaly_map.shape == (50, 70) and pred.path is None


def test_load_restores_identical_predictions(run_dir, model, brick):
    again = uflow.load(run_dir, allow_download=False)
    image = sorted((brick / "test" / "blob").glob("*.png"))[0]
    a, b = model.predict(image)[0], again.predict(image)[0]
    assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_training_is_reproducible(brick):
    a = uflow.fit(brick, **{**SMALL, "epochs": 2})
    b = uflow.fit(brick, **{**SMALL, "epochs": 2})
    assert a.training["best_val_nll"] == b.training["best_val_nll"]


def test_divergence_stops_with_a_clear_message_and_writes_nothing_false(brick, tmp_path):
    with pytest.raises(uflow.UFlowError, match=r"(training loss|validation NLL) became (nan|inf) at epoch 1 .*nothing saved.*lower --lr"):
        uflow.fit(brick, tmp_path / "run", **{**SMALL, "epochs": 5, "lr": 1e3})
    assert not (tmp_path / "run" / CONFIG_NAME).exists()


def test_too_few_images_are_refused_and_the_fewest_allowed_fit(tmp_path, brick):
    folder = tmp_path / "three"
    folder.mkdir()
    for p in sorted((brick / "train" / "good").glob("*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    with pytest.raises(uflow.UFlowError, match="at least 4"):
        uflow.fit(folder, **SMALL)
    # Four are enough: one trains, and one training image has no spread to standardise the score per position by,
    # so that run standardises globally.
    shutil.copy(sorted((brick / "train" / "good").glob("*.png"))[3], folder)
    with pytest.warns(UserWarning, match="promise"):
        smallest = uflow.fit(folder, **SMALL)
    assert smallest.training["n_train"] == 1
    assert smallest.score_positions is None and smallest.calibration.score_per_position is False
    assert np.isfinite(smallest.predict(sorted(folder.glob("*.png"))[0])[0].score)


def _copy_run(run_dir, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(run_dir, dest)
    return dest


def test_checkpoint_from_another_format_is_refused(run_dir, tmp_path):
    dest = _copy_run(run_dir, tmp_path)
    config = json.loads((dest / CONFIG_NAME).read_text())
    config["format"] = 99
    (dest / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(uflow.UFlowError, match="format 99"):
        uflow.load(dest, allow_download=False)


def test_checkpoint_for_another_backbone_is_refused(run_dir, tmp_path):
    dest = _copy_run(run_dir, tmp_path)
    config = json.loads((dest / CONFIG_NAME).read_text())
    config["backbone"] = "resnet18"
    (dest / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(uflow.UFlowError, match="backbone resnet18 gives"):
        uflow.load(dest, allow_download=False)


def _without_positions(dest, config):
    """Rewrite a copied run as format 2 wrote it: no per-position statistics beside the weights."""
    tensors = {k: v for k, v in load_file(str(dest / WEIGHTS_NAME)).items() if k not in (POSITION_CENTRES, POSITION_SPREADS)}
    save_file(tensors, str(dest / WEIGHTS_NAME))
    config.update(format=2, weights_sha256=file_sha256(dest / WEIGHTS_NAME))
    del config["calibration"]["score_per_position"]


def test_position_statistics_are_the_training_images_shrunk_moments(model, run_dir):
    # Recomputed from the training image files (the run's data minus what it held out) with NumPy, as
    # benchmarks/image_scores.py's candidate (e) does.
    held_out = {p for key in ("val_images", "calibration_images", "verification_images") for p in model.training[key]}
    trained = [p for p in training_images(model.training["data"]) if str(p.resolve()) not in held_out]
    assert len(trained) == model.training["n_train"] >= 2
    grid = model.image_size
    with torch.no_grad():
        features = model.extractor(torch.stack([to_model_input(read_image(p), grid) for p in trained]))
        latents, _ = model.flow(features[:3])
        coarse, _ = model.score_flow(features[1:])
    scales = [likelihood_map([z], (grid, grid)).double().numpy() for z in latents]
    whole = likelihood_map(latents, (grid, grid)).double().numpy()
    # The whole map's centre weight, recorded by the run, chose the parts (each scale here, then the score flow).
    assert model.training["whole_map_centre_weight"] == pytest.approx(plain_centre_weight(whole), abs=2e-4)
    parts = [*scales, likelihood_map(coarse, (grid, grid)).double().numpy()]
    assert len(model.score_positions.centres) == len(parts)
    for i, maps in enumerate(parts):
        centre, spread = plain_shrunk_statistics(maps)
        np.testing.assert_allclose(model.score_positions.centres[i].numpy(), centre, atol=1e-4)
        np.testing.assert_allclose(model.score_positions.spreads[i].numpy(), spread, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("drop", "message"), [(True, "holds no position statistics"), (False, r"of shape \(2, 64, 64\)")])
def test_position_statistics_that_do_not_fit_are_refused(run_dir, tmp_path, drop, message):
    dest = _copy_run(run_dir, tmp_path)
    tensors = load_file(str(dest / WEIGHTS_NAME))
    for name in (POSITION_CENTRES, POSITION_SPREADS):
        tensors[name] = tensors[name][:2]
        if drop:
            del tensors[name]
    save_file(tensors, str(dest / WEIGHTS_NAME))
    config = json.loads((dest / CONFIG_NAME).read_text())
    config["weights_sha256"] = file_sha256(dest / WEIGHTS_NAME)
    (dest / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(uflow.UFlowError, match=message):
        uflow.load(dest, allow_download=False)


def test_a_run_from_before_the_per_scale_parts_scores_as_it_did(run_dir, brick, tmp_path):
    dest = _copy_run(run_dir, tmp_path)
    config = json.loads((dest / CONFIG_NAME).read_text())
    _without_positions(dest, config)
    cal = config["calibration"]
    del cal["score_parts"]  # what uflow.json held before: one part per flow
    cal["score_centres"], cal["score_spreads"] = [0.5, 0.4], [0.1, 0.2]
    (dest / CONFIG_NAME).write_text(json.dumps(config))
    old = uflow.load(dest, allow_download=False)
    assert old.calibration.score_parts == "flows"
    image = sorted((brick / "test" / "blob").glob("*.png"))[0]
    with torch.no_grad():
        features = old.extractor(to_model_input(read_image(image), old.image_size)[None])
        latents, _ = old.flow(features[:3])
        coarse, _ = old.score_flow(features[1:])
    size = (old.image_size, old.image_size)
    whole, score_flow_part = image_score(likelihood_map(latents, size)).item(), image_score(likelihood_map(coarse, size)).item()
    assert old.predict(image)[0].score == pytest.approx(max((whole - 0.5) / 0.1, (score_flow_part - 0.4) / 0.2), abs=1e-4)


@pytest.mark.parametrize(
    ("parts", "centres", "combination", "message"),
    [
        ("pixels", 4, "largest", "unknown image score parts 'pixels'"),
        ("scales", 2, "largest", "standardises 2 image score parts"),
        ("scales", 4, "median", "unknown image score combination 'median'"),
    ],
)
def test_a_calibration_that_does_not_fit_the_model_is_refused(run_dir, tmp_path, parts, centres, combination, message):
    dest = _copy_run(run_dir, tmp_path)
    config = json.loads((dest / CONFIG_NAME).read_text())
    config["calibration"].update(score_parts=parts, score_centres=[0.5] * centres, score_spreads=[0.1] * centres, score_combination=combination)
    (dest / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(uflow.UFlowError, match=message):
        uflow.load(dest, allow_download=False)


def test_mixed_or_missing_files_are_refused(run_dir, tmp_path):
    dest = _copy_run(run_dir, tmp_path)
    (dest / WEIGHTS_NAME).write_bytes(b"\0" * 100)
    with pytest.raises(uflow.UFlowError, match="checksum differs"):
        uflow.load(dest, allow_download=False)
    (dest / WEIGHTS_NAME).unlink()
    with pytest.raises(uflow.UFlowError, match="missing"):
        uflow.load(dest, allow_download=False)
    with pytest.raises(uflow.UFlowError, match="not a uflow model"):
        uflow.load(tmp_path, allow_download=False)


def test_segmentation_in_worker_processes_gives_identical_results_in_order(model, brick):
    images = sorted((brick / "test").rglob("*.png"))
    inline = model.predict(images, batch_size=2)
    pooled = model.predict(images, batch_size=2, workers=2)
    assert [p.path for p in pooled] == [p.path for p in inline]
    for a, b in zip(pooled, inline):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.log10_nfa, b.log10_nfa)
        assert [r.to_dict() for r in a.regions] == [r.to_dict() for r in b.regions]
    with pytest.raises(uflow.UFlowError, match="workers"):
        model.predict(images[0], workers=-1)

    # The workers outlive a call (starting them takes seconds), and a stream stopped early leaves them usable.
    pool = model._workers.executor
    stopped = model.iter_predict(images, batch_size=1, workers=2)
    next(stopped)
    stopped.close()
    again = model.predict(images, batch_size=2, workers=2)
    assert model._workers.executor is pool
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again, inline))
    model.close()
    assert model._workers.executor is None


def test_bf16_backbone_stays_close_to_float32(model, brick):
    images = sorted((brick / "test").rglob("*.png"))[:4]
    reference = model.predict(images)
    try:
        fast = model.accelerate("bf16").predict(images)
    finally:
        model.accelerate("fp32")
    for a, b in zip(fast, reference):
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 0.05
    with pytest.raises(uflow.UFlowError, match="precision"):
        model.accelerate("fp8")
