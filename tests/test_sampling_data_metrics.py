"""TrigFlow conversions, samplers, the Gaussian-mixture oracle and the metrics (issue 6 foundations).

Closed forms used: for data N(mu, s^2 I) the PF-ODE from x(pi/2) = sigma_d e ends at mu + s e exactly,
and E[x0 | x_t] is the Gaussian posterior mean; for a mixture it is checked against Monte Carlo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdistill import data, metrics, sampling, trigflow

SIGMA_D = 0.5


def single_gaussian(mu=(1.0, -2.0), s=0.3):
    return data.GaussianMixture(torch.tensor([mu], dtype=torch.float64), s)


def test_trigflow_velocity_and_consistency_function_are_inverse():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 1.4 + 0.1
    x_t = trigflow.add_noise(x0, z, t)
    v = trigflow.velocity_from_x0(x_t, x0, t)
    # Along x_t = cos t x0 + sin t z (x0, z fixed) the derivative is -sin t x0 + cos t z.
    torch.testing.assert_close(v, -torch.sin(t)[:, None] * x0 + torch.cos(t)[:, None] * z)
    torch.testing.assert_close(trigflow.x0_from_velocity(x_t, v, t), x0)
    sigma = trigflow.t_to_sigma(t, SIGMA_D)
    torch.testing.assert_close(trigflow.sigma_to_t(sigma, SIGMA_D), t)


def test_mixture_denoiser_matches_gaussian_posterior_and_monte_carlo():
    gauss = single_gaussian()
    x = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    sigma = torch.tensor([0.4, 2.0], dtype=torch.float64)
    shrink = 0.3**2 / (0.3**2 + sigma**2)
    want = gauss.means + shrink[:, None] * (x - gauss.means)
    torch.testing.assert_close(gauss.denoise(x, sigma), want)
    # Mixture: E[x0 | x_noisy] by self-normalised importance sampling over prior samples.
    mix = data.ring(4, radius=1.0, std=0.2)
    g = torch.Generator().manual_seed(1)
    prior = mix.sample(400_000, g, dtype=torch.float64)
    point, s = torch.tensor([0.5, 0.3], dtype=torch.float64), 0.6
    weights = torch.softmax(-((point - prior) ** 2).sum(1) / (2 * s * s), 0)
    mc = (weights[:, None] * prior).sum(0)
    torch.testing.assert_close(mix.denoise(point[None], torch.tensor(s))[0], mc, atol=5e-3, rtol=0)


def test_heun_teacher_ode_reaches_the_exact_endpoint():
    gauss = single_gaussian()
    g = torch.Generator().manual_seed(2)
    e = torch.randn(64, 2, generator=g, dtype=torch.float64)

    def x0_fn(x_t, t):  # exact for t < pi/2; at pi/2 the posterior is the prior mean
        t = t.clamp(max=math.pi / 2 - 1e-9)
        return gauss.denoise_trigflow(x_t, t, SIGMA_D)

    exact = gauss.means + 0.3 * e
    heun, nfe = sampling.teacher_ode(x0_fn, SIGMA_D * e, 64, solver="heun")
    assert nfe == 127
    heun_error = (heun - exact).abs().max().item()
    assert heun_error < 1e-3  # dominated by the final Euler step to t = 0 (EDM's rule)
    euler, nfe = sampling.teacher_ode(x0_fn, SIGMA_D * e, 64)
    assert nfe == 64
    assert 5 * heun_error < (euler - exact).abs().max().item() < 5e-2  # first order: visibly worse


def test_one_step_euler_is_the_closed_form_arithmetic():
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    z = torch.randn(5, 2, dtype=torch.float64)
    # At t = pi/2: velocity = (0 * x - x0) / 1 = -x0; one step to 0 gives x + (pi/2) x0.
    out, nfe = sampling.teacher_ode(lambda x, t: mu.expand_as(x), z, 1)
    torch.testing.assert_close(out, z + math.pi / 2 * mu)
    assert nfe == 1


def test_consistency_sampler_renoises_with_cos_sin_of_the_next_time():
    z = torch.randn(3, 2, dtype=torch.float64)
    calls = []

    def f(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.full_like(x, 2.0)

    times = sampling.few_step_times(2)
    assert times == [math.pi / 2, math.pi / 4]
    out = sampling.consistency_sample(f, z, times, torch.Generator().manual_seed(3), sigma_d=SIGMA_D)
    torch.testing.assert_close(out, torch.full_like(z, 2.0))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_D
    torch.testing.assert_close(calls[1][0], math.cos(math.pi / 4) * 2.0 + math.sin(math.pi / 4) * noise)
    assert calls[0][1].tolist() == [math.pi / 2] * 3
    with pytest.raises(ValueError, match="descending"):
        sampling.consistency_sample(f, z, [0.5, 1.0])


def test_ode_consistency_function_is_the_exact_ode_map_and_the_ideal_multistep_student():
    """A Gaussian's PF-ODE keeps (x_t - cos t mu) / std_t fixed (std_t^2 = cos^2 t s^2 + sin^2 t sigma_d^2),
    so its consistency function is mu + s (x_t - cos t mu) / std_t; an exact teacher is consistent, so
    re-noising between steps leaves its samples N(mu, s^2) at any number of steps."""
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.3
    gauss = single_gaussian(tuple(mu.tolist()), s)
    calls = []

    def x0_fn(x_t, t):
        calls.append(len(x_t))
        return gauss.denoise_trigflow(x_t, t.clamp(max=math.pi / 2 - 1e-9), SIGMA_D)

    f = sampling.ode_consistency_function(x0_fn, 64)
    g = torch.Generator().manual_seed(5)
    for t in (math.pi / 2 - 1e-3, 1.0, 0.3):
        x0, e = (torch.randn(32, 2, generator=g, dtype=torch.float64) for _ in range(2))
        x_t = math.cos(t) * (mu + s * x0) + math.sin(t) * SIGMA_D * e
        std_t = math.sqrt(math.cos(t) ** 2 * s ** 2 + math.sin(t) ** 2 * SIGMA_D ** 2)
        calls.clear()
        out = f(x_t, torch.full((32,), t, dtype=torch.float64))
        torch.testing.assert_close(out, mu + s * (x_t - math.cos(t) * mu) / std_t, atol=2e-3, rtol=0)
        heun_steps = math.ceil(64 * t / (math.pi / 2) - 1e-9)
        assert len(calls) == 2 * heun_steps - 1  # Heun, with Euler on the last step to 0

    z = SIGMA_D * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    one = sampling.consistency_sample(f, z, [math.pi / 2])
    torch.testing.assert_close(one, sampling.teacher_ode(x0_fn, z, 64, solver="heun")[0])  # 1 step: the ODE
    g4 = torch.Generator().manual_seed(6)
    four = sampling.consistency_sample(f, z, sampling.few_step_times(4), g4, sigma_d=SIGMA_D)
    assert (four.mean(0) - mu).abs().max() < 0.01 and (four.std(0) - s).abs().max() < 0.01

    with pytest.raises(ValueError, match="steps"):
        sampling.ode_consistency_function(x0_fn, 0)
    with pytest.raises(ValueError, match="t_max"):
        sampling.ode_consistency_function(x0_fn, 8, t_max=2.0)
    with pytest.raises(ValueError, match="one time"):
        f(z[:2], torch.tensor([1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be"):
        f(z[:2], torch.tensor([1.0], dtype=torch.float64))


def test_metrics_separate_distributions_and_vanish_on_equal_ones():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(20_000, 2, generator=g)
    b = torch.randn(20_000, 2, generator=g)
    shifted = b + torch.tensor([0.5, 0.0])
    # 1-D W1 between N(0,1) and N(0.5,1) along direction u is 0.5 |u_x|; its mean over the circle is 1/pi.
    assert abs(metrics.sliced_wasserstein(a, shifted, projections=512) - 0.5 * 2 / math.pi) < 0.025
    assert metrics.sliced_wasserstein(a, b) < 0.02
    a, b, shifted = a[:1500], b[:1500], shifted[:1500]  # MMD holds an [N + M]^2 kernel matrix
    assert metrics.mmd_rbf(a, shifted) > 10 * abs(metrics.mmd_rbf(a, b))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.sliced_wasserstein(a, torch.zeros(5, 3))


def test_mode_coverage_counts_modes():
    grid = data.grid(5)
    g = torch.Generator().manual_seed(5)
    samples = grid.sample(2500, g)
    assert grid.modes_covered(samples) == 25
    only_center = samples[(samples.abs() < 0.5).all(1)]
    assert grid.modes_covered(only_center) == 1


def test_class_coverage_counts_classes_with_a_tenth_of_their_fair_share():
    # 1,000 labels: the fair share is 100, the threshold 10.
    labels = torch.cat([torch.full((10,), 0), torch.full((9,), 1), torch.arange(2, 10).repeat_interleave(123)])
    assert metrics.classes_covered(labels[: 1000]) == 9  # class 1 (9 < 10) is not present
    assert metrics.classes_covered(labels[: 1000], min_fraction=0.0) == 10
    assert metrics.classes_covered(torch.full((500,), 3)) == 1


def test_load_npy_points_images_and_bad_files(tmp_path):
    points = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float64)
    np.save(tmp_path / "p.npy", points)
    torch.testing.assert_close(data.load_npy(str(tmp_path / "p.npy")), torch.from_numpy(points).float())
    np.save(tmp_path / "i.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    assert data.load_npy(str(tmp_path / "i.npy")).shape == (4, 8, 8)
    np.save(tmp_path / "bad.npy", np.zeros((4,)))
    with pytest.raises(ValueError, match=r"N x d points or N x H x W images"):
        data.load_npy(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "nan.npy", np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        data.load_npy(str(tmp_path / "nan.npy"))
