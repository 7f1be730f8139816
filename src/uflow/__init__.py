"""uflow: U-Flow anomaly detection and a contrario segmentation from normal images only.

    import uflow
    model = uflow.fit("mvtec/bottle", out="runs/bottle")
    for p in model.predict(["a.png", "b.png"]):
        print(p.path, p.score, p.label, len(p.regions))
    model = uflow.load("runs/bottle")

Names are imported on first use, so the ONNX inference path
(:mod:`uflow.onnx_model`) runs where PyTorch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BACKBONES": "backbones",
    "DEFAULT_BACKBONE": "backbones",
    "UFlowError": "errors",
    "UFlowModel": "model",
    "load": "model",
    "Prediction": "result",
    "Region": "segmentation",
    "Segmentation": "segmentation",
    "fit": "train",
    "evaluate": "evaluate",
    "OnnxModel": "onnx_model",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'uflow' has no attribute {name!r}")
