"""Training: cache features once, fit the flow by maximum likelihood, select on held-out normal images.

The backbone is frozen and there is no augmentation, so every image's
features are computed exactly once. The normal images are split four ways,
seeded, and each part has one job: *training* images fit the flow;
*validation* images choose the epoch (early stopping on their negative
log-likelihood) and fit the null; *calibration* images set the detection
threshold for the promised false-alarm rate; *verification* images, used for
nothing else, measure the rate that threshold gives (see
:mod:`uflow.calibration`). No anomalous image is ever seen.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import DEFAULT_BACKBONE, BackboneSpec, FeatureExtractor, WeightsArg, build_feature_extractor
from .errors import UFlowError
from .flow import DEFAULT_BATCH_SIZE, DEFAULT_LR, FlowConfig, UFlow, negative_log_likelihood
from .images import as_float_image, list_images, resolve_inputs
from .calibration import DECISION, DECISIONS, Decision, FALSE_ALARM_RATE, PROMISE_CONFIDENCE, Calibration, HeldOut, check_rate, images_to_verify, make_promise
from .model import UFlowModel, flow_latents, resolve_device, score_map_latents, to_model_input
from .anomaly_map import (
    SCORE_PARTS,
    SCORE_PER_POSITION,
    PositionAccumulator,
    PositionStatistics,
    ScoreParts,
    chi2_statistics,
    combination_for,
    combined_score,
    display_map,
    image_score,
    map_and_raw_scores,
    part_maps,
    parts_for,
)
from .segmentation import correlation_area

log = logging.getLogger(__name__)

MIN_IMAGES = 4  # one per role: training, validation, calibration, verification

Position = Literal["auto", "on", "off"]
# Sinusoid frequencies per axis of a position-aware flow: up to 4 periods across the image
# resolves a busbar or a corner of a solar cell (about a tenth of its width) but not single pixels.
POSITIONAL_FREQUENCIES = 4
# Which flows a fit trains; with "auto" both, and the one with the lower held-out NLL is kept.
POSITIONS: dict[str, tuple[int, ...]] = {"auto": (0, POSITIONAL_FREQUENCIES), "on": (POSITIONAL_FREQUENCIES,), "off": (0,)}


def held_out_images(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path] | None:
    """``DATA/validation/good`` of an MVTec-style category (MVTec LOCO and AD 2 have one), else None.

    When present, these normal images alone stop training, fit the null,
    calibrate and verify the threshold, and all of ``train/good`` trains. That
    matters when the training images are not independent of each other
    (overlapping crops, bursts of one part): held-out images drawn from among
    them look more familiar to the flow than a new part does, and a threshold
    calibrated on them flags new normal parts far more often than promised.
    """
    if isinstance(data, (str, os.PathLike)):
        folder = Path(data) / "validation" / "good"
        if folder.is_dir():
            return list_images(folder)
    return None


def training_images(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Normal images for training: ``DATA/train/good`` of an MVTec-style category, else the folder itself."""
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        mvtec_train = root / "train" / "good"
        if mvtec_train.is_dir():
            return list_images(mvtec_train)
        return list_images(root)
    return resolve_inputs(list(data))


# Cached features may take this much RAM; beyond it they are kept in half precision, and beyond
# that in half precision on disk, so fitting 1,000 images at 448 px stays within a laptop's memory.
FEATURE_CACHE_BUDGET = 4 * 2**30


class FeatureCache:
    """Per-scale feature storage for every training image: float32 in RAM, float16 in RAM, or float16 on disk."""

    def __init__(self, shapes: Sequence[tuple[int, int, int]], n_images: int, budget: int | None = None):
        budget = FEATURE_CACHE_BUDGET if budget is None else budget
        per_image = sum(c * h * w for c, h, w in shapes)
        self.folder: str | None = None  # where a disk cache lives
        if per_image * n_images * 4 <= budget:
            self.kind = "ram float32"
            self.scales = [torch.empty((n_images, *shape), dtype=torch.float32) for shape in shapes]
        elif per_image * n_images * 2 <= budget:
            self.kind = "ram float16"
            self.scales = [torch.empty((n_images, *shape), dtype=torch.float16) for shape in shapes]
        else:
            self.kind = "disk float16"
            self.folder = folder = tempfile.mkdtemp(prefix="uflow-features-")
            # Removed when the cache is garbage-collected (fit returned or failed) or at exit.
            weakref.finalize(self, shutil.rmtree, folder, True)
            self.scales = [
                torch.from_numpy(np.memmap(os.path.join(folder, f"scale{i}.f16"), dtype=np.float16, mode="w+", shape=(n_images, *shape)))
                for i, shape in enumerate(shapes)
            ]

    def batch(self, index: torch.Tensor | slice, device: torch.device) -> list[torch.Tensor]:
        return [f[index].to(device, non_blocking=True).float() for f in self.scales]

    def select(self, scales: Sequence[int]) -> "FeatureCache":
        """A view holding only ``scales`` (no copy): what one flow models."""
        view = object.__new__(FeatureCache)
        view.kind, view.folder, view.scales = self.kind, self.folder, [self.scales[i] for i in scales]
        view._whole = self  # a disk cache's folder lives as long as any view of it
        return view

    def __len__(self) -> int:
        return self.scales[0].shape[0]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, paths: Sequence[Path], image_size: int, device: torch.device, batch_size: int, progress: bool
) -> FeatureCache:
    """Per-scale features of every image, computed once and kept on the CPU."""
    cache = FeatureCache(extractor.spec.feature_shapes(image_size), len(paths))
    square = extractor.spec.fixed_image_size
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = torch.stack([to_model_input(as_float_image(p, square=square)[0], image_size) for p in chunk]).to(device)
        for store, m in zip(cache.scales, extractor(batch), strict=True):
            store[start : start + len(chunk)] = m.to("cpu", store.dtype)
        bar.update(len(chunk))
    bar.close()
    return cache


def fit(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    epochs: int = 60,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-5,
    val_fraction: float = 0.15,
    calibration_fraction: float = 0.25,
    verification_fraction: float = 0.15,
    false_alarm_rate: float = FALSE_ALARM_RATE,
    confidence: float | None = PROMISE_CONFIDENCE,
    decision: Decision = DECISION,
    patience: int = 10,
    n_steps: int = 4,
    position: Position = "auto",
    score_flow: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    weights: WeightsArg = None,
    allow_download: bool = True,
    progress: bool = True,
) -> UFlowModel:
    """Train a U-Flow model on normal images and (if ``out`` is given) save it there.

    ``data`` is an MVTec-style category folder (``train/good`` is used, and
    ``validation/good`` when present, see :func:`held_out_images`), a plain
    folder of normal images, or a list of image paths. The best epoch by
    validation NLL on held-out normal images is kept. A non-finite loss stops
    training; the best model so far is saved and :class:`UFlowError` raised.

    ``position`` "auto" trains a position-blind and a position-aware flow (see
    :mod:`uflow.flow`) for the first sixth of the epochs (:func:`race_epochs`),
    then only the one with the lower held-out NLL goes on; "on" and "off"
    train only one. The run records every candidate's NLL.

    ``score_flow`` also trains a second flow on coarser backbone scales, with the
    same schedule and the race's choice of position, for the image score only (see
    :func:`uflow.anomaly_map.combined_score`); backbones without coarser scales have none.

    ``false_alarm_rate`` is the promise: the share of normal images allowed
    any detection at the default threshold, for this run with probability
    ``confidence`` (None: on average over runs, see :mod:`uflow.calibration`);
    ``decision`` says what flags an image: its most significant region or its
    score (see :mod:`uflow.calibration`).
    ``calibration_fraction`` of the images set that threshold and
    ``verification_fraction`` (0 allowed) check it; the result is
    ``model.calibration.promise``. When they are too few to certify or to
    confirm the rate, a warning says so in one line.
    """
    started = time.perf_counter()
    paths = training_images(data)
    if len(paths) < MIN_IMAGES:
        raise UFlowError(
            f"{data}: {len(paths)} normal image(s) found, at least {MIN_IMAGES} are needed (some are held out to stop, calibrate and verify)"
        )
    for name, value, low in (("validation", val_fraction, 0), ("calibration", calibration_fraction, 0), ("verification", verification_fraction, -1e-12)):
        if not low < value < 1:
            raise UFlowError(f"{name} fraction must be between 0 and 1, got {value}")
    check_rate(false_alarm_rate, confidence)
    if decision not in DECISIONS:
        raise UFlowError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if position not in POSITIONS:
        raise UFlowError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if epochs < 1 or batch_size < 1:
        raise UFlowError("epochs and batch size must be at least 1")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    held_out = held_out_images(data)
    if held_out is None:
        pool = paths
        fractions = (val_fraction, calibration_fraction, verification_fraction)
    else:  # the held-out folder is shared among the three roles in the same proportions
        if len(held_out) < 3:
            raise UFlowError(f"{Path(data) / 'validation' / 'good'}: {len(held_out)} image(s); at least 3 are needed (to stop, calibrate and verify)")
        pool = held_out
        total = val_fraction + calibration_fraction + verification_fraction
        fractions = (val_fraction / total, calibration_fraction / total, verification_fraction / total)
    order = torch.randperm(len(pool), generator=generator).tolist()
    counts = [max(1, round(fractions[0] * len(pool))), max(1, round(fractions[1] * len(pool))), round(fractions[2] * len(pool))]
    if held_out is not None:
        counts[2] = len(pool) - counts[0] - counts[1]
    elif len(paths) - sum(counts) < 1:
        raise UFlowError(
            f"{data}: {len(paths)} normal images leave none to train on after {counts[0]} for validation, "
            f"{counts[1]} for calibration and {counts[2]} for verification; lower those fractions"
        )
    bounds = np.cumsum([0, *counts])
    val_paths, cal_paths, ver_paths = ([pool[i] for i in sorted(order[a:b])] for a, b in zip(bounds[:-1], bounds[1:]))
    train_paths = paths if held_out is not None else [paths[i] for i in sorted(order[bounds[-1] :])]

    extractor = build_feature_extractor(backbone, image_size, weights, allow_download, score_flow=score_flow).to(dev)
    size = extractor.image_size
    train_feats = extract_features(extractor, train_paths, size, dev, batch_size, progress)
    val_feats = extract_features(extractor, val_paths, size, dev, batch_size, progress)
    schedule = Schedule(epochs, lr, weight_decay, batch_size, patience)
    spec = extractor.spec
    map_train, map_val = train_feats.select(spec.map_scales), val_feats.select(spec.map_scales)
    candidates = [FlowConfig(feature_channels=spec.map_channels, n_steps=n_steps, permutation_seed=seed, positional=p) for p in POSITIONS[position]]
    trainers = []
    for config in candidates:
        torch.manual_seed(seed)  # each candidate starts from the weights it would get alone
        trainers.append(FlowTrainer(config, map_train, map_val, schedule, dev, torch.Generator().manual_seed(seed), progress))
    # Likelihoods of the same features under two flows are comparable: keep the one that explains held-out
    # normal images best. Candidates race for the first epochs and only the likelier one trains on.
    race = race_epochs(schedule.max_epochs) if len(trainers) > 1 else None
    for trainer in trainers:
        trainer.advance(race)
        if trainer.stopped == "interrupted":
            break
    finished = [t for t in trainers if t.best_state is not None]
    if finished and not any(t.stopped == "interrupted" for t in trainers):
        min(finished, key=lambda t: t.best_nll).advance()
    runs = [t.result() for t in trainers]
    chosen = min((r for r in runs if r.flow is not None), key=lambda r: r.best_nll, default=runs[-1])
    if chosen.flow is None:
        raise UFlowError(f"{chosen.diverged or 'training stopped'} before any epoch finished; nothing saved (try a lower --lr)")
    flow, stopped, diverged = chosen.flow, chosen.stopped, chosen.diverged
    best_nll, best_epoch, epochs_run, history = chosen.best_nll, chosen.best_epoch, chosen.epochs_run, chosen.history
    flow.eval()
    cache_kind = train_feats.kind

    score_run, interrupted = None, stopped == "interrupted"
    if score_flow and spec.score_scales and not interrupted and not diverged:
        # Position is a property of the images, so the score flow takes the race's answer instead of racing again.
        config = FlowConfig(feature_channels=spec.score_channels, n_steps=n_steps, permutation_seed=seed, positional=flow.config.positional)
        torch.manual_seed(seed)
        trainer = FlowTrainer(config, train_feats.select(spec.score_scales), val_feats.select(spec.score_scales), schedule, dev,
                              torch.Generator().manual_seed(seed), progress, label="fit score flow")
        trainer.advance()
        score_run = trainer.result()
        # Ctrl-C or a non-finite loss here ends the fit as it would in the map flow: the best so far is saved, then it stops.
        interrupted = score_run.stopped == "interrupted"
        diverged = diverged or (f"score flow: {score_run.diverged}" if score_run.diverged else None)
        if score_run.flow is None:
            score_run = None
        else:
            score_run.flow.eval()
    score_flow_model = score_run.flow if score_run is not None else None

    # One training image has no spread to standardise by: such a run standardises globally, as runs did before.
    per_position = SCORE_PER_POSITION and len(train_feats) >= 2
    parts, positions, whole_weight = SCORE_PARTS, None, None
    if per_position:
        parts, positions, whole_weight = _position_statistics(flow, score_flow_model, spec, train_feats, size, dev, batch_size)
    calibration = _calibrate(flow, score_flow_model, spec, val_feats, size, dev, batch_size, parts, positions)
    del train_feats, val_feats, map_train, map_val
    held_out = [
        _held_out(
            flow, score_flow_model, spec, calibration, extract_features(extractor, group, size, dev, batch_size, progress), size, dev, batch_size, positions
        )
        for group in (cal_paths, ver_paths)
    ]
    promise = make_promise(*held_out, false_alarm_rate, "per_size", "calibrated", confidence, decision)
    if promise.shortfall or promise.verification_images < images_to_verify(promise.target_rate):
        warnings.warn(promise.note, stacklevel=2)
    calibration.promise = promise
    training = {
        "data": str(data) if isinstance(data, (str, os.PathLike)) else f"{len(paths)} files",
        "n_train": len(train_paths),
        "n_val": len(val_paths),
        # Held-out normal images, so evaluation can set its "fair" threshold on images the flow never fit.
        "val_images": [str(p.resolve()) for p in val_paths],
        "n_calibration": len(cal_paths),
        "n_verification": len(ver_paths),
        "calibration_images": [str(p.resolve()) for p in cal_paths],
        "verification_images": [str(p.resolve()) for p in ver_paths],
        "epochs_run": epochs_run,
        "positional": flow.config.positional,
        # Every candidate flow with its held-out NLL: the record of how the kept one was chosen.
        "candidates": [{"positional": r.config.positional, "best_val_nll": round(r.best_nll, 6), "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "stopped": r.stopped} for r in runs],
        "best_epoch": best_epoch,
        "best_val_nll": round(best_nll, 6),
        "stopped": stopped,
        "score_flow": None if score_run is None else {
            "best_epoch": score_run.best_epoch, "best_val_nll": round(score_run.best_nll, 6), "epochs_run": score_run.epochs_run,
            "stopped": score_run.stopped, "history": score_run.history,
        },
        # What chose the image score's parts (uflow.anomaly_map.parts_for); None without per-position statistics.
        "whole_map_centre_weight": None if whole_weight is None else round(whole_weight, 4),
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(dev),
        "feature_cache": cache_kind,
        "history": history,
    }
    model = UFlowModel(extractor, flow, calibration, training, dev, score_flow=score_flow_model, score_positions=positions)
    if out is not None:
        model.save(out)
    if diverged:
        where = f" in {out}" if out is not None else ""
        raise UFlowError(f"{diverged}; kept the best model (epoch {best_epoch}, val NLL {best_nll:.4f}){where}; try a lower --lr")
    if interrupted:
        raise KeyboardInterrupt
    return model


@dataclass(frozen=True)
class Schedule:
    """How a flow is trained: Adam, the learning rate cut on a plateau of held-out NLL, stopped on a longer one."""

    max_epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int  # epochs without a better held-out NLL before training stops

    @property
    def plateau(self) -> int:
        """Epochs without improvement before the learning rate is cut (a third of the patience)."""
        return max(2, self.patience // 3)


LR_CUT = 0.3  # factor the learning rate is multiplied by on each plateau
# With several candidate flows, each trains for this share of the epoch cap, then only the one with the lower
# held-out NLL goes on. In every fit where both ran to the end (the demo's three textures, ELPV), the flow
# ahead at epoch 5 of 30 (10 of 60) was ahead at the end too; two flows then cost 1.17 flows, not 2.
RACE_SHARE = 1 / 6


def race_epochs(max_epochs: int) -> int:
    """Epochs each candidate flow trains before the likelier one goes on alone (at least 3)."""
    return max(3, math.ceil(RACE_SHARE * max_epochs))


@dataclass
class TrainedFlow:
    """One candidate flow and how its training went."""

    config: FlowConfig
    flow: UFlow | None  # at its best epoch; None if no epoch finished
    best_nll: float
    best_epoch: int
    epochs_run: int
    stopped: str
    diverged: str | None
    history: list[dict[str, float]]


class FlowTrainer:
    """Fits one flow by maximum likelihood, epoch by epoch, keeping its epoch with the lowest held-out NLL.

    The learning rate is cut by ``LR_CUT`` when the held-out NLL has not improved for
    ``schedule.plateau`` epochs; training stops after ``schedule.patience`` epochs without
    improvement, at ``schedule.max_epochs``, on a non-finite loss, or on Ctrl-C.
    :meth:`advance` can stop after a given number of epochs and go on later, so
    several candidate flows can be raced (:func:`fit`); a flow advanced in steps
    ends exactly as one trained in one go.
    """

    def __init__(
        self,
        config: FlowConfig,
        train_feats: FeatureCache,
        val_feats: FeatureCache,
        schedule: Schedule,
        dev: torch.device,
        generator: torch.Generator,
        progress: bool,
        label: str | None = None,
    ):
        self.config, self.schedule, self.dev, self.generator, self.progress = config, schedule, dev, generator, progress
        self.train_feats, self.val_feats = train_feats, val_feats
        self.flow = UFlow(config).to(dev)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
        self.dims = sum(f[0].numel() for f in train_feats.scales)
        self.label = label or f"fit{' positional' if config.positional else ''}"
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_nll, self.best_epoch, self.epochs_run, self.last_cut = math.inf, 0, 0, 0
        self.stopped: str | None = None  # why training ended; None while it can go on
        self.diverged: str | None = None
        self.history: list[dict[str, float]] = []

    # Report NLL per dimension with the Gaussian constant, so N(0, 1) data scores log(2 pi) / 2 = 0.919.
    _CONSTANT = 0.5 * math.log(2 * math.pi)

    def _validation_nll(self) -> float:
        self.flow.eval()
        total, size = 0.0, self.schedule.batch_size
        with torch.no_grad():
            for start in range(0, len(self.val_feats), size):
                z, log_det = self.flow(self.val_feats.batch(slice(start, start + size), self.dev))
                total += negative_log_likelihood(z, log_det).sum().item()
        return total / (len(self.val_feats) * self.dims) + self._CONSTANT

    def _epoch(self, epoch: int) -> float | None:
        """One pass over the training images; the mean training NLL, or None when the loss is not finite."""
        self.flow.train()
        perm = torch.randperm(len(self.train_feats), generator=self.generator)
        running, seen, size = 0.0, 0, self.schedule.batch_size
        for start in range(0, len(perm), size):
            idx = perm[start : start + size]
            z, log_det = self.flow(self.train_feats.batch(idx, self.dev))
            loss = negative_log_likelihood(z, log_det).mean()
            if not torch.isfinite(loss):
                self.diverged = f"training loss became {loss.item()} at epoch {epoch}"
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        return running / (seen * self.dims) + self._CONSTANT

    def advance(self, epochs: int | None = None) -> None:
        """Train ``epochs`` more epochs (all that are left when None), unless training ends first."""
        schedule = self.schedule
        last = schedule.max_epochs if epochs is None else min(schedule.max_epochs, self.epochs_run + epochs)
        bar = tqdm(range(self.epochs_run + 1, last + 1), desc=self.label, unit="epoch", disable=not self.progress,
                   initial=self.epochs_run, total=schedule.max_epochs)
        try:
            for epoch in bar:
                if self.stopped is not None:
                    break
                train_nll = self._epoch(epoch)
                val_nll = self._validation_nll() if train_nll is not None else math.nan
                if train_nll is not None and not math.isfinite(val_nll):
                    self.diverged = f"validation NLL became {val_nll} at epoch {epoch}"
                if self.diverged:
                    self.stopped = "diverged"
                    break
                self.epochs_run = epoch
                lr = self.optimizer.param_groups[0]["lr"]
                self.history.append({"epoch": epoch, "train_nll": round(train_nll, 5), "val_nll": round(val_nll, 5), "lr": lr})
                if val_nll < self.best_nll - 1e-4:
                    self.best_nll, self.best_epoch = val_nll, epoch
                    self.best_state = {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
                bar.set_postfix(loss=f"{train_nll:.4f}", val_nll=f"{val_nll:.4f}", best=self.best_epoch)
                if not self.progress:  # the bar shows the same; without it (a log file), one line per epoch
                    log.info("%s epoch %d: train NLL %.4f, held-out NLL %.4f, lr %.2g, best epoch %d",
                             self.label, epoch, train_nll, val_nll, lr, self.best_epoch)
                if epoch - self.best_epoch >= schedule.patience:
                    self.stopped = "plateau"
                    break
                if epoch - max(self.best_epoch, self.last_cut) >= schedule.plateau:
                    for group in self.optimizer.param_groups:
                        group["lr"] *= LR_CUT
                    self.last_cut = epoch
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        finally:
            bar.close()
        if self.stopped is None and self.epochs_run >= schedule.max_epochs:
            self.stopped = "max_epochs"

    def result(self) -> TrainedFlow:
        """The flow at its best epoch (None if no epoch finished) and how its training went so far."""
        flow = None
        if self.best_state is not None:
            self.flow.load_state_dict(self.best_state)
            flow = self.flow
        stopped = self.stopped or "raced"  # paused by the race and not resumed: it lost
        return TrainedFlow(self.config, flow, self.best_nll, self.best_epoch, self.epochs_run, stopped, self.diverged, self.history)


@torch.no_grad()
def _position_statistics(
    flow: UFlow, score_flow: UFlow | None, spec: BackboneSpec, feats: FeatureCache, size: int, dev: torch.device, batch_size: int
) -> tuple[ScoreParts, PositionStatistics, float]:
    """The image score's parts, their per-position statistics on the training images, and the weight that chose them.

    The training images, not the stopping ones: the per-position pattern is what a run must learn, and it is
    the images' (busbars, borders), which the fitted flow reproduces; the stopping images, fewer, then
    standardise the per-position scores as they do the plain ones. One pass gathers every candidate part
    (each scale, the score flow's map, the whole map); :func:`uflow.anomaly_map.parts_for` picks the parts
    from the whole map's centre weight (see there).
    """
    accumulator = PositionAccumulator()
    for start in range(0, len(feats), batch_size):
        z, coarse = flow_latents(feats.batch(slice(start, start + batch_size), dev), spec, flow, score_flow)
        whole, maps = part_maps(z, coarse, (size, size), "scales")
        accumulator.add([*maps, whole])  # each scale, the score flow's map if any, then the whole map
    statistics, whole_weight = accumulator.statistics(), accumulator.centre_weights()[-1]
    n_scales, n_parts = len(spec.map_scales), len(statistics.centres)
    parts = parts_for(whole_weight)
    kept = [*range(n_scales)] if parts == "scales" else [n_parts - 1]
    kept += range(n_scales, n_parts - 1)  # the score flow's map
    return parts, PositionStatistics(statistics.centres[kept], statistics.spreads[kept]), whole_weight


@torch.no_grad()
def _calibrate(
    flow: UFlow,
    score_flow: UFlow | None,
    spec: BackboneSpec,
    val_feats: FeatureCache,
    size: int,
    dev: torch.device,
    batch_size: int,
    parts: ScoreParts,
    positions: PositionStatistics | None,
) -> Calibration:
    """Image-score standardisation and threshold, display range and the null, from held-out normal images."""
    raw_batches: list[list[torch.Tensor]] = []  # per batch, each part's raw scores
    medians, shown_tops = [], []
    stats: list[list[torch.Tensor]] = [[] for _ in spec.map_scales]
    n = len(val_feats)
    for start in range(0, n, batch_size):
        z, coarse = flow_latents(val_feats.batch(slice(start, start + batch_size), dev), spec, flow, score_flow)
        maps, raw = map_and_raw_scores(z, coarse, (size, size), parts, positions)
        shown = display_map(maps, (size, size))  # the overlay's colour scale is the smoothed map's
        medians.append(shown.flatten(1).median(dim=1).values.cpu())
        shown_tops.append(image_score(shown).cpu())
        for store, s in zip(stats, chi2_statistics(z)):
            store.append(s.double().cpu())
        raw_batches.append([part.cpu() for part in raw])
    per_part = [torch.cat(column).double() for column in zip(*raw_batches)]
    # Population spread (n, not n - 1), floored at 1 % of the centre: from one or two stopping images the
    # spread can come out near zero, and one part's score would then swamp the others' on noise alone.
    # (The demo's and ELPV's runs measured spreads of 1.8 % to 18 % of the centre.)
    centres = [float(r.mean()) for r in per_part]
    spreads = [max(float(r.std(correction=0)), 0.01 * abs(c), 1e-6) for r, c in zip(per_part, centres)]
    combination = combination_for(parts)
    score = combined_score([r.float() for r in per_part], centres, spreads, combination)
    low = float(torch.cat(medians).median())
    high = float(torch.cat(shown_tops).max())
    scales, dofs, areas = [], [], []
    for store in stats:
        s = torch.cat(store)
        mean, var = s.mean().item(), s.var().item()
        # Moment match S ~ a * chi2(nu): mean a * nu, variance 2 a^2 nu.
        scales.append(var / (2 * mean))
        dofs.append(2 * mean * mean / var)
        areas.append(correlation_area(s.numpy()))
    return Calibration(
        score_centres=centres,
        score_spreads=spreads,
        score_parts=parts,
        score_combination=combination,
        score_per_position=positions is not None,
        score_threshold=float(score.max()),
        display_low=low,
        display_high=max(high, low + 1e-6),
        chi2_scale=scales,
        chi2_dof=dofs,
        pixels_per_sample=areas,
    )


@torch.no_grad()
def _held_out(
    flow: UFlow,
    score_flow: UFlow | None,
    spec: BackboneSpec,
    calibration: Calibration,
    feats: FeatureCache,
    size: int,
    dev: torch.device,
    batch_size: int,
    positions: PositionStatistics | None,
) -> HeldOut:
    """Each image's score and smallest log10 NFA with the default segmentation settings."""
    scores: list[float] = []
    smallest: list[float] = []
    for start in range(0, len(feats), batch_size):
        score, _, z = score_map_latents(feats.batch(slice(start, start + batch_size), dev), spec, flow, score_flow, calibration, size, positions)
        scores.extend(score.tolist())
        stats = [s.cpu().numpy() for s in chi2_statistics(z)]
        smallest.extend(calibration.smallest_log10_nfa(stats, flow.latent_channels, "per_size", "calibrated").tolist())
    return HeldOut(np.array(scores), np.array(smallest))
