"""Phase 2: the U-shaped normalizing flow.

One flow stage per scale, coarsest first. A stage's output is split along
channels: one part is that scale's latent, the other is moved up a scale by an
invertible pixel shuffle (channels / 4, height and width x 2, log det 0) and
concatenated with the next finer scale's features. The finest stage's whole
output is its latent.

The coupling step is written here rather than taken from FrEIA: FrEIA's
all-in-one block builds its permutation as a convolution with a fixed matrix
and its reverse pass through Python-side state that does not export to ONNX;
this one does the same arithmetic (affine coupling with soft clamping, learned
global affine, fixed channel permutation) with plain tensor ops that export,
and runs in both directions so it can be tested by round trip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FlowConfig:
    """Everything needed to rebuild a :class:`UFlow` (stored in checkpoints)."""

    feature_channels: tuple[int, ...]  # per scale, finest first; each scale is half the previous size
    n_steps: int = 4
    kernel_sizes: tuple[int, ...] = (3, 1)  # cycled over the steps of a stage
    clamp: float = 2.0
    subnet_scale: float = 0.1
    permutation_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FlowConfig":
        data = dict(data)
        for key in ("feature_channels", "kernel_sizes"):
            data[key] = tuple(data[key])
        return cls(**data)


def upsampled_channels(stage_channels: int) -> int:
    """How many of a stage's output channels go up a scale: about half, a multiple of 4 for the pixel shuffle."""
    return 4 * (stage_channels // 8)


class AffineCouplingStep(nn.Module):
    """Affine coupling with soft clamping, a learned global affine and a fixed channel permutation.

    x = [x1, x2] (ceil/floor split); a = 0.1 * subnet(x1); s = clamp * tanh(a_s);
    y2 = x2 * exp(s) + a_t; then y = permute(scale * [x1, y2] + offset) with
    scale = 0.1 * softplus_{beta=0.5}(g), g initialised so that scale = 1.
    log det = sum(s) + H * W * sum(log scale).
    """

    def __init__(self, channels: int, kernel_size: int, clamp: float, subnet_scale: float, generator: torch.Generator):
        super().__init__()
        if channels < 2:
            raise ValueError("a coupling step needs at least 2 channels")
        self.channels = channels
        self.split = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.subnet_scale = subnet_scale
        hidden = self.split[0]
        padding = kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.split[0], hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * self.split[1], kernel_size, padding=padding),
        )
        # softplus_{0.5}(g) = 2 log(1 + e^{g/2}) = 10  <=>  g = 2 log(e^5 - 1): the global scale starts at 1.
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        permutation = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _log_scale_and_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.subnet(x1) * self.subnet_scale
        a_s, a_t = a[:, : self.split[1]], a[:, self.split[1] :]
        return self.clamp * torch.tanh(a_s), a_t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.split[0]], x[:, self.split[0] :]
        s, t = self._log_scale_and_shift(x1)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        scale = self._scale()
        y = (y * scale + self.global_offset)[:, self.permutation]
        log_det = s.sum(dim=(1, 2, 3)) + x.shape[2] * x.shape[3] * torch.log(scale).sum()
        return y, log_det

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y = (y[:, self.inverse_permutation] - self.global_offset) / self._scale()
        y1, y2 = y[:, : self.split[0]], y[:, self.split[0] :]
        s, t = self._log_scale_and_shift(y1)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class FlowStage(nn.Module):
    """A sequence of coupling steps at one scale, kernel sizes cycling through ``kernel_sizes``."""

    def __init__(self, channels: int, config: FlowConfig, generator: torch.Generator):
        super().__init__()
        self.steps = nn.ModuleList(
            AffineCouplingStep(channels, config.kernel_sizes[i % len(config.kernel_sizes)], config.clamp, config.subnet_scale, generator)
            for i in range(config.n_steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step(x)
            log_det = log_det + step_log_det
        return x, log_det

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            y = step.reverse(y)
        return y


class UFlow(nn.Module):
    """U-shaped flow: per-scale features (finest first) <-> per-scale latents (finest first)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.permutation_seed)
        n = len(config.feature_channels)
        stage_channels = [0] * n
        self.latent_channels = [0] * n
        carried = 0
        for level in reversed(range(n)):  # coarsest first, as data flows
            stage_channels[level] = config.feature_channels[level] + carried
            up = upsampled_channels(stage_channels[level]) if level > 0 else 0
            self.latent_channels[level] = stage_channels[level] - up
            carried = up // 4
        self.stage_channels = stage_channels
        stages = {level: FlowStage(stage_channels[level], config, generator) for level in reversed(range(n))}
        self.stages = nn.ModuleList(stages[level] for level in range(n))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features (finest first) -> latents (finest first) and log |det J| per sample."""
        n = len(self.stages)
        latents: list[torch.Tensor] = [features[0]] * n
        log_det = features[0].new_zeros(features[0].shape[0])
        carry: torch.Tensor | None = None
        for level in reversed(range(n)):
            x = features[level] if carry is None else torch.cat([features[level], carry], dim=1)
            z, stage_log_det = self.stages[level](x)
            log_det = log_det + stage_log_det
            keep = self.latent_channels[level]
            latents[level] = z[:, :keep]
            carry = F.pixel_shuffle(z[:, keep:], 2) if keep < z.shape[1] else None
        return latents, log_det

    def reverse(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Latents (finest first) -> features (finest first): the exact inverse of :meth:`forward`."""
        n = len(self.stages)
        features: list[torch.Tensor] = [latents[0]] * n
        carry: torch.Tensor | None = None
        for level in range(n):
            z = latents[level] if carry is None else torch.cat([latents[level], carry], dim=1)
            x = self.stages[level].reverse(z)
            own = self.config.feature_channels[level]
            features[level] = x[:, :own]
            carry = F.pixel_unshuffle(x[:, own:], 2) if x.shape[1] > own else None
        return features


def negative_log_likelihood(latents: list[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
    """Per-sample -log p(x) up to the constant: sum over scales and elements of z^2 / 2, minus log det."""
    quadratic = sum(0.5 * z.pow(2).flatten(1).sum(dim=1) for z in latents)
    return quadratic - log_det
