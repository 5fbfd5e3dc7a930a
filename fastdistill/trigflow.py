"""TrigFlow time, the internal parameterisation of the distillation methods (notes/distillation.md).

    x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sigma_d^2 I),   t in [0, pi/2]

t = 0 is data, t = pi/2 pure noise. The EDM noise level of x_t / cos(t) is sigma = sigma_d tan(t),
so t = arctan(sigma / sigma_d). A model predicts F(x_t / sigma_d, t); the probability-flow ODE is
dx_t/dt = sigma_d F and the consistency function is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F,
which equals the denoised sample E[x0 | x_t] for the exact F. Functions here convert between these
views; all take t as a tensor broadcastable against x's leading (batch) dim.
"""

from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t [N] (or scalar) -> [N, 1, ..., 1] to broadcast against x [N, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def sigma_to_t(sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """TrigFlow time of an EDM noise level: arctan(sigma / sigma_d)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_d)


def t_to_sigma(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """EDM noise level of TrigFlow time t: sigma_d tan(t) (inf at pi/2)."""
    return sigma_d * torch.tan(torch.as_tensor(t))


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z, with z already scaled by sigma_d."""
    t = _expand(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx_t/dt of the probability-flow ODE given the denoised estimate x0 = E[x0 | x_t]:
    (cos(t) x_t - x0) / sin(t) (= sigma_d F). Undefined at t = 0, where no step is taken."""
    t = _expand(t, x_t)
    return (torch.cos(t) * x_t - x0) / torch.sin(t)


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The consistency function f = cos(t) x_t - sin(t) dx_t/dt (inverse of velocity_from_x0)."""
    t = _expand(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * velocity
