"""The false-alarm promise across runs: fit one category with several seeds, count what each run flags.

    python benchmarks/seeds.py CATEGORY_DIR --seeds 0,1,2,3 [--epochs 30] [--fractions 0.09,0.6,0.3] [--json FILE]

The promise is per run: at most 5 % of normal images flagged, with the run's confidence. One
run's count on one test set says little (at a true rate of 4.5 %, 6 or more of 100 are flagged
about one time in three). Each seed draws its own split of the held-out images and its own
training order; the test set stays the same. Per run: the promise, what its verification images
showed, how many normal and defective test images the automatic threshold flags, and image AUROC
(pixel AUROC and AUPRO where the category has masks);
then how many runs flagged more than the promised share of the normal test images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import uflow
from uflow.evaluate import evaluate

from taps import fit_fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds, one fit each")
    parser.add_argument("--epochs", type=int, default=30, help="the demo's 30 by default")
    parser.add_argument("--fractions", type=fit_fractions, default="0.09,0.6,0.3", help="validation,calibration,verification shares as fit takes them (default the demo's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.perf_counter()
        model = uflow.fit(args.category, seed=seed, epochs=args.epochs, progress=False, **args.fractions)
        fit_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            m = evaluate(model, args.category, Path(tmp), report=False, progress=False).metrics
        row = {"category": args.category.name, "seed": seed, "fit_s": round(fit_s, 1),
               **{k: m.get(k) for k in ("false_alarm_promised", "false_alarm_confidence", "verification_flagged", "n_verification",
                                         "normal_flagged", "n_normal", "anomalous_flagged", "n_anomalous", "image_auroc", "pixel_auroc", "aupro")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    over = sum(r["normal_flagged"] > r["false_alarm_promised"] * r["n_normal"] for r in rows)
    flagged = sum(r["normal_flagged"] for r in rows)
    tested = sum(r["n_normal"] for r in rows)
    summary = {"category": args.category.name, "runs": len(rows), "runs_over_promise_on_test": over,
               "normal_test_flagged": f"{flagged}/{tested}", "mean_test_rate": round(flagged / tested, 4)}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
