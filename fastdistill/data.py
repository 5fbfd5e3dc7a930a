"""Datasets of the demo and the tests.

`GaussianMixture` (with the `ring` and `grid` presets): 2-D mixtures whose exact denoiser
E[x0 | x_t] is known in closed form, a zero-training oracle teacher for unit tests of samplers and
distillation losses. `digits`: scikit-learn's bundled 8x8 digits (no download). `moving_shapes`: a
procedural video set. `load_npy`: user data from a .npy file (N x d points or N x H x W images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .trigflow import _expand


@dataclass(frozen=True)
class GaussianMixture:
    """Equal-weight isotropic Gaussian mixture: x0 = means[k] + std * e, k uniform, e ~ N(0, I).

    means: [K, d] float64 tensor; std: per-component standard deviation.
    """

    means: torch.Tensor
    std: float

    def __post_init__(self):
        if not isinstance(self.means, torch.Tensor) or self.means.dim() != 2:
            raise ValueError(f"GaussianMixture: means must be a [K, d] tensor, got {getattr(self.means, 'shape', self.means)}")
        if not self.std > 0:
            raise ValueError(f"GaussianMixture: std must be > 0, got {self.std}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """[n, d] samples (on the CPU; seeded by `generator`)."""
        k = torch.randint(len(self.means), (n,), generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).to(dtype)

    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma e = x_noisy] (EDM form), exactly: x_noisy [N, d], sigma [N] or scalar.

        Given component k the posterior mean is means[k] + s^2 / (s^2 + sigma^2) (x - means[k]); the
        components are weighted by their responsibilities under N(means[k], (s^2 + sigma^2) I).
        Computed in float64, returned in x_noisy's dtype.
        """
        x = x_noisy.double()
        sigma = _expand(sigma, x).double()  # [N, 1]
        var = self.std**2 + sigma**2
        means = self.means.to(x.device)
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # [N, K]
        resp = torch.softmax(-sq / (2 * var), dim=1)  # equal weights and variances: only distances matter
        shrink = self.std**2 / var  # [N, 1]
        posterior = means[None] + shrink[:, :, None] * (x[:, None, :] - means[None])  # [N, K, d]
        return (resp[:, :, None] * posterior).sum(1).to(x_noisy.dtype)

    def denoise_trigflow(self, x_t: torch.Tensor, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
        """E[x0 | x_t] for x_t = cos(t) x0 + sin(t) sigma_d e: the EDM denoiser at x_t / cos(t),
        sigma = sigma_d tan(t). t must be < pi/2 (at pi/2 the answer is the mixture mean)."""
        t = _expand(t, x_t).double()
        return self.denoise(x_t.double() / torch.cos(t), (sigma_d * torch.tan(t)).reshape(-1)).to(x_t.dtype)

    def modes_covered(self, samples: torch.Tensor, *, radius_stds: float = 3.0, min_fraction: float = 0.1) -> int:
        """How many components hold at least `min_fraction` of their fair share (n / K) of the samples
        within `radius_stds` standard deviations of their mean."""
        dist = torch.cdist(samples.double(), self.means.to(samples.device))  # [n, K]
        near = dist.min(1)
        counts = torch.bincount(near.indices[near.values <= radius_stds * self.std], minlength=len(self.means))
        return int((counts >= min_fraction * len(samples) / len(self.means)).sum())


def ring(modes: int = 8, radius: float = 2.0, std: float = 0.05) -> GaussianMixture:
    """`modes` components evenly spaced on a circle of `radius`."""
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return GaussianMixture(radius * torch.stack((angle.cos(), angle.sin()), 1), std)


def grid(side: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """side x side components on a square grid centred at the origin."""
    axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    return GaussianMixture(torch.cartesian_prod(axis, axis), std)


def load_npy(path: str) -> torch.Tensor:
    """User data from a .npy file: float32 [N, d] points or [N, H, W] images, as saved.

    Raises ValueError for other ranks, non-numeric arrays, NaN/inf values or fewer than 2 samples.
    """
    array = np.load(path, allow_pickle=False)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"load_npy: {path} holds {array.dtype} values; expected a numeric array")
    if array.ndim not in (2, 3) or array.shape[0] < 2:
        raise ValueError(f"load_npy: {path} must hold N x d points or N x H x W images (N >= 2), got shape {array.shape}")
    data = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(data).all():
        raise ValueError(f"load_npy: {path} contains NaN or inf")
    return data


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits: images [1797, 1, 8, 8] float32 scaled from 0..16 to
    [-1, 1], and labels [1797] int64. Needs scikit-learn (`pip install scikit-learn`; it ships the
    data, nothing is downloaded)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("data.digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def moving_shapes(n: int, *, frames: int = 8, size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """Procedural videos [n, 1, frames, size, size] in [-1, 1]: one bright square or disc (radius 2-4
    pixels) per video moving with a constant velocity of up to 1.5 pixels per frame and bouncing off
    the borders, on a dark background. Deterministic for a seeded generator."""
    if n < 1 or frames < 1 or size < 8:
        raise ValueError(f"moving_shapes: need n >= 1, frames >= 1, size >= 8; got {n}, {frames}, {size}")
    radius = 2.0 + 2.0 * torch.rand(n, generator=generator, dtype=torch.float64)
    start = radius[:, None] + (size - 1 - 2 * radius[:, None]) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    velocity = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * 1.5
    is_disc = torch.rand(n, generator=generator) < 0.5
    step = torch.arange(frames, dtype=torch.float64)
    lo, span = radius[:, None, None], (size - 1 - 2 * radius)[:, None, None]
    # Bouncing: reflect the unconstrained path into [r, size - 1 - r] (a triangle wave).
    path = start[:, None, :] - lo + velocity[:, None, :] * step[None, :, None]
    path = torch.remainder(path, 2 * span)
    center = lo + torch.where(path > span, 2 * span - path, path)  # [n, frames, 2]
    axis = torch.arange(size, dtype=torch.float64)
    dy = axis[None, None, :, None] - center[..., 0, None, None]
    dx = axis[None, None, None, :] - center[..., 1, None, None]
    r = radius[:, None, None, None]
    inside = torch.where(is_disc[:, None, None, None], dx * dx + dy * dy <= r * r, (dx.abs() <= r) & (dy.abs() <= r))
    return (inside.float() * 2 - 1).unsqueeze(1)
