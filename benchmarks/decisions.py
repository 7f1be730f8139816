"""What flags an image at the automatic threshold: each decision rule on one fitted run, from the same images.

    python benchmarks/decisions.py RUN_DIR CATEGORY_DIR [--json FILE]

For each rule of ``uflow.calibration`` (the most significant region, the image
score), the run's promise is set again on its own calibration images
and measured on its verification images (normal images only, as ``fit`` does),
then the category's test set is evaluated as ``uflow evaluate`` does: normal
and defective test images flagged, the share of defective images the best
threshold on the image score detects without flagging more test normals (the
ROC at the same rate) and, with masks, mIoU of the automatic masks against the
oracle's. The default rule was chosen on the ELPV poly development set with
this script, never on a set that reports it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import uflow
from uflow.calibration import DECISIONS, HeldOut, make_promise
from uflow.evaluate import evaluate
from uflow.train import _held_out, extract_features


def held_out(model: uflow.UFlowModel, key: str) -> HeldOut:
    paths = [Path(p) for p in model.training[key]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: the run's {key.replace('_', ' ')} are not where it recorded them")
    feats = extract_features(model.extractor, paths, model.image_size, model.device, 16, False)
    return _held_out(model.flow, model.score_flow, model.extractor.spec, model.calibration, feats, model.image_size, model.device, 16, model.score_positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = uflow.load(args.run)
    was = model.calibration.promise
    if was is None:
        raise SystemExit(f"{args.run}: the run has no false-alarm promise (made before uflow set one); refit it")
    cal, ver = held_out(model, "calibration_images"), held_out(model, "verification_images")
    rows = {}
    for decision in DECISIONS:
        model.calibration.promise = make_promise(cal, ver, was.requested_rate, was.test_count, was.null, was.requested_confidence, decision)
        m = evaluate(model, args.category, report=False, progress=False).metrics
        rows[decision] = {
            "verification": f"{model.calibration.promise.verification_flagged}/{len(ver)}",
            "normal_flagged": f"{m['normal_flagged']}/{m['n_normal']}",
            "defective_flagged": f"{m['anomalous_flagged']}/{m['n_anomalous']}",
            "detected": m["detected"],
            "roc_same_rate": m["score_tpr_at_same_fpr"],
            "miou_auto": m.get("miou_auto"),
            "miou_oracle": m.get("miou_oracle"),
            "promise": model.calibration.promise.note,
        }
    print(f"{args.category.name}: verification flagged, test normal flagged, defective detected, ROC at the same rate, mIoU auto / oracle")
    for decision, r in rows.items():
        miou = f"{r['miou_auto']:.3f} / {r['miou_oracle']:.3f}" if r["miou_auto"] is not None else "-"
        print(f"  {decision:7s} {r['verification']:>7s} {r['normal_flagged']:>8s} {100 * r['detected']:6.1f} % {100 * r['roc_same_rate']:6.1f} %  {miou}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "run": str(args.run), "category": str(args.category), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
