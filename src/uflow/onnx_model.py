"""Inference from an exported ``.onnx`` file with onnxruntime: no PyTorch needed.

The graph gives scores, anomaly maps and the chi-square maps; the same
calibration and a contrario segmentation as the PyTorch engine turn them
into the same :class:`~uflow.result.Prediction` objects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibration import Calibration, Null, check_options
from .errors import UFlowError
from .images import ErrorHandler, ImageInput, read_inputs
from .result import Prediction
from .segmentation import TestCount

METADATA_KEY = "uflow"


@dataclass
class OnnxModel:
    """A model exported by ``uflow export``, run with onnxruntime. Create it with :meth:`load`."""

    session: Any  # onnxruntime.InferenceSession
    description: dict[str, Any]
    calibration: Calibration
    path: Path

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None) -> OnnxModel:
        """Open an exported model; refuses files that are not uflow exports, naming the file."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise UFlowError("running an .onnx model needs onnxruntime, which uflow depends on; repair the install: pip install uflow-anomaly") from None
        path = Path(path)
        if not path.is_file():
            raise UFlowError(f"{path}: no such file")
        try:
            session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UFlowError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise UFlowError(f"{path}: an ONNX model, but not one exported by uflow (no '{METADATA_KEY}' metadata)")
        description = json.loads(raw)
        exported_by = description.get("uflow_version")
        if exported_by != __version__:
            raise UFlowError(f"{path}: exported by uflow {exported_by}, this is uflow {__version__}; export it again with this version")
        return cls(session, description, Calibration(**description["calibration"]), path)

    @property
    def backbone(self) -> str:
        return self.description["backbone"]

    @property
    def image_size(self) -> int:
        return int(self.description["image_size"])

    @property
    def latent_channels(self) -> list[int]:
        return list(self.description["latent_channels"])

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float | None = None,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
        keep_images: bool = False,
        on_error: ErrorHandler | None = None,
    ) -> list[Prediction]:
        """Score images (paths or arrays); one :class:`Prediction` per image, as :meth:`UFlowModel.predict`."""
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        options = {"batch_size": batch_size, "segmentation": segmentation, "epsilon": epsilon, "test_count": test_count, "null": null}
        return list(self.iter_predict(images, keep_images=keep_images, on_error=on_error, **options))

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int = 16,
        segmentation: bool = True,
        epsilon: float | None = None,
        test_count: TestCount = "per_size",
        null: Null = "calibrated",
        keep_images: bool = False,
        on_error: ErrorHandler | None = None,
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding as images finish; options are checked at once."""
        check_options(epsilon, test_count, null)
        if segmentation:
            self.calibration.log10_threshold(epsilon, test_count, null)  # refuses a threshold the run cannot give
        segment_options = (epsilon, test_count, null) if segmentation else None
        return self._stream(read_inputs(images, on_error=on_error), batch_size, segment_options, keep_images)

    def _stream(
        self, items: Iterable[tuple[np.ndarray, Path | None]], batch_size: int, segment_options: tuple | None, keep_images: bool
    ) -> Iterator[Prediction]:
        # The graph takes one H x W per call; images of equal size share a batch.
        pending: list[tuple[np.ndarray, Path | None]] = []
        for item in items:
            if pending and (len(pending) == batch_size or pending[0][0].shape != item[0].shape):
                yield from self._run(pending, segment_options, keep_images)
                pending = []
            pending.append(item)
        if pending:
            yield from self._run(pending, segment_options, keep_images)

    def _run(self, items: list[tuple[np.ndarray, Path | None]], segment_options: tuple | None, keep_images: bool) -> list[Prediction]:
        batch = np.stack([img for img, _ in items])
        if self.description["onnx"]["input_dtype"] == "uint8":
            # Exact for 8-bit images; deeper images lose their low bits here, as they would in any uint8 pipeline.
            batch = np.round(batch * 255.0).astype(np.uint8)
        outputs = self.session.run(None, {"image": batch})
        scores, maps, stats = outputs[0], outputs[1], outputs[2:]
        segs = None
        if segment_options is not None:
            sizes = [img.shape[:2] for img, _ in items]
            segs = self.calibration.segment(stats, self.latent_channels, sizes, *segment_options, scores)
        images = [img for img, _ in items] if keep_images else None
        return self.calibration.predictions(scores, list(maps), [path for _, path in items], segs, images)
