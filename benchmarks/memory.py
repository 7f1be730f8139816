"""Peak RAM of fitting many images at a large size on the CPU.

    python benchmarks/memory.py --images 1000 --size 448 --epochs 1

Writes N crops of scikit-image's real brick photograph at SIZE px, fits the
chosen backbone for the given epochs in a fresh process and reports that
process's peak resident memory, the feature cache it used (RAM float32, RAM
float16 or disk float16) and the time taken. Backbones other than the
default need a weights file (``--weights``); for memory alone a seeded random
state dict is written when none is given, since the values do not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import uflow

    started = time.perf_counter()
    model = uflow.fit(args.data, None, backbone=args.backbone, image_size=args.size, epochs=args.epochs, patience=args.epochs,
                      weights=args.weights, progress=False, allow_download=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_rss_gb": round(peak, 2), "feature_cache": model.training["feature_cache"], "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import numpy as np
    from PIL import Image

    from uflow.textures import _texture

    work = Path(tempfile.mkdtemp(prefix="uflow-memory-"))
    texture = (_texture("brick") * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    crop = min(args.size, texture.shape[0])
    for i in range(args.images):
        y, x = rng.integers(0, texture.shape[0] - crop + 1, 2)
        Image.fromarray(texture[y : y + crop, x : x + crop]).resize((args.size, args.size)).save(work / f"{i:04d}.png")
    weights = args.weights
    if weights is None and args.backbone != "tf_efficientnet_lite0":
        import timm
        import torch

        torch.manual_seed(0)
        weights = str(work / "weights.pth")
        torch.save(timm.create_model(args.backbone).state_dict(), weights)
    command = [sys.executable, __file__, "--child", "--data", str(work), "--images", str(args.images), "--size", str(args.size),
               "--epochs", str(args.epochs), "--backbone", args.backbone] + (["--weights", weights] if weights else [])
    res = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{time.strftime('%Y-%m-%d')} · {os.cpu_count()} CPUs · fit {args.images} images at {args.size} px, {args.backbone}, "
          f"{args.epochs} epoch(s): peak RAM {result['peak_rss_gb']} GB, feature cache {result['feature_cache']}, {result['seconds']} s")


if __name__ == "__main__":
    main()
