"""Evaluation on an MVTec-style category: the field's metrics, metrics.json and the HTML report.

Images are scored at the model's input resolution and ground-truth masks are
resized to it with nearest neighbour, as anomalib and the paper's code do, so
an evaluation of hundreds of megapixel images stays small in memory. The
"fair" threshold comes from the run's held-out normal images only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .files import atomic_write_text
from .errors import UFlowError
from .images import IMAGE_SUFFIXES, as_float_image, list_images, read_mask
from .metrics import PixelStatistics, auroc_interval, fair_threshold, image_auroc, image_roc, iou_per_image, miou_at, miou_curve, pixel_intervals
from .calibration import Null, binomial_upper_bound
from .model import UFlowModel, to_model_input
from .report import Panel, write_report
from .result import Evaluation
from .segmentation import TestCount
from .train import training_images

GOOD = "good"


@dataclass
class TestImage:
    """One test image of an MVTec-style category."""

    path: Path
    defect: str  # "good" for normal images
    mask_path: Path | None = None

    @property
    def anomalous(self) -> bool:
        return self.defect != GOOD


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):  # MVTec-AD names masks <stem>_mask.png; BTAD and others <stem>.png
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def mvtec_test_set(category: str | os.PathLike) -> tuple[list[TestImage], bool]:
    """The test images of ``category`` and whether it has ground-truth masks.

    ``test/good`` holds normal images and every other ``test/<defect>`` folder
    anomalous ones. With a ``ground_truth`` folder, every anomalous image must
    have its mask ``ground_truth/<defect>/<stem>_mask.png``; without one only
    image-level metrics are computed.
    """
    root = Path(category)
    test = root / "test"
    if not test.is_dir():
        raise UFlowError(f"{root}: no test folder (an MVTec-style category has test/good and test/<defect>)")
    folders = sorted(d for d in test.iterdir() if d.is_dir())
    if not folders:
        raise UFlowError(f"{test}: no subfolders (expected test/good and test/<defect>)")
    truth = root / "ground_truth"
    has_masks = truth.is_dir()
    items = []
    for folder in folders:
        for path in list_images(folder, recursive=False):
            mask = None
            if has_masks and folder.name != GOOD:
                mask = _find_mask(truth / folder.name, path.stem)
                if mask is None:
                    raise UFlowError(f"{path}: no ground-truth mask (expected {truth / folder.name / (path.stem + '_mask.png')})")
            items.append(TestImage(path, folder.name, mask))
    return items, has_masks


def model_resolution(path: Path, size: int, square: bool) -> np.ndarray:
    image, _ = as_float_image(path, square=square)
    return to_model_input(image, size).numpy().transpose(1, 2, 0)


def _truth_mask(item: TestImage, size: int) -> np.ndarray:
    if item.mask_path is None:
        return np.zeros((size, size), dtype=bool)
    mask = read_mask(item.mask_path)
    with Image.open(item.path) as image:  # the header only: the pixels were read for scoring
        width, height = image.size
    if mask.shape != (height, width):
        raise UFlowError(f"{item.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {item.path.name} is {width}x{height}")
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def _validation_images(model: UFlowModel, category: Path) -> tuple[list[Path], str]:
    recorded = [Path(p) for p in model.training.get("val_images", [])]
    if recorded and all(p.is_file() for p in recorded):
        return recorded, "held-out validation images of the run"
    return training_images(category), "training images (the run's validation images were not found)"


def evaluate(
    model: UFlowModel,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    batch_size: int = 16,
    epsilon: float | None = None,
    test_count: TestCount = "per_size",
    null: Null = "calibrated",
    report: bool = True,
    max_panels: int = 40,
    progress: bool = True,
) -> Evaluation:
    """Score every test image of an MVTec-style category and compute the field's metrics.

    Detection is at the run's verified threshold unless ``epsilon`` is given
    (log10 NFA < log10 epsilon, the paper's rule). The metrics put the
    promised false-alarm rate, the rate measured on the run's verification
    images and the rate on this test set's normal images side by side, with
    the share of defective images detected and the best share any threshold
    on the image score reaches at the same test false-alarm rate.

    Writes ``metrics.json`` (and ``report.html`` with its figures unless
    ``report`` is False) into ``out`` when given.
    """
    from tqdm.auto import tqdm

    category = Path(data)
    items, has_masks = mvtec_test_set(category)
    size = model.image_size
    square = model.extractor.spec.fixed_image_size
    options = dict(batch_size=batch_size, epsilon=epsilon, test_count=test_count, null=null)

    val_paths, fair_source = _validation_images(model, category)
    # Test and validation images go through the model as one stream, so its batches stay full.
    resized = (model_resolution(p, size, square) for p in [*(it.path for it in items), *val_paths])
    scores, maps, nfas, detected, truths, panels_in, val_nfa = [], [], [], [], [], [], []
    bar = tqdm(total=len(items) + len(val_paths), desc="evaluate", unit="img", disable=not progress, leave=False)
    for k, pred in enumerate(model.iter_predict(resized, keep_images=True, **options)):
        if k < len(items):
            scores.append(pred.score)
            maps.append(pred.anomaly_map)
            nfas.append(pred.log10_nfa)
            detected.append(pred.mask)
            truths.append(_truth_mask(items[k], size))
            panels_in.append((np.round(pred.image * 255).astype(np.uint8), pred))
        else:
            val_nfa.append(pred.log10_nfa)
        bar.update(1)
    bar.close()

    scores = np.array(scores)
    anomalous = np.array([it.anomalous for it in items])
    log_eps = model.calibration.log10_threshold(epsilon, test_count, null)
    flagged = np.array([d.any() for d in detected])  # as the run decides (see uflow.calibration), which may not be log_eps alone
    promise = model.calibration.promise if epsilon is None else None
    n_normal, normal_flagged = int((~anomalous).sum()), int(flagged[~anomalous].sum())
    test_rate = normal_flagged / n_normal if n_normal else float("nan")
    roc = image_roc(scores, anomalous)
    metrics: dict[str, Any] = {
        "image_auroc": image_auroc(scores, anomalous),
        # The image's most significant region as a score: what the automatic threshold decides on by default.
        "image_auroc_nfa": image_auroc([-float(np.min(v)) for v in nfas], anomalous),
        "n_normal": n_normal,
        "n_anomalous": int(anomalous.sum()),
        "anomalous_flagged": int(flagged[anomalous].sum()),
        "normal_flagged": normal_flagged,
        # With a confidence, the rate this run keeps with that probability; without, the rate on average over runs.
        "false_alarm_promised": promise.target_rate if promise else None,
        "false_alarm_confidence": promise.confidence if promise else None,
        "n_verification": promise.verification_images if promise else None,
        "verification_flagged": promise.verification_flagged if promise else None,
        "false_alarm_verified": promise.verification_rate if promise else None,
        "false_alarm_verified_upper_95": promise.verification_upper_95 if promise else None,
        "false_alarm_test": test_rate,
        "false_alarm_test_upper_95": binomial_upper_bound(normal_flagged, n_normal),
        "detected": float(flagged[anomalous].mean()) if anomalous.any() else float("nan"),
        # Power any threshold on the image score reaches without flagging more test normals than the automatic one.
        "score_tpr_at_same_fpr": float(roc.y[roc.x <= test_rate + 1e-12].max()) if anomalous.any() and n_normal else float("nan"),
        # The image-level rule without segmentation (the promise's score threshold, else the largest validation score).
        "anomalous_over_score_threshold": int((scores[anomalous] > model.calibration.image_threshold).sum()),
        "normal_over_score_threshold": int((scores[~anomalous] > model.calibration.image_threshold).sum()),
        "n_val": len(val_nfa),
    }
    # 95 % intervals, so a reader can tell which differences this test set resolves (uflow.metrics).
    if min(metrics["n_anomalous"], n_normal) >= 2:
        metrics["image_auroc_interval"] = auroc_interval(scores, anomalous).to_list()
    thresholds = {"auto": log_eps, "fair": fair_threshold(val_nfa)}
    curves = {"image_roc": roc}
    iou = np.full(len(items), np.nan)
    if has_masks:
        curve = miou_curve(nfas, truths, also=[thresholds["auto"], thresholds["fair"]])
        best = int(np.argmax(curve.y))
        thresholds["oracle"] = float(curve.x[best])
        pixels = PixelStatistics(maps, truths)
        metrics.update(
            pixel_auroc=pixels.auroc(),
            aupro=pixels.aupro(),
            f1_max=pixels.f1_max(),
            miou_auto=float(iou_per_image(detected, truths).mean()),
            miou_fair=miou_at(nfas, truths, thresholds["fair"]),
            miou_oracle=float(curve.y[best]),
        )
        curves.update(pixel_roc=pixels.roc(), pro=pixels.pro_curve(), miou=curve)
        defective_images = sum(bool(t.any()) for t in truths)
        if min(defective_images, len(truths) - defective_images) >= 2:
            for key, interval in pixel_intervals(maps, truths, exact=pixels).items():
                metrics[f"{key}_interval"] = interval.to_list()
        iou = iou_per_image(detected, truths)

    records = []
    for k, (item, (_, pred)) in enumerate(zip(items, panels_in)):
        record = pred.summary()
        record.update(path=str(item.path), defect=item.defect, anomalous=bool(item.anomalous), flagged=bool(flagged[k]))
        record["iou_auto"] = None if np.isnan(iou[k]) else round(float(iou[k]), 4)
        records.append(record)
    settings = {
        "data": str(category.resolve()),
        "trained_on": model.training.get("data"),
        "backbone": model.backbone,
        "image_size": size,
        "resolution": f"{size}x{size} (masks resized by nearest neighbour)",
        "epsilon": epsilon,
        "log10_nfa_threshold": log_eps,
        "decision": promise.decision if promise else "region",
        "score_threshold": promise.score_threshold if promise else None,
        "threshold_from": promise.note if promise else ("epsilon" if epsilon is not None else "epsilon = 1 (run without a promise)"),
        "test_count": test_count,
        "null": null,
        "fair_threshold_from": f"{len(val_paths)} {fair_source}",
    }
    result = Evaluation(category.name, _rounded(metrics), thresholds, records, settings, curves)
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "metrics.json", json_text(result.to_dict()))
        if report:
            order = _worst_first(scores, anomalous, flagged, iou)[:max_panels]
            panels = [Panel(panels_in[k][0], truths[k], maps[k], detected[k], records[k]) for k in order]
            write_report(out, result, panels, (model.calibration.display_low, model.calibration.display_high), model.calibration.image_threshold)
    return result


def _worst_first(scores: np.ndarray, anomalous: np.ndarray, flagged: np.ndarray, iou: np.ndarray) -> list[int]:
    """Misses first: missed defects and flagged normal images, then poor overlaps, then the rest.

    Within a group, images whose score is most on the wrong side come first.
    """
    rank = scores.argsort().argsort() / max(len(scores) - 1, 1)
    wrong = np.where(anomalous, ~flagged, flagged)
    overlap_error = np.where(anomalous & ~np.isnan(iou), 1 - np.nan_to_num(iou), 0.0)
    score_error = np.where(anomalous, 1 - rank, rank)
    return sorted(range(len(scores)), key=lambda k: (-int(wrong[k]), -overlap_error[k], -score_error[k]))


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v)) for k, v in metrics.items()}


def json_text(data: Any) -> str:
    """JSON text; infinite thresholds become "inf" / "-inf" (JSON has no infinity) and NaN null."""
    import json

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"
