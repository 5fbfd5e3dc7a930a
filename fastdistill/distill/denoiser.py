"""Denoisers in TrigFlow time, teacher adapters and classifier-free guidance.

Every model the methods touch is a `Denoiser`: an nn.Module with

    forward(x_t, t)  -> F          the TrigFlow network output, x_t [N, ...], t [N] (or [N, frames])
    x0(x_t, t)       -> E[x0|x_t]  = cos(t) x_t - sin(t) sigma_d F   (the consistency function)
    velocity(x_t, t) -> dx_t/dt    = sigma_d F                        (the PF-ODE drift)

`TrigFlowModel(net, sigma_d)` wraps a network net(x_t / sigma_d, t) -> F: the students, critics and the
demo's teachers. Teachers trained in another parameterisation keep their own network and gain the
same interface through an adapter that converts x_t and t on the way in and the prediction on the
way out: `RectifiedFlowTeacher`, `EDMTeacher`, `EpsTeacher`. `ClassifierFreeGuidance` combines the
conditional and unconditional predictions of a conditional teacher under an explicitly named
convention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..trigflow import HALF_PI, _expand


class Denoiser(nn.Module):
    """Base class: subclasses define `x0` (adapters) or `forward` (TrigFlowModel); the other is derived."""

    sigma_d: float

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t_ = _expand_time(t, x_t)
        return (torch.cos(t_) * x_t - self.x0(x_t, t, **cond)) / (torch.sin(t_).clamp_min(1e-6) * self.sigma_d)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t_ = _expand_time(t, x_t)
        return torch.cos(t_) * x_t - torch.sin(t_) * self.sigma_d * self(x_t, t, **cond)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.sigma_d * self(x_t, t, **cond)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t x0 + sin t noise (noise already scaled by sigma_d); t [N] or per frame [N, frames].
    trigflow.add_noise for the methods, which also see per-frame times."""
    t_ = _expand_time(t, x0)
    return torch.cos(t_) * x0 + torch.sin(t_) * noise


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t [N] -> [N, 1, ...]; t [N, frames] for video x [N, C, frames, H, W] -> [N, 1, frames, 1, 1]."""
    if t.dim() == 2 and x.dim() == 5:
        return t.to(x.dtype)[:, None, :, None, None]
    return _expand(t, x)


class TrigFlowModel(Denoiser):
    """A network in the TrigFlow parameterisation: F = net(x_t / sigma_d, t, **cond).

    net: any nn.Module taking (x [N, ...], t [N], **cond) and returning F of x's shape, e.g.
    `fastdistill.models.AdaLNMLP` / `TinyDiT` or a user's DiT with its conditioning as keywords.
    sigma_d: the data standard deviation (noise is z ~ N(0, sigma_d^2 I)).
    """

    def __init__(self, net: nn.Module, sigma_d: float = 1.0):
        super().__init__()
        if not sigma_d > 0:
            raise ValueError(f"TrigFlowModel: sigma_d must be > 0, got {sigma_d!r}")
        self.net, self.sigma_d = net, float(sigma_d)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x_t / self.sigma_d, t, **cond)


class RectifiedFlowTeacher(Denoiser):
    """A rectified-flow teacher v(x_s, s, **cond) ~ e - x0, with x_s = (1 - s) x0 + s e, e ~ N(0, I),
    s in [0, 1] (SD3, Flux, Wan). sigma_d: the data scale the TrigFlow side uses.

    TrigFlow's x_t = cos t x0 + sin t sigma_d e is (cos t + sigma_d sin t) x_s with
    s = sigma_d sin t / (cos t + sigma_d sin t), so x0 = x_s - s v. `time_scale` multiplies s before
    the call (1000 for models trained on integer-like timesteps)."""

    def __init__(self, model: nn.Module, sigma_d: float = 1.0, *, time_scale: float = 1.0):
        super().__init__()
        self.model, self.sigma_d, self.time_scale = model, float(sigma_d), float(time_scale)

    def x0(self, x_t, t, **cond):
        denom = torch.cos(t) + self.sigma_d * torch.sin(t)
        s = self.sigma_d * torch.sin(t) / denom
        x_s = x_t / _expand_time(denom, x_t)
        return x_s - _expand_time(s, x_t) * self.model(x_s, s * self.time_scale, **cond)


class EDMTeacher(Denoiser):
    """An EDM denoiser D(x_noisy, sigma, **cond) ~ E[x0 | x0 + sigma e = x_noisy] (Karras et al.).
    TrigFlow's x_t / cos t is x0 + sigma_d tan(t) e, so x0 = D(x_t / cos t, sigma_d tan t)."""

    def __init__(self, model: nn.Module, sigma_d: float = 0.5):
        super().__init__()
        self.model, self.sigma_d = model, float(sigma_d)

    def x0(self, x_t, t, **cond):
        t = t.clamp(max=HALF_PI - 1e-4)  # sigma = inf at pi/2: EDM models are trained up to sigma ~ 80
        return self.model(x_t / torch.cos(_expand_time(t, x_t)), self.sigma_d * torch.tan(t), **cond)


class EpsTeacher(Denoiser):
    """A DDPM-style eps-prediction model eps(x_n, n, **cond) with x_n = sqrt(a_n) x0 + sqrt(1 - a_n) e,
    a_n = alphas_cumprod[n] (n = 0 .. len - 1; SD1.5/SDXL use 1,000 steps).

    The continuous timestep of TrigFlow time t is found by interpolating n linearly in
    log(sigma_n) = log(sqrt((1 - a_n) / a_n)) (as k-diffusion does), clamped to the table's range;
    x_n = sqrt(a) x_t / cos(t) with sigma = sigma_d tan(t) and a = 1 / (1 + sigma^2).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, sigma_d: float = 1.0):
        super().__init__()
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2 or not ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all():
            raise ValueError("EpsTeacher: alphas_cumprod must be a 1-D table of values in (0, 1) with >= 2 entries")
        self.model, self.sigma_d = model, float(sigma_d)
        self.register_buffer("log_sigmas", (0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)), persistent=False)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM step n of EDM noise level sigma (log_sigmas increase with n)."""
        log_sigma = torch.log(sigma.double()).clamp(self.log_sigmas[0], self.log_sigmas[-1])
        upper = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[upper - 1], self.log_sigmas[upper]
        return (upper - 1 + (log_sigma - lo) / (hi - lo)).to(sigma.dtype)

    def x0(self, x_t, t, **cond):
        t = t.clamp(max=HALF_PI - 1e-4)
        sigma = self.sigma_d * torch.tan(t)
        x_noisy = x_t / torch.cos(_expand_time(t, x_t))  # x0 + sigma e
        scale = torch.rsqrt(1 + _expand_time(sigma, x_t) ** 2)  # sqrt(a)
        eps = self.model(x_noisy * scale, self.timestep(sigma), **cond)
        return x_noisy - _expand_time(sigma, x_t) * eps


CFG_CONVENTIONS = ("standard", "dmd2")


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float, convention: str) -> torch.Tensor:
    """Classifier-free guidance of two predictions (x0, velocity or eps: the combination is affine with
    weights summing to 1, so it commutes with the TrigFlow conversions).

    convention "standard" (Ho & Salimans as used by diffusers; scale 1 = no guidance):
        u + scale (c - u)
    convention "dmd2" (DMD2's code, where scale 0 = no guidance):
        c + scale (c - u)          (= "standard" with scale + 1)
    """
    if convention == "standard":
        return unconditional + scale * (conditional - unconditional)
    if convention == "dmd2":
        return conditional + scale * (conditional - unconditional)
    raise ValueError(f"guided: convention must be one of {CFG_CONVENTIONS}, got {convention!r}")


class ClassifierFreeGuidance(Denoiser):
    """A guided teacher: x0 = guided(teacher.x0(x, t, **cond), teacher.x0(x, t, **uncond), scale, convention).

    teacher: a Denoiser taking conditioning keywords. uncond: the keywords of the unconditional call
    (e.g. {"labels": null_labels} or {"text": empty_embedding}). The convention has no default on
    purpose: scale 3 means different things in diffusers and DMD2 code.
    """

    def __init__(self, teacher: Denoiser, scale: float, *, convention: str, uncond: dict):
        super().__init__()
        if convention not in CFG_CONVENTIONS:
            raise ValueError(f"ClassifierFreeGuidance: convention must be one of {CFG_CONVENTIONS}, got {convention!r}")
        self.teacher, self.scale, self.convention, self.uncond = teacher, float(scale), convention, dict(uncond)
        self.sigma_d = teacher.sigma_d

    def x0(self, x_t, t, **cond):
        return guided(self.teacher.x0(x_t, t, **cond), self.teacher.x0(x_t, t, **self.uncond), self.scale, self.convention)


def lognormal_times(n: int, p_mean: float, p_std: float, sigma_d: float, *, generator=None, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """[n] TrigFlow times t = arctan(exp(p_mean + p_std e) / sigma_d), e ~ N(0, 1): EDM's log-normal
    noise proposal carried into TrigFlow (sCM's proposal)."""
    e = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.atan(torch.exp(p_mean + p_std * e) / sigma_d).to(dtype)


def uniform_times(n: int, lo: float, hi: float, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """[n] TrigFlow times uniform in [lo, hi]."""
    return (lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)).to(dtype)


def sigma_max_time(sigma_max: float, sigma_d: float) -> float:
    """TrigFlow time of the largest noise level a sampler starts from: arctan(sigma_max / sigma_d)."""
    return math.atan(sigma_max / sigma_d)


def denoising_loss(model: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **cond) -> torch.Tensor:
    """The diffusion (flow-matching) loss in TrigFlow: mean over the batch of
    ||F(x_t, t) - v / sigma_d||^2 / D with x_t = cos t x0 + sin t noise and v = cos t noise - sin t x0
    (noise already scaled by sigma_d). Computed in float32 or better. Returns a scalar."""
    t_ = _expand_time(t, x0)
    x_t = noised(x0, noise, t)
    target = (torch.cos(t_) * noise - torch.sin(t_) * x0) / model.sigma_d
    err = model(x_t, t, **cond).to(torch.promote_types(x0.dtype, torch.float32)) - target
    return err.pow(2).mean()
