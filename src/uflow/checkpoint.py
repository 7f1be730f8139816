"""Run folders: flow weights in safetensors plus a JSON file that rebuilds everything else.

Both files are written atomically (temporary file, then rename), the JSON
last; it records the SHA-256 of the weights file so a folder whose two files
do not belong together is refused instead of silently mixed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UFlowError
from .files import atomic_write_text, file_sha256

# 2: the score flow (its tensors prefixed "score_flow."), Lite backbones tap stride 32; 3: per-position score
# statistics beside the weights; 4: the image score's parts may be averaged (calibration.score_combination).
# Older formats still load (they score as they did); an older uflow refuses a newer format rather than
# scoring it differently.
CHECKPOINT_FORMAT = 4
READABLE_FORMATS = (2, 3, 4)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "uflow.json"


def save_run(run_dir: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write ``state_dict`` and ``config`` into ``run_dir`` atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        digest = file_sha256(Path(tmp))
        os.replace(tmp, run_dir / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    config = dict(config, format=CHECKPOINT_FORMAT, weights_sha256=digest)
    atomic_write_text(run_dir / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=False) + "\n")


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a run folder; every problem is a one-line :class:`UFlowError`."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UFlowError(f"{run_dir}: no such run folder")
    config_path = run_dir / CONFIG_NAME if run_dir.is_dir() else run_dir
    if not config_path.is_file() or config_path.name != CONFIG_NAME:
        raise UFlowError(f"{run_dir}: not a uflow model (no {CONFIG_NAME}; train one with 'uflow fit')")
    run_dir = config_path.parent
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UFlowError(f"{config_path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(config, dict) or "format" not in config:
        raise UFlowError(f"{config_path}: not a uflow model description")
    if config["format"] not in READABLE_FORMATS:
        raise UFlowError(
            f"{run_dir}: checkpoint format {config['format']} (written by uflow {config.get('uflow_version', '?')}) "
            f"cannot be read by this uflow, which reads formats {', '.join(map(str, READABLE_FORMATS))}; retrain or use the matching version"
        )
    weights_path = run_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise UFlowError(f"{run_dir}: {WEIGHTS_NAME} is missing")
    if file_sha256(weights_path) != config.get("weights_sha256"):
        raise UFlowError(f"{weights_path}: does not match {CONFIG_NAME} (checksum differs); the run folder is corrupt or mixed")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind
        raise UFlowError(f"{weights_path}: cannot read weights ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return config, tensors
