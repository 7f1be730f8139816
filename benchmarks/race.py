"""Does the race of ``fit --position auto`` keep the flow that full training of both would keep?

    python benchmarks/race.py DATA_ROOT [--categories brick,grass] [--epochs 30]

For each MVTec-style category under DATA_ROOT, fits the position-blind and the
position-aware flow to the end (``--position off`` and ``on``, same seed and
split as ``auto``), then reads from their recorded histories which flow had the
lower held-out NLL after the race's epochs (``uflow.train.race_epochs``) and
which had it at the end. ``fit --position auto`` keeps the first; training
both fully would keep the second. The race is sound where they agree. Prints
one row per category and exits 1 if any disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uflow
from uflow.train import race_epochs

NAMES = {0: "position-blind", 1: "position-aware"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="MVTec-style root: one folder per category with train/good")
    parser.add_argument("--categories", default=None, help="comma-separated subset (default: every category)")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    names = args.categories.split(",") if args.categories else sorted(p.name for p in args.root.iterdir() if (p / "train").is_dir())
    race = race_epochs(args.epochs)
    print(f"race: {race} of {args.epochs} epochs\n")
    print("| category | blind NLL at race end | aware NLL at race end | blind NLL at end | aware NLL at end | race keeps | full training keeps |")
    print("|---|---:|---:|---:|---:|---|---|")
    disagree = 0
    for name in names:
        early, final = [], []
        for position in ("off", "on"):
            model = uflow.fit(args.root / name, epochs=args.epochs, position=position, progress=False)
            history = model.training["history"]
            early.append(min(h["val_nll"] for h in history[:race]))
            final.append(model.training["best_val_nll"])
        race_keeps, full_keeps = int(early[1] < early[0]), int(final[1] < final[0])
        disagree += race_keeps != full_keeps
        print(f"| {name} | {early[0]:.4f} | {early[1]:.4f} | {final[0]:.4f} | {final[1]:.4f} | {NAMES[race_keeps]} | {NAMES[full_keeps]} |", flush=True)
    sys.exit(1 if disagree else 0)


if __name__ == "__main__":
    main()
