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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make,match", [
    (lambda: S.EDM(sigma_min=100, sigma_max=1), r"sigma_min=100, sigma_max=1\): sigma_min must be smaller"),
    (lambda: S.EDM(sigma_min=-1.0), r"sigma_min=-1.0\): sigma_min must be in \(0.0, inf\)"),
    (lambda: S.EDM(sigma_max=INF), r"sigma_max=inf\): sigma_max must be finite"),
    (lambda: S.EDM(sigma_data=0), r"sigma_data=0\)"),
    (lambda: S.EDM(sigma_data=NAN), r"sigma_data=nan\)"),
    (lambda: S.ContinuousVP(t_min=0.9, t_max=0.1), r"t_min=0.9, t_max=0.1\): t_min must be smaller than t_max"),
    (lambda: S.ContinuousVP(beta_min=-0.1), r"beta_min=-0.1\): beta_min must be in \[0.0, inf\)"),
    (lambda: S.ContinuousVP(beta_min=20.0, beta_max=0.1), r"beta_min must be smaller than beta_max"),
    (lambda: S.ContinuousVP(t_max=1.5), r"t_max=1.5\): t_max must be in \(0.0, 1.0\]"),
    (lambda: S.SubVP(t_min=0.0), r"SubVP\(t_min=0.0\)"),
    (lambda: S.SubVP(beta_max="20"), r"beta_max='20'\): beta_max must be a real number"),
    (lambda: S.VE(sigma_min=0), r"VE\(sigma_min=0\): sigma_min must be in \(0.0, inf\)"),
    (lambda: S.VE(sigma_min=50.0, sigma_max=0.01), r"sigma_min must be smaller than sigma_max"),
    (lambda: S.VE(t_max=NAN), r"t_max=nan"),
    (lambda: S.RectifiedFlow(t_max=2), r"RectifiedFlow\(t_max=2\): t_max must be in \(0.0, 1.0\]"),
    (lambda: S.RectifiedFlow(t_min=0.5, t_max=0.5), r"t_min must be smaller than t_max"),
    (lambda: S.RectifiedFlow(shift=0), r"shift=0\): shift must be in \(0.0, inf\)"),
    (lambda: S.RectifiedFlow(shift=INF), r"shift=inf"),
    (lambda: S.RectifiedFlow(sigma_min=1.0), r"sigma_min=1.0\): sigma_min must be in \[0.0, 1.0\)"),
    (lambda: S.RectifiedFlow(lipman_time=1), r"lipman_time=1\): lipman_time must be True or False"),
    (lambda: S.DiscreteVP(betas=[0.5, 1.5]), r"betas\[1\] = 1.5 is outside \(0, 1\)"),
    (lambda: S.DiscreteVP(betas=[0.0, 0.5]), r"betas\[0\] = 0.0"),
    (lambda: S.DiscreteVP(betas=[0.1, 1.0, 0.5]), r"betas\[1\] = 1.0"),
    (lambda: S.DiscreteVP(betas=[0.1, NAN, 0.5]), r"betas\[1\] = nan"),
    (lambda: S.DiscreteVP(betas=[0.1]), r"at least 2 values"),
    (lambda: S.DiscreteVP(betas=["a", "b"]), r"betas must be a sequence of numbers"),
    (lambda: S.DiscreteVP(num_train_timesteps=0), r"num_train_timesteps=0\): num_train_timesteps must be an int"),
    (lambda: S.DiscreteVP(num_train_timesteps=1), r"num_train_timesteps=1\)"),
    (lambda: S.DiscreteVP(num_train_timesteps=10.5), r"num_train_timesteps=10.5\)"),
    (lambda: S.DiscreteVP(beta_start=-1e-4), r"beta_start=-0.0001\): beta_start must be in \(0.0, 1.0\)"),
    (lambda: S.DiscreteVP(beta_start=1.0), r"beta_start=1.0\): beta_start must be in \(0.0, 1.0\)"),
    (lambda: S.DiscreteVP(beta_end=2.0), r"beta_end=2.0\): beta_end must be in \(0.0, 1.0\]"),
    (lambda: S.DiscreteVP.scaled_linear(beta_end=NAN), r"beta_end=nan"),
    (lambda: S.DiscreteVP(rescale_betas_zero_snr="yes"), r"rescale_betas_zero_snr='yes'\)"),
])
def test_invalid_schedules_are_rejected_naming_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_beta_schedule_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown beta_schedule 'scaled-linear'; did you mean 'scaled_linear'"):
        S.DiscreteVP(beta_schedule="scaled-linear")
    with pytest.raises(ValueError, match="beta_schedule 'quadratic'"):
        S.DiscreteVP(beta_schedule="quadratic")


def test_linear_betas_are_ddpm_and_diffusers_linear():
    diffusers = pytest.importorskip("diffusers")
    sch = S.DiscreteVP.linear()
    np.testing.assert_allclose(sch.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)
    theirs = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.double().numpy()
    np.testing.assert_allclose(sch.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)  # diffusers keeps float32
    assert S.DiscreteVP.linear(num_train_timesteps=50).t_max == 49.0


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
