"""report.html: a static page (opens offline) with the metrics, the curves and the worst misses.

Figures are matplotlib PNGs, panels are composed with numpy; everything is
written to a staging folder and moved into place with report.html last, so a
failed report never leaves a page pointing at missing images.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .files import atomic_write_text
from .result import Evaluation
from .tables import INTERVALS_TITLE, interval_lines, table_rows
from .visualize import overlay

ASSETS = "report_files"
_GREEN = np.array([0.1, 0.95, 0.2])
_CYAN = np.array([0.0, 1.0, 1.0])

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #888; }
.figs img { width: 380px; margin: 4px; border: 1px solid #eee; }
.figs img.strip { width: 600px; }
.panel { display: inline-block; margin: 8px; vertical-align: top; font-size: 12px; }
.panel img { display: block; border: 1px solid #ccc; }
.miss { color: #b00; font-weight: bold; } .hit { color: #080; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }
"""


@dataclass
class Panel:
    """What the report shows for one test image, at the evaluation resolution."""

    image: np.ndarray  # (S, S, 3) uint8
    truth: np.ndarray  # (S, S) bool
    anomaly_map: np.ndarray
    detected: np.ndarray  # (S, S) bool, automatic threshold
    record: dict[str, Any]


def _outline(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    if mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 192))
        image = image.copy()
        image[edge] = colour
    return image


def panel_image(panel: Panel, display: tuple[float, float]) -> np.ndarray:
    """Image with the ground truth outlined (green) | anomaly map overlay with detections (cyan) | automatic mask."""
    image = panel.image.astype(np.float32) / 255.0
    left = _outline(image, panel.truth, _GREEN)
    middle = overlay(image, panel.anomaly_map, *display, panel.detected).astype(np.float32) / 255.0
    right = np.repeat(panel.detected[:, :, None].astype(np.float32), 3, axis=2) * 0.9
    right = _outline(right, panel.truth, _GREEN)
    gap = np.ones((image.shape[0], 4, 3), dtype=np.float32)
    strip = np.concatenate([left, gap, middle, gap, right], axis=1)
    return np.clip(np.round(strip * 255), 0, 255).astype(np.uint8)


def _figures(evaluation: Evaluation, folder: Path, score_threshold: float) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    curves = evaluation.curves

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        figures.append((name, caption))

    fig, ax = plt.subplots(figsize=(4.2, 4))
    roc = curves["image_roc"]
    ax.plot(roc.x, roc.y, label=f"image (AUROC {_pct(evaluation.metrics.get('image_auroc'))})")
    if "pixel_roc" in curves:
        ax.plot(curves["pixel_roc"].x, curves["pixel_roc"].y, label=f"pixel (AUROC {_pct(evaluation.metrics.get('pixel_auroc'))})")
    ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "roc.png", "ROC curves of image scores and of pooled pixels")

    if "pro" in curves:
        pro = curves["pro"]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(pro.x, pro.y)
        ax.axvspan(0, 0.3, color="#1f77b4", alpha=0.08)
        ax.axvline(0.3, color="#888", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_title(f"PRO (AUPRO to FPR 0.3: {_pct(evaluation.metrics.get('aupro'))})")
        save(fig, "pro.png", "Per-region overlap; the shaded part up to FPR 0.3 is what AUPRO integrates")

    scores = np.array([r["score"] for r in evaluation.images])
    anomalous = np.array([r["anomalous"] for r in evaluation.images])
    fig, ax = plt.subplots(figsize=(4.2, 4))
    bins = np.linspace(scores.min(), scores.max() + 1e-9, 30)
    ax.hist(scores[~anomalous], bins=bins, alpha=0.6, label=f"normal ({(~anomalous).sum()})", color="#2a9d8f")
    ax.hist(scores[anomalous], bins=bins, alpha=0.6, label=f"anomalous ({anomalous.sum()})", color="#e76f51")
    ax.axvline(score_threshold, color="#333", lw=1, ls="--", label="image threshold of the run")
    ax.set(xlabel="image score (spreads of held-out normal scores above their mean)", ylabel="images", title="Image scores")
    ax.legend(fontsize=8)
    save(fig, "scores.png", "Image scores of normal and anomalous test images")

    if "miou" in curves:
        miou = curves["miou"]
        finite = np.isfinite(miou.x)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(miou.x[finite], miou.y[finite])
        # A run that decides on the score segments only flagged images: its automatic mIoU is not a point of this curve.
        shown = ("fair", "oracle") if evaluation.settings.get("decision") == "score" else ("auto", "fair", "oracle")
        for name, colour in (("auto", "#d62728"), ("fair", "#2ca02c"), ("oracle", "#9467bd")):
            if name not in shown:
                continue
            t = evaluation.thresholds.get(name)
            if t is not None and np.isfinite(t):
                ax.axvline(t, color=colour, ls="--", lw=1, label=f"{name}: log10 NFA < {t:.2g}")
        marked = [t for t in evaluation.thresholds.values() if np.isfinite(t)]
        # Region NFAs reach -1000 and below; the thresholds that matter sit near 0.
        ax.set_xlim(max(float(miou.x[finite].min()), min(marked) - 20), max(marked) + 10)
        ax.set(xlabel="log10 NFA threshold", ylabel="mIoU (normal images included)", title="mIoU against the NFA threshold")
        ax.legend(fontsize=8)
        save(fig, "miou.png", "mIoU for every threshold on log10 NFA; automatic, fair and oracle marked")
    return figures


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table_html(rows: Sequence[tuple[str, dict[str, Any]]], with_mean: bool, links: dict[str, str] | None = None) -> str:

    cells = table_rows(rows, with_mean)
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells[0]) + "</tr>"]
    for i, row in enumerate(cells[1:]):
        is_mean = with_mean and i == len(cells) - 2
        first = html.escape(row[0])
        if links and row[0] in links:
            first = f'<a href="{html.escape(links[row[0]])}">{first}</a>'
        tds = [f"<td>{first}</td>"] + [f"<td>{html.escape(c)}</td>" for c in row[1:]]
        out.append(f"<tr{' class=mean' if is_mean else ''}>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_METRIC_NOTES = (
    "AUROC, AUPRO (per-region overlap to FPR 0.3, normalised) and F1-max in percent; mIoU per image, normal images "
    "included (1 when nothing is detected), at the automatic threshold (the run's verified one, or log10 &epsilon; when given), at a threshold set on held-out "
    "normal training images (fair) and at the best single log10 NFA threshold on this test set (oracle, never used to choose anything; "
    "a run that decides on the image score only segments flagged images, so its automatic mIoU can exceed it). "
    "False alarms (FA): the share of normal images with any detection the run promised (at most that share for this run "
    "with the stated confidence over calibration sets; without one, on average over runs), the share of its verification images "
    "(normal images that took no part in training, stopping or calibration) flagged, with a one-sided 95 % Clopper-Pearson bound, "
    "and, under 'flagged: normal', the share of this test set's normal images flagged."
)


def _automatic(settings: dict) -> str:
    """What flags an image at the automatic threshold, in HTML."""
    regions = f"log10 NFA &lt; {settings['log10_nfa_threshold']:.3g}"
    score = settings.get("score_threshold")
    if settings.get("decision") != "score" or score is None:
        return regions
    return f"image score &gt; {score:.3g} (masks: regions with {regions}, else the most significant one)"


def write_report(
    out: Path, evaluation: Evaluation, panels: Sequence[Panel], display: tuple[float, float], score_threshold: float
) -> Path:
    """Write ``out/report.html`` and its figures in ``out/report_files``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".uflow-report-"))
    try:
        figures = _figures(evaluation, stage, score_threshold)
        panel_html = []
        for k, panel in enumerate(panels):
            name = f"panel_{k:03d}.png"
            Image.fromarray(panel_image(panel, display)).save(stage / name)
            r = panel.record
            if r["anomalous"]:
                verdict = ("hit", "found") if r["flagged"] else ("miss", "missed")
            else:
                verdict = ("miss", "false alarm") if r["flagged"] else ("hit", "clean")
            iou = "" if r.get("iou_auto") is None else f" &middot; IoU {r['iou_auto']:.2f}"
            best = min((g["log10_nfa"] for g in r["regions"]), default=None)
            nfa = "" if best is None else f" &middot; min log10 NFA {best:.1f}"
            panel_html.append(
                f'<div class="panel"><img src="{ASSETS}/{name}" alt="{html.escape(r["path"])}">'
                f'<span class="{verdict[0]}">{verdict[1]}</span> &middot; {html.escape(r["defect"])}/{html.escape(Path(r["path"]).name)}'
                f" &middot; score {r['score']:.3f}{iou} &middot; {len(r['regions'])} region(s){nfa}</div>"
            )
        s = evaluation.settings
        body = [
            f"<h1>uflow: {html.escape(evaluation.category)}</h1>",
            f'<p class="sub">{html.escape(s["backbone"])} at {s["image_size"]} px &middot; trained on {html.escape(str(s.get("trained_on")))} '
            f"&middot; test count {html.escape(s['test_count'])}, null {html.escape(s['null'])} "
            f"&middot; fair threshold from {html.escape(s['fair_threshold_from'])}</p>",
            f'<p class="sub">Automatic threshold: {_automatic(s)}; {html.escape(s["threshold_from"])}</p>',
            _table_html([(evaluation.category, evaluation.metrics)], with_mean=False),
            _intervals_html([(evaluation.category, evaluation.metrics)]),
            f"<p class=sub>{_METRIC_NOTES}</p>",
            '<div class="figs">' + "".join(f'<img src="{ASSETS}/{n}" alt="{html.escape(c)}" title="{html.escape(c)}">' for n, c in figures) + "</div>",
            f"<h2>Test images, worst misses first ({len(panels)} of {len(evaluation.images)})</h2>",
            '<p class="legend">image with ground truth<span style="background:#1af233"></span>'
            " | anomaly map, detections outlined<span style=\"background:#0ff\"></span> | automatic mask</p>",
            "\n".join(panel_html),
        ]
        page = _page(f"uflow report: {evaluation.category}", "\n".join(body))
        assets = out / ASSETS
        assets.mkdir(exist_ok=True)
        fresh = {src.name for src in stage.iterdir()}
        for name in fresh:
            os.replace(stage / name, assets / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    atomic_write_text(out / "report.html", page)
    for stale in assets.iterdir():  # figures of an earlier report that this one does not show
        if stale.name not in fresh:
            stale.unlink()
    return out / "report.html"


def _intervals_html(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    lines = interval_lines(rows)
    return f"<p class=sub>{html.escape(INTERVALS_TITLE)}: " + "; ".join(html.escape(line) for line in lines) + "</p>" if lines else ""


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _category_strip(out: Path, name: str, page: str) -> str:
    """A category's curves and its worst miss, each linking to the category's own report."""
    folder = Path(page).parent / ASSETS
    shown = [f for f in ("roc.png", "pro.png", "scores.png", "panel_000.png") if (out / folder / f).is_file()]
    images = "".join(
        f'<a href="{html.escape(page)}"><img{" class=strip" if f.startswith("panel") else ""} src="{html.escape(str(folder / f))}" '
        f'alt="{html.escape(name)} {f}"></a>'
        for f in shown
    )
    return f'<h2><a href="{html.escape(page)}">{html.escape(name)}</a></h2><div class="figs">{images}</div>'


def write_benchmark_page(out: Path, rows: Sequence[tuple[str, dict[str, Any]]], reports: dict[str, str], note: str) -> Path:
    """``out/report.html`` for a whole benchmark: the per-category table with means, linking each category's report."""
    body = "\n".join(
        [
            "<h1>uflow benchmark</h1>",
            f'<p class="sub">{html.escape(note)}</p>',
            _table_html(rows, with_mean=True, links=reports),
            _intervals_html(rows),
            f"<p class=sub>{_METRIC_NOTES}</p>",
            *[_category_strip(Path(out), name, page) for name, page in reports.items()],
        ]
    )
    atomic_write_text(Path(out) / "report.html", _page("uflow benchmark", body))
    return Path(out) / "report.html"
