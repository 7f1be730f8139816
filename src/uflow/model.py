"""The engine: a frozen backbone, a trained flow, and prediction on images.

``UFlowModel`` ties the phases together in the order data flows through them:
preprocess -> features -> flow -> likelihood map and score -> a contrario
segmentation. It is created by :func:`uflow.fit` or :func:`uflow.load`.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .anomaly_map import PositionStatistics, ScoreCombination, ScoreParts, chi2_statistics, combined_score, display_map, map_and_raw_scores
from .backbones import BackboneSpec, FeatureExtractor, WeightsArg, build_feature_extractor, get_spec
from .checkpoint import read_run, save_run
from .calibration import Calibration, Null, check_options
from .errors import UFlowError
from .flow import FlowConfig, UFlow
from .images import ErrorHandler, ImageInput, read_inputs
from .result import Prediction
from .segmentation import TestCount
from .workers import SegmentationWorkers


PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or "auto" picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UFlowError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UFlowError(f"device {device} requested but CUDA is not available on this machine")
    return dev


def to_model_input(image: np.ndarray, image_size: int) -> torch.Tensor:
    """(H, W, 3) float image in [0, 1] -> (3, S, S) tensor resized with antialiasing."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x[0]


def flow_latents(
    features: Sequence[torch.Tensor], spec: BackboneSpec, flow: UFlow, score_flow: UFlow | None
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The map flow's latents and the score flow's (None without one) from backbone features."""
    latents, _ = flow([features[i] for i in spec.map_scales])
    return latents, (score_flow([features[i] for i in spec.score_scales])[0] if score_flow is not None else None)


def score_map_latents(
    features: Sequence[torch.Tensor],
    spec: BackboneSpec,
    flow: UFlow,
    score_flow: UFlow | None,
    calibration: Calibration,
    size: int,
    positions: PositionStatistics | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """From backbone features: image scores (B,), the flow's map on the input grid (B, S, S) and the map flow's latents.

    The map flow draws the map; the image score combines the parts the calibration names, each standardised per
    position by ``positions`` when the run has them (:func:`uflow.anomaly_map.map_and_raw_scores`), as
    :func:`uflow.anomaly_map.combined_score` says.
    """
    latents, coarse = flow_latents(features, spec, flow, score_flow)
    flow_map, scores = map_and_raw_scores(latents, coarse, (size, size), calibration.score_parts, positions)
    score = combined_score(scores, calibration.score_centres, calibration.score_spreads, calibration.score_combination)
    return score, flow_map, latents


@dataclass
class UFlowModel:
    """A trained U-Flow model. Use :func:`uflow.fit` or :func:`uflow.load` to get one."""

    extractor: FeatureExtractor
    flow: UFlow  # models the finest scales; draws the map and the masks
    calibration: Calibration
    training: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    score_flow: UFlow | None = None  # models coarser scales for the image score only; None: the map flow's score alone
    score_positions: PositionStatistics | None = None  # per-position standardisation of the score's parts (runs that record it)
    precision: str = "fp32"  # of the backbone; the flow always runs in float32
    _backbone: Any = field(default=None, repr=False)  # the extractor, or its torch.compile'd version
    _workers: SegmentationWorkers = field(default_factory=SegmentationWorkers, repr=False)

    @property
    def backbone(self) -> str:
        return self.extractor.spec.name

    @property
    def image_size(self) -> int:
        return self.extractor.image_size

    def to(self, device: str | torch.device | None) -> "UFlowModel":
        self.device = resolve_device(device)
        self.extractor.to(self.device)
        self.flow.to(self.device)
        if self.score_flow is not None:
            self.score_flow.to(self.device)
        if self.score_positions is not None:
            self.score_positions = self.score_positions.to(self.device)
        return self

    def accelerate(self, precision: str = "bf16", compile: bool = False) -> "UFlowModel":
        """Faster inference settings, meant for GPUs.

        ``precision="bf16"`` runs the backbone under bfloat16 autocast; its
        features are layer-normalised and the flow runs in float32, so the
        likelihood keeps its precision. ``compile=True`` compiles the backbone
        with ``torch.compile`` (the first batches are slow while it compiles).
        """
        if precision not in PRECISIONS:
            raise UFlowError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._backbone = torch.compile(self.extractor) if compile else None
        return self

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def latents(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> the map flow's per-scale latents, finest first."""
        features = self._flow_inputs(batch)
        z, _ = self.flow([features[i] for i in self.extractor.spec.map_scales])
        return z

    @torch.no_grad()
    def _score_map_latents(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        features = self._flow_inputs(batch)
        return score_map_latents(features, self.extractor.spec, self.flow, self.score_flow, self.calibration, self.image_size, self.score_positions)

    def _flow_inputs(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> float32 backbone features on the model's device, the flows set to eval."""
        self.flow.eval()
        if self.score_flow is not None:
            self.score_flow.eval()
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return [f.float().contiguous() for f in self.features(batch)]

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features, finest first, of images (B, 3, S, S) in [0, 1] already on the model's device."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return (self._backbone or self.extractor)(batch)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float | None = None,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
        workers: int = 0,
        keep_images: bool = False,
        on_error: ErrorHandler | None = None,
    ) -> list[Prediction]:
        """Score images (paths or arrays); one :class:`Prediction` per image, in order.

        Regions are detected at the run's verified threshold (``calibration.promise``:
        at most its rate of normal images flagged, with its confidence) unless ``epsilon`` is given,
        which detects at log10 NFA < log10 epsilon, the paper's rule.
        ``keep_images`` keeps the scored RGB image in each prediction (for
        overlays). ``on_error(path, message)``, when given, receives images that
        cannot be read, which are then skipped instead of stopping the call.
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        options = {"batch_size": batch_size, "segmentation": segmentation, "epsilon": epsilon, "test_count": test_count, "null": null}
        return list(self.iter_predict(images, workers=workers, keep_images=keep_images, on_error=on_error, **options))

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float | None = None,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
        workers: int = 0,
        keep_images: bool = False,
        on_error: ErrorHandler | None = None,
    ) -> Iterator[Prediction]:
        """Like :meth:`predict` but yields as batches finish, so outputs can be written while the rest runs.

        ``workers`` > 0 runs the segmentation (CPU-only tree work) of each batch
        in that many worker processes while the model computes the next batches,
        so on a GPU it is not the bottleneck. Results are identical and in order.
        Options are checked at once, not when the first result is asked for.
        """
        check_options(epsilon, test_count, null)
        if segmentation:
            self.calibration.log10_threshold(epsilon, test_count, null)  # refuses a threshold the run cannot give
        if workers < 0:
            raise UFlowError(f"workers must be 0 or more, got {workers}")
        segment_options = (epsilon, test_count, null) if segmentation else None
        items = read_inputs(images, square=self.extractor.spec.fixed_image_size, on_error=on_error)
        return self._stream(items, batch_size, segment_options, workers, keep_images)

    def _stream(
        self,
        items: Iterator[tuple[np.ndarray, Path | None]],
        batch_size: int,
        segment_options: tuple[float | None, TestCount, Null] | None,
        workers: int,
        keep_images: bool,
    ) -> Iterator[Prediction]:
        pool = self._workers.get(workers) if workers and segment_options else None
        in_flight: deque[tuple[Future, tuple]] = deque()
        try:
            for batch in iter(lambda: list(itertools.islice(items, batch_size)), []):
                scores, maps, stats, sizes = self._forward(batch, with_statistics=segment_options is not None)
                paths = [path for _, path in batch]
                images = [img for img, _ in batch] if keep_images else None
                if segment_options is None:
                    yield from self.calibration.predictions(scores, maps, paths, None, images)
                elif pool is None:
                    segs = self.calibration.segment(stats, self.flow.latent_channels, sizes, *segment_options, scores)
                    yield from self.calibration.predictions(scores, maps, paths, segs, images)
                else:
                    job = pool.submit(self.calibration.segment, stats, self.flow.latent_channels, sizes, *segment_options, scores)
                    in_flight.append((job, (scores, maps, paths, images)))
                    while len(in_flight) > workers:  # keep the workers busy, the memory bounded
                        job, (scores, maps, paths, images) = in_flight.popleft()
                        yield from self.calibration.predictions(scores, maps, paths, job.result(), images)
            while in_flight:
                job, (scores, maps, paths, images) = in_flight.popleft()
                yield from self.calibration.predictions(scores, maps, paths, job.result(), images)
        finally:
            for job, _ in in_flight:  # the caller stopped early or a batch failed
                job.cancel()

    def close(self) -> None:
        """Stop the segmentation worker processes, if any (they are also stopped when the model is deleted)."""
        self._workers.close()

    def _forward(
        self, items: Sequence[tuple[np.ndarray, Path | None]], with_statistics: bool
    ) -> tuple[list[float], list[np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
        """Scores, anomaly maps at image size, chi-square maps and image sizes of one batch."""
        batch = torch.stack([to_model_input(img, self.image_size) for img, _ in items])
        score, flow_maps, latents = self._score_map_latents(batch)
        sizes = [img.shape[:2] for img, _ in items]
        scores = score.tolist()
        maps = [display_map(flow_maps[i : i + 1], size)[0].cpu().numpy() for i, size in enumerate(sizes)]
        stats = [s.cpu().numpy() for s in chi2_statistics(latents)] if with_statistics else []
        return scores, maps, stats, sizes

    # ------------------------------------------------------------------ persistence

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this model, as stored next to the weights."""
        return {
            "uflow_version": __version__,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "backbone_weights": [vars(s) for s in self.extractor.weight_sources],
            "flow": self.flow.config.to_dict(),
            "score_flow": self.score_flow.config.to_dict() if self.score_flow is not None else None,
            "latent_channels": list(self.flow.latent_channels),
            "calibration": self.calibration.to_dict(),
            "training": self.training,
        }

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write the model into ``run_dir`` (created if needed) atomically."""
        tensors = dict(self.flow.state_dict())
        if self.score_flow is not None:
            tensors.update({SCORE_FLOW_PREFIX + k: v for k, v in self.score_flow.state_dict().items()})
        if self.score_positions is not None:
            tensors.update({POSITION_CENTRES: self.score_positions.centres, POSITION_SPREADS: self.score_positions.spreads})
        save_run(Path(run_dir), tensors, self.describe())
        return Path(run_dir)


SCORE_FLOW_PREFIX = "score_flow."  # the score flow's tensors in model.safetensors; the map flow's have no prefix
POSITION_CENTRES, POSITION_SPREADS = "score_position.centres", "score_position.spreads"


def _load_flow(run_dir: str | os.PathLike, config: FlowConfig, tensors: dict[str, torch.Tensor], backbone: str) -> UFlow:
    """A flow built from ``config`` holding exactly ``tensors``; one line naming the first mismatch otherwise."""
    flow = UFlow(config)
    own = flow.state_dict()
    bad = [k for k in own if k not in tensors or tensors[k].shape != own[k].shape]
    if bad or set(tensors) - set(own):
        name = bad[0] if bad else sorted(set(tensors) - set(own))[0]
        raise UFlowError(f"{run_dir}: flow weights do not fit a {backbone} model (first mismatch: {name})")
    flow.load_state_dict(tensors)
    return flow


def load(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    weights: WeightsArg = None,
    allow_download: bool = True,
) -> UFlowModel:
    """Restore a model saved by :func:`uflow.fit` from its run folder.

    Refuses, with one line saying why, a folder that is not a uflow model, a
    checkpoint of another format, flow weights that do not fit the recorded
    backbone, and backbone weights that differ from those it was trained with.
    """
    config, tensors = read_run(Path(run_dir))
    try:
        spec = get_spec(config["backbone"])
        flow_config = FlowConfig.from_dict(config["flow"])
        score_config = FlowConfig.from_dict(config["score_flow"]) if config.get("score_flow") else None
        image_size = int(config["image_size"])
        calibration = Calibration(**config["calibration"])
    except UFlowError as exc:
        raise UFlowError(f"{run_dir}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UFlowError(f"{run_dir}: incomplete model description ({exc!r})") from None
    for what, built, expected in (("flow", flow_config, spec.map_channels), ("score flow", score_config, spec.score_channels)):
        if built is not None and built.feature_channels != expected:
            raise UFlowError(
                f"{run_dir}: {what} was built for feature channels {list(built.feature_channels)}, "
                f"but backbone {spec.name} gives {list(expected)}"
            )
    if calibration.score_parts not in get_args(ScoreParts):
        raise UFlowError(f"{run_dir}: unknown image score parts {calibration.score_parts!r}; this uflow knows {', '.join(get_args(ScoreParts))}")
    if calibration.score_combination not in get_args(ScoreCombination):
        raise UFlowError(
            f"{run_dir}: unknown image score combination {calibration.score_combination!r}; this uflow knows {', '.join(get_args(ScoreCombination))}"
        )
    parts = (len(spec.map_scales) if calibration.score_parts == "scales" else 1) + (score_config is not None)
    if len(calibration.score_centres) != parts or len(calibration.score_spreads) != parts:
        raise UFlowError(
            f"{run_dir}: the calibration standardises {len(calibration.score_centres)} image score parts, "
            f"but this model has {parts} ({calibration.score_parts})"
        )
    positions = _load_positions(run_dir, calibration, tensors, parts, image_size)
    score_tensors = {k[len(SCORE_FLOW_PREFIX):]: v for k, v in tensors.items() if k.startswith(SCORE_FLOW_PREFIX)}
    flow = _load_flow(run_dir, flow_config, {k: v for k, v in tensors.items() if not k.startswith(SCORE_FLOW_PREFIX)}, spec.name)
    score_flow = _load_flow(run_dir, score_config, score_tensors, spec.name) if score_config is not None else None
    if score_config is None and score_tensors:
        raise UFlowError(f"{run_dir}: model.safetensors holds a score flow that uflow.json does not describe")
    recorded = config.get("backbone_weights", [])
    if weights is None:
        files = [w["detail"] if w.get("kind") == "file" else None for w in recorded]
        weights = files if any(files) and all(files) else None
    extractor = build_feature_extractor(spec.name, image_size, weights, allow_download, score_flow=score_flow is not None)
    for was, now in zip(recorded, extractor.weight_sources):
        same = (was.get("kind"), was.get("detail") if was.get("kind") != "file" else was.get("sha256")) == (
            now.kind,
            now.detail if now.kind != "file" else now.sha256,
        )
        if not same:
            raise UFlowError(
                f"{run_dir}: trained with backbone weights from {was.get('kind')} {was.get('detail')}, "
                f"but this machine gives {now.kind} {now.detail}; features would differ"
            )
    model = UFlowModel(extractor, flow, calibration, config.get("training", {}), score_flow=score_flow, score_positions=positions)
    return model.to(device)


def _load_positions(
    run_dir: str | os.PathLike, calibration: Calibration, tensors: dict[str, torch.Tensor], parts: int, size: int
) -> PositionStatistics | None:
    """Take the per-position statistics out of ``tensors``; one line if they do not match what the calibration says."""
    found = [tensors.pop(name, None) for name in (POSITION_CENTRES, POSITION_SPREADS)]
    if not calibration.score_per_position:
        if any(t is not None for t in found):
            raise UFlowError(f"{run_dir}: model.safetensors holds per-position score statistics that uflow.json does not use")
        return None
    centres, spreads = found
    if centres is None or spreads is None:
        raise UFlowError(f"{run_dir}: uflow.json standardises the image score per position, but model.safetensors holds no position statistics")
    if centres.shape != (parts, size, size) or spreads.shape != centres.shape:
        raise UFlowError(
            f"{run_dir}: per-position score statistics of shape {tuple(centres.shape)} and {tuple(spreads.shape)} "
            f"do not fit this model ({parts} parts at {size}x{size})"
        )
    return PositionStatistics(centres.float(), spreads.float())
