"""Accuracy of the anomaly map smoothed by a Gaussian of several widths, on one fitted run.

    python benchmarks/map_smoothing.py RUN_DIR CATEGORY_DIR [--sigmas 0,2,4,8] [--json FILE]

Every test image goes through the flow once at the model's resolution, as
``uflow evaluate`` does; each candidate blurs the flow's own map (before
uflow's smoothing; sigma in pixels at that resolution, 0 = no blur) and
recomputes pixel AUROC and AUPRO, and image AUROC with the image score (top
1 % mean) taken from the blurred map, so the differences come from the
smoothing alone. anomalib's PatchCore and PaDiM blur with sigma 4 at 256 px. Used to
fix a default across several sets, never per dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from image_scores import flow_maps, top_mean
from scipy import ndimage

import uflow
from uflow.evaluate import _truth_mask, mvtec_test_set
from uflow.metrics import PixelStatistics, image_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--sigmas", default="0,2,4,8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run_dir)
    items, has_masks = mvtec_test_set(args.category)
    size = model.image_size
    maps = flow_maps(model, [it.path for it in items])
    anomalous = [it.anomalous for it in items]
    truths = [_truth_mask(it, size) for it in items] if has_masks else None
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        smooth = maps if sigma == 0 else np.stack([ndimage.gaussian_filter(m, sigma, mode="nearest", truncate=4.0) for m in maps])
        row = {"category": args.category.name, "sigma": sigma, "image_auroc": float(f"{100 * image_auroc(top_mean(smooth, 0.01), anomalous):.2f}")}
        if truths is not None:
            pixels = PixelStatistics(list(smooth), truths)
            row.update(pixel_auroc=float(f"{100 * pixels.auroc():.2f}"), aupro=float(f"{100 * pixels.aupro():.2f}"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
