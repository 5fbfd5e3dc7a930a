"""DMD2: distribution matching distillation with a learned fake score (Yin et al., arXiv 2405.14867).

Roles: "student" (the few-step generator G) and "critic" (the fake score, initialised from the
teacher, plus the optional GAN head). With x^ a generator sample, t ~ U[t_lo, t_hi], x_t its noised
version, x0_real = teacher.x0(x_t, t) (CFG inside the teacher) and x0_fake = critic.x0(x_t, t):

    grad   = (x0_fake - x0_real) / mean|x^ - x0_real|            (per sample: DMD's normaliser;
                                                                  or one mean over the batch)
    loss_G = 0.5 ||x^ - stopgrad(x^ - grad)||^2 / numel          (so d loss_G / d x^ = grad / numel)

grad is the (normalised) difference of the fake and real scores: descending it moves the generator's
distribution towards the teacher's (reverse KL). The critic is trained with the ordinary denoising
loss on detached generator samples, `ttur` critic updates per generator update (two time-scale
update rule). Multi-step students use backward simulation: the student runs its own sampler from
noise without gradient for a random number of steps and only the last step is trained, so it trains
on the inputs it meets at inference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..trigflow import HALF_PI
from .denoiser import Denoiser, denoising_loss, lognormal_times, noised, uniform_times
from .method import Method, frozen


@dataclass
class DMD2Config:
    """steps: the student's sampling steps (backward simulation when > 1); a tuple such as (1, 2, 4)
    trains one student for several step counts (each generator update draws one of them). t_range: fraction of
    [0, pi/2] the DMD time is drawn from (DMD2: 2%-98% of the schedule). ttur: critic updates per
    generator update (5 in DMD2, 10 for large models). critic_p_mean/p_std: the critic's log-normal
    time proposal. gan_weight / gan_critic_weight: the GAN head's generator / discriminator loss
    weights (0 disables the head; DMD2 used 3e-3 and 1e-2). regression_weight: DMD v1's regression
    loss: mean squared error between the student's output from stored teacher ODE states and the
    teacher's ODE samples they lead to (`regression_pairs` of the method). normaliser: "sample"
    divides each sample's DMD gradient by its own mean|x^ - x0_real| (DMD); "batch" by the batch
    mean of those, which keeps the relative sizes of the samples' gradients: in low dimension a
    sample already on a mode has a tiny mean|x^ - x0_real|, and the per-sample division blows its
    small score difference up to a unit push off the mode."""

    steps: int | tuple[int, ...] = 1
    t_range: tuple[float, float] = (0.02, 0.98)
    ttur: int = 5
    critic_p_mean: float = -0.8
    critic_p_std: float = 1.6
    gan_weight: float = 0.0
    gan_critic_weight: float = 1e-2
    regression_weight: float = 0.0
    normaliser: str = "sample"
    sigma_max: float = 80.0


class GANHead(nn.Module):
    """Logit from the critic's features [N, feature_dim] (the critic net must support return_features)."""

    def __init__(self, feature_dim: int, width: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feature_dim, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, normaliser: str = "sample") -> torch.Tensor:
    """(x0_fake - x0_real) / mean|x^ - x0_real|, the mean taken per sample ("sample") or over the
    whole batch ("batch"), in float32 or better. All tensors [N, ...]."""
    if normaliser not in ("sample", "batch"):
        raise ValueError(f"dmd_gradient: normaliser must be 'sample' or 'batch', got {normaliser!r}")
    work = torch.promote_types(x_hat.dtype, torch.float32)
    x_hat, x0_real, x0_fake = x_hat.to(work), x0_real.to(work), x0_fake.to(work)
    scale = (x_hat - x0_real).abs().flatten(1).mean(1)
    if normaliser == "batch":
        scale = scale.mean().expand_as(scale)
    return (x0_fake - x0_real) / scale.clamp_min(1e-8).reshape((-1,) + (1,) * (x_hat.dim() - 1))


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mean((x^ - stopgrad(x^ - grad))^2): its gradient w.r.t. x^ is grad / numel."""
    x_hat = x_hat.to(grad.dtype)
    return 0.5 * (x_hat - (x_hat - grad).detach()).pow(2).mean()


class DMD2(Method):
    """student: a Denoiser (TrigFlowModel) used as x^ = student.x0(x_t, t). teacher: a frozen Denoiser.
    critic: defaults to a trainable deep copy of the teacher. regression_pairs, for regression_weight
    > 0, either
      (z [M, ...], x [M, ...]): noises (scaled by sigma_d) and the teacher's ODE samples from them
        (DMD v1: the student regresses x from z at t_max), or
      (states [M, K, ...], times [K], x [M, ...]): the teacher's ODE states at K times on the way to
        x (`sampling.ode_trajectory`); each regression sample draws one time, so a multi-step
        student learns the endpoint from every time its sampler starts a step at (those of
        `sample_times`), which keeps its later steps from mode-seeking collapse."""

    def __init__(self, student: Denoiser, teacher: Denoiser, config: DMD2Config | None = None, *,
                 critic: Denoiser | None = None, regression_pairs: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        self.config = config or DMD2Config()
        steps = self.config.steps
        self.step_counts = tuple(steps) if isinstance(steps, (tuple, list)) else (steps,)
        if not self.step_counts or min(self.step_counts) < 1 or self.config.ttur < 1:
            raise ValueError(f"DMD2: steps and ttur must be >= 1, got {self.config.steps} and {self.config.ttur}")
        if self.config.normaliser not in ("sample", "batch"):
            raise ValueError(f"DMD2: normaliser must be 'sample' or 'batch', got {self.config.normaliser!r}")
        self.student = student
        self.critic = critic if critic is not None else copy.deepcopy(teacher)
        for p in self.critic.parameters():
            p.requires_grad_(True)
        self.critic.train()
        self.teacher = frozen(teacher)
        self.sigma_max = self.config.sigma_max
        if (self.config.regression_weight > 0) != (regression_pairs is not None):
            raise ValueError("DMD2: regression_weight > 0 and regression_pairs go together")
        if regression_pairs is not None:
            if len(regression_pairs) == 2:
                pz, px = regression_pairs
                if pz.shape != px.shape:
                    raise ValueError(f"DMD2: regression_pairs (z, x) must have equal shapes, got {tuple(pz.shape)} and "
                                     f"{tuple(px.shape)}")
                states, times = pz.unsqueeze(1), torch.tensor([self.t_max], dtype=torch.float64)
            elif len(regression_pairs) == 3:
                states, times, px = regression_pairs
                times = torch.as_tensor(times, dtype=torch.float64).cpu()
                if (states.dim() != px.dim() + 1 or states.shape[0] != px.shape[0] or states.shape[2:] != px.shape[1:]
                        or times.dim() != 1 or states.shape[1] != len(times)):
                    raise ValueError(f"DMD2: regression_pairs (states [M, K, ...], times [K], x [M, ...]) disagree: "
                                     f"states {tuple(states.shape)}, times {tuple(times.shape)}, x {tuple(px.shape)}")
                if not bool(((times > 0) & (times <= HALF_PI)).all()):
                    raise ValueError(f"DMD2: regression times must lie in (0, pi/2], got {times.tolist()}")
            else:
                raise ValueError(f"DMD2: regression_pairs must be (z, x) or (states, times, x), got {len(regression_pairs)} tensors")
            self.register_buffer("pairs_states", states, persistent=False)
            self.register_buffer("pairs_times", times.to(device=px.device, dtype=px.dtype), persistent=False)
            self.register_buffer("pairs_x", px, persistent=False)
        self.gan_head = None
        if self.config.gan_weight > 0:
            feature_dim = getattr(getattr(self.critic, "net", None), "feature_dim", None)
            if feature_dim is None:
                raise ValueError("DMD2: gan_weight > 0 needs a critic TrigFlowModel whose net has feature_dim and "
                                 "accepts return_features=True (AdaLNMLP, TinyDiT)")
            self.gan_head = GANHead(feature_dim)

    def role_parameters(self):
        critic = list(self.critic.parameters()) + (list(self.gan_head.parameters()) if self.gan_head is not None else [])
        return {"student": list(self.student.parameters()), "critic": critic}

    def phases(self, iteration):
        return ["critic", "student"] if iteration % self.config.ttur == 0 else ["critic"]

    # -- generator ------------------------------------------------------------------------------------
    def generate(self, n_like: torch.Tensor, generator, *, grad: bool):
        """A student sample x^ [N, ...] by backward simulation: a random number of the student's own
        steps without gradient, then the trained step (with gradient when `grad`)."""
        sigma_d = self.student.sigma_d
        z = torch.randn(n_like.shape, generator=generator, device=n_like.device, dtype=n_like.dtype) * sigma_d
        n = len(z)
        # The step count and exit step come from the training generator (reproducible, resumable);
        # reading them is one host sync per update of a multi-step student.
        steps = self.step_counts[0]
        if len(self.step_counts) > 1:
            steps = self.step_counts[int(torch.randint(len(self.step_counts), (1,), generator=generator, device=z.device))]
        times = self.sample_times(steps)
        last = int(torch.randint(len(times), (1,), generator=generator, device=z.device)) if len(times) > 1 else 0
        x = z
        with torch.no_grad():
            for i in range(last):
                x0 = self.student.x0(x, torch.full((n,), times[i], device=z.device, dtype=z.dtype))
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype) * sigma_d
                x = noised(x0, noise, torch.full((n,), times[i + 1], device=z.device, dtype=z.dtype))
        with torch.set_grad_enabled(grad):
            return self.student.x0(x, torch.full((n,), times[last], device=z.device, dtype=z.dtype))

    def dmd_term(self, x_hat: torch.Tensor, generator):
        """(loss, noised sample, t) of the distribution-matching term for generator samples x^."""
        lo, hi = self.config.t_range
        t = uniform_times(len(x_hat), lo * HALF_PI, hi * HALF_PI, generator=generator, device=x_hat.device, dtype=x_hat.dtype)
        noise = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=x_hat.dtype) * self.student.sigma_d
        x_t = noised(x_hat, noise, t)
        with torch.no_grad():
            x0_real = self.teacher.x0(x_t.detach(), t)
            x0_fake = self.critic.x0(x_t.detach(), t)
            grad = dmd_gradient(x_hat.detach(), x0_real, x0_fake, self.config.normaliser)
        return dmd_loss(x_hat, grad), x_t, t

    def _logit(self, x_t, t):
        _, features = self.critic.net(x_t / self.critic.sigma_d, t, return_features=True)
        return self.gan_head(features)

    def generator_loss(self, x0, iteration, generator):
        x_hat = self.generate(x0, generator, grad=True)
        loss, x_t, t = self.dmd_term(x_hat, generator)
        logs = {"dmd": loss.detach()}
        if self.config.regression_weight > 0:
            n = len(x_hat)
            pick = torch.randint(len(self.pairs_x), (n,), generator=generator, device=x_hat.device)
            k = (torch.randint(len(self.pairs_times), (n,), generator=generator, device=x_hat.device)
                 if len(self.pairs_times) > 1 else torch.zeros_like(pick))
            start, t = self.pairs_states[pick, k], self.pairs_times[k].to(x_hat.dtype)
            regression = (self.student.x0(start, t) - self.pairs_x[pick]).pow(2).mean()
            loss = loss + self.config.regression_weight * regression
            logs["regression"] = regression.detach()
        if self.gan_head is not None:
            gan = nn.functional.softplus(-self._logit(x_t, t)).mean()  # non-saturating
            loss = loss + self.config.gan_weight * gan
            logs["gan_g"] = gan.detach()
        return loss, logs

    # -- critic ---------------------------------------------------------------------------------------
    def critic_loss(self, x0, iteration, generator):
        x_hat = self.generate(x0, generator, grad=False)
        t = lognormal_times(len(x_hat), self.config.critic_p_mean, self.config.critic_p_std, self.critic.sigma_d,
                            generator=generator, device=x_hat.device, dtype=x_hat.dtype)
        noise = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=x_hat.dtype) * self.critic.sigma_d
        loss = denoising_loss(self.critic, x_hat, t, noise)
        logs = {"critic": loss.detach()}
        if self.gan_head is not None:
            t_gan = uniform_times(len(x0), self.config.t_range[0] * HALF_PI, self.config.t_range[1] * HALF_PI,
                                  generator=generator, device=x0.device, dtype=x0.dtype)
            real_t = noised(x0, noise[: len(x0)], t_gan)
            fake_t = noised(x_hat, noise[: len(x0)], t_gan)
            gan = (nn.functional.softplus(-self._logit(real_t, t_gan)) + nn.functional.softplus(self._logit(fake_t, t_gan))).mean()
            loss = loss + self.config.gan_critic_weight * gan
            logs["gan_d"] = gan.detach()
        return loss, logs

    def loss(self, role, x0, iteration, generator):
        if role == "critic":
            return self.critic_loss(x0, iteration, generator)
        if role == "student":
            return self.generator_loss(x0, iteration, generator)
        raise ValueError(f"DMD2.loss: unknown role {role!r}")
