"""ONNX export: the exported graph agrees with the PyTorch model on real images; refusals are clear."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import SMALL
from PIL import Image

import uflow
from uflow.errors import UFlowError
from uflow.export import export_onnx
from uflow.onnx_model import OnnxModel


@pytest.fixture(scope="module")
def resnet_model(brick, tmp_path_factory):
    """A second backbone, position-aware: resnet18 with a weights file this test makes (no download here)."""
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    weights = folder / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    return uflow.fit(brick, folder / "run", backbone="resnet18", weights=str(weights), position="on", **SMALL)


@pytest.fixture(scope="module")
def exported_default(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx")


def _real_images(brick):
    """Test images of the texture set, plus a non-square crop and a gray one, so resizing is exercised both ways."""
    paths = sorted((brick / "test").rglob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return images, [images[0][:80, :70], np.asarray(Image.open(paths[-1]).convert("L"))]


@pytest.mark.parametrize("which", ["model", "resnet_model"])
def test_exported_model_agrees_with_pytorch(which, request, brick, exported_default, tmp_path):
    model = request.getfixturevalue(which)
    path = exported_default if which == "model" else export_onnx(model, tmp_path / "m.onnx")
    exported = OnnxModel.load(path)
    same_size, odd = _real_images(brick)
    for images in (same_size, odd[:1], odd[1:]):
        ours = exported.predict(images, batch_size=4)
        ref = model.predict(images, batch_size=4)
        for a, b in zip(ours, ref):
            assert a.anomaly_map.shape == b.anomaly_map.shape
            assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4
            # The score is standardised by the spread of held-out scores (small on this tiny set): 1e-4 in raw score units.
            assert abs(a.score - b.score) < 1e-4 / min(model.calibration.score_spreads)
            assert np.array_equal(a.mask, b.mask)
            assert a.label == b.label and len(a.regions) == len(b.regions)


def test_metadata_and_dynamic_axes(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", input_dtype="float32")
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["uflow"])
    assert meta["backbone"] == model.backbone and meta["image_size"] == model.image_size
    assert meta["uflow_version"] == uflow.__version__
    assert meta["calibration"]["score_threshold"] == model.calibration.score_threshold
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[3] == 3 and all(isinstance(d, str) for d in dims[:3]), dims
    exported = OnnxModel.load(path)
    image = np.random.default_rng(0).random((50, 61, 3)).astype(np.float32)
    out = exported.session.run(None, {"image": np.stack([image] * 3)})
    assert out[0].shape == (3,) and out[1].shape == (3, 50, 61)


def test_export_refuses_clearly(model, tmp_path):
    with pytest.raises(UFlowError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.bin")
    with pytest.raises(UFlowError, match="input dtype"):
        export_onnx(model, tmp_path / "m.onnx", input_dtype="float16")
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_loading_refuses_foreign_and_stale_files(exported_default, tmp_path):
    foreign = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(UFlowError, match="not one exported by uflow"):
        OnnxModel.load(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UFlowError, match="not a readable ONNX model"):
        OnnxModel.load(tmp_path / "junk.onnx")
    proto = onnx.load(str(exported_default))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["uflow"])
    meta["uflow_version"] = "0.0.1"
    onnx.helper.set_model_props(proto, {"uflow": json.dumps(meta)})
    onnx.save(proto, tmp_path / "old.onnx")
    with pytest.raises(UFlowError, match="exported by uflow 0.0.1"):
        OnnxModel.load(tmp_path / "old.onnx")


# Run in a fresh interpreter where importing PyTorch fails, as on an inference-only install.
_WITHOUT_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "safetensors"):
            raise ImportError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, Block())
from uflow.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_cli_export_then_predict_without_pytorch_matches_the_run(run_dir, brick, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    onnx_path = tmp_path / "model.onnx"
    res = subprocess.run([sys.executable, "-m", "uflow", "export", run_dir, "--out", onnx_path], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert onnx_path.is_file() and "exported" in res.stdout

    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, "predict", onnx_path, brick / "test", "--out", tmp_path / "onnx", "--quiet"],
        capture_output=True, text=True, env=env,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "uflow", "predict", run_dir, brick / "test", "--out", tmp_path / "torch", "--quiet"],
        capture_output=True, text=True, env=env,
    )
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "onnx" / "results.json").read_text())["images"]
    b = json.loads((tmp_path / "torch" / "results.json").read_text())["images"]
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["score"] - y["score"]) < 1e-4 and x["label"] == y["label"]
        mask_x = np.asarray(Image.open(tmp_path / "onnx" / x["outputs"]["mask"]))
        mask_y = np.asarray(Image.open(tmp_path / "torch" / y["outputs"]["mask"]))
        assert np.array_equal(mask_x, mask_y)

    res = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "fit", brick, "--out", tmp_path / "r"], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and res.stderr.strip().startswith("uflow: error:") and "torch" in res.stderr
