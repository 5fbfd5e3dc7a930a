"""LCM: discrete consistency distillation with a teacher solver step (Luo et al.; Song et al.'s CD),
and its multistep/segment variant (phased / multistep consistency models, Hyper-SD).

An N-point grid t_0 = 0 < t_1 < ... < t_N = t_max (uniform in t) is split into `segments` equal
segments. For n ~ U{1..N} and a data sample x0:

    x_n      = cos t_n x0 + sin t_n z
    x^_{n-1} = DDIM(x_n, teacher.x0(x_n, t_n), t_n -> t_{n-1})          (one teacher solver step;
               solver="heun" averages that x0 with teacher.x0 at the DDIM end point, the
               second-order step of CD's Heun solver, two teacher calls)
    loss     = pseudo_huber(f_theta(x_n, t_n), f_target(x^_{n-1}, t_{n-1}))

where f(x, t) maps to the start b(t) of t's segment: f(x, t) = DDIM(x, x0_pred(x, t), t -> b(t)), the
boundary condition f(x, b) = x holding by construction (with one segment b = 0 and f = x0_pred). The
target network is an EMA of the student (`target_decay`; 0 = stop-gradient student).
Pseudo-Huber: sqrt(||a - b||^2 + c^2) - c per sample with c = 0.00054 sqrt(D) (iCT's choice).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .denoiser import Denoiser, TrigFlowModel, _expand_time, noised
from .method import Method, frozen


@dataclass
class LCMConfig:
    grid: int = 48
    segments: int = 1
    target_decay: float = 0.95
    huber_c: float | None = None
    solver: str = "euler"
    sigma_max: float = 80.0


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move from time t to s given the denoised estimate x0: keep the implied noise
    e = (x_t - cos t x0) / sin t and rebuild x_s = cos s x0 + sin s e. Exact at s = t; s = 0 gives x0."""
    t_, s_ = _expand_time(t, x_t), _expand_time(s, x_t)
    noise = (x_t - torch.cos(t_) * x0) / torch.sin(t_).clamp_min(1e-12)
    return torch.cos(s_) * x0 + torch.sin(s_) * noise


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c, [N]."""
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c


class LCM(Method):
    """student: TrigFlowModel. teacher: frozen Denoiser (CFG inside). Role: "student"."""

    def __init__(self, student: TrigFlowModel, teacher: Denoiser, config: LCMConfig | None = None):
        super().__init__()
        self.config = config or LCMConfig()
        c = self.config
        if c.grid < 1 or c.segments < 1 or c.grid % c.segments:
            raise ValueError(f"LCM: grid ({c.grid}) must be a positive multiple of segments ({c.segments})")
        if not 0 <= c.target_decay < 1:
            raise ValueError(f"LCM: target_decay must be in [0, 1), got {c.target_decay}")
        if c.solver not in ("euler", "heun"):
            raise ValueError(f"LCM: solver must be 'euler' or 'heun', got {c.solver!r}")
        self.student, self.teacher = student, frozen(teacher)
        self.target = frozen(copy.deepcopy(student))
        self.sigma_max = c.sigma_max
        self.register_buffer("times", torch.linspace(0.0, self.t_max, c.grid + 1, dtype=torch.float64), persistent=False)

    def role_parameters(self):
        return {"student": list(self.student.parameters())}

    def boundary(self, index: torch.Tensor) -> torch.Tensor:
        """Grid index of the segment start of grid index `index` (>= 1): segment k covers (k L, (k+1) L]."""
        per = self.config.grid // self.config.segments
        return ((index - 1) // per) * per

    def consistency_output(self, model: Denoiser, x, index):
        t = self.times[index].to(x.dtype)
        b = self.times[self.boundary(index)].to(x.dtype)
        return ddim_step(x, model.x0(x, t), t, b)

    def teacher_step(self, x_n: torch.Tensor, t_n: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """The teacher's solver step x_n at t_n -> x^ at t_prev [N, ...] (DDIM, or Heun: the mean of
        the x0 estimates at both ends; plain DDIM where t_prev = 0, as the x0 estimate there is x)."""
        x0 = self.teacher.x0(x_n, t_n)
        x_prev = ddim_step(x_n, x0, t_n, t_prev)
        if self.config.solver == "euler":
            return x_prev
        x0_end = self.teacher.x0(x_prev, t_prev)
        corrected = ddim_step(x_n, 0.5 * (x0 + x0_end), t_n, t_prev)
        return torch.where(_expand_time((t_prev > 0).to(x_n.dtype), x_n).bool(), corrected, x_prev)

    def loss(self, role, x0, iteration, generator):
        if role != "student":
            raise ValueError(f"LCM.loss: unknown role {role!r}")
        n = torch.randint(1, self.config.grid + 1, (len(x0),), generator=generator, device=x0.device)
        t_n, t_prev = self.times[n].to(x0.dtype), self.times[n - 1].to(x0.dtype)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * self.student.sigma_d
        x_n = noised(x0, z, t_n)
        with torch.no_grad():
            x_prev = self.teacher_step(x_n, t_n, t_prev)
            # At a segment start (n - 1 on a boundary) the target is x^_{n-1} itself.
            on_boundary = _expand_time((self.boundary(n) == n - 1).to(x0.dtype), x0)
            safe_prev = torch.where(n - 1 > 0, n - 1, torch.ones_like(n))
            target = torch.where(on_boundary.bool(), x_prev, self.consistency_output(self.target, x_prev, safe_prev))
        out = self.consistency_output(self.student, x_n, n)
        dim = x0[0].numel()
        c = self.config.huber_c if self.config.huber_c is not None else 0.00054 * math.sqrt(dim)
        work = torch.promote_types(x0.dtype, torch.float32)
        loss = pseudo_huber(out.to(work), target.to(work), c).mean()
        return loss, {"lcm": loss.detach()}

    @torch.no_grad()
    def after_step(self, role, iteration):
        decay = self.config.target_decay
        for target, online in zip(self.target.parameters(), self.student.parameters()):
            target.lerp_(online, 1 - decay)

    @torch.no_grad()
    def sample(self, z, steps, generator=None, *, student=None):
        """segments == 1: multistep consistency sampling. segments > 1: `steps` must equal `segments`;
        deterministic jumps from segment end to segment start (the phased-CM sampler)."""
        if self.config.segments == 1:
            return super().sample(z, steps, generator, student=student)
        if steps != self.config.segments:
            raise ValueError(f"LCM.sample: a {self.config.segments}-segment student samples in {self.config.segments} steps, got {steps}")
        model = student if student is not None else self.student
        per = self.config.grid // self.config.segments
        x = z
        for end in range(self.config.grid, 0, -per):
            x = self.consistency_output(model, x, torch.full((len(z),), end, device=z.device, dtype=torch.long))
        return x
