"""Time of the evaluation metrics on a large synthetic test set (hundreds of 256x256 images).

    python benchmarks/metrics.py --images 400 --runs 5

Maps are noise plus a bump on rectangular ground-truth regions; a quarter of
the images are normal. Times pixel AUROC, AUPRO, F1-max and the mIoU curve
(over log10 NFA-like maps), and what the 95 % intervals add to them (pixel
AUROC's and AUPRO's from 2,000 resamples of the images, the pixel statistics
already computed, as ``uflow evaluate`` does), each as the median of the runs;
optionally scikit-learn's roc_auc_score on the same pixels for comparison.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from uflow.metrics import PixelStatistics, miou_curve, pixel_intervals


def make_set(n: int, side: int, seed: int):
    rng = np.random.default_rng(seed)
    masks = [np.zeros((side, side), bool) for _ in range(n)]
    for g in masks[n // 4 :]:
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, side - 40, 2)
            g[y : y + rng.integers(4, 40), x : x + rng.integers(4, 40)] = True
    maps = [(rng.random((side, side)) + 0.6 * g).astype(np.float32) for g in masks]
    # log NFA maps hold one value per region: quantise to mimic that
    nfa = [np.where(m > 0.9, np.round(-30 * m, 1), np.inf).astype(np.float32) for m in maps]
    return maps, masks, nfa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare-sklearn", action="store_true", help="also time scikit-learn's roc_auc_score on the same pixels")
    args = parser.parse_args()
    maps, masks, nfa = make_set(args.images, args.side, 0)
    def pixel_metrics():
        pixels = PixelStatistics(maps, masks)  # one pass serves all three, as in uflow evaluate
        return pixels.auroc(), pixels.aupro(), pixels.f1_max(), pixels.roc()

    computed = PixelStatistics(maps, masks)
    jobs = {
        "pixel AUROC + AUPRO + F1-max + ROC": pixel_metrics,
        "mIoU curve": lambda: miou_curve(nfa, masks),
        "intervals (2,000 image resamples)": lambda: pixel_intervals(maps, masks, exact=computed),
    }
    print(f"{args.images} images of {args.side}x{args.side}, {platform.machine()}, median of {args.runs} runs")
    total = 0.0
    for name, job in jobs.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            job()
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
        print(f"  {name:36s} {statistics.median(times):7.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")
    if args.compare_sklearn:
        from sklearn.metrics import roc_auc_score

        values = np.concatenate([m.ravel() for m in maps])
        truth = np.concatenate([g.ravel() for g in masks])
        start = time.perf_counter()
        roc_auc_score(truth, values)
        peer = time.perf_counter() - start
        print(f"  {'scikit-learn roc_auc_score alone':36s} {peer:7.2f} s  (one run)")
    print(f"  {'all':36s} {total:7.2f} s")


if __name__ == "__main__":
    main()
