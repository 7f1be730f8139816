"""The command line end to end, in fresh processes, on real texture images."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import uflow


def uflow_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "uflow", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_confidence_option_takes_a_probability_or_average():
    from uflow.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["fit", "data", "--out", "r", "--confidence", "average"]).confidence is None
    assert parser.parse_args(["fit", "data", "--out", "r"]).confidence == 0.9
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "data", "--out", "r", "--confidence", "high"])


def test_help_on_every_command():
    for cmd in ([], ["fit"], ["predict"], ["evaluate"], ["benchmark"], ["demo"]):
        res = uflow_cli(*cmd, "--help")
        assert res.returncode == 0 and "usage: uflow" in res.stdout


def test_fit_then_predict_mirrors_folders_and_writes_results(brick, tmp_path):
    run = tmp_path / "run"
    res = uflow_cli("fit", brick, "--out", run, "--image-size", "64", "--epochs", "2", "--quiet", "--no-download")
    assert res.returncode == 0, res.stderr
    assert "best epoch" in res.stdout and (run / "uflow.json").is_file()
    assert "image score from each scale per position (whole map's centre weight" in res.stdout  # a texture

    out = tmp_path / "pred"
    res = uflow_cli("predict", run, brick / "test", "--out", out, "--quiet", "--no-download", "--workers", "1")
    assert res.returncode == 0, res.stderr
    for sub in ("good", "blob", "scratch"):
        assert (out / sub / "000_overlay.png").is_file()
        assert np.load(out / sub / "000_map.npy").shape == (96, 96)
        assert (out / sub / "000_mask.png").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    n_images = len(list((brick / "test").rglob("*.png")))
    assert len(rows) == n_images and {r["label"] for r in rows} <= {"normal", "anomalous"}
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["images"]) == n_images and summary["epsilon"] is None
    calibration = uflow.load(run).calibration
    assert summary["log10_nfa_threshold"] == calibration.promise.log10_nfa_threshold
    assert summary["decision"] == "region" and summary["score_threshold"] is None  # fit's default: regions label the images
    assert len({r["outputs"]["map"] for r in summary["images"]}) == n_images, "same-named files never collide"
    overlay = np.asarray(Image.open(out / "good" / "000_overlay.png"))
    assert overlay.shape == (96, 96, 3)
    assert not list(out.glob(".uflow-partial-*"))

    res = uflow_cli("predict", run, brick / "test" / "good" / "000.png", "--out", tmp_path / "noseg", "--no-segmentation", "--quiet")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "noseg" / "000_mask.png").exists()

    res = uflow_cli("predict", run, brick / "test", "--out", tmp_path / "maps", "--outputs", "map", "--quiet")
    assert res.returncode == 0, res.stderr
    written = sorted(p.name for p in (tmp_path / "maps").rglob("*") if p.is_file())
    assert written == sorted(["errors.csv", "results.csv", "results.json"] + [f"{p.stem}_map.npy" for p in (brick / "test").rglob("*.png")])


def _one_line_error(res, *needles):
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uflow: error:"), res.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bad_inputs_fail_with_one_line_and_leave_no_results(run_dir, brick, tmp_path):
    _one_line_error(uflow_cli("predict", tmp_path, brick / "test", "--out", tmp_path / "x"), "not a uflow model")

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(uflow_cli("fit", empty, "--out", tmp_path / "r"), "contains no images")

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.open(brick / "test" / "good" / "000.png").save(bad / "a.png")
    raw = (bad / "a.png").read_bytes()
    (bad / "b.png").write_bytes(raw[: len(raw) // 3])
    out = tmp_path / "out"
    _one_line_error(uflow_cli("predict", run_dir, bad, "--out", out, "--quiet", "--on-error", "stop"), "b.png", "cannot read image")
    assert not (out / "results.json").exists() and not (out / "a_overlay.png").exists()
    assert not list(out.glob(".uflow-partial-*"))

    # By default a bad image is listed in errors.csv and the others are scored; the exit status says something failed.
    _one_line_error(uflow_cli("predict", run_dir, bad, "--out", out, "--quiet"), "1 of 2 images could not be scored", "errors.csv", "b.png")
    assert [r["path"] for r in csv.DictReader((out / "results.csv").open())] == [str(bad / "a.png")]
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert [e["path"] for e in errors] == [str(bad / "b.png")] and "truncated" in errors[0]["error"]
    assert (out / "a_overlay.png").is_file() and not list(out.glob(".uflow-partial-*"))

    _one_line_error(uflow_cli("predict", run_dir, bad / "a.png", "--out", bad / "a.png"), "exists and is not a folder")
    _one_line_error(uflow_cli("predict", run_dir, bad / "a.png", "--out", out, "--outputs", "heatmap"), "outputs must be")

    _one_line_error(uflow_cli("predict", run_dir, tmp_path / "missing.png", "--out", out), "no such file")
    _one_line_error(uflow_cli("predict", run_dir, bad / "a.png", "--out", out, "--epsilon", "0"), "epsilon")
    _one_line_error(uflow_cli("fit", brick, "--out", tmp_path / "r2", "--backbone", "resnet18", "--no-download", "--quiet"), "resnet18")
    _one_line_error(uflow_cli("fit", brick, "--out", tmp_path / "r3", "--confidence", "1.5", "--quiet"), "confidence must be between 0 and 1")
    assert not (tmp_path / "r3").exists()


def test_evaluate_prints_the_table_and_writes_the_report(run_dir, brick, tmp_path):
    out = tmp_path / "eval"
    res = uflow_cli("evaluate", run_dir, brick, "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "px AUROC" in res.stdout and "report.html" in res.stdout
    assert "95 % intervals" in res.stdout and "brick: img AUROC" in res.stdout
    assert json.loads((out / "metrics.json").read_text())["category"] == "brick"
    _one_line_error(uflow_cli("evaluate", run_dir, tmp_path, "--quiet"), "no test folder")


def test_benchmark_fits_and_evaluates_every_category(texture_root, tmp_path):
    out = tmp_path / "bench"
    res = uflow_cli("benchmark", texture_root, "--out", out, "--image-size", "64", "--epochs", "2", "--quiet", "--no-download")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("brick") for line in lines) and any(line.startswith("mean") for line in lines)
    bench = json.loads((out / "benchmark.json").read_text())
    assert set(bench["categories"]) == {"brick"}
    assert (out / "brick" / "run" / "uflow.json").is_file() and (out / "brick" / "report.html").is_file()
    assert 'href="brick/report.html"' in (out / "report.html").read_text()
    _one_line_error(uflow_cli("benchmark", tmp_path / "nothing", "--out", out, "--quiet"), "no such folder")
