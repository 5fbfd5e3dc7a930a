"""Few-step and many-step samplers in TrigFlow time (fastdistill.trigflow).

A model enters as `x0_fn(x_t, t) -> E[x0 | x_t]` (x_t [N, ...], t [N]): a denoiser, a teacher wrapped
by its adapter, or a consistency student's f(x_t, t). Noise is z ~ N(0, sigma_d^2 I); at t = pi/2,
x_t = z.

  teacher_ode(x0_fn, z, steps, solver="euler"|"heun")   PF-ODE from pi/2 to 0; returns (x0, nfe)
  consistency_sample(f, z, times, generator)             multistep consistency sampling
  ode_consistency_function(x0_fn, steps, t_max)          a teacher's own consistency function (its PF-ODE
                                                         solved from t to 0): the ideal student
  ode_trajectory(x0_fn, z, times)                        PF-ODE states at given times (ODE-regression pairs)
  causal_rollout(model, z, times, generator)             streaming chunk-by-chunk video through a KV cache,
                                                         with the latency of every chunk and frames/s
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .trigflow import HALF_PI, _expand, add_noise, velocity_from_x0

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


def _step_times(caller: str, times: Sequence[float] | torch.Tensor) -> list[float]:
    """A few-step sampler's times as floats, checked: non-empty, descending, in (0, pi/2]."""
    times = [float(t) for t in (times.tolist() if isinstance(times, torch.Tensor) else times)]
    if not times or any(not 0 < t <= HALF_PI + 1e-12 for t in times) or times != sorted(times, reverse=True):
        raise ValueError(f"{caller}: times must be descending in (0, pi/2], got {times}")
    return times


@torch.no_grad()
def consistency_sample(f: X0Fn, z: torch.Tensor, times: Sequence[float] | torch.Tensor,
                       generator: torch.Generator | None = None, sigma_d: float = 1.0) -> torch.Tensor:
    """Multistep consistency sampling: x = z at times[0]; at each time x0 = f(x, t), then, unless it
    is the last time, re-noise to the next: x = cos(t') x0 + sin(t') sigma_d e with fresh e.
    len(times) model calls (times descending, all > 0; e.g. [pi/2] for one step)."""
    times = _step_times("consistency_sample", times)
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


def ode_consistency_function(x0_fn: X0Fn, steps: int, t_max: float = HALF_PI) -> X0Fn:
    """The consistency function of a teacher: f(x_t, t) = its PF-ODE solved from (x_t, t) to 0 with
    Heun, ceil(steps * t / t_max) steps (so `steps` over the whole range, fewer from lower t).

    What a perfect distillation of the teacher would learn. In `consistency_sample` it is the ideal
    k-step student: a multistep student that is worse than 1 step can be compared with it, since a
    teacher whose ODE marginals differ from the noised versions of its own samples makes re-noising
    samplers drift even with an exact f. t [N] must hold one time (what the samplers pass); reading
    it is a host sync, acceptable in this evaluation tool."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ode_consistency_function: steps must be an int >= 1, got {steps!r}")
    if not 0 < t_max <= HALF_PI + 1e-12:
        raise ValueError(f"ode_consistency_function: t_max must be in (0, pi/2], got {t_max}")

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 1 or len(t) != len(x):
            raise ValueError(f"ode_consistency_function: t must be [N] for x {tuple(x.shape)}, got {tuple(t.shape)}")
        start = float(t[0])
        if not bool((t == t[0]).all()):
            raise ValueError("ode_consistency_function: every sample of the batch must be at one time")
        n = max(1, math.ceil(steps * start / t_max - 1e-9))
        grid = torch.linspace(start, 0.0, n + 1, dtype=torch.float64)
        return teacher_ode(x0_fn, x, n, solver="heun", times=grid)[0]

    return f


@torch.no_grad()
def ode_trajectory(x0_fn: X0Fn, z: torch.Tensor, times: Sequence[float], *, substeps: int = 8,
                   solver: str = "heun") -> torch.Tensor:
    """The PF-ODE path from z (at times[0]) through each of `times` (descending, > 0) to t = 0, with
    `substeps` solver steps per interval. Returns [len(times) + 1, N, ...]: the state at each time,
    then the sample at 0 (the pairs of an ODE-regression initialisation, e.g. Self-Forcing's)."""
    times = [float(t) for t in times]
    if not times or any(t <= 0 for t in times) or times != sorted(times, reverse=True) or len(set(times)) != len(times):
        raise ValueError(f"ode_trajectory: times must be strictly descending and > 0, got {times}")
    states, x = [z], z
    for t, t_next in zip(times, times[1:] + [0.0]):
        grid = torch.linspace(t, t_next, substeps + 1, dtype=torch.float64)
        x = teacher_ode(x0_fn, x, substeps, solver=solver, times=grid)[0]
        states.append(x)
    return torch.stack(states)


@dataclass
class Rollout:
    """A streamed video and its timing. video [N, C, T, H, W]; chunk_seconds: wall time of each chunk
    (its denoising steps and its context pass; empty when not timed); frames_per_second: frames of
    the whole batch per second of rollout (0 when not timed)."""

    video: torch.Tensor
    chunk_seconds: list[float] = field(default_factory=list)
    frames_per_second: float = 0.0


def causal_rollout(model, z: torch.Tensor, times: Sequence[float], generator: torch.Generator | None = None, *,
                   context_time: float = 0.0, window_chunks: int | None = None, sink_chunks: int = 0,
                   exit_step: int | None = None, grad: bool = False, timed: bool = False) -> Rollout:
    """Generate a video chunk by chunk with a causal student and its RollingKVCache (Self-Forcing's
    inference, and its training rollout).

    model: a TrigFlow denoiser whose `net` is causal (`frames_per_chunk`, `new_cache`, `forward_chunk`:
    `fastdistill.models.TinyDiT(..., frames_per_chunk=k)` in a `TrigFlowModel`) with `sigma_d`.
    z [N, C, T, H, W]: the noise (scaled by sigma_d), T a multiple of frames_per_chunk; T may exceed
    the model's frames when `window_chunks` bounds the attention (sliding window, `sink_chunks`
    never evicted). times: the per-chunk step schedule (descending, > 0), the same for every chunk.

    Per chunk: x = its noise; for each step i up to `exit_step` (default: the last), x0 = f(x, t_i)
    and, before the exit step, x = cos(t_{i+1}) x0 + sin(t_{i+1}) e with fresh e. The chunk's output is
    the exit step's x0. Then a context pass runs the model once on that output noised to
    `context_time` (0: clean) and commits its K/V as the history later chunks attend to; the last
    chunk skips it. Only the exit step runs with gradient, and only when `grad` (the cache history is
    detached: the context pass is gradient-free). timed: synchronise the device around every chunk
    and report its latency and the frames per second (host syncs; leave it off in training).
    """
    net, sigma_d = model.net, float(model.sigma_d)
    per_chunk = getattr(net, "frames_per_chunk", None)
    if per_chunk is None or not hasattr(net, "forward_chunk"):
        raise TypeError("causal_rollout: model.net must be causal (a TinyDiT built with frames_per_chunk)")
    if z.dim() != 5 or z.shape[2] % per_chunk:
        raise ValueError(f"causal_rollout: z must be [N, C, T, H, W] with T a multiple of {per_chunk}, got {tuple(z.shape)}")
    chunks = z.shape[2] // per_chunk
    if window_chunks is None and z.shape[2] > net.frames:
        raise ValueError(f"causal_rollout: z has {z.shape[2]} frames, more than the model's {net.frames}; "
                         "pass window_chunks to roll out longer videos with a sliding window")
    times = _step_times("causal_rollout", times)
    exit_step = len(times) - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < len(times):
        raise ValueError(f"causal_rollout: exit_step must be in [0, {len(times)}), got {exit_step}")
    n = z.shape[0]
    cache = net.new_cache(n, window_chunks=window_chunks, sink_chunks=sink_chunks, dtype=z.dtype, device=z.device)

    def x0(x, t):
        t_batch = torch.full((n,), t, dtype=x.dtype, device=x.device)
        t_ = _expand(t_batch, x)
        return torch.cos(t_) * x - torch.sin(t_) * sigma_d * net.forward_chunk(x / sigma_d, t_batch, cache)

    def sync():
        if timed and z.is_cuda:
            torch.cuda.synchronize(z.device)

    outputs, seconds = [], []
    sync()
    started = time.perf_counter()
    for c in range(chunks):
        chunk_start = time.perf_counter()
        x = z[:, :, c * per_chunk: (c + 1) * per_chunk]
        with torch.no_grad():
            for i in range(exit_step):
                out = x0(x, times[i])
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * sigma_d
                x = add_noise(out, noise, torch.full((n,), times[i + 1], dtype=x.dtype, device=x.device))
        with torch.set_grad_enabled(grad):
            out = x0(x, times[exit_step])
        outputs.append(out)
        if c + 1 < chunks:
            with torch.no_grad():
                context = out.detach()
                if context_time > 0:
                    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * sigma_d
                    context = add_noise(context, noise, torch.full((n,), context_time, dtype=x.dtype, device=x.device))
                net.forward_chunk(context / sigma_d, torch.full((n,), context_time, dtype=x.dtype, device=x.device), cache)
                cache.commit()
        sync()
        if timed:
            seconds.append(time.perf_counter() - chunk_start)
    video = torch.cat(outputs, dim=2)
    fps = n * z.shape[2] / (time.perf_counter() - started) if timed else 0.0
    return Rollout(video, seconds, fps)


__all__ = ["Rollout", "causal_rollout", "consistency_sample", "few_step_times", "ode_consistency_function",
           "ode_trajectory", "teacher_ode", "time_grid"]
