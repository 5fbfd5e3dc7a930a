"""The shape every distillation method shares (notes/distillation.md): a method owns its roles and
exposes one training step per role; the Trainer decides nothing about the algorithm.

    method.role_parameters()           {"student": [...], "critic": [...]}: one optimizer each
    method.phases(iteration)           the roles updated this iteration, in order (TTUR lives here)
    method.loss(role, x0, iteration, generator) -> (loss, logs)
    method.after_step(role, iteration) bookkeeping after the role's optimizer stepped (targets, EMA)
    method.sample(z, steps, generator) few-step samples of the student

`x0` is a batch of training data [N, ...] (the student never needs it in data-free methods, but the
critic, GAN head and sCT do). `logs` maps names to detached scalar tensors: nothing is read back to
the host inside a step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sampling import consistency_sample, few_step_times
from .denoiser import Denoiser, sigma_max_time


class Method(nn.Module):
    student: Denoiser
    sigma_max: float = 80.0

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def phases(self, iteration: int) -> list[str]:
        return ["student"]

    def loss(self, role: str, x0: torch.Tensor, iteration: int, generator: torch.Generator | None):
        raise NotImplementedError

    def after_step(self, role: str, iteration: int) -> None:
        pass

    @property
    def t_max(self) -> float:
        """The time a sampler starts at: arctan(sigma_max / sigma_d) (pi/2 - 0.0125 for sigma_d = 1)."""
        return sigma_max_time(self.sigma_max, self.student.sigma_d)

    def sample_times(self, steps: int) -> list[float]:
        return few_step_times(steps, self.t_max)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int, generator: torch.Generator | None = None, *,
               student: Denoiser | None = None) -> torch.Tensor:
        """`steps`-step samples from noise z [N, ...] (z ~ N(0, sigma_d^2 I)): multistep consistency
        sampling (x0 = f(x, t), re-noise to the next time). `student` overrides the model (an EMA copy)."""
        model = student if student is not None else self.student
        return consistency_sample(model.x0, z, self.sample_times(steps), generator, sigma_d=model.sigma_d)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """||x_i|| over all but the batch dim, shaped [N, 1, ..., 1]."""
    return x.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))


def frozen(module: nn.Module) -> nn.Module:
    """module in eval mode with requires_grad off (teachers)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
