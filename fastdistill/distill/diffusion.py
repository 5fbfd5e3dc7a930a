"""Teacher training: the TrigFlow diffusion (flow-matching) objective as a Method, so teachers train
with the same Trainer (EMA, clipping, checkpoints, data parallel) as students."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import teacher_ode, time_grid
from .denoiser import TrigFlowModel, denoising_loss, lognormal_times
from .method import Method


@dataclass
class DiffusionConfig:
    """Log-normal proposal of sigma (EDM: p_mean -1.2, p_std 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_max: float = 80.0


class Diffusion(Method):
    """Trains `model` (role "student") with the denoising loss; samples with the PF-ODE (Euler)."""

    def __init__(self, model: TrigFlowModel, config: DiffusionConfig | None = None):
        super().__init__()
        self.config = config or DiffusionConfig()
        self.student = model
        self.sigma_max = self.config.sigma_max

    def role_parameters(self):
        return {"student": list(self.student.parameters())}

    def loss(self, role, x0, iteration, generator):
        if role != "student":
            raise ValueError(f"Diffusion.loss: unknown role {role!r}")
        sigma_d = self.student.sigma_d
        t = lognormal_times(len(x0), self.config.p_mean, self.config.p_std, sigma_d, generator=generator,
                            device=x0.device, dtype=x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sigma_d
        loss = denoising_loss(self.student, x0, t, noise)
        return loss, {"denoise": loss.detach()}

    @torch.no_grad()
    def sample(self, z, steps, generator=None, *, student=None):
        model = student if student is not None else self.student
        return teacher_ode(model.x0, z, steps, times=time_grid(steps, self.t_max))[0]
