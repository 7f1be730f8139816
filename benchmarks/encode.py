"""Time of drawing and encoding one image's `uflow predict` pictures, against the plain ways, in the same run.

    python benchmarks/encode.py --runs 5

On 256x256 crops of scikit-image's brick texture with a smooth anomaly map
(blurred noise) and a mask: the overlay through lookup tables
(``visualize.overlay``) against the per-pixel float64 blend it replaced, and
``visualize.png_bytes`` against Pillow's encoder at compress level 1 (the
setting uflow used before), on the same overlays. Prints per-run medians over
the images, then the median of the runs, the ratios and the mean file sizes.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image
from scipy import ndimage

from uflow.textures import _texture
from uflow.visualize import colorize, overlay, png_bytes


def per_pixel_overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, mask: np.ndarray) -> np.ndarray:
    """The blend as uflow computed it before the lookup tables: float64, per pixel."""
    scaled = (anomaly_map - low) / max(2.0 * (high - low), 1e-6)
    alpha = 0.25 + 0.45 * np.clip(scaled, 0, 1)[..., None]
    out = image * (1 - alpha) + colorize(scaled) * alpha
    edge = mask & ~ndimage.binary_erosion(mask)
    out[edge] = (0.0, 1.0, 1.0)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def pillow_png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_inputs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    texture = _texture("brick")  # float32 RGB in [0, 1]
    inputs = []
    for _ in range(n):
        top, left = rng.integers(0, texture.shape[0] - 256), rng.integers(0, texture.shape[1] - 256)
        image = np.ascontiguousarray(texture[top : top + 256, left : left + 256])
        anomaly_map = ndimage.gaussian_filter(rng.random((256, 256)), 8).astype(np.float32)
        anomaly_map = (anomaly_map - anomaly_map.min()) / (np.ptp(anomaly_map) + 1e-9)
        inputs.append((image, anomaly_map, anomaly_map > 0.8))
    return inputs


def per_image_ms(fn, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(*item)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, one thread, 256x256 brick crops")
    inputs = make_inputs(args.images, 0)
    display = (0.2, 0.6)
    pictures = [overlay(img, m, *display, mask) for img, m, mask in inputs]
    for a, b in zip(pictures, (per_pixel_overlay(img, m, *display, mask) for img, m, mask in inputs)):
        assert np.abs(a.astype(int) - b).max() <= 2, "the two overlays differ by more than a colour step"
    for p in pictures:
        with Image.open(io.BytesIO(png_bytes(p))) as decoded:
            assert np.array_equal(np.asarray(decoded), p), "png_bytes does not round-trip"
    cases = {
        "overlay, lookup tables": (lambda img, m, mask: overlay(img, m, *display, mask), inputs),
        "overlay, per-pixel float64": (lambda img, m, mask: per_pixel_overlay(img, m, *display, mask), inputs),
        "PNG, png_bytes": (png_bytes, [(p,) for p in pictures]),
        "PNG, Pillow level 1": (pillow_png, [(p,) for p in pictures]),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for run in range(args.runs):
        for name, (fn, items) in cases.items():
            results[name].append(per_image_ms(fn, items))
        print(f"run {run + 1}: " + ", ".join(f"{name} {results[name][-1]:.2f} ms" for name in cases))
    median = {name: statistics.median(values) for name, values in results.items()}
    size_ours = np.mean([len(png_bytes(p)) for p in pictures])
    size_pillow = np.mean([len(pillow_png(p)) for p in pictures])
    print(f"\nmedian of {args.runs} runs, ms per image:\n")
    print("| step | uflow | plain | plain / uflow |")
    print("|---|---:|---:|---:|")
    print(f"| overlay | {median['overlay, lookup tables']:.2f} | {median['overlay, per-pixel float64']:.2f} | "
          f"{median['overlay, per-pixel float64'] / median['overlay, lookup tables']:.1f}x |")
    print(f"| PNG encode | {median['PNG, png_bytes']:.2f} | {median['PNG, Pillow level 1']:.2f} | "
          f"{median['PNG, Pillow level 1'] / median['PNG, png_bytes']:.1f}x |")
    print(f"\nmean PNG size: png_bytes {size_ours:.0f} bytes, Pillow level 1 {size_pillow:.0f} bytes ({size_ours / size_pillow:.3f}x)")


if __name__ == "__main__":
    main()
