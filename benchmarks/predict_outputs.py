"""End-to-end `uflow predict` rate with its outputs written, per output choice (CPU by default).

    python benchmarks/predict_outputs.py --runs 3
    python benchmarks/predict_outputs.py --run-dir runs/bottle --images mvtec/bottle/test

Fits a model on 256x256 crops of scikit-image's brick texture (a few epochs:
speed does not depend on accuracy) unless ``--run-dir`` is given, writes
``--predict`` test PNGs, then runs the real command line in this process
(``uflow.cli.main``) for each output choice: all files (overlay, map, mask),
maps only, tables only. Reported rates are images per second from the first
image read to the last table written, with the model load (timed on its own
and printed) left out; the whole command's rate, load included, is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import uflow
from uflow.cli import main as uflow_main

from fit_predict import make_images  # same 256 px brick crops as the fit/predict benchmark

CHOICES = {"overlay,map,mask": "all outputs", "map": "maps only", "none": "tables only"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--predict", type=int, default=64, help="test images to write (ignored with --images)")
    parser.add_argument("--run-dir", default=None, help="an existing run folder instead of a quick fit")
    parser.add_argument("--images", default=None, help="an existing image folder instead of generated crops")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
        if not args.run_dir:
            uflow.fit(make_images(tmp / "train", 24, 0), run_dir, epochs=2, progress=False)
        images = Path(args.images) if args.images else tmp / "test"
        if not args.images:
            make_images(images, args.predict, 1)
        n = sum(1 for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
        # Untimed warm-up: the first load and the first predict in a process pay one-off costs (imports,
        # allocator, kernels) that the load timed beside each run would not see, overstating run 1's rate.
        uflow.load(run_dir)
        assert uflow_main(["predict", str(run_dir), str(images), "--out", str(tmp / "warm-up"), "--outputs", "none", "--quiet"]) == 0
        loads = []
        rates: dict[str, list[float]] = {c: [] for c in CHOICES}
        whole: dict[str, list[float]] = {c: [] for c in CHOICES}
        for run in range(args.runs):
            t = time.perf_counter()
            uflow.load(run_dir)
            loads.append(time.perf_counter() - t)
            for choice in CHOICES:
                out = tmp / f"out-{run}-{choice.replace(',', '_')}"
                t = time.perf_counter()
                status = uflow_main(["predict", str(run_dir), str(images), "--out", str(out), "--outputs", choice, "--quiet"])
                seconds = time.perf_counter() - t
                assert status == 0, f"predict failed with status {status}"
                rates[choice].append(n / (seconds - loads[-1]))
                whole[choice].append(n / seconds)
            print(f"run {run + 1}: load {loads[-1]:.2f} s; " + ", ".join(f"{CHOICES[c]} {rates[c][-1]:.1f} img/s" for c in CHOICES))
    print(f"\n{n} images at 256 px, median of {args.runs} runs, model load {statistics.median(loads):.2f} s left out:\n")
    print("| outputs | img/s | img/s, load included |")
    print("|---|---:|---:|")
    for choice, name in CHOICES.items():
        print(f"| {name} (`--outputs {choice}`) | {statistics.median(rates[choice]):.1f} | {statistics.median(whole[choice]):.1f} |")


if __name__ == "__main__":
    main()
