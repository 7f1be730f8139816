"""Writing predictions to disk: per-image files mirroring the input tree, a results table and an errors table.

Per-image files go into a staging folder inside the output folder, written by
a small thread pool so that image encoding overlaps the model (Pillow's
encoders and zlib release the GIL). Result rows are spooled to JSON-lines
part files in the stage and never all held in memory, so the same writer
serves a million images, and a distributed run whose workers write their own
files and parts into the stage (:func:`write_image_outputs`, :func:`write_part`).
:meth:`ResultsWriter.finish` moves the files into place and writes
results.csv, results.json and errors.csv, each atomically; a run that fails
leaves no partial results behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import UFlowError
from .files import atomic_open, atomic_write_bytes
from .result import Prediction
from .visualize import overlay, png_bytes

OUTPUT_KINDS: tuple[str, ...] = ("overlay", "map", "mask")
_ROWS, _ERRORS = ".rows", ".errors"  # spooled part files inside the stage
RESULT_COLUMNS: tuple[str, ...] = ("path", "score", "label", "regions", "min_log10_nfa")


def parse_output_kinds(text: str) -> tuple[str, ...]:
    """``"overlay,map,mask"`` (any subset, in any order) or ``"none"`` (tables only) -> the kinds to write."""
    if text.strip().lower() == "none":
        return ()
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise UFlowError(f"outputs must be a comma-separated subset of {','.join(OUTPUT_KINDS)}, or none; got {text!r}")
    return kinds


@dataclass(frozen=True)
class OutputLayout:
    """Where each image's files go: its path relative to ``base`` without suffix, so test/crack/000 and test/good/000 never collide."""

    base: Path
    kinds: tuple[str, ...] = OUTPUT_KINDS
    display: tuple[float, float] = (0.0, 1.0)  # the overlay's colour range (the model's calibration)

    def stem(self, path: str | os.PathLike) -> Path:
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.base).with_suffix("")
        except ValueError:  # not under the base (cannot happen for paths the base was computed from)
            return Path(resolved.stem)


def write_image_outputs(pred: Prediction, folder: Path, layout: OutputLayout) -> dict:
    """Write one image's overlay PNG, raw map (.npy, float32) and mask PNG under ``folder``; returns its result row.

    The overlay needs the scored image (``pred.image``: predict with ``keep_images=True``).
    """
    stem = layout.stem(pred.path)
    target = folder / stem
    files: dict[str, str] = {}
    if layout.kinds:
        target.parent.mkdir(parents=True, exist_ok=True)
    if "overlay" in layout.kinds:
        if pred.image is None:
            raise ValueError("an overlay needs the scored image: predict with keep_images=True")
        Path(f"{target}_overlay.png").write_bytes(png_bytes(overlay(pred.image, pred.anomaly_map, *layout.display, pred.mask)))
        files["overlay"] = f"{stem.as_posix()}_overlay.png"
    if "map" in layout.kinds:
        np.save(f"{target}_map.npy", pred.anomaly_map.astype(np.float32, copy=False))
        files["map"] = f"{stem.as_posix()}_map.npy"
    if "mask" in layout.kinds and pred.mask is not None:
        Path(f"{target}_mask.png").write_bytes(png_bytes(pred.mask.astype(np.uint8) * 255))
        files["mask"] = f"{stem.as_posix()}_mask.png"
    row = pred.summary()
    row["outputs"] = files
    return row


def table_row(row: dict) -> list:
    """A result row (:func:`write_image_outputs`) as the values of :data:`RESULT_COLUMNS`."""
    nfa = min((r["log10_nfa"] for r in row["regions"]), default="")
    return [row["path"], row["score"], row["label"], len(row["regions"]), nfa]


def write_part(stage: Path, name: str, rows: Sequence[dict], errors: Sequence[dict] = ()) -> None:
    """Spool result rows and errors (``{"path", "error"}``) of one batch into the stage, atomically.

    Parts are read back in the order of their names; writing a part again
    under the same name replaces it, so a batch that is retried after a
    failure is counted once.
    """
    for sub, items in ((_ROWS, rows), (_ERRORS, errors)):
        if items:
            atomic_write_bytes(stage / sub / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in items).encode())


@dataclass(frozen=True)
class ResultsSummary:
    """What a finished run wrote."""

    n_images: int
    n_anomalous: int
    n_errors: int
    first_error: str | None = None


class ResultsWriter:
    """Streams predictions into ``out_dir``: ``add`` each prediction, ``add_error`` each failure, then ``finish``.

    Use it as a context manager: leaving the block with an exception removes
    everything staged, so a failed run leaves no results behind.
    """

    def __init__(self, out_dir: str | os.PathLike, layout: OutputLayout, meta: dict, *, threads: int = 2, part_size: int = 1000):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UFlowError(f"{self.out_dir}: exists and is not a folder; name a folder for the results")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UFlowError(f"{self.out_dir}: cannot create the output folder ({exc.strerror})") from None
        self.layout = layout
        self.meta = meta
        self.stage = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=".uflow-partial-"))
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="uflow-write")
        self._max_pending = 4 * max(1, threads)  # bounds the images held while they are written
        self._pending: deque[Future] = deque()
        self._rows: list[dict] = []
        self._errors: list[dict] = []
        self._part_size = part_size
        self._parts = 0

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, pred: Prediction) -> None:
        """Queue one prediction's files; its row joins the table in the order predictions were added."""
        self._pending.append(self._pool.submit(write_image_outputs, pred, self.stage, self.layout))
        while len(self._pending) > self._max_pending:
            self._collect(self._pending.popleft())

    def add_error(self, path: str | os.PathLike | None, reason: str) -> None:
        """Record an image that could not be scored; the run goes on and ends non-zero."""
        self._errors.append({"path": None if path is None else str(path), "error": reason})

    def _collect(self, job: Future) -> None:
        self._rows.append(job.result())
        if len(self._rows) >= self._part_size:
            self._flush()

    def _flush(self) -> None:
        write_part(self.stage, f"{self._parts:012d}", self._rows, self._errors)
        self._parts += 1
        self._rows, self._errors = [], []

    def finish(self) -> ResultsSummary:
        """Move every staged file into place, then write results.csv, results.json and errors.csv atomically."""
        try:
            while self._pending:
                self._collect(self._pending.popleft())
            self._flush()
            self._pool.shutdown()
            summary = finalize(self.stage, self.out_dir, self.meta)
        except BaseException:
            self.abort()
            raise
        return summary

    def abort(self) -> None:
        """Drop everything staged; the output folder keeps only what earlier runs finished."""
        for job in self._pending:
            job.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.stage, ignore_errors=True)


def _read_parts(folder: Path) -> Iterator[dict]:
    if folder.is_dir():
        for part in sorted(folder.glob("*.jsonl")):
            with part.open(encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)


def finalize(stage: Path, out_dir: Path, meta: dict) -> ResultsSummary:
    """Move a stage's files into ``out_dir`` and write its tables from the spooled parts; removes the stage."""
    try:
        for root, dirs, files in os.walk(stage):
            if Path(root) == stage:
                dirs[:] = [d for d in dirs if d not in (_ROWS, _ERRORS)]
            for name in files:
                src = Path(root) / name
                dest = out_dir / src.relative_to(stage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
        n_images, n_anomalous = _write_tables(_read_parts(stage / _ROWS), out_dir, meta)
        n_errors, first_error = _write_errors(_read_parts(stage / _ERRORS), out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ResultsSummary(n_images, n_anomalous, n_errors, first_error)


def _write_tables(rows: Iterable[dict], out_dir: Path, meta: dict) -> tuple[int, int]:
    """results.csv and results.json, streamed row by row into temporary files that replace the old ones at once."""
    n_images = n_anomalous = 0
    with atomic_open(out_dir / "results.csv") as table, atomic_open(out_dir / "results.json") as doc:
        writer = csv.writer(table)
        writer.writerow(RESULT_COLUMNS)
        head = json.dumps(meta, indent=2)
        doc.write(head[:-1].rstrip() + (",\n" if meta else "\n") + '  "images": [')
        for row in rows:
            writer.writerow(table_row(row))
            doc.write(("," if n_images else "") + "\n    " + json.dumps(row))
            n_images += 1
            n_anomalous += row["label"] == "anomalous"
        doc.write("\n  ]\n}\n")
    return n_images, n_anomalous


def _write_errors(errors: Iterable[dict], out_dir: Path) -> tuple[int, str | None]:
    """errors.csv (path, error) is always written, so a stale one from an earlier run never lingers."""
    count, first = 0, None
    with atomic_open(out_dir / "errors.csv") as table:
        writer = csv.writer(table)
        writer.writerow(["path", "error"])
        for err in errors:
            writer.writerow([err["path"], err["error"]])
            first = first or err["error"]
            count += 1
    return count, first
