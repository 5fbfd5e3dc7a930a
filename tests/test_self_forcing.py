"""Self-Forcing and the streaming rollout: the cache rollout (values and gradients) against an
independent teacher-forced recomputation, the ODE path against the closed form of a Gaussian, the
ODE-regression loss against a per-chunk loop, and Self-Forcing's DMD training step."""

from __future__ import annotations

import math

import pytest
import torch

from fastdistill import data
from fastdistill.distill import (
    CausalODEInit, DMD2Config, Denoiser, SelfForcing, SelfForcingConfig, Trainer, TrigFlowModel,
)
from fastdistill.models import TinyDiT
from fastdistill.sampling import causal_rollout, ode_trajectory

SIGMA_D = 0.8


def _causal_student(frames=6, per_chunk=2):
    torch.manual_seed(0)
    net = TinyDiT(1, 4, 4, frames=frames, frames_per_chunk=per_chunk, patch=2, dim=24, heads=2, depth=2).double()
    for name, p in net.named_parameters():
        if "modulation" in name:  # adaLN-Zero starts as the identity; give the blocks something to do
            torch.nn.init.normal_(p, std=0.3)
    return TrigFlowModel(net, SIGMA_D)


def _teacher_forced_rollout(model, z, times, generator, context_time, exit_step):
    """The rollout recomputed without a cache: chunk c's passes are full chunk-causal forwards of
    [contexts of chunks < c (noised to context_time), chunk c, zeros after] with per-frame times, and
    chunk c's slice of the output is kept (the causal mask makes the zeros irrelevant). Draws the fresh
    noises in the rollout's order. The contexts are detached, as the rollout's cache is."""
    per_chunk = model.net.frames_per_chunk
    n, frames = z.shape[0], z.shape[2]
    contexts, outputs = [], []
    for c in range(frames // per_chunk):
        lo, hi = c * per_chunk, (c + 1) * per_chunk

        def x0_of_chunk(x_chunk, t):
            x_full = torch.cat(contexts + [x_chunk, torch.zeros_like(z[:, :, hi:])], dim=2)
            t_full = torch.full((n, frames), t, dtype=z.dtype)
            t_full[:, :lo] = context_time
            return model.x0(x_full, t_full)[:, :, lo:hi]

        x = z[:, :, lo:hi]
        with torch.no_grad():
            for i in range(exit_step):
                out = x0_of_chunk(x, times[i])
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * SIGMA_D
                x = math.cos(times[i + 1]) * out + math.sin(times[i + 1]) * noise
        out = x0_of_chunk(x, times[exit_step])
        outputs.append(out)
        if hi < frames:
            context = out.detach()
            if context_time > 0:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * SIGMA_D
                context = math.cos(context_time) * context + math.sin(context_time) * noise
            contexts.append(context)
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("exit_step,context_time", [(2, 0.0), (1, 0.3), (0, 0.3)])
def test_causal_rollout_and_its_gradients_equal_the_teacher_forced_recomputation(exit_step, context_time):
    """Values for every chunk; gradients where the recomputation has the rollout's semantics: the
    parameters through chunk 0 (which has no context; later chunks' full forwards would also
    differentiate the context K/V, which the rollout's cache holds constant) and, at exit step 0,
    the noise of every chunk (the exit step's input: q, k and v of the chunk over the cached keys)."""
    model = _causal_student()
    z = torch.randn(2, 1, 6, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * SIGMA_D
    times = [1.5, 1.0, 0.4]
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if exit_step > 0:
        weights[:, :, 2:] = 0  # parameter gradients through chunk 0 only

    def run(rollout_fn):
        model.zero_grad()
        z_ = z.clone().requires_grad_(exit_step == 0)
        video = rollout_fn(z_)
        (video * weights).sum().backward()
        return video.detach(), [p.grad.clone() for p in model.parameters()], z_.grad

    video, grads, z_grad = run(lambda z_: causal_rollout(model, z_, times, torch.Generator().manual_seed(3),
                                                         context_time=context_time, exit_step=exit_step, grad=True).video)
    ref_video, ref_grads, ref_z_grad = run(lambda z_: _teacher_forced_rollout(model, z_, times, torch.Generator().manual_seed(3),
                                                                              context_time, exit_step))
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-12)
    if exit_step == 0:
        assert z_grad.abs().sum() > 0
        torch.testing.assert_close(z_grad, ref_z_grad, rtol=1e-9, atol=1e-12)
    else:
        assert any(g.abs().sum() > 0 for g in grads)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_causal_rollout_timing_sliding_window_and_errors():
    model = _causal_student()
    z = torch.randn(3, 1, 10, 4, 4, dtype=torch.float64)  # longer than the model's 6 frames
    with pytest.raises(ValueError, match="window_chunks"):
        causal_rollout(model, z, [1.5])
    rollout = causal_rollout(model, z, [1.5, 0.7], window_chunks=2, timed=True)
    assert rollout.video.shape == z.shape and not rollout.video.requires_grad
    assert len(rollout.chunk_seconds) == 5 and all(s > 0 for s in rollout.chunk_seconds) and rollout.frames_per_second > 0
    with pytest.raises(ValueError, match="multiple of 2"):
        causal_rollout(model, z[:, :, :5], [1.5], window_chunks=2)
    with pytest.raises(ValueError, match="exit_step"):
        causal_rollout(model, z[:, :, :6], [1.5, 0.7], exit_step=2)
    with pytest.raises(TypeError, match="causal"):
        causal_rollout(TrigFlowModel(TinyDiT(1, 4, 4, frames=6, dim=24, heads=2, depth=1), SIGMA_D), z[:, :, :6], [1.5])


class _Gaussian(Denoiser):
    """The exact denoiser of N(mu, s^2 I) data."""

    def __init__(self, mu=0.7, s=0.3):
        super().__init__()
        self.sigma_d, self.mixture = SIGMA_D, data.GaussianMixture(torch.tensor([[mu, -mu]], dtype=torch.float64), s)

    def x0(self, x, t):
        return self.mixture.denoise_trigflow(x, t, SIGMA_D)


def test_ode_trajectory_follows_the_closed_form_path_of_a_gaussian():
    """For N(mu, s^2) data the PF-ODE moves each point affinely: x_t = cos t mu + sqrt(v_t / v_t0) (x_t0 - cos t0 mu),
    v_t = cos^2 t s^2 + sin^2 t sigma_d^2."""
    teacher, mu, s = _Gaussian(), torch.tensor([0.7, -0.7], dtype=torch.float64), 0.3
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_D
    times = [1.55, 1.0, 0.5]
    v = lambda t: math.cos(t) ** 2 * s * s + math.sin(t) ** 2 * SIGMA_D**2
    want = torch.stack([math.cos(t) * mu + math.sqrt(v(t) / v(times[0])) * (z - math.cos(times[0]) * mu)
                        for t in times + [0.0]])
    errors = {}
    for substeps in (8, 32):
        path = ode_trajectory(teacher.x0, z, times, substeps=substeps)
        assert path.shape == (4, 64, 2) and torch.equal(path[0], z)
        errors[substeps] = float((path - want).abs().max())
    # Heun (second order: 4x the substeps, ~16x smaller error; measured 9.6e-3 -> 6.0e-4).
    assert errors[32] < 1e-3 and errors[32] < errors[8] / 8, errors
    with pytest.raises(ValueError, match="descending"):
        ode_trajectory(teacher.x0, z, [0.5, 1.0])


def test_causal_ode_init_loss_is_the_per_chunk_regression():
    student = _causal_student()
    g = torch.Generator().manual_seed(0)
    times = [1.5, 0.9, 0.3]
    trajectories = torch.randn(4, 5, 1, 6, 4, 4, generator=g, dtype=torch.float64)
    method = CausalODEInit(student, trajectories, times)
    loss, _ = method.loss("student", torch.zeros(3, 1, 6, 4, 4, dtype=torch.float64), 0, torch.Generator().manual_seed(7))
    # The same draws, then the input assembled chunk by chunk.
    g = torch.Generator().manual_seed(7)
    pick = torch.randint(5, (3,), generator=g)
    step = torch.randint(3, (3, 3), generator=g)
    x_in = torch.empty(3, 1, 6, 4, 4, dtype=torch.float64)
    t = torch.empty(3, 6, dtype=torch.float64)
    for i in range(3):
        for c in range(3):
            x_in[i, :, 2 * c: 2 * c + 2] = trajectories[step[i, c], pick[i], :, 2 * c: 2 * c + 2]
            t[i, 2 * c: 2 * c + 2] = times[step[i, c]]
    want = (student.x0(x_in, t) - trajectories[-1, pick]).pow(2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="len\\(times\\) \\+ 1"):
        CausalODEInit(student, trajectories[:3], times)
    with pytest.raises(TypeError, match="causal"):
        CausalODEInit(TrigFlowModel(TinyDiT(1, 4, 4, frames=6, dim=24, heads=2, depth=1), SIGMA_D), trajectories, times)


def test_self_forcing_trains_the_causal_student_with_dmd_on_its_rollouts():
    student = _causal_student()
    torch.manual_seed(1)
    teacher = TrigFlowModel(TinyDiT(1, 4, 4, frames=6, patch=2, dim=24, heads=2, depth=1).double(), SIGMA_D)
    method = SelfForcing(student, teacher, SelfForcingConfig(steps=3, dmd=DMD2Config(ttur=2)))
    assert method.phases(0) == ["critic", "student"] and method.phases(1) == ["critic"]
    assert all(torch.equal(a, b) for a, b in zip(method.critic.parameters(), teacher.parameters()))
    assert method.rollout_times() == pytest.approx(method.sample_times(3))
    g = torch.Generator().manual_seed(0)
    video = method.generate(torch.zeros(2, 1, 6, 4, 4, dtype=torch.float64), g, grad=True)
    assert video.shape == (2, 1, 6, 4, 4) and video.requires_grad

    before = [p.detach().clone() for p in student.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    videos = torch.randn(8, 1, 6, 4, 4, dtype=torch.float64)
    trainer = Trainer(method, lr=1e-3, seed=0, progress=False)
    history = trainer.fit(videos, 2, 2)
    assert all(math.isfinite(v) for v in history[-1].values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    samples = method.sample(torch.randn(2, 1, 6, 4, 4, dtype=torch.float64), 2, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 6, 4, 4)
    with pytest.raises(TypeError, match="causal"):
        SelfForcing(teacher, teacher)
    with pytest.raises(ValueError, match="times has 2 entries"):
        SelfForcing(student, teacher, SelfForcingConfig(steps=3, times=(1.5, 0.5)))


def test_self_forcing_regression_adds_the_weighted_causal_ode_regression_to_dmd():
    student = _causal_student()
    torch.manual_seed(1)
    teacher = TrigFlowModel(TinyDiT(1, 4, 4, frames=6, patch=2, dim=24, heads=2, depth=1).double(), SIGMA_D)
    g = torch.Generator().manual_seed(0)
    times = [1.5, 0.9, 0.3]
    trajectories = torch.randn(4, 5, 1, 6, 4, 4, generator=g, dtype=torch.float64)
    config = SelfForcingConfig(steps=3, dmd=DMD2Config(ttur=1, regression_weight=0.5))
    method = SelfForcing(student, teacher, config, regression=(trajectories, times))
    plain = SelfForcing(student, teacher, SelfForcingConfig(steps=3, dmd=DMD2Config(ttur=1)), critic=method.critic)
    videos = torch.zeros(3, 1, 6, 4, 4, dtype=torch.float64)
    loss, logs = method.loss("student", videos, 0, torch.Generator().manual_seed(7))
    # The same draws: DMD2's generator loss first, then the regression's (CausalODEInit's loss).
    g = torch.Generator().manual_seed(7)
    dmd, _ = plain.loss("student", videos, 0, g)
    regression, _ = CausalODEInit(student, trajectories, times).loss("student", videos, 0, g)
    torch.testing.assert_close(loss, dmd + 0.5 * regression, rtol=1e-12, atol=0)
    torch.testing.assert_close(logs["regression"], regression.detach())
    assert "regression" not in plain.loss("student", videos, 0, torch.Generator().manual_seed(7))[1]
    with pytest.raises(ValueError, match="go together"):
        SelfForcing(student, teacher, config)
    with pytest.raises(ValueError, match="go together"):
        SelfForcing(student, teacher, SelfForcingConfig(steps=3), regression=(trajectories, times))
    with pytest.raises(ValueError, match="len\\(times\\) \\+ 1"):
        SelfForcing(student, teacher, config, regression=(trajectories[:3], times))
