"""The embedded main job: real textures, synthetic defects, fit, predict, show where the outputs are."""

from __future__ import annotations

import json
from pathlib import Path

from .images import resolve_inputs
from .outputs import write_predictions
from .textures import make_texture_dataset
from .train import fit


def run_demo(out: Path, category: str = "brick", epochs: int = 40, progress: bool = True) -> dict:
    """Build the texture dataset under ``out/data``, fit on ``category``, predict its test set into ``out/predictions``."""
    out = Path(out)
    data = make_texture_dataset(out / "data", categories=(category,), n_train=60, size=128)
    category_dir = data / category
    model = fit(category_dir, out / "run", epochs=epochs, progress=progress)
    paths = resolve_inputs([category_dir / "test"])
    predictions = model.predict(paths)
    meta = {"model": str((out / "run").resolve()), "segmentation": True, "epsilon": 1.0, "test_count": "per_size"}
    display = (model.calibration.display_low, model.calibration.display_high)
    rows = write_predictions(predictions, paths, out / "predictions", display, meta)
    normal = [r for r in rows if "/good/" in r["path"]]
    defective = [r for r in rows if "/good/" not in r["path"]]
    summary = {
        "category": category,
        "defective_flagged": f"{sum(r['label'] == 'anomalous' for r in defective)}/{len(defective)}",
        "normal_flagged": f"{sum(r['label'] == 'anomalous' for r in normal)}/{len(normal)}",
        "best_epoch": model.training["best_epoch"],
        "val_nll": model.training["best_val_nll"],
    }
    print(json.dumps(summary))
    print(f"dataset:     {category_dir}")
    print(f"model:       {out / 'run'}")
    print(f"predictions: {out / 'predictions'} (overlays *_overlay.png, maps *_map.npy, masks *_mask.png)")
    print(f"results:     {out / 'predictions' / 'results.csv'}")
    return summary
