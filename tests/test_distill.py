"""fastdistill.distill: the methods' formulas against closed forms and finite differences, the teacher
adapters against the Gaussian-mixture oracle, and the Trainer's TTUR, checkpoint and data parallel.

Oracles: for data N(mu, s^2 I) the PF-ODE maps x_t = cos t mu + sqrt(v_t) e (v_t = cos^2 t s^2 +
sin^2 t sigma_d^2) to mu + s e, so the exact consistency function is f(x_t, t) = mu + s (x_t - cos t mu)
/ sqrt(v_t); GaussianMixture.denoise gives the exact E[x0 | x_t].
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

from fastdistill import data
from fastdistill.distill import (
    DMD2, LCM, RCM, SCM, ClassifierFreeGuidance, Denoiser, DMD2Config, EDMTeacher, EpsTeacher,
    LCMConfig, RCMConfig, RectifiedFlowTeacher, SCMConfig, Trainer, TrigFlowModel, cosine_schedule, dmd_gradient, guided,
)
from fastdistill.distill.lcm import ddim_step, pseudo_huber
from fastdistill.models import AdaLNMLP

SIGMA_D = 0.7
MU = (1.0, -2.0)
S = 0.3


class ExactConsistency(nn.Module):
    """F of the exact consistency function of N(MU, S^2 I), as a network of (x_t / sigma_d, t)."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    def forward(self, x_scaled, t):
        mu = torch.tensor(MU, dtype=x_scaled.dtype)
        x, tt = x_scaled * SIGMA_D, t[:, None]
        v = torch.cos(tt) ** 2 * S * S + torch.sin(tt) ** 2 * SIGMA_D**2
        f = mu + S * (x - torch.cos(tt) * mu) / torch.sqrt(v) + self.offset * torch.sin(3 * tt) * x
        return (torch.cos(tt) * x - f) / (torch.sin(tt) * SIGMA_D)


class MixtureTeacher(Denoiser):
    """The exact denoiser of a GaussianMixture as a TrigFlow teacher."""

    def __init__(self, mixture, sigma_d=SIGMA_D):
        super().__init__()
        self.mixture, self.sigma_d = mixture, sigma_d

    def x0(self, x_t, t):
        return self.mixture.denoise_trigflow(x_t, t.clamp(max=math.pi / 2 - 1e-9), self.sigma_d)


def gaussian():
    return data.GaussianMixture(torch.tensor([MU], dtype=torch.float64), S)


def scm_point(method, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gaussian().sample(n, g, dtype=torch.float64)
    t, z, x_t = method.draw(x0, g)
    return x0, t, z, x_t


# -- sCM --------------------------------------------------------------------------------------------
def test_scm_tangent_vanishes_for_the_exact_consistency_function_and_not_otherwise():
    config = SCMConfig(tangent_norm=0.0, tangent_warmup=0, adaptive_weight=False)
    exact = SCM(TrigFlowModel(ExactConsistency(), SIGMA_D), MixtureTeacher(gaussian()), config)
    x0, t, z, x_t = scm_point(exact)
    _, g = exact.tangent(x_t, t, exact.ode_velocity(x0, z, x_t, t), iteration=1)
    assert g.abs().max().item() < 1e-10  # g = cos t df/dt = 0 along the exact PF-ODE
    wrong = SCM(TrigFlowModel(ExactConsistency(offset=0.2), SIGMA_D), MixtureTeacher(gaussian()), config)
    _, g = wrong.tangent(x_t, t, wrong.ode_velocity(x0, z, x_t, t), iteration=1)
    assert g.abs().max().item() > 1e-2


def test_scm_tangent_matches_finite_differences_in_float64():
    torch.manual_seed(0)
    net = AdaLNMLP(2, width=32, depth=2).double()
    for p in net.parameters():  # non-zero modulation so time enters every block
        nn.init.normal_(p, std=0.2)
    config = SCMConfig(tangent_norm=0.0, tangent_warmup=4, adaptive_weight=False)
    method = SCM(TrigFlowModel(net, SIGMA_D), MixtureTeacher(data.ring(4, radius=1.0, std=0.2)), config)
    x0, t, z, x_t = scm_point(method, n=16)
    dxdt = method.ode_velocity(x0, z, x_t, t)
    f_minus, g = method.tangent(x_t, t, dxdt, iteration=2)  # r = 1/2

    def F(x, time):
        return net(x / SIGMA_D, time)

    h = 1e-6
    dF = (F(x_t + h * dxdt, t + h) - F(x_t - h * dxdt, t - h)) / (2 * h)  # total derivative along the ODE
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    want = -c**2 * (SIGMA_D * F(x_t, t) - dxdt) - 0.5 * (c * s * x_t + SIGMA_D * c * s * dF)
    torch.testing.assert_close(f_minus, F(x_t, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-8)
    # Normalisation: g / (||g|| + c) per sample.
    method.config.tangent_norm = 0.1
    _, g_normed = method.tangent(x_t, t, dxdt, iteration=2)
    torch.testing.assert_close(g_normed, want / (want.norm(dim=1, keepdim=True) + 0.1), rtol=1e-7, atol=1e-9)


def test_scm_training_uses_the_conditional_velocity_without_teacher():
    method = SCM(TrigFlowModel(ExactConsistency(), SIGMA_D), None, SCMConfig())
    x0, t, z, x_t = scm_point(method)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    torch.testing.assert_close(method.ode_velocity(x0, z, x_t, t), c * z - s * x0)
    with pytest.raises(TypeError, match="TrigFlowModel"):
        SCM(MixtureTeacher(gaussian()), None)


def test_scm_loss_gradient_pulls_f_towards_the_tangent_target():
    """d loss / d F_theta = 2 e^{-w} (F_theta - F^- - g) / (N D) = -2 g / (N D) at w = 0."""
    torch.manual_seed(1)
    net = AdaLNMLP(2, width=16, depth=1).double()
    method = SCM(TrigFlowModel(net, SIGMA_D), MixtureTeacher(gaussian()), SCMConfig(tangent_warmup=0))
    g = torch.Generator().manual_seed(3)
    x0 = gaussian().sample(8, g, dtype=torch.float64)
    captured = {}
    original = method.student.forward

    def spy(x_t, t):
        out = original(x_t, t)
        out.retain_grad()
        captured["F"] = out
        return out

    method.student.forward = spy
    state = g.get_state()
    loss, _ = method.loss("student", x0, 5, g)
    loss.backward()
    g.set_state(state)
    t, z, x_t = method.draw(x0, g)
    _, tangent = method.tangent(x_t, t, method.ode_velocity(x0, z, x_t, t), 5)
    torch.testing.assert_close(captured["F"].grad, -2 * tangent / tangent.numel(), rtol=1e-6, atol=1e-12)


# -- DMD2 -------------------------------------------------------------------------------------------
def test_dmd_generator_gradient_is_the_normalised_score_difference():
    real = MixtureTeacher(data.GaussianMixture(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.4))
    fake = MixtureTeacher(data.GaussianMixture(torch.tensor([[0.0, 1.0]], dtype=torch.float64), 0.6))
    student = TrigFlowModel(AdaLNMLP(2, width=8, depth=1).double(), SIGMA_D)
    method = DMD2(student, real, DMD2Config(), critic=fake)
    g = torch.Generator().manual_seed(4)
    x_hat = torch.randn(32, 2, generator=g, dtype=torch.float64, requires_grad=True)
    state = g.get_state()
    loss, x_t, t = method.dmd_term(x_hat, g)
    loss.backward()
    # Independent recomputation with the same random draws.
    g.set_state(state)
    lo, hi = (f * math.pi / 2 for f in method.config.t_range)
    t_want = lo + (hi - lo) * torch.rand(32, generator=g, dtype=torch.float64)
    noise = torch.randn(32, 2, generator=g, dtype=torch.float64) * SIGMA_D
    x_t_want = torch.cos(t_want)[:, None] * x_hat.detach() + torch.sin(t_want)[:, None] * noise
    torch.testing.assert_close(x_t.detach(), x_t_want)
    x0_real = real.mixture.denoise_trigflow(x_t_want, t_want, SIGMA_D)
    x0_fake = fake.mixture.denoise_trigflow(x_t_want, t_want, SIGMA_D)
    grad = (x0_fake - x0_real) / (x_hat.detach() - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x_hat.grad, grad / x_hat.numel(), rtol=1e-10, atol=1e-14)


def test_dmd_batch_normaliser_divides_by_the_batch_mean_of_the_per_sample_scales():
    g = torch.Generator().manual_seed(5)
    x_hat, real, fake = (torch.randn(6, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    x_hat[0] = real[0] + 1e-3  # a sample on its mode: the per-sample normaliser blows its gradient up
    diff = fake - real
    per_sample = (x_hat - real).abs().mean((1, 2), keepdim=True)
    torch.testing.assert_close(dmd_gradient(x_hat, real, fake), diff / per_sample, rtol=1e-12, atol=0)
    torch.testing.assert_close(dmd_gradient(x_hat, real, fake, "batch"), diff / per_sample.mean(), rtol=1e-12, atol=0)
    assert dmd_gradient(x_hat, real, fake)[0].abs().max() > 100 * dmd_gradient(x_hat, real, fake, "batch")[0].abs().max()
    with pytest.raises(ValueError, match="normaliser"):
        dmd_gradient(x_hat, real, fake, "global")
    with pytest.raises(ValueError, match="normaliser"):
        DMD2(TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D), TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D),
             DMD2Config(normaliser="global"))


def _exact_ode_path(z, times):
    """States of the PF-ODE of N(MU, S^2 I) (data) from noise z ~ N(0, sigma_d^2 I) at `times`, and its
    end point: x_t = cos t mu + sqrt(v_t) e with e = z / sigma_d, ending at mu + S e."""
    mu, e = torch.tensor(MU, dtype=torch.float64), z / SIGMA_D
    states = []
    for t in times:
        v = math.cos(t) ** 2 * S * S + math.sin(t) ** 2 * SIGMA_D**2
        states.append(math.cos(t) * mu + math.sqrt(v) * e)
    return torch.stack(states, 1), mu + S * e


def test_dmd2_trajectory_regression_pairs_each_state_with_its_time():
    """The exact consistency function maps every state of the exact ODE path to its end point, so its
    regression loss vanishes; one that is exact only at t_max does not, and the logged loss equals an
    independent recomputation with the same draws."""
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_D
    times = [1.5, 0.9, 0.4]
    states, end = _exact_ode_path(z, times)
    teacher = TrigFlowModel(AdaLNMLP(2, width=8, depth=1).double(), SIGMA_D)
    config = DMD2Config(regression_weight=1.0)
    x0 = torch.zeros(16, 2, dtype=torch.float64)
    exact = DMD2(TrigFlowModel(ExactConsistency(), SIGMA_D), teacher, config, regression_pairs=(states, times, end))
    _, logs = exact.generator_loss(x0, 0, torch.Generator().manual_seed(0))
    assert float(logs["regression"]) < 1e-24
    # Time-reversed pairing: the states meet the wrong times, and the loss must see it.
    swapped = DMD2(TrigFlowModel(ExactConsistency(), SIGMA_D), teacher, config,
                   regression_pairs=(states.flip(1), times, end))
    assert float(swapped.generator_loss(x0, 0, torch.Generator().manual_seed(0))[1]["regression"]) > 1e-3

    method = DMD2(TrigFlowModel(ExactConsistency(offset=0.5), SIGMA_D), teacher, config, regression_pairs=(states, times, end))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    _, logs = method.generator_loss(x0, 0, g)
    g.set_state(state)  # replay: the generator sample and the DMD term draw first, then the pairs and times
    with torch.no_grad():
        method.dmd_term(method.generate(x0, g, grad=False), g)
    pick = torch.randint(40, (16,), generator=g)
    k = torch.randint(3, (16,), generator=g)
    t = torch.tensor(times, dtype=torch.float64)[k]
    f = ExactConsistency(offset=0.5)(states[pick, k] / SIGMA_D, t)
    x0_pred = torch.cos(t)[:, None] * states[pick, k] - torch.sin(t)[:, None] * SIGMA_D * f
    want = (x0_pred - end[pick]).pow(2).mean()
    assert float(want) > 1e-4
    torch.testing.assert_close(logs["regression"], want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="disagree"):
        DMD2(TrigFlowModel(ExactConsistency(), SIGMA_D), teacher, config, regression_pairs=(states, times[:2], end))
    with pytest.raises(ValueError, match="go together"):
        DMD2(TrigFlowModel(ExactConsistency(), SIGMA_D), teacher, DMD2Config(), regression_pairs=(states, times, end))


def test_dmd2_critic_starts_as_the_teacher_and_ttur_schedules_phases():
    teacher = TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D)
    student = copy.deepcopy(teacher)
    method = DMD2(student, teacher, DMD2Config(ttur=3))
    for a, b in zip(method.critic.parameters(), teacher.parameters()):
        assert torch.equal(a, b) and a.requires_grad and not b.requires_grad and a is not b
    assert [method.phases(i) for i in range(4)] == [["critic", "student"], ["critic"], ["critic"], ["critic", "student"]]
    with pytest.raises(ValueError, match="steps and ttur"):
        DMD2(student, teacher, DMD2Config(ttur=0))


def test_dmd2_backward_simulation_trains_the_step_it_exits_at():
    teacher = TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D)
    method = DMD2(copy.deepcopy(teacher), teacher, DMD2Config(steps=4))
    seen = []
    original = method.student.x0

    def spy(x, t):
        seen.append((float(t[0]), torch.is_grad_enabled()))
        return original(x, t)

    method.student.x0 = spy
    exits = set()
    for seed in range(40):
        seen.clear()
        method.generate(torch.zeros(3, 2), torch.Generator().manual_seed(seed), grad=True)
        assert [grad for _, grad in seen] == [False] * (len(seen) - 1) + [True]
        assert [time for time, _ in seen] == pytest.approx(method.sample_times(4)[: len(seen)])
        exits.add(len(seen))
    assert exits == {1, 2, 3, 4}


@pytest.mark.parametrize("regression", [False, True])
def test_rcm_student_loss_is_scm_plus_weighted_dmd_and_critic_follows_ttur(regression):
    torch.manual_seed(2)
    teacher = TrigFlowModel(AdaLNMLP(2, width=8, depth=1).double(), SIGMA_D)
    pairs = (torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)) if regression else None
    config = RCMConfig(dmd=DMD2Config(ttur=1, regression_weight=2.0 if regression else 0.0), dmd_weight=0.25)
    method = RCM(copy.deepcopy(teacher).requires_grad_(True), teacher, config, regression_pairs=pairs)
    x0 = data.ring(4).sample(16, torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    loss, logs = method.loss("student", x0, 3, g)
    g.set_state(state)
    scm, _ = method.scm.consistency_loss(x0, 3, g)
    dmd, _ = method.dmd.generator_loss(x0, 3, g)
    torch.testing.assert_close(loss, scm + 0.25 * dmd)
    assert {"scm", "dmd"} <= set(logs) and method.phases(0) == ["critic", "student"]
    if regression:  # the DMD part's loss carries DMD2's regression term on the given pairs
        assert logs["regression"] > 0
        torch.testing.assert_close(dmd, logs["dmd"] + 2.0 * logs["regression"])
    else:
        assert "regression" not in logs
    assert set(method.role_parameters()) == {"student", "critic"}
    critic_ids = {id(p) for p in method.role_parameters()["critic"]}
    assert not critic_ids & {id(p) for p in method.student.parameters()}


# -- LCM --------------------------------------------------------------------------------------------
def test_ddim_step_is_exact_for_the_true_x0_and_pseudo_huber_is_its_formula():
    g = torch.Generator().manual_seed(5)
    x0, e = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t, s = torch.full((4,), 1.2, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    x_t = math.cos(1.2) * x0 + math.sin(1.2) * e
    torch.testing.assert_close(ddim_step(x_t, x0, t, s), math.cos(0.4) * x0 + math.sin(0.4) * e)
    a, b = torch.randn(5, 2, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(a, b, 0.3), torch.sqrt(((a - b) ** 2).sum((1, 2)) + 0.09) - 0.3)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_lcm_teacher_step_converges_at_its_order_on_the_exact_gaussian_ode(solver, order):
    # N(MU, S^2 I)'s PF-ODE in closed form: x_s = cos s MU + sqrt(v_s / v_t) (x_t - cos t MU),
    # v_t = cos^2 t S^2 + sin^2 t sigma_d^2. A method of order p has local error O(h^(p + 1)):
    # halving h divides it by 2^(p + 1).
    method = LCM(TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D), MixtureTeacher(gaussian()), LCMConfig(solver=solver))
    g = torch.Generator().manual_seed(8)
    mu = torch.tensor(MU, dtype=torch.float64)
    t = torch.full((16,), 1.1, dtype=torch.float64)
    x_t = math.cos(1.1) * mu + torch.randn(16, 2, generator=g, dtype=torch.float64)
    variance = lambda u: math.cos(u) ** 2 * S * S + math.sin(u) ** 2 * SIGMA_D**2  # noqa: E731
    errors = []
    for h in (0.08, 0.04):
        s = 1.1 - h
        exact = math.cos(s) * mu + math.sqrt(variance(s) / variance(1.1)) * (x_t - math.cos(1.1) * mu)
        errors.append((method.teacher_step(x_t, t, torch.full_like(t, s)) - exact).abs().max().item())
    assert 2 ** (order + 1) * 0.8 < errors[0] / errors[1] < 2 ** (order + 1) * 1.25, errors
    # At t_prev = 0 both solvers take the plain DDIM step onto the x0 estimate.
    zero = torch.zeros_like(t)
    torch.testing.assert_close(method.teacher_step(x_t, t, zero), method.teacher.x0(x_t, t))
    with pytest.raises(ValueError, match="solver"):
        LCM(method.student, method.teacher, LCMConfig(solver="rk4"))


def test_lcm_segments_map_to_their_start_and_the_target_tracks_the_student():
    teacher = TrigFlowModel(AdaLNMLP(2, width=8, depth=1), SIGMA_D)
    method = LCM(copy.deepcopy(teacher), teacher, LCMConfig(grid=12, segments=3, target_decay=0.5))
    index = torch.arange(1, 13)
    assert method.boundary(index).tolist() == [0] * 4 + [4] * 4 + [8] * 4
    x = torch.randn(12, 2)
    at_start = method.consistency_output(method.student, x, torch.tensor([4] * 12))
    assert not torch.allclose(at_start, x)  # index 4 belongs to segment (0, 4]: maps to t_0 = 0
    # The target EMA: after a step, target = 0.5 target + 0.5 student.
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target.parameters()]
    method.after_step("student", 0)
    for b, p, s in zip(before, method.target.parameters(), method.student.parameters()):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * s)
    with pytest.raises(ValueError, match="multiple of segments"):
        LCM(copy.deepcopy(teacher), teacher, LCMConfig(grid=10, segments=3))
    with pytest.raises(ValueError, match="3 steps"):
        method.sample(torch.randn(2, 2), 2)


# -- adapters and guidance ------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_teacher_adapters_reproduce_the_oracle_denoiser(sigma_d):
    mixture = data.ring(4, radius=1.0, std=0.2)
    oracle = MixtureTeacher(mixture, sigma_d)
    g = torch.Generator().manual_seed(6)
    t = 0.1 + 1.3 * torch.rand(32, generator=g, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * mixture.sample(32, g, dtype=torch.float64) + torch.sin(t)[:, None] * sigma_d * torch.randn(32, 2, generator=g, dtype=torch.float64)
    want = oracle.x0(x_t, t)

    def rf_velocity(x_s, s):  # e - E[x0 | x_s] / ... for x_s = (1 - s) x0 + s e
        s_ = s[:, None]
        x0 = mixture.denoise(x_s / (1 - s_), s / (1 - s))
        return (x_s - x0) / s_

    torch.testing.assert_close(RectifiedFlowTeacher(rf_velocity, sigma_d).x0(x_t, t), want)
    torch.testing.assert_close(EDMTeacher(lambda x, sigma: mixture.denoise(x, sigma), sigma_d).x0(x_t, t), want)

    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    teacher = EpsTeacher(None, alphas, sigma_d)
    log_sigmas = teacher.log_sigmas

    def eps_model(x_n, n):  # the exact eps-predictor, with the adapter's continuous step -> sigma map
        lower = n.floor().long().clamp(0, len(log_sigmas) - 2)
        sigma = torch.exp(log_sigmas[lower] + (n - lower) * (log_sigmas[lower + 1] - log_sigmas[lower]))[:, None]
        a = 1 / (1 + sigma**2)
        x0 = mixture.denoise(x_n / a.sqrt(), sigma[:, 0])
        return (x_n - a.sqrt() * x0) / (1 - a).sqrt()

    teacher.model = eps_model
    inside = (sigma_d * torch.tan(t) > log_sigmas[0].exp()) & (sigma_d * torch.tan(t) < log_sigmas[-1].exp())
    torch.testing.assert_close(teacher.x0(x_t, t)[inside], want[inside])


def test_guidance_conventions_and_explicit_choice():
    c, u = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(guided(c, u, 4.0, "standard"), guided(c, u, 3.0, "dmd2"))
    torch.testing.assert_close(guided(c, u, 1.0, "standard"), c)
    torch.testing.assert_close(guided(c, u, 0.0, "dmd2"), c)
    with pytest.raises(ValueError, match="convention"):
        guided(c, u, 1.0, "cfg")

    class Conditional(Denoiser):
        sigma_d = 1.0

        def x0(self, x, t, label):
            return x * 0 + label

    guided_teacher = ClassifierFreeGuidance(Conditional(), 3.0, convention="standard", uncond={"label": 0.0})
    x, t = torch.zeros(2, 2), torch.full((2,), 0.5)
    torch.testing.assert_close(guided_teacher.x0(x, t, label=1.0), torch.full((2, 2), 3.0))
    with pytest.raises(TypeError):
        ClassifierFreeGuidance(Conditional(), 3.0, uncond={"label": 0.0})  # no default convention


# -- Trainer ----------------------------------------------------------------------------------------
def _dmd_method(seed=0):
    torch.manual_seed(seed)
    teacher = TrigFlowModel(AdaLNMLP(2, width=16, depth=1), SIGMA_D)
    return DMD2(copy.deepcopy(teacher).requires_grad_(True), teacher, DMD2Config(steps=(1, 2), ttur=2))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    train = data.ring(4).sample(256, torch.Generator().manual_seed(0))
    settings = dict(lr={"student": 1e-3, "critic": 2e-3}, ema_decay=0.9, grad_clip=1.0, accumulation=2, progress=False)
    straight = Trainer(_dmd_method(), **settings)
    straight.fit(train, 6, 16)
    first = Trainer(_dmd_method(), **settings)
    first.fit(train, 3, 16)
    first.save(tmp_path / "ckpt.pt")
    resumed = Trainer(_dmd_method(seed=123), **settings)  # different init: everything must come from the file
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(train, 6, 16)
    for a, b in zip(_params(straight.method), _params(resumed.method)):
        assert torch.equal(a, b)
    for a, b in zip(_params(straight.ema), _params(resumed.ema)):
        assert torch.equal(a, b)
    assert resumed.iteration == 6
    assert not all(torch.equal(a, b) for a, b in zip(_params(straight.method.student), _params(_dmd_method().student)))


def test_trainer_steps_only_the_roles_of_the_phase():
    method = _dmd_method()
    trainer = Trainer(method, lr=1e-2, progress=False)
    train = data.ring(4).sample(64, torch.Generator().manual_seed(0))
    trainer.step(train, 8)  # iteration 0: critic and student
    student, critic = _params(method.student), _params(method.critic)
    trainer.step(train, 8)  # iteration 1: critic only (ttur 2)
    assert all(torch.equal(a, b) for a, b in zip(student, _params(method.student)))
    assert not all(torch.equal(a, b) for a, b in zip(critic, _params(method.critic)))
    with pytest.raises(ValueError, match="no optimizer"):
        Trainer(method, optimizers={"student": torch.optim.SGD(method.student.parameters(), lr=1)})


def test_lr_schedule_scales_every_role_and_survives_resume(tmp_path):
    schedule = cosine_schedule(4, final=0.1)
    assert [schedule(i) for i in (0, 2, 4, 9)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    train = data.ring(4).sample(64, torch.Generator().manual_seed(0))
    seen = []
    trainer = Trainer(_dmd_method(), lr={"student": 1e-3, "critic": 4e-3}, lr_schedule=schedule, progress=False)
    original = trainer.optimizers["critic"].step

    def spy(*args, **kwargs):  # the critic steps every iteration (ttur 2)
        seen.append((trainer.optimizers["student"].param_groups[0]["lr"], trainer.optimizers["critic"].param_groups[0]["lr"]))
        return original(*args, **kwargs)

    trainer.optimizers["critic"].step = spy
    trainer.fit(train, 5, 8)
    assert seen == pytest.approx([(1e-3 * schedule(i), 4e-3 * schedule(i)) for i in range(5)])
    straight = Trainer(_dmd_method(), lr=1e-2, lr_schedule=schedule, progress=False)
    straight.fit(train, 4, 8)
    first = Trainer(_dmd_method(), lr=1e-2, lr_schedule=schedule, progress=False)
    first.fit(train, 2, 8)
    first.save(tmp_path / "ckpt.pt")
    resumed = Trainer(_dmd_method(seed=9), lr=1e-2, lr_schedule=schedule, progress=False)
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(train, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(_params(straight.method), _params(resumed.method)))
    with pytest.raises(TypeError, match="lr_schedule"):
        Trainer(_dmd_method(), lr_schedule="cosine")
    with pytest.raises(ValueError, match="cosine_schedule"):
        cosine_schedule(0)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: the trainer must broadcast rank 0's
        teacher = TrigFlowModel(AdaLNMLP(2, width=16, depth=1), SIGMA_D)
        train = data.ring(4).sample(512, torch.Generator().manual_seed(0))
        methods = {
            "scm": SCM(copy.deepcopy(teacher).requires_grad_(True), teacher, SCMConfig(tangent_warmup=2)),
            "dmd2": DMD2(copy.deepcopy(teacher).requires_grad_(True), teacher, DMD2Config(ttur=2)),
        }
        result = {}
        for name, method in methods.items():
            trainer = Trainer(method, lr=1e-2, seed=0, progress=False)
            start = _params(method)
            trainer.fit(train, 4, 32)
            result[name] = (start, _params(method))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_data_parallel_keeps_ranks_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("scm", "dmd2"):
        (start0, end0), (start1, end1) = ranks[0][name], ranks[1][name]
        assert all(torch.equal(a, b) for a, b in zip(start0, start1))  # broadcast from rank 0
        assert all(torch.equal(a, b) for a, b in zip(end0, end1))  # averaged gradients: same updates
        assert not all(torch.equal(a, b) for a, b in zip(start0, end0))  # and it did train
