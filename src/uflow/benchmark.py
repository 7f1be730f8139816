"""Fit and evaluate every category under an MVTec-style root; one table with means, as papers lay it out."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .files import atomic_write_text
from .errors import UFlowError
from .evaluate import evaluate, json_text
from .tables import format_intervals, format_table
from .report import write_benchmark_page
from .train import fit


def categories(root: str | os.PathLike) -> list[Path]:
    """Category folders under ``root``: those with ``train/good`` and ``test``."""
    root = Path(root)
    if not root.is_dir():
        raise UFlowError(f"{root}: no such folder")
    found = sorted(d for d in root.iterdir() if (d / "train" / "good").is_dir() and (d / "test").is_dir())
    if not found:
        raise UFlowError(f"{root}: no MVTec-style categories (folders with train/good and test) found")
    return found


CategoryMap = Callable[[Callable[[Path], dict[str, Any]], Sequence[Path]], Iterable[dict[str, Any]]]


def benchmark_category(
    folder: Path,
    out: Path,
    *,
    fit_options: dict[str, Any],
    evaluate_options: dict[str, Any],
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Fit ``out/<category>/run`` on one category and evaluate it into ``out/<category>``; returns its benchmark.json entry.

    ``device``, when given, replaces the one in ``fit_options`` (a Ray task's worker device).
    """
    started = time.perf_counter()
    options = {**fit_options, **({"device": device} if device else {})}
    model = fit(folder, out / folder.name / "run", progress=progress, **options)
    result = evaluate(model, folder, out / folder.name, progress=progress, **evaluate_options)
    return {
        "metrics": result.metrics,
        "thresholds": result.thresholds,
        "best_epoch": model.training["best_epoch"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_benchmark(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fit_options: dict[str, Any] | None = None,
    evaluate_options: dict[str, Any] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    map_categories: CategoryMap = map,
) -> list[tuple[str, dict[str, Any]]]:
    """Fit ``out/<category>/run`` and evaluate into ``out/<category>`` for each category.

    ``map_categories(run_one, folders)`` runs :func:`benchmark_category` on
    each folder and yields the results in order: ``map`` runs them one after
    another here, :func:`uflow.ray_engine.map_on_ray` in parallel on Ray.
    Writes ``out/benchmark.json`` and ``out/report.html`` (the table, linking
    each category's report) and prints the table. Returns (category, metrics) rows.
    """
    out = Path(out)
    folders = categories(root)
    if only:
        unknown = sorted(set(only) - {f.name for f in folders})
        if unknown:
            raise UFlowError(f"{root}: no category {', '.join(unknown)} (found {', '.join(f.name for f in folders)})")
        folders = [f for f in folders if f.name in only]
    run_one = partial(benchmark_category, out=out, fit_options=fit_options or {}, evaluate_options=evaluate_options or {}, progress=progress)
    rows, details, reports = [], {}, {}
    for folder, detail in zip(folders, map_categories(run_one, folders)):
        rows.append((folder.name, detail["metrics"]))
        reports[folder.name] = f"{folder.name}/report.html"
        details[folder.name] = detail
        if progress:
            print(f"{folder.name}: done in {detail['seconds']} s", flush=True)
    settings = {"root": str(Path(root).resolve()), "fit": fit_options or {}, "evaluate": evaluate_options or {}}
    atomic_write_text(out / "benchmark.json", json_text({"settings": settings, "categories": details}))
    note = f"{len(rows)} categories from {Path(root).resolve()}; fit options {fit_options or 'default'}"
    write_benchmark_page(out, rows, reports, note)
    print(format_table(rows, with_mean=True))
    intervals = format_intervals(rows)
    if intervals:
        print(intervals)
    return rows
