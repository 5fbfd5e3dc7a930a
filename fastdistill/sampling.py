"""Few-step and many-step samplers in TrigFlow time (fastdistill.trigflow).

A model enters as `x0_fn(x_t, t) -> E[x0 | x_t]` (x_t [N, ...], t [N]): a denoiser, a teacher wrapped
by its adapter, or a consistency student's f(x_t, t). Noise is z ~ N(0, sigma_d^2 I); at t = pi/2,
x_t = z.

  teacher_ode(x0_fn, z, steps, solver="euler"|"heun")   PF-ODE from pi/2 to 0; returns (x0, nfe)
  consistency_sample(f, z, times, generator)             multistep consistency sampling
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .trigflow import HALF_PI, add_noise, velocity_from_x0

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, t_max: float = HALF_PI, *, device=None) -> torch.Tensor:
    """steps + 1 times from t_max down to 0, uniform in t (float64)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"time_grid: steps must be an int >= 1, got {steps!r}")
    return torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def teacher_ode(x0_fn: X0Fn, z: torch.Tensor, steps: int, *, solver: str = "euler",
                times: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = (cos t x - x0_fn(x, t)) / sin t from times[0] (default pi/2, where x = z) to 0.

    solver "euler": one model call per step; "heun": Heun's second-order step, with Euler on the last
    step to t = 0 (EDM's rule), so 2 steps - 1 calls. Returns (samples, number of model calls).
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"teacher_ode: solver must be 'euler' or 'heun', got {solver!r}")
    times = time_grid(steps, device=z.device) if times is None else times.to(device=z.device, dtype=torch.float64)
    x, nfe = z, 0
    batch = z.shape[0]

    def velocity(x, t):
        nonlocal nfe
        nfe += 1
        t_batch = torch.full((batch,), float(t), dtype=x.dtype, device=x.device)
        return velocity_from_x0(x, x0_fn(x, t_batch), t_batch)

    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        d = velocity(x, t)
        x_euler = x + (t_next - t) * d
        if solver == "heun" and t_next > 0:
            x = x + (t_next - t) * 0.5 * (d + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x, nfe


@torch.no_grad()
def consistency_sample(f: X0Fn, z: torch.Tensor, times: Sequence[float] | torch.Tensor,
                       generator: torch.Generator | None = None, sigma_d: float = 1.0) -> torch.Tensor:
    """Multistep consistency sampling: x = z at times[0]; at each time x0 = f(x, t), then, unless it
    is the last time, re-noise to the next: x = cos(t') x0 + sin(t') sigma_d e with fresh e.
    len(times) model calls (times descending, all > 0; e.g. [pi/2] for one step)."""
    times = [float(t) for t in (times.tolist() if isinstance(times, torch.Tensor) else times)]
    if not times or any(not 0 < t <= HALF_PI + 1e-12 for t in times) or times != sorted(times, reverse=True):
        raise ValueError(f"consistency_sample: times must be descending in (0, pi/2], got {times}")
    x = z
    batch = z.shape[0]
    for i, t in enumerate(times):
        x0 = f(x, torch.full((batch,), t, dtype=x.dtype, device=x.device))
        if i + 1 == len(times):
            return x0
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * sigma_d
        x = add_noise(x0, noise, torch.full((batch,), times[i + 1], dtype=x.dtype, device=x.device))
    raise AssertionError("unreachable")


def few_step_times(steps: int, t_max: float = HALF_PI) -> list[float]:
    """The times of an n-step consistency / DMD sampler: uniform in t, t_max first, 0 excluded."""
    return [t_max * (1 - i / steps) for i in range(steps)] if steps >= 1 else []


__all__ = ["consistency_sample", "few_step_times", "teacher_ode", "time_grid"]
