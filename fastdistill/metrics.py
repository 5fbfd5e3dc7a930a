"""Sample-quality metrics of the demo: sliced Wasserstein distance and RBF-MMD^2.

Both compare two sample sets x [N, d] and y [M, d] (images flattened first) and are computed in
float64. Neither is meaningful alone: the demo reports them next to the *floor*, the same metric
between two reference sets drawn with different seeds.
"""

from __future__ import annotations

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def _quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function of each column of values [n, P] at `levels` [q]: [q, P]."""
    return torch.quantile(values, levels, dim=0, interpolation="linear")


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projections.

    The 1-D distance is the L1 distance between quantile functions, evaluated at 512 levels (exact
    enough for sets of different sizes). Directions come from `seed`, so two calls compare alike.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: x and y must have the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    qx = _quantiles(x @ directions.to(x.device), levels.to(x.device))
    qy = _quantiles(y @ directions.to(y.device), levels.to(y.device))
    return (qx - qy).abs().mean().item()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, *, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels exp(-|a - b|^2 / (2 h^2)).

    bandwidths default to (0.5, 1, 2) x the median pairwise distance of the pooled samples. Holds an
    (N + M)^2 kernel matrix: subsample large sets.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf: x and y must have the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd_rbf: needs at least 2 samples in each set")
    pooled = torch.cat((x, y))
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidths is None:
        median = d2[torch.triu_indices(len(pooled), len(pooled), 1).unbind()].sqrt().median().item()
        bandwidths = tuple(f * max(median, 1e-12) for f in (0.5, 1.0, 2.0))
    kernel = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = len(x)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = len(y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (xx + yy - 2 * kxy.mean()).item()
