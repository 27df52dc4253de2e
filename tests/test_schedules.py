"""Schedules against their defining formulas, written independently here (and diffusers' tables where present)."""

import math

import numpy as np
import pytest
from scipy import integrate

import fastdiff as fd
from fastdiff import schedules as S

ALL = {
    "DiscreteVP": S.DiscreteVP(),
    "DiscreteVP.scaled_linear": S.DiscreteVP.scaled_linear(),
    "DiscreteVP.cosine": S.DiscreteVP.cosine(),
    "ContinuousVP": S.ContinuousVP(),
    "SubVP": S.SubVP(),
    "VE": S.VE(),
    "EDM": S.EDM(),
    "RectifiedFlow": S.RectifiedFlow(),
    "RectifiedFlow.lipman": S.RectifiedFlow.lipman(1e-4),
}


def interior_times(sch, n=37):
    return np.linspace(sch.t_min, sch.t_max, n)[1:-1]


@pytest.mark.parametrize("name", list(ALL))
def test_lambda_roundtrip_and_monotone(name):
    sch = ALL[name]
    t = interior_times(sch)
    lam = sch.lambda_(t)
    assert np.all(np.diff(lam) < 0), "lambda must decrease in t"
    np.testing.assert_allclose(sch.t_from_lambda(lam), t, rtol=1e-9, atol=1e-9 * max(1.0, sch.t_max))
    np.testing.assert_allclose(lam, np.log(sch.alpha(t) / sch.sigma(t)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL))
def test_derivatives_match_finite_differences(name):
    sch = ALL[name]
    t = interior_times(sch, 11)
    if isinstance(sch, S.DiscreteVP):
        t = np.floor(t) + 0.5  # piecewise: differentiate inside one interval
    h = 1e-6 * max(1.0, sch.t_max)
    np.testing.assert_allclose(sch.dalpha(t), (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sch.dsigma(t), (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h), rtol=1e-5, atol=1e-8)


def test_continuous_vp_is_the_integral_of_beta():
    sch = S.ContinuousVP(beta_min=0.1, beta_max=20.0)
    for t in (0.01, 0.3, 0.77, 1.0):
        integral = integrate.quad(lambda u: 0.1 + u * 19.9, 0, t)[0]
        assert math.isclose(sch.alpha(t), math.exp(-0.5 * integral), rel_tol=1e-12)
        assert math.isclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, 1.0, rel_tol=1e-12)


def test_sub_vp_sigma():
    vp, sub = S.ContinuousVP(), S.SubVP()
    t = np.linspace(0.01, 1, 9)
    np.testing.assert_allclose(sub.alpha(t), vp.alpha(t))
    np.testing.assert_allclose(sub.sigma(t), 1 - vp.alpha(t) ** 2, rtol=1e-12)


def test_ve_and_edm():
    ve = S.VE(sigma_min=0.01, sigma_max=50.0)
    assert math.isclose(ve.sigma(0.0), 0.01) and math.isclose(ve.sigma(1.0), 50.0) and ve.alpha(0.3) == 1.0
    assert ve.init_scale == pytest.approx(50.0)
    edm = S.EDM()
    assert edm.sigma(3.5) == 3.5 and edm.alpha(3.5) == 1.0 and edm.init_scale == 80.0
    assert S.DiscreteVP().init_scale == 1.0 and S.RectifiedFlow().init_scale == 1.0


def test_discrete_vp_tables():
    betas = np.linspace(1e-4, 0.02, 1000)
    sch = S.DiscreteVP()
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(sch.alphas_cumprod, ab, rtol=1e-12)
    np.testing.assert_allclose(sch.alpha(np.arange(1000.0)) ** 2, ab, rtol=1e-12)
    assert sch.alpha(-1.0) == 1.0 and sch.sigma(-1.0) == 0.0  # the clean point (set_alpha_to_one)
    custom = S.DiscreteVP(betas=betas[:50])
    assert custom.num_train_timesteps == 50 and custom.t_max == 49.0


def test_zero_terminal_snr():
    sch = S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True)
    assert sch.alpha(999.0) == 0.0 and sch.sigma(999.0) == 1.0
    plain = S.DiscreteVP.scaled_linear()
    assert math.isclose(sch.alpha(0.0), plain.alpha(0.0), rel_tol=1e-9)  # first step unchanged (Lin et al.)
    assert sch.t_from_lambda(-np.inf) == 999.0


def test_discrete_fractional_time_interpolates_log_sigma():
    sch = S.DiscreteVP()
    s = lambda t: sch.sigma(t) / sch.alpha(t)  # noqa: E731
    assert math.isclose(math.log(s(10.25)), 0.75 * math.log(s(10.0)) + 0.25 * math.log(s(11.0)), rel_tol=1e-12)


def test_rectified_flow_and_lipman_convention():
    rf = S.RectifiedFlow()
    assert rf.alpha(0.3) == pytest.approx(0.7) and rf.sigma(0.3) == pytest.approx(0.3)
    lip = S.RectifiedFlow.lipman(sigma_min=0.01)
    t_lipman = 0.8  # Lipman et al. 2023: mu_t = t x1, sigma_t = 1 - (1 - sigma_min) t
    t = lip.t_from_model_time(t_lipman)
    assert lip.model_time(t) == pytest.approx(t_lipman)
    assert lip.alpha(t) == pytest.approx(t_lipman)
    assert lip.sigma(t) == pytest.approx(1 - (1 - 0.01) * t_lipman)
    assert lip.model_time_rate == -1.0


@pytest.mark.parametrize("bad", [dict(beta_schedule="quadratic"), dict(betas=[0.5, 1.5])])
def test_bad_discrete_schedule(bad):
    with pytest.raises(ValueError):
        S.DiscreteVP(**bad)


def test_schedules_are_hashable_values():
    assert S.DiscreteVP() == S.DiscreteVP() and hash(S.EDM()) == hash(S.EDM())
    assert S.ContinuousVP() != S.SubVP()


def test_against_diffusers_tables():
    diffusers = pytest.importorskip("diffusers")
    for kw, ours in [
        (dict(beta_schedule="linear"), S.DiscreteVP()),
        (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), S.DiscreteVP.scaled_linear()),
        (dict(beta_schedule="squaredcos_cap_v2"), S.DiscreteVP.cosine()),
        (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
         S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True)),
    ]:
        theirs = diffusers.DDPMScheduler(**kw).alphas_cumprod.double().numpy()
        # diffusers keeps betas in float32
        np.testing.assert_allclose(ours.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)
