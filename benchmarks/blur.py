"""Time of the anomaly map's Gaussian smoothing per 256 px map: uflow's two matrix products against a convolution.

    python benchmarks/blur.py --runs 5 [--threads 2]

``anomaly_map.display_map`` blurs the flow's map on the input grid as
B @ M @ B^T with a banded matrix B; the plain way is the same Gaussian as a
separable 33-tap convolution with edge values repeated (checked equal here).
Both at batch 1 and 256 -> 256 px, PyTorch on the CPU with ``--threads``
threads (kept out of ``encode.py``, whose numpy timings change once PyTorch is
loaded). Prints each run's mean time per map, then the median of the runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from uflow.anomaly_map import SMOOTHING_SIGMA, display_map


def convolution_blur(anomaly_map: torch.Tensor) -> torch.Tensor:
    radius = int(4.0 * SMOOTHING_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / SMOOTHING_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(anomaly_map[:, None], (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))[:, 0]


def per_map_ms(fn, maps) -> float:
    """Wall time over all maps / their number: a predict pays the slow calls too, which a median of calls would hide."""
    start = time.perf_counter()
    for m in maps:
        fn(m)
    return 1e3 * (time.perf_counter() - start) / len(maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--maps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, 256x256 maps")
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 256, 256, generator=gen) for _ in range(args.maps)]
    for m in maps[:4]:
        assert torch.allclose(display_map(m, (256, 256)), convolution_blur(m), atol=1e-5), "the two blurs differ"
    cases = {"matrix products": lambda m: display_map(m, (256, 256)), "33-tap convolution": convolution_blur}
    for fn in cases.values():  # warm-up, untimed: first calls allocate and pick kernels
        for m in maps[:8]:
            fn(m)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for run in range(args.runs):
        for name, fn in cases.items():
            results[name].append(per_map_ms(fn, maps))
        print(f"run {run + 1}: " + ", ".join(f"{name} {results[name][-1]:.2f} ms" for name in cases))
    ours, plain = (statistics.median(results[name]) for name in cases)
    print(f"\nmedian of {args.runs} runs: matrix products {ours:.2f} ms, convolution {plain:.2f} ms per map ({plain / ours:.1f}x)")


if __name__ == "__main__":
    main()
