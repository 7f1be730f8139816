"""The hot folder: images are scored once each, as predict scores them, and a crash neither loses nor repeats one."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uflow.errors import UFlowError
from uflow.watch import HotFolder


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _test_images(brick: Path) -> list[Path]:
    return sorted((brick / "test").rglob("*.png"))


def _drop(images: list[Path], in_dir: Path) -> list[str]:
    """Copy images in under unique names, as a camera would (the test set has 000.png in several folders)."""
    names = []
    for image in images:
        name = f"{image.parent.name}_{image.name}"
        shutil.copyfile(image, in_dir / name)
        names.append(name)
    return names


def test_scores_each_settled_image_once_as_predict_does(model, brick, tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    images = _test_images(brick)[:4]
    names = _drop(images, in_dir)
    (in_dir / "broken.png").write_bytes(b"not an image at all")
    (in_dir / "notes.txt").write_text("not an image, left alone")
    # A file still being written: half of it now, the rest after the folder has been looked at.
    data = images[0].read_bytes()
    growing = in_dir / "growing.png"
    growing.write_bytes(data[: len(data) // 2])
    folder = HotFolder(model, in_dir, out, kinds=("overlay", "mask"), settle_s=0.3, poll_s=0.05)

    first = folder.poll_once()  # first look: nothing has been seen unchanged yet
    assert (first.scored, first.failed) == (0, 0)
    time.sleep(0.35)
    with growing.open("ab") as fh:  # the writer finishes just before the next look
        fh.write(data[len(data) // 2 :])
    second = folder.poll_once()
    assert (second.scored, second.failed) == (4, 1)  # the four settled images and the broken one, not the growing one
    assert growing.exists()
    rest = folder.run(once=True)
    assert (rest.scored, rest.failed) == (1, 0)

    rows = _rows(out / "results.csv")
    assert sorted(r["source"] for r in rows) == sorted(names + ["growing.png"])
    expected = {name: pred for name, pred in zip(names, model.predict(images))}
    for row in rows:
        pred = expected.get(row["source"], expected[names[0]])  # growing.png holds the first image's bytes
        assert float(row["score"]) == pytest.approx(pred.score, abs=1e-4)
        assert row["label"] == pred.label and int(row["regions"]) == len(pred.regions)
        assert Path(row["path"]).parent == in_dir / "done" and Path(row["path"]).exists()
        assert (out / f"{Path(row['path']).stem}_overlay.png").exists()
    errors = _rows(out / "errors.csv")
    assert [e["source"] for e in errors] == ["broken.png"] and "cannot read image" in errors[0]["error"]
    assert (in_dir / "failed" / "broken.png").exists()
    assert sorted(p.name for p in in_dir.iterdir() if p.is_file()) == ["notes.txt"]


def test_a_reused_file_name_keeps_both_images_and_outputs(model, brick, tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    first, second = _test_images(brick)[:2]
    folder = HotFolder(model, in_dir, out, kinds=("mask",), settle_s=0.0, poll_s=0.01)
    for image in (first, second):
        shutil.copyfile(image, in_dir / "frame.png")
        folder.run(once=True)
    rows = _rows(out / "results.csv")
    assert [Path(r["path"]).name for r in rows] == ["frame.png", "frame-1.png"]
    assert (in_dir / "done" / "frame.png").read_bytes() == first.read_bytes()
    assert (in_dir / "done" / "frame-1.png").read_bytes() == second.read_bytes()


def test_restart_finishes_what_a_crash_interrupted_without_scoring_twice(model, brick, tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    names = _drop(_test_images(brick)[:2], in_dir)
    HotFolder(model, in_dir, out, kinds=(), settle_s=0.0, poll_s=0.01).run(once=True)
    assert len(_rows(out / "results.csv")) == 2
    # The state a crash between logging and moving leaves: the row is written, the image still in the folder
    # (a rename keeps its size and modification time), and a second row cut short mid-write.
    os.replace(in_dir / "done" / names[0], in_dir / names[0])
    with (out / "results.csv").open("a") as fh:
        fh.write("/somewhere/x.png,0.5,anom")
    again = HotFolder(model, in_dir, out, kinds=(), settle_s=0.0, poll_s=0.01).run(once=True)
    assert (again.scored, again.recovered) == (0, 1)
    rows = _rows(out / "results.csv")
    assert sorted(r["source"] for r in rows) == sorted(names)
    assert (in_dir / "done" / names[0]).exists() and not (in_dir / names[0]).exists()


def test_refuses_folders_that_would_loop_or_clash(model, tmp_path):
    with pytest.raises(UFlowError, match="no such folder to watch"):
        HotFolder(model, tmp_path / "missing", tmp_path / "out", kinds=())
    with pytest.raises(UFlowError, match="cannot be the watched folder"):
        HotFolder(model, tmp_path, tmp_path / "out", kinds=(), done_dir=tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("path,score\n")
    with pytest.raises(UFlowError, match="not a uflow watch log"):
        HotFolder(model, tmp_path, tmp_path / "out", kinds=())


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_cli_killed_mid_run_then_restarted_scores_every_image_exactly_once(run_dir, brick, tmp_path):
    """A real `uflow watch` process is killed with SIGKILL while images keep arriving; a restart completes the set."""
    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    images = _test_images(brick)
    command = [sys.executable, "-m", "uflow", "watch", str(run_dir), str(in_dir), "--out", str(out), "--settle", "0.2", "--poll", "0.05"]
    command += ["--batch-size", "2", "--no-download", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        names = _drop(images[:3], in_dir)
        _wait_for(lambda: (out / "results.csv").exists() and len(_rows(out / "results.csv")) >= 1, 120, "the first scored image")
        names += _drop(images[3:], in_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = sum(1 for r in _rows(out / "results.csv") if r["scored_at"])  # a row cut short by the kill is dropped on restart

    restarted = subprocess.run(command + ["--once"], capture_output=True, text=True, timeout=180)
    assert restarted.returncode == 0, restarted.stderr
    rows = _rows(out / "results.csv")
    assert sorted(r["source"] for r in rows) == sorted(names)  # every image once: none lost, none repeated
    assert sorted(p.name for p in (in_dir / "done").iterdir()) == sorted(names)
    assert not [p for p in in_dir.iterdir() if p.is_file()]
    # Not a terminal: one readable log line per image, no progress-bar frames.
    scored_now = [line for line in restarted.stderr.splitlines() if ", score " in line]
    assert len(scored_now) == len(names) - before
    assert "\r" not in restarted.stderr
    assert restarted.stdout.startswith(f"{len(names) - before} images scored")


def test_cli_stops_cleanly_on_sigterm(run_dir, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uflow", "watch", str(run_dir), str(in_dir), "--out", str(tmp_path / "out"), "--no-download", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: (tmp_path / "out" / "results.csv").exists(), 120, "the watcher to start")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "0 images scored" in stdout and "stopping" in stderr
