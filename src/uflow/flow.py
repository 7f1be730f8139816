"""Phase 2: the U-shaped normalizing flow.

One flow stage per scale, coarsest first. A stage's output is split along
channels: one part is that scale's latent, the other is moved up a scale by an
invertible pixel shuffle (channels / 4, height and width x 2, log det 0) and
concatenated with the next finer scale's features. The finest stage's whole
output is its latent.

A flow may also know *where* it is: with ``positional > 0`` every coupling
subnet sees, beside its half of the channels, a fixed 2-D sinusoidal encoding
of the pixel's position (as CFlow-AD conditions its flow). Conditioning the
subnets keeps the step invertible with the same log det, and lets the flow fit
a different density at a busbar than between busbars on aligned parts, or at
the feature maps' borders, whose padding differs from the interior.

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

# How the flow is trained by default, chosen on held-out normal likelihood alone. Per image a
# training step costs about the same at batch 4 as at 16 on a CPU (benchmarks/flow_step.py: within
# a fifth at 256 px on one core), so small batches buy four times the updates: on the demo's grass,
# held-out NLL reached 0.65 at epoch 13 with batch 4 and lr 4e-3 against epoch 31 with batch 16
# and lr 8e-3, and 0.582 at its plateau (epoch 46) against 0.603 (epoch 80).
DEFAULT_LR = 4e-3
DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class FlowConfig:
    """Everything needed to rebuild a :class:`UFlow` (stored in checkpoints)."""

    feature_channels: tuple[int, ...]  # per scale, finest first; each scale is half the previous size
    n_steps: int = 4
    kernel_sizes: tuple[int, ...] = (3, 1)  # cycled over the steps of a stage
    clamp: float = 2.0
    subnet_scale: float = 0.1
    permutation_seed: int = 0
    positional: int = 0  # sinusoid frequencies per axis the subnets are conditioned on (0: position-blind)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FlowConfig":
        data = dict(data)
        for key in ("feature_channels", "kernel_sizes"):
            data[key] = tuple(data[key])
        return cls(**data)


def positional_encoding(height: int, width: int, frequencies: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 4 * frequencies, H, W): sin and cos of k * pi * u for k = 1..frequencies, u in (0, 1) the pixel centre per axis.

    Low frequencies only: the flow should learn smooth changes with position (a busbar, a border),
    not memorise single pixels of a small training set.
    """
    rows = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height
    cols = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width
    k = torch.arange(1, frequencies + 1, device=like.device, dtype=like.dtype) * math.pi
    ry = (k[:, None] * rows[None, :])[:, :, None].expand(frequencies, height, width)
    rx = (k[:, None] * cols[None, :])[:, None, :].expand(frequencies, height, width)
    return torch.cat([ry.sin(), ry.cos(), rx.sin(), rx.cos()])[None]


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

    def __init__(
        self, channels: int, kernel_size: int, clamp: float, subnet_scale: float, generator: torch.Generator, condition_channels: int = 0
    ):
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
            nn.Conv2d(self.split[0] + condition_channels, hidden, kernel_size, padding=padding),
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

    def _log_scale_and_shift(self, x1: torch.Tensor, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if condition is not None:
            x1 = torch.cat([x1, condition.expand(x1.shape[0], -1, -1, -1)], dim=1)
        a = self.subnet(x1) * self.subnet_scale
        a_s, a_t = a[:, : self.split[1]], a[:, self.split[1] :]
        return self.clamp * torch.tanh(a_s), a_t

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.split[0]], x[:, self.split[0] :]
        s, t = self._log_scale_and_shift(x1, condition)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        scale = self._scale()
        y = torch.index_select(y * scale + self.global_offset, 1, self.permutation)  # a plain gather: faster on CPU than y[:, perm]
        log_det = s.sum(dim=(1, 2, 3)) + x.shape[2] * x.shape[3] * torch.log(scale).sum()
        return y, log_det

    def reverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        y = (torch.index_select(y, 1, self.inverse_permutation) - self.global_offset) / self._scale()
        y1, y2 = y[:, : self.split[0]], y[:, self.split[0] :]
        s, t = self._log_scale_and_shift(y1, condition)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class FlowStage(nn.Module):
    """A sequence of coupling steps at one scale, kernel sizes cycling through ``kernel_sizes``."""

    def __init__(self, channels: int, config: FlowConfig, generator: torch.Generator):
        super().__init__()
        self.frequencies = config.positional
        self.steps = nn.ModuleList(
            AffineCouplingStep(
                channels, config.kernel_sizes[i % len(config.kernel_sizes)], config.clamp, config.subnet_scale, generator, 4 * config.positional
            )
            for i in range(config.n_steps)
        )

    def _condition(self, x: torch.Tensor) -> torch.Tensor | None:
        return positional_encoding(x.shape[2], x.shape[3], self.frequencies, x) if self.frequencies else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        condition = self._condition(x)
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step(x, condition)
            log_det = log_det + step_log_det
        return x, log_det

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        condition = self._condition(y)
        for step in reversed(self.steps):
            y = step.reverse(y, condition)
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
