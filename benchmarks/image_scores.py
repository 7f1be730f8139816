"""Image AUROC of candidate image scores on one fitted run, from the same predictions.

    python benchmarks/image_scores.py RUN_DIR CATEGORY_DIR [--json FILE]

Candidates: the anomaly map's maximum (the paper's), the mean of its top 1 %
and top 0.1 % of pixels, and minus the image's smallest log10 NFA (its most
significant a contrario region). Every image is scored once at the model's
resolution, as ``uflow evaluate`` does, and each map candidate is computed from
the flow's unsmoothed map on the input grid (what uflow's score reads), so the
differences come from the score alone. Used to fix
uflow's image score (``anomaly_map.image_score``) across several sets, never
per dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import uflow
from uflow.anomaly_map import likelihood_map
from uflow.evaluate import mvtec_test_set, model_resolution
from uflow.metrics import image_auroc
from uflow.model import UFlowModel, to_model_input


def top_mean(maps: np.ndarray, share: float) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    top = max(1, int(np.ceil(share * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -top:].mean(axis=1)


@torch.no_grad()
def flow_maps(model: UFlowModel, paths: list[Path]) -> np.ndarray:
    """The flow's unsmoothed maps (N, S, S) on the model's input grid, each image resized as ``uflow evaluate`` does."""
    size, square = model.image_size, model.extractor.spec.fixed_image_size
    out = []
    for path in paths:
        batch = to_model_input(model_resolution(path, size, square), size)[None].to(model.device)
        out.append(likelihood_map(model.latents(batch), (size, size))[0].cpu().numpy())
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run_dir)
    items, _ = mvtec_test_set(args.category)
    square = model.extractor.spec.fixed_image_size
    images = (model_resolution(it.path, model.image_size, square) for it in items)
    predictions = list(model.iter_predict(images))
    maps = flow_maps(model, [it.path for it in items])
    anomalous = [it.anomalous for it in items]
    candidates = {
        "max": maps.reshape(len(maps), -1).max(axis=1),
        "top 1 %": top_mean(maps, 0.01),
        "top 0.1 %": top_mean(maps, 0.001),
        "smallest log10 NFA": -np.array([float(np.min(p.log10_nfa)) for p in predictions]),
        "uflow's score": np.array([p.score for p in predictions]),
    }
    row = {"run": str(args.run_dir), "category": args.category.name, **{k: round(100 * image_auroc(v, anomalous), 2) for k, v in candidates.items()}}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
