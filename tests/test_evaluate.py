"""Evaluation on an MVTec-style category: metrics.json, report.html, and the refusals."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from uflow.errors import UFlowError
from uflow.evaluate import evaluate, mvtec_test_set
from uflow.tables import format_intervals, format_table


@pytest.fixture(scope="module")
def evaluated(model, brick, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(model, brick, out, progress=False), out


def test_metrics_are_computed_and_written(evaluated, brick):
    result, out = evaluated
    items, has_masks = mvtec_test_set(brick)
    assert has_masks and len(result.images) == len(items)
    m = result.metrics
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "miou_auto", "miou_fair", "miou_oracle"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["miou_oracle"] >= max(m["miou_auto"], m["miou_fair"]) - 1e-9, "the oracle is the best threshold on the test set"
    assert m["n_normal"] == 3 and m["n_anomalous"] == 4
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["metrics"] == m
    assert "held-out validation images" in on_disk["settings"]["fair_threshold_from"]
    table = format_table([("brick", m)])
    assert "img AUROC" in table and "brick" in table
    for key in ("image_auroc", "pixel_auroc", "aupro"):  # each with its 95 % interval, from these 7 images
        low, high = m[f"{key}_interval"]
        assert 0.0 <= low <= m[key] <= high <= 1.0, key
        assert low < high or (key == "image_auroc" and m[key] == 1.0), key  # DeLong's is empty only when every pair is ordered
    assert "brick: img AUROC " in format_intervals([("brick", m)])
    assert "95 % intervals" in (out / "report.html").read_text()


def test_report_links_only_existing_images(evaluated):
    _, out = evaluated
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert any(s.endswith("roc.png") for s in sources) and any(s.endswith("pro.png") for s in sources)
    assert sum("panel_" in s for s in sources) == 7
    for src in sources:
        assert (out / src).is_file(), src
    assert not list(out.glob(".uflow-report-*"))


def _copy_category(brick, tmp_path):
    target = tmp_path / "cat"
    shutil.copytree(brick, target)
    return target


def test_without_masks_only_image_metrics(model, brick, tmp_path):
    category = _copy_category(brick, tmp_path)
    shutil.rmtree(category / "ground_truth")
    result = evaluate(model, category, tmp_path / "out", progress=False)
    assert 0.0 <= result.metrics["image_auroc"] <= 1.0
    assert "pixel_auroc" not in result.metrics and "miou_auto" not in result.metrics
    assert (tmp_path / "out" / "report.html").is_file()


def test_missing_or_mismatched_masks_are_refused_by_name(model, brick, tmp_path):
    category = _copy_category(brick, tmp_path)
    (category / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(UFlowError, match=r"scratch/000.png: no ground-truth mask"):
        evaluate(model, category, None, progress=False)

    category = _copy_category(brick, tmp_path / "again")
    mask = category / "ground_truth" / "blob" / "000_mask.png"
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(mask)
    with pytest.raises(UFlowError, match=r"000_mask.png: mask is 40x50 but its image 000.png is 96x96"):
        evaluate(model, category, None, progress=False)


def test_not_a_category_is_refused(model, tmp_path):
    with pytest.raises(UFlowError, match="no test folder"):
        evaluate(model, tmp_path, None, progress=False)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")), reason="no Chromium on this machine")
def test_report_renders_in_headless_chromium_with_every_image(evaluated, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, out = evaluated
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
    shot = tmp_path / "report.png"
    res = subprocess.run([sys.executable, script, out / "report.html", "--screenshot", shot], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 missing" in res.stdout
    assert Image.open(shot).size == (1280, 2400)
