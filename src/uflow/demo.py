"""The embedded main job: real textures with synthetic defects, fitted and evaluated, with a report to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .benchmark import run_benchmark
from .textures import CATEGORIES, make_texture_dataset

# Small enough to finish in a few minutes on a 2-core CPU, large enough to give stable numbers:
# 120 training crops; 110 held-out crops from the test part of each photograph (as new to the model
# as the test crops) give 30 to stop and fit the null, 40 to set the 5 % threshold and 40, used for
# nothing else, to check it; 40 normal test crops measure it once more.
DEMO_TRAIN_IMAGES = 120
DEMO_HELD_OUT_IMAGES = 110
DEMO_GOOD_IMAGES = 40
DEMO_CROP = 128
DEMO_EPOCHS = 30


def run_demo(out: Path, categories: tuple[str, ...] = CATEGORIES, epochs: int = DEMO_EPOCHS, progress: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """Build the texture dataset under ``out/data``, fit and evaluate each category, write ``out/report.html``."""
    out = Path(out)
    data = make_texture_dataset(
        out / "data", categories=CATEGORIES, n_train=DEMO_TRAIN_IMAGES, n_good=DEMO_GOOD_IMAGES, size=DEMO_CROP,
        n_validation=DEMO_HELD_OUT_IMAGES,
    )
    rows = run_benchmark(data, out, fit_options={"epochs": epochs}, only=list(categories), progress=progress)
    print(f"report:  {(out / 'report.html').resolve()}")
    print(f"dataset: {data.resolve()} (MVTec layout: train/good, validation/good, test/<defect>, ground_truth/<defect>)")
    return rows
