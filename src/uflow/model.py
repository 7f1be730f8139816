"""The engine: a frozen backbone, a trained flow, and prediction on images.

``UFlowModel`` ties the phases together in the order data flows through them:
preprocess -> features -> flow -> likelihood map and score -> a contrario
segmentation. It is created by :func:`uflow.fit` or :func:`uflow.load`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .anomaly_map import chi2_statistics, likelihood_map
from .backbones import FeatureExtractor, WeightsArg, build_feature_extractor, get_spec
from .checkpoint import read_run, save_run
from .errors import UFlowError
from .flow import FlowConfig, UFlow
from .images import read_image
from .result import Prediction
from .segmentation import TEST_COUNTS, TestCount, segment

ImageInput = str | os.PathLike | np.ndarray
Null = Literal["calibrated", "theoretical"]
NULLS: tuple[str, ...] = ("calibrated", "theoretical")


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


def as_float_image(image: ImageInput, *, square: bool = False) -> tuple[np.ndarray, Path | None]:
    """Read a path or accept an array; returns float32 RGB (H, W, 3) in [0, 1] and the path if any."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise UFlowError(f"image array has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        else:
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise UFlowError("float image arrays must be finite and in [0, 1]")
        path = None
    else:
        path = Path(image)
        arr = read_image(path)
    if square and arr.shape[0] != arr.shape[1]:
        where = path if path is not None else "image array"
        raise UFlowError(f"{where}: is {arr.shape[1]}x{arr.shape[0]}; the mcait backbone needs square images (crop them first)")
    return arr, path


@dataclass
class Calibration:
    """What held-out normal images said at training time (no anomalies involved)."""

    score_threshold: float  # largest validation image score: above it, "anomalous" without segmentation
    display_low: float  # median validation map value, the bottom of the overlay colour scale
    display_high: float
    # Per scale, S = sum_c z^2 on held-out normal images matched by a * chi2(nu) in mean and
    # variance. A trained flow's latents are never exactly white: their per-pixel
    # spread is wider than chi2(C) even on training images, and the exact chi2(C)
    # null then flags normal texture. None means the theoretical chi2(C).
    chi2_scale: list[float] | None = None
    chi2_dof: list[float] | None = None
    # Per scale, pixels per independent sample of S on held-out normal images
    # (see segmentation.correlation_area); None means independent pixels.
    pixels_per_sample: list[float] | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class UFlowModel:
    """A trained U-Flow model. Use :func:`uflow.fit` or :func:`uflow.load` to get one."""

    extractor: FeatureExtractor
    flow: UFlow
    calibration: Calibration
    training: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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
        return self

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def latents(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> per-scale latents, finest first."""
        self.flow.eval()
        z, _ = self.flow(self.extractor(batch.to(self.device)))
        return z

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float = 1.0,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
    ) -> list[Prediction]:
        """Score images (paths or arrays); one :class:`Prediction` per image, in order."""
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        return list(
            self.iter_predict(images, batch_size=batch_size, segmentation=segmentation, epsilon=epsilon, test_count=test_count, null=null)
        )

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float = 1.0,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
    ) -> Iterator[Prediction]:
        """Like :meth:`predict` but yields as batches finish, so outputs can be written while the rest runs.

        Options are checked at once, not when the first result is asked for.
        """
        if epsilon <= 0:
            raise UFlowError(f"epsilon must be positive, got {epsilon}")
        if test_count not in TEST_COUNTS:
            raise UFlowError(f"test count must be one of {', '.join(TEST_COUNTS)}, got {test_count!r}")
        if null not in NULLS:
            raise UFlowError(f"null must be one of {', '.join(NULLS)}, got {null!r}")
        return self._stream(images, batch_size, segmentation, epsilon, test_count, null)

    def _stream(self, images, batch_size, segmentation, epsilon, test_count, null) -> Iterator[Prediction]:
        square = self.extractor.spec.fixed_image_size
        pending: list[tuple[np.ndarray, Path | None]] = []
        for image in images:
            pending.append(as_float_image(image, square=square))
            if len(pending) == batch_size:
                yield from self._predict_batch(pending, segmentation, epsilon, test_count, null)
                pending = []
        if pending:
            yield from self._predict_batch(pending, segmentation, epsilon, test_count, null)

    def _predict_batch(
        self, items: list[tuple[np.ndarray, Path | None]], segmentation: bool, epsilon: float, test_count: TestCount, null: Null
    ) -> list[Prediction]:
        batch = torch.stack([to_model_input(img, self.image_size) for img, _ in items])
        latents = self.latents(batch)
        sizes = [img.shape[:2] for img, _ in items]
        maps = []
        for i, size in enumerate(sizes):
            maps.append(likelihood_map([z[i : i + 1] for z in latents], size)[0].cpu().numpy())
        scores = [float(m.max()) for m in maps]
        segs = None
        if segmentation:
            stats = [s.cpu().numpy() for s in chi2_statistics(latents)]
            dof: Sequence[float] = self.flow.latent_channels
            pixels_per_sample = None
            if null == "calibrated" and self.calibration.chi2_scale is not None:
                stats = [s / a for s, a in zip(stats, self.calibration.chi2_scale)]
                dof = self.calibration.chi2_dof
                pixels_per_sample = self.calibration.pixels_per_sample
            segs = segment(stats, dof, sizes, epsilon=epsilon, test_count=test_count, pixels_per_sample=pixels_per_sample)
        predictions = []
        for i, (_, path) in enumerate(items):
            if segs is not None:
                seg = segs[i]
                label = "anomalous" if seg.regions else "normal"
                predictions.append(Prediction(scores[i], maps[i], label, path, seg.mask, seg.log10_nfa, seg.regions))
            else:
                label = "anomalous" if scores[i] > self.calibration.score_threshold else "normal"
                predictions.append(Prediction(scores[i], maps[i], label, path))
        return predictions

    # ------------------------------------------------------------------ persistence

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this model, as stored next to the weights."""
        return {
            "uflow_version": __version__,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "backbone_weights": [vars(s) for s in self.extractor.weight_sources],
            "flow": self.flow.config.to_dict(),
            "latent_channels": list(self.flow.latent_channels),
            "calibration": self.calibration.to_dict(),
            "training": self.training,
        }

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write the model into ``run_dir`` (created if needed) atomically."""
        save_run(Path(run_dir), self.flow.state_dict(), self.describe())
        return Path(run_dir)


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
        image_size = int(config["image_size"])
        calibration = Calibration(**config["calibration"])
    except UFlowError as exc:
        raise UFlowError(f"{run_dir}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UFlowError(f"{run_dir}: incomplete model description ({exc!r})") from None
    expected = tuple(c for c, _, _ in spec.feature_shapes(image_size))
    if flow_config.feature_channels != expected:
        raise UFlowError(
            f"{run_dir}: flow was built for feature channels {list(flow_config.feature_channels)}, "
            f"but backbone {spec.name} gives {list(expected)}"
        )
    flow = UFlow(flow_config)
    own = flow.state_dict()
    bad = [k for k in own if k not in tensors or tensors[k].shape != own[k].shape]
    if bad or set(tensors) - set(own):
        name = bad[0] if bad else sorted(set(tensors) - set(own))[0]
        raise UFlowError(f"{run_dir}: flow weights do not fit a {spec.name} model (first mismatch: {name})")
    flow.load_state_dict(tensors)
    recorded = config.get("backbone_weights", [])
    if weights is None:
        files = [w["detail"] if w.get("kind") == "file" else None for w in recorded]
        weights = files if any(files) and all(files) else None
    extractor = build_feature_extractor(spec.name, image_size, weights, allow_download)
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
    model = UFlowModel(extractor, flow, calibration, config.get("training", {}))
    return model.to(device)
