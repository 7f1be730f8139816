"""Time of the a contrario segmentation step per image, on one CPU core.

    python benchmarks/nfa.py --runs 5

Latents are N(0, 1) with the default model's channel counts. Reports the
median over runs of the per-image time for the default model at 256 px
(scales 64x64, 32x32, 16x16) and for single scales from 32x32 to 128x128.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from uflow.segmentation import segment  # noqa: E402


def per_image_ms(sides: list[int], channels: list[int], batch: int, runs: int, rng: np.random.Generator) -> list[float]:
    maps = [(rng.standard_normal((batch, c, s, s)) ** 2).sum(axis=1) for s, c in zip(sides, channels)]
    out = 4 * max(sides)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        segment(maps, channels, [(out, out)] * batch)
        times.append((time.perf_counter() - t) / batch * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rng = np.random.default_rng(0)
    t = per_image_ms([64, 32, 16], [30, 30, 56], args.batch, args.runs, rng)
    print(f"default model, 256 px (64x64 + 32x32 + 16x16): median {statistics.median(t):.2f} ms/image (runs: {', '.join(f'{x:.2f}' for x in t)})")
    for side in (32, 64, 96, 128):
        t = per_image_ms([side], [30], args.batch, args.runs, rng)
        print(f"single scale {side}x{side}: median {statistics.median(t):.2f} ms/image")


if __name__ == "__main__":
    main()
