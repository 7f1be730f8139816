"""Metrics as tables: the plain-text table the CLI prints and the rows the HTML report draws.

AUROC, AUPRO and F1 are shown in percent, mIoU as a fraction, and the
false-alarm columns put the promised rate beside the measured ones; under
the table, a line per category gives each AUROC's and AUPRO's 95 % interval.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .calibration import confidence_pct

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("image_auroc", "img AUROC", "pct"),
    ("pixel_auroc", "px AUROC", "pct"),
    ("aupro", "AUPRO", "pct"),
    ("f1_max", "F1-max", "pct"),
    ("miou_auto", "mIoU auto", "frac"),
    ("miou_fair", "mIoU fair", "frac"),
    ("miou_oracle", "mIoU oracle", "frac"),
)


def format_value(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.2f}" if kind == "pct" else f"{value:.3f}"


def _share(flagged: int | None, n: int | None) -> str:
    return "-" if flagged is None or not n else f"{flagged}/{n} ({100 * flagged / n:.1f}%)"


def table_rows(rows: Sequence[tuple[str, dict[str, Any]]], with_mean: bool) -> list[list[str]]:
    """Header plus one row per (name, metrics), plus the mean row as the paper's tables have it.

    The false-alarm columns put side by side the promised rate (with the
    confidence this run keeps it, when the run has one), the rate
    measured on the run's verification images (with its 95 % upper bound) and
    the share of this test set's normal images flagged.
    """
    header = ["category"] + [title for _, title, _ in COLUMNS] + ["flagged: defective", "flagged: normal", "FA promised", "FA verified (95% bound)"]
    out = [header]

    def promised_cell(promised: float | None, confidence: float | None) -> str:
        if promised is None:
            return "-"
        return f"{100 * promised:.1f}%" + ("" if confidence is None else f" at {confidence_pct(confidence).replace(' ', '')}")

    def false_alarm_cells(m: dict[str, Any]) -> list[str]:
        verified = _share(m.get("verification_flagged"), m.get("n_verification"))
        if verified != "-":
            verified += f" <= {100 * m['false_alarm_verified_upper_95']:.1f}%"
        return [promised_cell(m.get("false_alarm_promised"), m.get("false_alarm_confidence")), verified]

    for name, m in rows:
        out.append(
            [name]
            + [format_value(m.get(key), kind) for key, _, kind in COLUMNS]
            + [_share(m["anomalous_flagged"], m["n_anomalous"]), _share(m["normal_flagged"], m["n_normal"])]
            + false_alarm_cells(m)
        )
    if with_mean and rows:
        mean_row = ["mean"]
        for key, _, kind in COLUMNS:
            values = [m.get(key) for _, m in rows]
            values = [v for v in values if v is not None]
            mean_row.append(format_value(float(np.mean(values)), kind) if values else "-")
        for key, total in (("anomalous_flagged", "n_anomalous"), ("normal_flagged", "n_normal")):
            mean_row.append(_share(sum(m[key] for _, m in rows), sum(m[total] for _, m in rows)))
        promised = {(m.get("false_alarm_promised"), m.get("false_alarm_confidence")) for _, m in rows}
        flagged = [m.get("verification_flagged") for _, m in rows]
        n_ver = sum(m.get("n_verification") or 0 for _, m in rows)
        pooled = None if None in flagged else sum(flagged)
        mean_row += [promised_cell(*promised.pop()) if len(promised) == 1 else "-", _share(pooled, n_ver)]
        out.append(mean_row)
    return out


INTERVALS: tuple[tuple[str, str], ...] = (("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("aupro", "AUPRO"))
INTERVALS_TITLE = "95 % intervals (image AUROC: Newcombe's; pixel AUROC and AUPRO: the test images resampled)"


def interval_lines(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Per category, each AUROC's and AUPRO's 95 % interval in percent, where ``evaluate`` could compute it."""
    lines = []
    for name, m in rows:
        cells = [f"{title} {100 * m[key + '_interval'][0]:.2f} to {100 * m[key + '_interval'][1]:.2f}" for key, title in INTERVALS if m.get(key + "_interval")]
        if cells:
            lines.append(f"{name}: " + ", ".join(cells))
    return lines


def format_intervals(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The lines of :func:`interval_lines` under their title, or nothing."""
    lines = interval_lines(rows)
    return "\n".join([INTERVALS_TITLE + ":", *("  " + line for line in lines)]) if lines else ""


def format_table(rows: Sequence[tuple[str, dict[str, Any]]], with_mean: bool = False) -> str:
    """A plain-text table: AUROC, AUPRO and F1 in percent, mIoU as a fraction."""
    cells = table_rows(rows, with_mean)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if with_mean and len(cells) > 2:
        lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)
