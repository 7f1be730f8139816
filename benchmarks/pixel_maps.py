"""Pixel AUROC and AUPRO of candidate anomaly maps on one fitted run, from the same latents.

    python benchmarks/pixel_maps.py RUN_DIR CATEGORY_DIR [--json FILE]

Candidates, each smoothed as uflow smooths its map (``uflow.anomaly_map.display_map``):
the map uflow shows now (1 - the mean over map-flow scales of the likelihoods); (P1)
that map standardised per pixel position by the mean and spread of the run's
training images' maps there, both shrunk toward the whole map's as the image score's
per-position step does; (P2) the mean over scales of each scale's map standardised
per position the same way; (P3) the mean over scales of each scale's latent
Mahalanobis distance per position (``image_scores.py``'s candidate (n)); (P4) the
mean over scales of each scale's latent norm. The per-position statistics are computed here in NumPy
(``image_scores.py``'s), independently of uflow's own. Used to choose the map on
development sets with masks, never on a set that reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from image_scores import latents_per_scale, mahalanobis_per_position, run_training_images, scale_maps, shrunk_per_position  # noqa: E402

import uflow  # noqa: E402
from uflow.anomaly_map import display_map  # noqa: E402
from uflow.evaluate import _truth_mask, mvtec_test_set  # noqa: E402
from uflow.metrics import PixelStatistics  # noqa: E402


def smoothed(maps: np.ndarray) -> list[np.ndarray]:
    side = maps.shape[-1]
    return list(display_map(torch.from_numpy(maps.astype(np.float32)), (side, side)).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run_dir)
    items, has_masks = mvtec_test_set(args.category)
    if not has_masks:
        raise SystemExit(f"{args.category}: no masks, no pixel metrics")
    masks = [_truth_mask(it, model.image_size) for it in items]
    per_scale = scale_maps(model, [it.path for it in items])  # (N, L, S, S)
    trained_per_scale = scale_maps(model, run_training_images(model))
    candidates = {
        "uflow's map now": per_scale.mean(axis=1),
        "(P1) whole map per position": shrunk_per_position(per_scale.mean(axis=1), trained_per_scale.mean(axis=1)),
        "(P2) mean of the scales per position": np.mean(
            [shrunk_per_position(per_scale[:, i], trained_per_scale[:, i]) for i in range(per_scale.shape[1])], axis=0
        ),
    }
    test_latents, _ = latents_per_scale(model, [it.path for it in items])
    trained_latents, _ = latents_per_scale(model, run_training_images(model))
    size = model.image_size
    candidates["(P3) mean of the scales' latent Mahalanobis distances per position"] = np.mean(
        [mahalanobis_per_position(z, t, size) for z, t in zip(test_latents, trained_latents)], axis=0
    )
    candidates["(P4) mean of the scales' latent norms"] = np.mean(
        [
            torch.nn.functional.interpolate(torch.from_numpy(np.sqrt((z**2).sum(axis=1, keepdims=True))), size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
            for z in test_latents
        ],
        axis=0,
    )
    row: dict = {"run": str(args.run_dir), "category": args.category.name}
    for name, maps in candidates.items():
        pixels = PixelStatistics(smoothed(maps), masks)
        row[name] = {"pixel_auroc": round(100 * pixels.auroc(), 2), "aupro": round(100 * pixels.aupro(), 2)}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
