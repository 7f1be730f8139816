import math

import pytest
import torch
from torch.autograd.functional import jacobian

from uflow.flow import AffineCouplingStep, FlowConfig, UFlow, negative_log_likelihood, positional_encoding, upsampled_channels


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value so the tests exercise non-trivial maps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _features(config: FlowConfig, batch: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size >> i, size >> i, generator=gen, dtype=torch.float64) for i, c in enumerate(config.feature_channels)]


@pytest.mark.parametrize("channels,kernel", [(5, 3), (6, 1), (2, 3)])
def test_coupling_step_round_trip_and_log_det(channels, kernel):
    step = AffineCouplingStep(channels, kernel, 2.0, 0.1, torch.Generator().manual_seed(0)).double()
    _randomise(step)
    x = torch.randn(1, channels, 3, 3, dtype=torch.float64)
    y, log_det = step(x)
    assert torch.allclose(step.reverse(y), x, atol=1e-10)
    jac = jacobian(lambda t: step(t.view_as(x))[0].flatten(), x.flatten())
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)


def test_global_scale_starts_at_one():
    step = AffineCouplingStep(4, 3, 2.0, 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose(step._scale(), torch.ones(1, 4, 1, 1), atol=1e-6)


@pytest.mark.parametrize("channels", [(24, 40, 112), (6, 5, 9), (768, 384)])
def test_u_flow_latent_shapes_follow_the_split_rule(channels):
    config = FlowConfig(feature_channels=channels, n_steps=1)
    flow = UFlow(config)
    carried = 0
    for level in reversed(range(len(channels))):
        stage = channels[level] + carried
        up = upsampled_channels(stage) if level else 0
        assert flow.latent_channels[level] == stage - up
        carried = up // 4
    assert sum(flow.latent_channels[l] * 4 ** (len(channels) - 1 - l) for l in range(len(channels))) == sum(
        c * 4 ** (len(channels) - 1 - l) for l, c in enumerate(channels)
    ), "the U-shape must preserve the number of dimensions"


def test_mcait_latents_match_the_paper():
    flow = UFlow(FlowConfig(feature_channels=(768, 384)))
    assert flow.latent_channels == [816, 192]


@pytest.mark.parametrize("positional", [0, 2])
def test_u_flow_round_trip(positional):
    config = FlowConfig(feature_channels=(6, 5, 9), n_steps=4, positional=positional)
    flow = UFlow(config).double()
    _randomise(flow)
    feats = _features(config, batch=2, size=8)
    latents, _ = flow(feats)
    back = flow.reverse(latents)
    for a, b in zip(back, feats):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("positional", [0, 1])
def test_u_flow_log_det_matches_autograd_jacobian(positional):
    config = FlowConfig(feature_channels=(3, 4), n_steps=2, positional=positional)
    flow = UFlow(config).double()
    _randomise(flow, seed=3)
    feats = _features(config, batch=1, size=4)
    sizes = [f.numel() for f in feats]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        z, _ = flow([p.view_as(t) for p, t in zip(parts, feats)])
        return torch.cat([t.flatten() for t in z])

    flat = torch.cat([t.flatten() for t in feats])
    jac = jacobian(f, flat)
    assert jac.shape[0] == jac.shape[1], "the flow must preserve dimension"
    _, log_det = flow(feats)
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-7)


def test_nll_is_per_sample_sum_minus_log_det():
    z = [torch.ones(2, 3, 2, 2), torch.full((2, 1, 1, 1), 2.0)]
    log_det = torch.tensor([1.0, -1.0])
    nll = negative_log_likelihood(z, log_det)
    expected_quadratic = 0.5 * (12 * 1.0 + 4.0)
    assert nll.tolist() == pytest.approx([expected_quadratic - 1.0, expected_quadratic + 1.0])
    assert not math.isclose(nll.mean().item(), nll.sum().item())


def test_positional_encoding_tells_every_pixel_apart_and_is_smooth():
    code = positional_encoding(6, 10, 2, torch.zeros(1, dtype=torch.float64))
    assert code.shape == (1, 8, 6, 10)
    pixels = code[0].flatten(1).T
    assert torch.cdist(pixels, pixels).add(torch.eye(60, dtype=torch.float64)).min() > 0.1, "two pixels share a code"
    # Neighbours differ by at most the largest frequency times one pixel's step: smooth in position.
    assert (code[..., 1:] - code[..., :-1]).abs().max() <= 2 * math.pi / 10 + 1e-12


def test_a_positional_flow_sees_where_it_is():
    """The same feature vector at two positions gets two different latents only when the flow is conditioned on position."""
    for positional, differs in ((0, False), (2, True)):
        flow = UFlow(FlowConfig(feature_channels=(4,), n_steps=2, kernel_sizes=(1,), positional=positional)).double()
        _randomise(flow)
        feats = [torch.ones(1, 4, 5, 5, dtype=torch.float64)]
        z = flow(feats)[0][0]
        assert bool((z[..., 0, 0] - z[..., 4, 4]).abs().max() > 1e-6) == differs
