"""ONNX export: one graph from a raw image batch to the score, the anomaly map and the chi-square maps.

Graph input ``image``: (B, H, W, 3) RGB, channels last as decoders produce
it, ``uint8`` in 0..255 (default) or ``float32`` in [0, 1] (``input_dtype``).
Batch, height and width are dynamic. Inside the graph: scaling to [0, 1],
resizing to the model's input size (bilinear, antialiased, as in PyTorch),
the backbone's normalisation, the backbone, the flows, the likelihood map on
the input grid (the score is taken there, with the score flow's), smoothed and resized to H x W.

Outputs: ``score`` (B,), ``anomaly_map`` (B, H, W) in [0, 1], and per scale
``chi2_<l>`` (B, H_l, W_l), the sum over latent channels of z^2 that the a
contrario segmentation needs (finest scale first). The segmentation itself is
a tree algorithm with data-dependent shapes that ONNX cannot express; it runs
on the CPU after the graph, identically for both engines.

The model description (backbone, image size, version, latent channels,
calibration with its thresholds) goes into the ONNX metadata as JSON under
the key ``uflow``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_map import chi2_statistics, display_map
from .errors import UFlowError
from .model import UFlowModel, score_map_latents

METADATA_KEY = "uflow"
INPUT_DTYPES = ("uint8", "float32")
OPSET = 18  # Resize with antialias needs opset 18


class ExportGraph(nn.Module):
    """The inference computation of a :class:`UFlowModel`, raw image batch in, maps out."""

    def __init__(self, model: UFlowModel, input_dtype: str):
        super().__init__()
        self.extractor = model.extractor
        self.flow = model.flow
        self.score_flow = model.score_flow
        self.calibration = model.calibration
        self.positions = model.score_positions  # captured as constants of the graph
        self.size = model.image_size
        self.from_uint8 = input_dtype == "uint8"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = image.shape[1], image.shape[2]
        x = image.permute(0, 3, 1, 2).float()
        if self.from_uint8:
            x = x / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        score, flow_map, latents = score_map_latents(
            self.extractor(x), self.extractor.spec, self.flow, self.score_flow, self.calibration, self.size, self.positions
        )
        return (score, display_map(flow_map, (height, width)), *chi2_statistics(latents))


def output_names(n_scales: int) -> list[str]:
    return ["score", "anomaly_map", *[f"chi2_{level}" for level in range(n_scales)]]


def export_onnx(model: UFlowModel, out: str | os.PathLike, input_dtype: str = "uint8", example_size: int | None = None) -> Path:
    """Export ``model`` to a single ``.onnx`` file, written atomically; returns its path."""
    try:
        import onnx
    except ImportError:
        raise UFlowError("ONNX export needs the onnx and onnxscript packages, which uflow depends on; repair the install: pip install uflow-anomaly") from None
    if input_dtype not in INPUT_DTYPES:
        raise UFlowError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if model.extractor.spec.fixed_image_size:
        raise UFlowError(
            f"ONNX export of the {model.backbone} backbone is not supported: its transformer blocks run at a fixed "
            "token grid the exporter cannot make dynamic; use a CNN backbone (tf_efficientnet_lite0/1/2, resnet18, wide_resnet50_2)"
        )
    out = Path(out)
    if out.suffix != ".onnx":
        raise UFlowError(f"{out}: the exported file must end in .onnx")
    model = model.to("cpu")
    graph = ExportGraph(model, input_dtype).eval()
    side = example_size or model.image_size + 17  # not the model size, so the resize is traced as a real resize
    example = torch.zeros((2, side, side + 5, 3), dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    batch, height, width = torch.export.Dim("batch", min=1), torch.export.Dim("height", min=8), torch.export.Dim("width", min=8)
    names = output_names(len(model.flow.latent_channels))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamic_shapes={"image": {0: batch, 1: height, 2: width}},
                input_names=["image"],
                output_names=names,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
        proto = program.model_proto
        description = model.describe()
        description.pop("training", None)  # history and file lists: not needed to run the model
        description["onnx"] = {"input": "image", "input_layout": "BHWC RGB", "input_dtype": input_dtype, "outputs": names}
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(description)})
        onnx.save_model(proto, tmp)
        os.replace(tmp, out)
    except UFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; say so in one line
        raise UFlowError(f"ONNX export of {model.backbone} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
