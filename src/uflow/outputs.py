"""Writing predictions to disk: per-image files mirroring the input tree, then a results table.

Everything goes into a staging folder inside the output folder and is moved
into place only when every image succeeded, with results.json last; a run
that fails leaves no partial results behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from .files import atomic_write_text
from .images import read_image
from .result import Prediction
from .visualize import overlay


def relative_stems(paths: list[Path]) -> list[Path]:
    """Paths relative to the inputs' common folder, without suffix: test/crack/000 and test/good/000 stay apart."""
    resolved = [p.resolve() for p in paths]
    base = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(base).with_suffix("") for p in resolved]


def write_predictions(
    predictions: Iterable[Prediction],
    paths: list[Path],
    out_dir: Path,
    display: tuple[float, float],
    meta: dict,
) -> list[dict]:
    """Write overlay PNG, raw map (.npy, float32) and mask PNG per image, then results.csv/json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = dict(zip([p.resolve() for p in paths], relative_stems(paths)))
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".uflow-partial-"))
    rows: list[dict] = []
    try:
        for pred in predictions:
            stem = stems[Path(pred.path).resolve()]
            target = stage / stem
            target.parent.mkdir(parents=True, exist_ok=True)
            image = read_image(pred.path)
            Image.fromarray(overlay(image, pred.anomaly_map, *display, pred.mask)).save(f"{target}_overlay.png")
            np.save(f"{target}_map.npy", pred.anomaly_map.astype(np.float32))
            files = {"overlay": f"{stem}_overlay.png", "map": f"{stem}_map.npy"}
            if pred.mask is not None:
                Image.fromarray((pred.mask * 255).astype(np.uint8)).save(f"{target}_mask.png")
                files["mask"] = f"{stem}_mask.png"
            row = pred.summary()
            row["outputs"] = files
            rows.append(row)
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            dest = out_dir / src.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["path", "score", "label", "regions", "min_log10_nfa"])
    for row in rows:
        nfa = min((r["log10_nfa"] for r in row["regions"]), default="")
        writer.writerow([row["path"], row["score"], row["label"], len(row["regions"]), nfa])
    atomic_write_text(out_dir / "results.csv", table.getvalue())
    atomic_write_text(out_dir / "results.json", json.dumps(dict(meta, images=rows), indent=2) + "\n")
    return rows
