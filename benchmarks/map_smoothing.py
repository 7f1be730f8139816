"""Accuracy of the anomaly map smoothed by a Gaussian of several widths, on one fitted run.

    python benchmarks/map_smoothing.py RUN_DIR CATEGORY_DIR [--sigmas 0,2,4,8] [--json FILE]

Every test image is scored once at the model's resolution, as ``uflow evaluate``
does; each candidate blurs those same maps (sigma in pixels at that
resolution, 0 = the map as the flow gives it) and recomputes the image score
(top 1 % mean), image AUROC, pixel AUROC and AUPRO, so the differences come
from the smoothing alone. PatchCore and CFlow-AD blur with sigma 4 at 256 px.
Used to fix a default across several sets, never per dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

import uflow
from uflow.evaluate import _truth_mask, model_resolution, mvtec_test_set
from uflow.metrics import PixelStatistics, image_auroc


def top_mean(maps: np.ndarray, share: float = 0.01) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    top = max(1, int(np.ceil(share * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -top:].mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--sigmas", default="0,2,4,8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run_dir)
    items, has_masks = mvtec_test_set(args.category)
    size, square = model.image_size, model.extractor.spec.fixed_image_size
    images = (model_resolution(it.path, size, square) for it in items)
    maps = np.stack([p.anomaly_map for p in model.iter_predict(images, segmentation=False)]).astype(np.float32)
    anomalous = [it.anomalous for it in items]
    truths = [_truth_mask(it, size) for it in items] if has_masks else None
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        smooth = maps if sigma == 0 else np.stack([ndimage.gaussian_filter(m, sigma, mode="nearest", truncate=4.0) for m in maps])
        row = {"category": args.category.name, "sigma": sigma, "image_auroc": round(100 * image_auroc(top_mean(smooth), anomalous), 2)}
        if truths is not None:
            pixels = PixelStatistics(list(smooth), truths)
            row.update(pixel_auroc=round(100 * pixels.auroc(), 2), aupro=round(100 * pixels.aupro(), 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
