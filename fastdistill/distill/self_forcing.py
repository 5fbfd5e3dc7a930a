"""Self-Forcing: DMD on the videos a causal student generates chunk by chunk through its KV cache
(Huang et al., arXiv 2506.08009), and the ODE-regression initialisation it starts from.

The student is causal (`TinyDiT(..., frames_per_chunk=k)` in a `TrigFlowModel`): in training it
generates exactly as at inference (`sampling.causal_rollout`): per chunk, its few denoising steps
attend to the cached K/V of the chunks before; after a chunk, its clean output is run once more at
`context_time` to write the cache. One exit step, drawn per rollout and the same for every chunk,
ends each chunk's denoising and is the only forward with gradient, so the student is trained on the
inputs its own earlier chunks create (no exposure bias) at the cost of one differentiable forward
per chunk. The generated video is then scored by DMD2's distribution-matching gradient between a
frozen bidirectional teacher on whole videos and a critic (fake score) trained on the student's
videos, with DMD2's TTUR. Everything DMD2 offers (GAN head, t range, critic proposal) applies.

`CausalODEInit` is the initialisation (CausVid's, reused by Self-Forcing): the causal student
regresses the teacher's ODE endpoints from the teacher's ODE states at the student's step times,
each chunk at its own randomly drawn step, in one teacher-forced chunk-causal forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..sampling import Rollout, causal_rollout
from .denoiser import Denoiser
from .dmd import DMD2, DMD2Config
from .method import Method


@dataclass
class SelfForcingConfig:
    """steps: denoising steps per chunk (the student's times are `Method.sample_times(steps)` unless
    `times` lists them, descending in (0, pi/2]). context_time: the noise level of the context pass
    that writes the cache (Self-Forcing: 0, clean). window_chunks / sink_chunks: the cache's sliding
    window and sink (None: every chunk of the model's frames). dmd: the DMD2 settings (ttur, t_range,
    critic proposal, GAN head); its `steps` is ignored."""

    steps: int = 4
    times: tuple[float, ...] | None = None
    context_time: float = 0.0
    window_chunks: int | None = None
    sink_chunks: int = 0
    dmd: DMD2Config = field(default_factory=lambda: DMD2Config(ttur=5))


def _check_causal(student: Denoiser, who: str) -> None:
    net = getattr(student, "net", None)
    if getattr(net, "frames_per_chunk", None) is None or not hasattr(net, "forward_chunk"):
        raise TypeError(f"{who}: the student must be a TrigFlowModel around a causal net "
                        "(fastdistill.models.TinyDiT(..., frames_per_chunk=k))")


def _check_trajectories(student: Denoiser, trajectories: torch.Tensor, times: list[float], who: str) -> None:
    if trajectories.dim() != 6 or trajectories.shape[0] != len(times) + 1:
        raise ValueError(f"{who}: trajectories must be [len(times) + 1, M, C, T, H, W] = [{len(times) + 1}, ...], "
                         f"got {tuple(trajectories.shape)}")
    per_chunk = student.net.frames_per_chunk
    if trajectories.shape[3] % per_chunk:
        raise ValueError(f"{who}: the trajectories' {trajectories.shape[3]} frames are not a multiple of "
                         f"frames_per_chunk {per_chunk}")


def causal_regression_loss(student: Denoiser, trajectories: torch.Tensor, times: torch.Tensor, n: int,
                           generator: torch.Generator | None) -> torch.Tensor:
    """ODE regression of a causal student (see CausalODEInit): n trajectories drawn from
    trajectories [S + 1, M, C, T, H, W], one of the S steps drawn per chunk; the chunk-wise states at
    their own times (times [S], per-frame times) in one chunk-causal forward, mean squared error of
    student.x0 to the endpoints."""
    device = trajectories.device
    steps, frames = len(times), trajectories.shape[3]
    per_chunk = student.net.frames_per_chunk
    pick = torch.randint(trajectories.shape[1], (n,), generator=generator, device=device)
    step = torch.randint(steps, (n, frames // per_chunk), generator=generator, device=device)
    step = step.repeat_interleave(per_chunk, dim=1)  # [n, frames]: one step per chunk
    states = trajectories[:, pick]  # [S + 1, n, C, T, H, W]
    index = step[None, :, None, :, None, None].expand(1, n, states.shape[2], frames, *states.shape[4:])
    x_in = states.gather(0, index)[0]
    t = times.to(device=device, dtype=x_in.dtype)[step]  # [n, frames]
    return (student.x0(x_in, t) - states[-1]).pow(2).mean()


class SelfForcing(DMD2):
    """student: causal TrigFlowModel; teacher: a frozen Denoiser on whole videos [N, C, T, H, W];
    critic: defaults to a trainable copy of the teacher. Roles and phases are DMD2's."""

    def __init__(self, student: Denoiser, teacher: Denoiser, config: SelfForcingConfig | None = None, *,
                 critic: Denoiser | None = None, regression: tuple[torch.Tensor, list[float]] | None = None):
        """regression: (trajectories [S + 1, M, C, T, H, W], times [S]) of the teacher's ODE, as for
        CausalODEInit (usually the same ones), with config.dmd.regression_weight > 0: each generator
        update adds that weight times the causal ODE-regression loss on a batch of them, which keeps
        the student near the teacher's paths while DMD sharpens it."""
        config = config or SelfForcingConfig()
        _check_causal(student, "SelfForcing")
        if config.steps < 1:
            raise ValueError(f"SelfForcing: steps must be >= 1, got {config.steps}")
        if config.times is not None and len(config.times) != config.steps:
            raise ValueError(f"SelfForcing: times has {len(config.times)} entries, steps is {config.steps}")
        if (config.dmd.regression_weight > 0) != (regression is not None):
            raise ValueError("SelfForcing: config.dmd.regression_weight > 0 and regression go together")
        # DMD2's own regression (pairs at whole-video times) is replaced by the causal one below.
        super().__init__(student, teacher, dataclasses.replace(config.dmd, steps=config.steps, regression_weight=0.0),
                         critic=critic)
        self.sf_config = config
        self.has_regression = regression is not None
        if regression is not None:
            trajectories, times = regression
            times = [float(t) for t in times]
            _check_trajectories(student, trajectories, times, "SelfForcing")
            self.register_buffer("regression_trajectories", trajectories, persistent=False)
            times_tensor = torch.tensor(times, dtype=torch.float64, device=trajectories.device)
            self.register_buffer("regression_times", times_tensor, persistent=False)

    def generator_loss(self, x0, iteration, generator):
        loss, logs = super().generator_loss(x0, iteration, generator)
        if self.has_regression:
            regression = causal_regression_loss(self.student, self.regression_trajectories, self.regression_times,
                                                len(x0), generator)
            loss = loss + self.sf_config.dmd.regression_weight * regression
            logs["regression"] = regression.detach()
        return loss, logs

    def rollout_times(self, steps: int | None = None) -> list[float]:
        """The per-chunk step schedule: config.times for the configured steps, else uniform in t."""
        steps = self.sf_config.steps if steps is None else steps
        if self.sf_config.times is not None and steps == self.sf_config.steps:
            return [float(t) for t in self.sf_config.times]
        return self.sample_times(steps)

    def rollout(self, z: torch.Tensor, generator, *, steps: int | None = None, exit_step: int | None = None,
                grad: bool = False, timed: bool = False, student: Denoiser | None = None) -> Rollout:
        c = self.sf_config
        return causal_rollout(student if student is not None else self.student, z, self.rollout_times(steps), generator,
                              context_time=c.context_time, window_chunks=c.window_chunks, sink_chunks=c.sink_chunks,
                              exit_step=exit_step, grad=grad, timed=timed)

    def generate(self, n_like: torch.Tensor, generator, *, grad: bool):
        """A video [N, C, T, H, W] from the student's rollout, exiting every chunk at one random step
        (one host sync to read it, as DMD2's backward simulation)."""
        z = torch.randn(n_like.shape, generator=generator, device=n_like.device, dtype=n_like.dtype) * self.student.sigma_d
        exit_step = int(torch.randint(self.sf_config.steps, (1,), generator=generator, device=z.device))
        return self.rollout(z, generator, exit_step=exit_step, grad=grad).video

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int, generator: torch.Generator | None = None, *,
               student: Denoiser | None = None) -> torch.Tensor:
        """Streamed `steps`-step-per-chunk video from noise z [N, C, T, H, W] (see `rollout` for timing)."""
        return self.rollout(z, generator, steps=steps, student=student).video


class CausalODEInit(Method):
    """ODE-regression initialisation of a causal student.

    trajectories [S + 1, M, C, T, H, W]: the teacher's PF-ODE states at the student's S step times
    `times` and the endpoint (`sampling.ode_trajectory(teacher.x0, z, times)`). Each loss draws M'
    trajectories and, per chunk, one step i; the input is chunk-wise state i at time times[i] (per-
    frame times) and the target the endpoint: mean squared error of student.x0 in one chunk-causal
    forward. Sampling is the causal rollout with `times`."""

    def __init__(self, student: Denoiser, trajectories: torch.Tensor, times: tuple[float, ...] | list[float]):
        super().__init__()
        _check_causal(student, "CausalODEInit")
        times = [float(t) for t in times]
        _check_trajectories(student, trajectories, times, "CausalODEInit")
        self.student = student
        self.register_buffer("trajectories", trajectories, persistent=False)
        self.register_buffer("times", torch.tensor(times, dtype=torch.float64), persistent=False)
        self.sigma_d = student.sigma_d

    def role_parameters(self):
        return {"student": list(self.student.parameters())}

    def loss(self, role, x0, iteration, generator):
        if role != "student":
            raise ValueError(f"CausalODEInit.loss: unknown role {role!r}")
        loss = causal_regression_loss(self.student, self.trajectories, self.times, len(x0), generator)
        return loss, {"ode_regression": loss.detach()}

    @torch.no_grad()
    def sample(self, z, steps, generator=None, *, student=None):
        times = self.times.tolist() if steps == len(self.times) else self.sample_times(steps)
        return causal_rollout(student if student is not None else self.student, z, times, generator).video


__all__ = ["CausalODEInit", "SelfForcing", "SelfForcingConfig", "causal_regression_loss"]
