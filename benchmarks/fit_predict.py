"""Fit and predict speed of the default model (or ``--backbone``'s) on 256x256 real-texture images (CPU by default).

    python benchmarks/fit_predict.py --runs 3
    python benchmarks/fit_predict.py --device cuda --predict 2048 --batch-size 64 --precision bf16 --workers 8

Fits on 100 normal 256x256 crops of scikit-image's brick texture with the
default settings, then predicts ``--predict`` images, segmentation included,
no file writing: once from the PNG files (decoding included) and once from
images already decoded in memory. Prints each run and the medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import uflow
from uflow.textures import _texture


def make_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    img = _texture("brick")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        top, left = rng.integers(0, 512 - 256, size=2)
        path = folder / f"{i:03d}.png"
        Image.fromarray((img[top : top + 256, left : left + 256] * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--predict", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="predict batch size")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="backbone precision for predict")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone for predict")
    parser.add_argument("--workers", type=int, default=0, help="segmentation worker processes")
    parser.add_argument("--no-score-flow", action="store_true", help="fit the map flow alone (what the score flow costs)")
    parser.add_argument("--backbone", default=uflow.DEFAULT_BACKBONE, help="to measure another backbone's fit within the budget")
    args = parser.parse_args()
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}{gpu}")
    with tempfile.TemporaryDirectory() as tmp:
        train = make_images(Path(tmp) / "train", args.train, 0)
        test = make_images(Path(tmp) / "test", args.predict, 1)
        decoded = [np.asarray(Image.open(p).convert("RGB")) for p in test]
        options = {"batch_size": args.batch_size, "workers": args.workers}
        fit_s, from_files, from_memory = [], [], []
        for run in range(args.runs):
            t = time.perf_counter()
            model = uflow.fit(train, epochs=args.epochs, device=args.device, progress=False, score_flow=not args.no_score_flow, backbone=args.backbone)
            fit_s.append(time.perf_counter() - t)
            model.accelerate(args.precision, compile=args.compile)
            model.predict(decoded[: 2 * args.batch_size], **options)  # warm-up (and compilation)
            t = time.perf_counter()
            model.predict(test, **options)
            from_files.append(len(test) / (time.perf_counter() - t))
            t = time.perf_counter()
            model.predict(decoded, **options)
            from_memory.append(len(test) / (time.perf_counter() - t))
            print(f"run {run + 1}: fit {fit_s[-1]:.1f} s ({model.training['epochs_run']} epochs, stopped: {model.training['stopped']}), "
                  f"predict {from_files[-1]:.1f} img/s from files, {from_memory[-1]:.1f} img/s from decoded images")
    print(f"median fit: {statistics.median(fit_s):.1f} s for {args.train} images; median predict with segmentation at 256 px: "
          f"{statistics.median(from_files):.1f} img/s from files, {statistics.median(from_memory):.1f} img/s from decoded images "
          f"(batch {args.batch_size}, {args.precision}{', compiled' if args.compile else ''}, {args.workers} segmentation workers"
          f"{', no score flow' if args.no_score_flow else ''}, {args.backbone})")


if __name__ == "__main__":
    main()
