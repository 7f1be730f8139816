"""Fit and predict speed of the default model on 256x256 real-texture images (CPU by default).

    python benchmarks/fit_predict.py --runs 3

Fits on 100 normal 256x256 crops of scikit-image's brick texture with the
default settings, then predicts 64 images (segmentation included, no file
writing). Prints each run and the medians.
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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        train = make_images(Path(tmp) / "train", args.train, 0)
        test = make_images(Path(tmp) / "test", args.predict, 1)
        fit_s, rate = [], []
        for run in range(args.runs):
            t = time.perf_counter()
            model = uflow.fit(train, device=args.device, progress=False)
            fit_s.append(time.perf_counter() - t)
            model.predict(test[:8])  # warm-up
            t = time.perf_counter()
            model.predict(test)
            rate.append(len(test) / (time.perf_counter() - t))
            print(f"run {run + 1}: fit {fit_s[-1]:.1f} s ({model.training['epochs_run']} epochs, stopped: {model.training['stopped']}), predict {rate[-1]:.1f} img/s")
    print(f"median fit: {statistics.median(fit_s):.1f} s for {args.train} images; median predict: {statistics.median(rate):.1f} img/s at 256 px")


if __name__ == "__main__":
    main()
