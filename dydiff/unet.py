"""Temporal U-Net (Janner et al. 2022, Diffuser; Ajay et al. 2023 defaults): the network of
DyDiff's dynamics diffusion model."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features of a scalar (here EDM's c_noise = ln(sigma)/4)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(
            -torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs
        return torch.cat([arg.sin(), arg.cos()], -1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish over (B, C, T)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks; the noise embedding is added (per channel) after the first."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, kernel_size: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size)
        self.embed = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.embed(emb)[:, :, None]
        return self.block2(h) + self.skip(x)


class TemporalUnet(nn.Module):
    """eps/F-network over trajectories: (B, H, D) x noise label (B,) -> (B, H, D).

    1-D convolutions run over time with the D = obs_dim + act_dim channels as features;
    each level has two residual blocks and halves the horizon (stride-2 conv), the decoder mirrors
    it with transposed convs and skip connections. Horizons that are not a multiple of
    2^(levels-1) are padded at the end (replicating the last row) and cropped back.
    """

    def __init__(self, transition_dim: int, dim: int = 128,
                 dim_mults: Sequence[int] = (1, 4, 8), kernel_size: int = 5):
        super().__init__()
        dims = [transition_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.levels = len(in_out)
        self.noise_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, 4 * dim),
                                       nn.Mish(), nn.Linear(4 * dim, dim))
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == self.levels - 1
            self.downs.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, dim, kernel_size),
                ResidualTemporalBlock(c_out, c_out, dim, kernel_size),
                nn.Conv1d(c_out, c_out, 3, 2, 1) if not last else nn.Identity()]))
        mid = dims[-1]
        self.mid1 = ResidualTemporalBlock(mid, mid, dim, kernel_size)
        self.mid2 = ResidualTemporalBlock(mid, mid, dim, kernel_size)
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(in_out[1:]):  # every decoder level doubles the horizon
            self.ups.append(nn.ModuleList([
                ResidualTemporalBlock(2 * c_out, c_in, dim, kernel_size),
                ResidualTemporalBlock(c_in, c_in, dim, kernel_size),
                nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)]))
        self.final = nn.Sequential(Conv1dBlock(dims[1], dims[1], kernel_size),
                                   nn.Conv1d(dims[1], transition_dim, 1))

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        horizon = x.shape[1]
        mult = 2 ** (self.levels - 1)
        pad = (-horizon) % mult
        h = x.transpose(1, 2)
        if pad:
            h = torch.nn.functional.pad(h, (0, pad), mode="replicate")
        emb = self.noise_mlp(noise_label)
        skips = []
        for block1, block2, down in self.downs:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for block1, block2, up in self.ups:
            h = torch.cat([h, skips.pop()], 1)
            h = up(block2(block1(h, emb), emb))
        h = self.final(h)
        return h[:, :, :horizon].transpose(1, 2)
