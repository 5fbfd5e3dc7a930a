"""sCM: continuous-time consistency distillation (teacher velocity) and training (no teacher).

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv 2410.11081),
with rCM's float64 tangent normalisation. In TrigFlow time (fastdistill.trigflow), with F^- the
student evaluated with stopped gradients:

    dx_t/dt = sigma_d F_teacher(x_t, t)               (distillation; CFG inside the teacher)
            = cos t z - sin t x0                       (training: the conditional velocity)
    J       = d/ds F^-(x_t(s)/sigma_d, s) * cos t sin t  (one torch.func.jvp: the tangents are
              pre-scaled by cos t sin t, "JVP rearrangement", so no large value is formed in bf16)
    g       = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d J)
            = cos t * df^-/dt (r = 1): the change of the consistency function along the PF-ODE
    g      <- g / (||g|| + c)                           (per sample, float64; r = min(1, it / warmup))
    loss    = e^{-w(t)} / D ||F_theta - F^- - g||^2 + w(t)     (w: the adaptive weight head)

The JVP runs under no_grad on the *unwrapped* student network (JVP through a DDP wrapper fails; under
the Trainer's FSDP2 mode student.net is itself the fully_shard unit, so its call gathers the weights),
and goes through `fastdistill.attention`'s fused JVP for DiT students on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp

from ..models.mlp import TimeEmbedding
from .denoiser import Denoiser, TrigFlowModel, _expand_time, lognormal_times, noised
from .method import Method, frozen, per_sample_norm


@dataclass
class SCMConfig:
    """p_mean, p_std: log-normal proposal of sigma (sCM CIFAR: -1.0, 1.4). tangent_warmup: iterations
    over which r ramps from 0 to 1. tangent_norm: c of the tangent normalisation (0 disables it).
    adaptive_weight: learn w(t) (sCM); else the loss is scaled by `loss_scale` (rCM uses 100).
    sigma_max: where 1-step sampling starts (t = arctan(sigma_max / sigma_d))."""

    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup: int = 1000
    tangent_norm: float = 0.1
    adaptive_weight: bool = True
    loss_scale: float = 1.0
    sigma_max: float = 80.0


class AdaptiveWeight(nn.Module):
    """w(t): a scalar per time from Fourier features (sCM's adaptive loss weighting)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = TimeEmbedding(width, frequencies=16, max_frequency=16.0)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.silu(self.embed(t))).squeeze(1)


class SCM(Method):
    """Continuous-time consistency distillation (teacher given) or training (teacher=None).

    student: a TrigFlowModel (its `net` is what the JVP differentiates). teacher: a Denoiser (frozen
    here), None for consistency training from data alone. Roles: "student" (the student and, with
    adaptive weighting, the weight head).
    """

    def __init__(self, student: TrigFlowModel, teacher: Denoiser | None = None, config: SCMConfig | None = None):
        super().__init__()
        if not isinstance(student, TrigFlowModel):
            raise TypeError(f"SCM: student must be a fastdistill.distill.TrigFlowModel, got {type(student).__name__}")
        self.config = config or SCMConfig()
        self.student = student
        self.teacher = frozen(teacher) if teacher is not None else None
        if teacher is not None and abs(teacher.sigma_d - student.sigma_d) > 1e-12:
            raise ValueError(f"SCM: teacher sigma_d ({teacher.sigma_d}) != student sigma_d ({student.sigma_d})")
        self.weight = AdaptiveWeight() if self.config.adaptive_weight else None
        self.sigma_max = self.config.sigma_max

    def role_parameters(self):
        params = list(self.student.parameters())
        if self.weight is not None:
            params += list(self.weight.parameters())
        return {"student": params}

    def draw(self, x0: torch.Tensor, generator):
        """Training point: (t [N], z [N, ...] scaled by sigma_d, x_t)."""
        sigma_d = self.student.sigma_d
        t = lognormal_times(len(x0), self.config.p_mean, self.config.p_std, sigma_d, generator=generator,
                            device=x0.device, dtype=x0.dtype)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sigma_d
        return t, z, noised(x0, z, t)

    def ode_velocity(self, x0, z, x_t, t, **cond):
        """dx_t/dt: the teacher's PF-ODE velocity, or the conditional velocity without a teacher."""
        if self.teacher is None:
            t_ = _expand_time(t, x0)
            return torch.cos(t_) * z - torch.sin(t_) * x0
        with torch.no_grad():
            return self.teacher.velocity(x_t, t, **cond)

    def tangent(self, x_t, t, dxdt, iteration: int, **cond):
        """(F^-, g): the student at stopped gradients and the normalised tangent g (module docstring)."""
        sigma_d = self.student.sigma_d
        t_ = _expand_time(t, x_t)
        cos_t, sin_t = torch.cos(t_), torch.sin(t_)
        net = self.student.net

        def f(x_scaled, time):
            return net(x_scaled, time, **cond)

        with torch.no_grad():
            # Tangents pre-scaled by cos t sin t: the JVP returns cos t sin t dF^-/dt directly.
            f_minus, jvp_out = jvp(f, (x_t / sigma_d, t), (cos_t * sin_t * dxdt / sigma_d, torch.cos(t) * torch.sin(t)))
            r = min(1.0, iteration / self.config.tangent_warmup) if self.config.tangent_warmup > 0 else 1.0
            work = torch.promote_types(x_t.dtype, torch.float32)
            g = -cos_t.to(work) ** 2 * (sigma_d * f_minus.to(work) - dxdt.to(work)) - r * (
                (cos_t * sin_t).to(work) * x_t.to(work) + sigma_d * jvp_out.to(work))
            if self.config.tangent_norm > 0:
                g64 = g.double()
                g = (g64 / (per_sample_norm(g64) + self.config.tangent_norm)).to(work)
        return f_minus, g

    def consistency_loss(self, x0, iteration, generator, **cond):
        t, z, x_t = self.draw(x0, generator)
        dxdt = self.ode_velocity(x0, z, x_t, t, **cond)
        f_minus, g = self.tangent(x_t, t, dxdt, iteration, **cond)
        f_theta = self.student(x_t, t, **cond)
        work = g.dtype
        per_sample = (f_theta.to(work) - f_minus.to(work) - g).pow(2).flatten(1).mean(1)  # ||.||^2 / D
        if self.weight is not None:
            w = self.weight(t).to(work)
            loss = (torch.exp(-w) * per_sample + w).mean()
        else:
            loss = self.config.loss_scale * per_sample.mean()
        return loss, {"scm": per_sample.mean().detach(), "tangent_scale": min(1.0, iteration / max(1, self.config.tangent_warmup))}

    def loss(self, role, x0, iteration, generator):
        if role != "student":
            raise ValueError(f"SCM.loss: unknown role {role!r}")
        return self.consistency_loss(x0, iteration, generator)
