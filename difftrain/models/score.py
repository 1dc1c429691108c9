"""The score network of the Kolmogorov experiment: a periodic U-Net conditioned on the noise level.

Input: `window` consecutive velocity states flattened to (B, window * 2, H, W), plus a fixed
forcing channel sin(k y) appended inside the network (the flow is forced as a function of y, so giving
the network the forcing pattern saves it from learning where the bands are). Every
convolution pads circularly because the domain is periodic.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"SiLU": nn.SiLU, "ReLU": nn.ReLU, "GELU": nn.GELU, "ELU": nn.ELU, "Tanh": nn.Tanh}


def periodic_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, padding_mode="circular")


class NoiseEmbedding(nn.Module):
    """t in [0, 1] (B,) -> (B, features): sin/cos features at geometric frequencies, then an MLP."""

    def __init__(self, features: int, activation: type[nn.Module]):
        super().__init__()
        half = features // 2
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(1000.0), half)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, features), activation(), nn.Linear(features, features))

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.frequencies[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class ResidualBlock(nn.Module):
    """Pre-norm residual block; the noise embedding shifts the features between the two convs."""

    def __init__(self, channels: int, embedding: int, kernel_size: int, activation: type[nn.Module]):
        super().__init__()
        self.norm_in = nn.GroupNorm(1, channels)
        self.conv_in = periodic_conv(channels, channels, kernel_size)
        self.shift = nn.Linear(embedding, channels)
        self.norm_out = nn.GroupNorm(1, channels)
        self.conv_out = periodic_conv(channels, channels, kernel_size)
        self.activation = activation()
        # Starting each block as the identity keeps the deep U-Net stable in its first steps.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_in(self.activation(self.norm_in(x)))
        h = h + self.shift(emb)[:, :, None, None]
        h = self.conv_out(self.activation(self.norm_out(h)))
        return x + h


class ScoreUNet(nn.Module):
    """Epsilon-predicting U-Net: (x (B, window*2, H, W), t (B,)) -> eps (B, window*2, H, W).

    H and W must be divisible by 2 ** (len(hidden_channels) - 1).
    """

    # FSDP's unit of sharding under a TRANSFORMER_BASED_WRAP accelerate config (accelerate reads this
    # transformers convention): one block's weights are gathered at a time.
    _no_split_modules = ["ResidualBlock"]

    def __init__(self, window: int, embedding: int, hidden_channels: Sequence[int],
                 hidden_blocks: Sequence[int], kernel_size: int = 3, activation: str = "SiLU",
                 forcing_wavenumber: int = 4):
        super().__init__()
        if len(hidden_channels) != len(hidden_blocks):
            raise ValueError("hidden_channels and hidden_blocks need one entry per U-Net level")
        act = ACTIVATIONS[activation]
        self.channels = window * 2
        self.forcing_wavenumber = forcing_wavenumber
        self.levels = len(hidden_channels)
        self.embed = NoiseEmbedding(embedding, act)
        self.stem = periodic_conv(self.channels + 1, hidden_channels[0], kernel_size)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, (width, blocks) in enumerate(zip(hidden_channels, hidden_blocks)):
            self.down_blocks.append(nn.ModuleList(
                ResidualBlock(width, embedding, kernel_size, act) for _ in range(blocks)))
            if level + 1 < self.levels:
                self.downsamples.append(periodic_conv(width, hidden_channels[level + 1], kernel_size, stride=2))

        self.upsamples = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(self.levels - 1)):
            width = hidden_channels[level]
            self.upsamples.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                periodic_conv(hidden_channels[level + 1], width, kernel_size)))
            self.merges.append(nn.Conv2d(2 * width, width, 1))
            self.up_blocks.append(nn.ModuleList(
                ResidualBlock(width, embedding, kernel_size, act) for _ in range(hidden_blocks[level])))

        self.head = nn.Sequential(nn.GroupNorm(1, hidden_channels[0]), act(),
                                  periodic_conv(hidden_channels[0], self.channels, kernel_size))

    def forcing(self, x: Tensor) -> Tensor:
        """The forcing pattern sin(k y) on cell centres: (B, 1, H, W).

        The data generator stores fields with y along the last dim, so the pattern varies along it.
        """
        height, width = x.shape[-2:]
        y = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) * (2 * math.pi / width)
        pattern = torch.sin(self.forcing_wavenumber * y).expand(height, width)
        return pattern.expand(x.shape[0], 1, height, width)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.embed(t)
        h = self.stem(torch.cat([x, self.forcing(x)], dim=1))
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            if level + 1 < self.levels:
                skips.append(h)
                h = self.downsamples[level](h)
        for upsample, merge, blocks in zip(self.upsamples, self.merges, self.up_blocks):
            h = merge(torch.cat([upsample(h), skips.pop()], dim=1))
            for block in blocks:
                h = block(h, emb)
        return self.head(h)
