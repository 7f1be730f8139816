"""A development set with masks: two more of scikit-image's bundled photographs, built like the demo's data.

    python benchmarks/devset.py --out devset_data

Writes ``immunohistochemistry`` (stained tissue, 512x512) and
``hubble_deep_field`` (a star field, 872x1000) in the MVTec layout, with the
demo's sizes and defect kinds, under another seed than the demo's. No accuracy
figure in the README reports these two: they exist so that choices which need
masks (localisation: backbone, taps, the automatic mask) can be made on images
that are never used to report accuracy. Image-level choices have used them
beside ELPV's polycrystalline cells (the image score's per-scale parts,
2026-12-04), though synthetic defects on photographs are less like a production
line's than those cells are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uflow.demo import DEMO_CROP, DEMO_DEFECTS_PER_KIND, DEMO_GOOD_IMAGES, DEMO_HELD_OUT_IMAGES, DEMO_TRAIN_IMAGES
from uflow.textures import make_texture_dataset

DEVELOPMENT_TEXTURES = ("immunohistochemistry", "hubble_deep_field")
DEVELOPMENT_SEED = 11  # not the demo's 0: other crops and other defect shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("devset_data"))
    args = parser.parse_args()
    make_texture_dataset(
        args.out, categories=DEVELOPMENT_TEXTURES, n_train=DEMO_TRAIN_IMAGES, n_good=DEMO_GOOD_IMAGES,
        n_per_defect=DEMO_DEFECTS_PER_KIND, size=DEMO_CROP, seed=DEVELOPMENT_SEED, n_validation=DEMO_HELD_OUT_IMAGES,
    )
    for name in DEVELOPMENT_TEXTURES:
        print(f"{args.out / name}")


if __name__ == "__main__":
    main()
