"""uflow: U-Flow anomaly detection and a contrario segmentation from normal images only.

    import uflow
    model = uflow.fit("mvtec/bottle", out="runs/bottle")
    for p in model.predict(["a.png", "b.png"]):
        print(p.path, p.score, p.label, len(p.regions))
    model = uflow.load("runs/bottle")
"""

__version__ = "0.1.0"

from .backbones import BACKBONES, DEFAULT_BACKBONE  # noqa: E402
from .errors import UFlowError  # noqa: E402
from .model import UFlowModel, load  # noqa: E402
from .result import Prediction  # noqa: E402
from .segmentation import Region, Segmentation  # noqa: E402
from .train import fit  # noqa: E402

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "Prediction",
    "Region",
    "Segmentation",
    "UFlowError",
    "UFlowModel",
    "fit",
    "load",
    "__version__",
]
