"""Which EfficientNet-Lite0 stages feed the flow: fit and evaluate one category per choice of taps.

    python benchmarks/taps.py CATEGORY_DIR [--taps 1,2,3 --taps 2,3,4] [--epochs 60] [--json FILE]

timm's Lite0 feature stages are 0..4 with 16, 24, 40, 112 and 320 channels at
strides 2, 4, 8, 16 and 32; uflow's default taps 1, 2, 3 (strides 4, 8, 16,
as the paper's multi-scale features). Each choice is registered as a variant of
the default backbone (same weights file), fitted with uflow's defaults
(``--epochs`` and ``--fractions`` aside; held-out images from ``validation/good``
when the category has one) and evaluated as ``uflow evaluate`` does. Used to choose the default
across several sets, never per dataset.

With several choices it also measures two flows side by side, each later choice beside the first:
the image AUROC of the two image scores combined, each standardised by the mean and spread of its
model's scores on the run's stopping images (normal images neither flow trained on; both fits draw
the same ones), by their maximum and by their sum. The maximum with taps 2,3,4 is what uflow's score flow now
does (``anomaly_map.combined_score``); this measured it before it was built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import uflow
from uflow.backbones import BACKBONES, DEFAULT_BACKBONE, get_spec
from uflow.evaluate import evaluate, model_resolution
from uflow.metrics import image_auroc

LITE0_CHANNELS = (16, 24, 40, 112, 320)
LITE0_STRIDES = (2, 4, 8, 16, 32)


def fit_fractions(text: str) -> dict[str, float]:
    """``--fractions V,C,W`` as the keyword arguments ``uflow.fit`` takes (an argparse type, shared by the benchmarks)."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (validation,calibration,verification), got {text!r}")
    return dict(zip(("val_fraction", "calibration_fraction", "verification_fraction"), values))


def register_taps(taps: tuple[int, ...]) -> str:
    base = get_spec(DEFAULT_BACKBONE)
    name = f"{DEFAULT_BACKBONE}_taps{''.join(map(str, taps))}"
    BACKBONES[name] = dataclasses.replace(
        base, name=name, out_indices=taps, channels=tuple(LITE0_CHANNELS[t] for t in taps), strides=tuple(LITE0_STRIDES[t] for t in taps)
    )
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--taps", action="append", help="comma-separated stage indices, repeatable (default: 1,2,3 and 2,3,4)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--fractions", type=fit_fractions, default={}, help="validation,calibration,verification shares, as fit takes them (the demo: 0.09,0.6,0.3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    choices = args.taps or ["1,2,3", "2,3,4"]
    rows, scores = [], []
    for text in choices:
        taps = tuple(int(t) for t in text.split(","))
        backbone = register_taps(taps)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            model = uflow.fit(args.category, backbone=backbone, epochs=args.epochs, progress=False, **args.fractions)
            fit_s = time.perf_counter() - started
            result = evaluate(model, args.category, Path(tmp), report=False, progress=False)
        m = result.metrics
        stopping = [model_resolution(Path(p), model.image_size, model.extractor.spec.fixed_image_size) for p in model.training["val_images"]]
        scores.append((model.training["val_images"], np.array([p.score for p in model.predict(stopping, segmentation=False)]),
                       np.array([im["score"] for im in result.images]), [im["anomalous"] for im in result.images]))
        row = {"category": args.category.name, "taps": text, "fit_s": round(fit_s, 1), "best_epoch": model.training["best_epoch"],
               **{k: m.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "normal_flagged", "anomalous_flagged")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (first_val, first_stop, first_test, anomalous), *others = scores
    for text, (val, stop, test, _) in zip(choices[1:], others):
        assert val == first_val, "both fits must hold out the same stopping images"
        z = [(t - s.mean()) / s.std() for s, t in ((first_stop, first_test), (stop, test))]
        row = {"category": args.category.name, "taps": f"{choices[0]} beside {text}",
               "image_auroc_max": image_auroc(np.maximum(*z), anomalous), "image_auroc_sum": image_auroc(z[0] + z[1], anomalous)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
