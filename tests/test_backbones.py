
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from uflow.backbones import BACKBONES, FeatureExtractor, build_feature_extractor, get_spec
from uflow.errors import UFlowError


def _imagenet_class(extractor_models, image: np.ndarray) -> int:
    """Classify with the full timm classifier carrying the same (shipped) weights as the extractor."""
    import timm

    from uflow.backbones import _fit_state_dict, _package_weights

    full = timm.create_model("tf_efficientnet_lite0").eval()
    path, _ = _package_weights(get_spec("tf_efficientnet_lite0").weight_packages[0])
    full.load_state_dict(_fit_state_dict(torch.load(path, weights_only=True), full, "tf_efficientnet_lite0", "test"))
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        return int(full((x - 0.5) / 0.5).argmax())


def test_shipped_lite0_weights_are_real_imagenet_weights():
    assert _imagenet_class(None, data.chelsea()) == 285  # Egyptian cat
    assert _imagenet_class(None, data.coffee()) == 967  # espresso


def test_default_extractor_uses_the_shipped_package_and_is_frozen():
    ext = build_feature_extractor("tf_efficientnet_lite0", 64, allow_download=False)
    assert ext.weight_sources[0].kind == "package"
    assert not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training, "the backbone must stay in eval mode"
    feats = ext(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    # parameter-free layer norm over (C, H, W) per image
    for f in feats:
        assert f.mean(dim=(1, 2, 3)).abs().max() < 1e-4


def _plain_lite0_features():
    """timm's own Lite0 feature model with the shipped weights, neither cut nor folded."""
    import timm

    from uflow.backbones import _fit_state_dict, _package_weights

    plain = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    path, _ = _package_weights(get_spec("tf_efficientnet_lite0").weight_packages[0])
    plain.load_state_dict(_fit_state_dict(torch.load(path, weights_only=True), plain, "tf_efficientnet_lite0", "test"))
    return plain


def test_backbone_is_cut_after_its_last_tap():
    spec = get_spec("tf_efficientnet_lite0")
    assert len(FeatureExtractor(spec, 64, allow_download=False).models[0].blocks) == 7


def test_a_model_without_score_flow_taps_only_what_the_map_flow_reads():
    full = build_feature_extractor("tf_efficientnet_lite0", 64, allow_download=False)
    map_only = build_feature_extractor("tf_efficientnet_lite0", 64, allow_download=False, score_flow=False)
    assert map_only.spec.strides == (4, 8, 16) and map_only.spec.score_scales == ()
    assert len(map_only.models[0].blocks) == 5, "the two stride-32 stages are not run"
    x = torch.rand(2, 3, 64, 64)
    a, b = full(x), map_only(x)
    assert len(a) == 4 and len(b) == 3
    for i in map_only.spec.map_scales:
        assert torch.equal(a[i], b[i])


def test_folded_backbone_gives_timms_features():
    ext = build_feature_extractor("tf_efficientnet_lite0", 128, allow_download=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ext.modules()), "every batch norm is folded"
    x = torch.from_numpy(data.coffee()[:256, :256].copy()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(128, 128), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = [F.layer_norm(m, m.shape[1:]) for m in _plain_lite0_features()((x - 0.5) / 0.5)]
    for got, want in zip(ext(x), expected):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4


def test_weights_file_the_user_names_gives_the_same_features(tmp_path):
    ext = build_feature_extractor("tf_efficientnet_lite0", 64, allow_download=False)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in _plain_lite0_features().state_dict().items()}, str(path))
    from_file = build_feature_extractor("tf_efficientnet_lite0", 64, weights=path, allow_download=False)
    assert from_file.weight_sources[0].kind == "file" and from_file.weight_sources[0].sha256
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(ext(x), from_file(x)):
        assert torch.equal(a, b)


def test_no_weights_available_is_a_one_line_error_naming_what_was_tried():
    with pytest.raises(UFlowError) as err:
        build_feature_extractor("resnet18", 64, allow_download=False)
    msg = str(err.value)
    assert "resnet18" in msg and "timm download" in msg and "--weights" in msg and "\n" not in msg


def test_weights_of_another_architecture_are_refused(tmp_path):
    import timm

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(UFlowError, match="do not fit tf_efficientnet_lite0"):
        build_feature_extractor("tf_efficientnet_lite0", 64, weights=path, allow_download=False)


def test_unreadable_weights_file_is_refused(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UFlowError, match="cannot read weights"):
        build_feature_extractor("tf_efficientnet_lite0", 64, weights=path, allow_download=False)
    with pytest.raises(UFlowError, match="not found"):
        build_feature_extractor("tf_efficientnet_lite0", 64, weights=tmp_path / "missing.pth", allow_download=False)


def test_mcait_needs_two_weight_files_and_fixed_size():
    with pytest.raises(UFlowError, match="2 weight file"):
        build_feature_extractor("mcait", weights="only_one.pth", allow_download=False)
    with pytest.raises(UFlowError, match="448 px only"):
        build_feature_extractor("mcait", 224, allow_download=False)


def test_every_backbone_declares_consistent_scales():
    for spec in BACKBONES.values():
        assert len(spec.channels) == len(spec.strides) >= 2
        assert all(b == 2 * a for a, b in zip(spec.strides, spec.strides[1:]))
        for scales in (spec.map_scales, spec.score_scales):  # each flow models consecutive scales that the backbone taps
            assert list(scales) == list(range(scales[0], scales[0] + len(scales))) and scales[-1] < len(spec.channels) if scales else True
    assert get_spec("tf_efficientnet_lite0").score_channels == (40, 112, 320)
    with pytest.raises(UFlowError, match="unknown backbone"):
        get_spec("vgg")
    with pytest.raises(UFlowError, match="multiple of 32"):
        build_feature_extractor("tf_efficientnet_lite0", 100, allow_download=False)
