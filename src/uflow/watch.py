"""A hot folder: score images as a camera or a PLC drops them into a folder.

Each image is scored once it is completely written (its size and modification
time have not changed for ``settle_s`` seconds), its files are written as
``uflow predict`` writes them, one row is appended to ``OUT/results.csv`` and
the image is moved to the done folder (images that cannot be read go to
``OUT/errors.csv`` and the failed folder instead).

Restarts lose and repeat nothing because of the order of those steps: the
row is on disk (flushed and fsynced) before the image leaves the input folder,
and each row carries the image's name, size and modification time. An image
still in the input folder whose row is already in the log was scored just
before a crash; it is moved, not scored again. An image without a row was
not finished and is scored. A row cut short by a crash is removed on start.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UFlowError
from .images import is_image_file
from .outputs import RESULT_COLUMNS, OutputLayout, table_row, write_image_outputs

log = logging.getLogger(__name__)

LOG_COLUMNS: tuple[str, ...] = (*RESULT_COLUMNS, "source", "size", "mtime_ns", "scored_at")
ERROR_COLUMNS: tuple[str, ...] = ("path", "error", "source", "size", "mtime_ns", "scored_at")
FileKey = tuple[str, int, int]  # name, size, modification time (ns): one arrival of one file


@dataclass
class WatchSummary:
    """What one :func:`watch` call did."""

    scored: int = 0
    anomalous: int = 0
    failed: int = 0
    recovered: int = 0  # images scored before a crash and only moved now


class AppendLog:
    """An append-only CSV whose rows survive a crash: each batch is flushed and fsynced before the caller moves on."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path = path
        self.columns = columns
        self.keys: set[FileKey] = set()
        if path.exists():
            self._drop_torn_row()
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if tuple(reader.fieldnames or ()) != columns:
                    raise UFlowError(f"{path}: not a uflow watch log (columns {reader.fieldnames}); use another --out folder")
                self.keys = {(row["source"], int(row["size"]), int(row["mtime_ns"])) for row in reader}
        else:
            with path.open("w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(columns)
                fh.flush()
                os.fsync(fh.fileno())

    def _drop_torn_row(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: removing a row cut short by an earlier crash", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(cut)

    def append(self, rows: list[tuple[FileKey, list]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for _, values in rows:
            writer.writerow(values)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.keys.update(key for key, _ in rows)


class HotFolder:
    """Watches ``in_dir`` and scores what lands there with ``model`` (a :class:`~uflow.model.UFlowModel` or an ONNX model).

    ``predict_options`` are passed to the model's ``iter_predict``
    (segmentation options, batch size); ``kinds`` are the per-image files to
    write (see :data:`uflow.outputs.OUTPUT_KINDS`).
    """

    def __init__(
        self,
        model,
        in_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        *,
        kinds: tuple[str, ...],
        done_dir: str | os.PathLike | None = None,
        failed_dir: str | os.PathLike | None = None,
        predict_options: dict | None = None,
        settle_s: float = 1.0,
        poll_s: float = 0.5,
        batch_size: int = 8,
    ):
        self.model = model
        self.in_dir = Path(in_dir).resolve()
        if not self.in_dir.is_dir():
            raise UFlowError(f"{self.in_dir}: no such folder to watch")
        self.out_dir = Path(out_dir).resolve()
        self.done_dir = Path(done_dir).resolve() if done_dir else self.in_dir / "done"
        self.failed_dir = Path(failed_dir).resolve() if failed_dir else self.in_dir / "failed"
        folders = {"output": self.out_dir, "done": self.done_dir, "failed": self.failed_dir}
        for what, folder in folders.items():
            if folder == self.in_dir:
                raise UFlowError(f"{folder}: the {what} folder cannot be the watched folder itself")
            if folder.exists() and not folder.is_dir():
                raise UFlowError(f"{folder}: exists and is not a folder; name a folder for the {what} files")
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        if settle_s < 0 or poll_s <= 0 or batch_size < 1:
            raise UFlowError(f"settle time must be >= 0, poll interval > 0 and batch size >= 1 (got {settle_s}, {poll_s}, {batch_size})")
        self.kinds = kinds
        self.layout = OutputLayout(self.done_dir, kinds, (model.calibration.display_low, model.calibration.display_high))
        self.predict_options = {**(predict_options or {}), "batch_size": batch_size}
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.batch_size = batch_size
        self.results = AppendLog(self.out_dir / "results.csv", LOG_COLUMNS)
        self.errors = AppendLog(self.out_dir / "errors.csv", ERROR_COLUMNS)
        self._last_seen: dict[str, tuple[int, int]] = {}

    def ready_files(self) -> list[tuple[Path, FileKey]]:
        """Images in the watched folder that have stopped changing, oldest first."""
        now = time.time_ns()
        ready, seen = [], {}
        for entry in os.scandir(self.in_dir):
            path = Path(entry.path)
            if not entry.is_file() or not is_image_file(path):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # taken away between the listing and the stat
                continue
            state = (st.st_size, st.st_mtime_ns)
            seen[entry.name] = state
            # Unchanged since the last look and untouched for settle_s: the writer has finished.
            if self._last_seen.get(entry.name) == state and now - st.st_mtime_ns >= self.settle_s * 1e9:
                ready.append((path, (entry.name, *state)))
        self._last_seen = seen
        ready.sort(key=lambda item: (item[1][2], item[1][0]))
        return ready

    def poll_once(self) -> WatchSummary:
        """Score (or recover) every ready image, in batches; returns what was done."""
        summary = WatchSummary()
        ready = self.ready_files()
        todo = []
        for path, key in ready:
            if key in self.results.keys or key in self.errors.keys:
                # Logged before a crash, never moved: finish the move, do not score it twice.
                self._move(path, self.failed_dir if key in self.errors.keys else self.done_dir)
                summary.recovered += 1
                log.info("%s: already scored before a restart; moved", path.name)
            else:
                todo.append((path, key))
        for start in range(0, len(todo), self.batch_size):
            self._score_batch(todo[start : start + self.batch_size], summary)
        return summary

    def _score_batch(self, batch: list[tuple[Path, FileKey]], summary: WatchSummary) -> None:
        started = time.perf_counter()
        keys = {path: key for path, key in batch}
        dests = {path: _free_name(self.done_dir / path.name) for path, _ in batch}
        failures: dict[Path, str] = {}

        def on_error(path, message: str) -> None:
            failures[Path(path)] = message

        rows, stamp = [], _now()
        stream = self.model.iter_predict([p for p, _ in batch], keep_images="overlay" in self.kinds, on_error=on_error, **self.predict_options)
        for pred in stream:
            dest = dests[pred.path]
            # Outputs are named after the image's final name, so a name the line reuses never overwrites earlier outputs.
            row = write_image_outputs(dataclasses.replace(pred, path=dest), self.out_dir, self.layout)
            name, size, mtime = keys[pred.path]
            rows.append((keys[pred.path], [*table_row(row), name, size, mtime, stamp]))
            summary.scored += 1
            summary.anomalous += pred.is_anomalous
            log.info(
                "%s: %s, score %.4f, %d region%s", name, pred.label, pred.score, len(pred.regions), "" if len(pred.regions) == 1 else "s"
            )
        self.results.append(rows)
        error_rows = []
        for path, message in failures.items():
            name, size, mtime = keys[path]
            error_rows.append((keys[path], [str(self.failed_dir / name), message, name, size, mtime, stamp]))
            log.warning("%s: cannot be scored (%s); moved to %s", name, message, self.failed_dir)
        self.errors.append(error_rows)
        summary.failed += len(failures)
        for path, _ in batch:
            if path in failures:
                self._move(path, self.failed_dir)
            else:
                os.replace(path, dests[path])
        if rows:
            log.debug("batch of %d scored in %.0f ms", len(rows), 1000 * (time.perf_counter() - started))

    def _move(self, path: Path, folder: Path) -> None:
        os.replace(path, _free_name(folder / path.name))

    def run(self, stop: threading.Event | None = None, once: bool = False, on_poll: Callable[[WatchSummary], None] | None = None) -> WatchSummary:
        """Poll until ``stop`` is set (finishing the batch in hand), or, with ``once``, until nothing is left to settle."""
        total = WatchSummary()
        stop = stop or threading.Event()
        log.info("watching %s: results to %s, scored images to %s", self.in_dir, self.out_dir, self.done_dir)
        while not stop.is_set():
            done = self.poll_once()
            for field in dataclasses.fields(WatchSummary):
                setattr(total, field.name, getattr(total, field.name) + getattr(done, field.name))
            if on_poll is not None:
                on_poll(done)
            if once and not self._last_seen:
                break
            stop.wait(self.poll_s)
        return total


def _free_name(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext``, ... when a line reuses file names."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
