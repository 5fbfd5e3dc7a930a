"""AdaLN MLP denoiser for point data (the demo's 2-D mixtures and user N x d data)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """Fourier features of TrigFlow time t [N] -> [N, dim]: sin/cos of t at log-spaced frequencies
    from 1 to `max_frequency` rad per unit t, then a 2-layer MLP. The features are smooth in t, so
    the JVP's time tangent is meaningful; very high frequencies make dF/dt, and so sCM's JVP term,
    large and unstable (the sCM paper's warning), hence the modest default."""

    def __init__(self, dim: int, *, frequencies: int = 32, max_frequency: float = 64.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_frequency), frequencies)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs
        return self.mlp(torch.cat((angles.sin(), angles.cos()), dim=1).to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """Residual MLP block with adaptive LayerNorm: h + gate * MLP(LN(h) * (1 + scale) + shift), with
    (shift, scale, gate) from the time embedding; gate starts at 0 so a fresh block is the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 3 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(nn.functional.silu(cond)).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class AdaLNMLP(nn.Module):
    """F(x, t) for points: x [N, dim_in] (the scaled input x_t / sigma_d), t [N] TrigFlow time -> [N, dim_in].

    width: hidden width; depth: AdaLN blocks; time_frequency: the time embedding's highest frequency
    (rad per unit t). `forward(..., return_features=True)` also returns the last hidden state
    [N, width] (what a GAN head on a DMD2 critic reads).
    """

    def __init__(self, dim_in: int, *, width: int = 256, depth: int = 4, time_frequency: float = 64.0):
        super().__init__()
        self.dim_in = dim_in
        self.embed = nn.Linear(dim_in, width)
        self.time = TimeEmbedding(width, max_frequency=time_frequency)
        self.blocks = nn.ModuleList(AdaLNBlock(width, 2 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, dim_in)
        self.feature_dim = width

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, return_features: bool = False):
        if x.dim() != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"AdaLNMLP: x must be [N, {self.dim_in}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"AdaLNMLP: t must be [N] = [{x.shape[0]}], got {tuple(t.shape)}")
        cond = self.time(t)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, cond)
        h = self.norm(h)
        out = self.out(h)
        return (out, h) if return_features else out
