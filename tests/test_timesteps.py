"""Spacings against their definitions (Lin et al. 2023 Table 2; Karras et al. 2022 eq. 5; DPM-Solver logSNR)."""

import numpy as np
import pytest

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.timesteps import custom_times


def test_diffusers_discrete_spacings_table2():
    sch = S.DiscreteVP()
    lead = fd.timesteps(sch, 10, "leading", steps_offset=1)
    np.testing.assert_array_equal(lead[:-1], [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    trail = fd.timesteps(sch, 10, "trailing")
    np.testing.assert_array_equal(trail[:-1], [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    lin = fd.timesteps(sch, 10, "linspace")
    np.testing.assert_allclose(lin[:-1], np.arange(999, -1, -111.0))
    assert lead[-1] == -1.0  # the clean point of DiscreteVP
    assert fd.timesteps(sch, 10, "trailing", final="t_min")[-1] == 0.0


def test_karras_is_eq5():
    sch = S.EDM()
    n, rho = 7, 7.0
    t = fd.timesteps(sch, n, "karras")
    i = np.arange(n)
    expect = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(t[:-1], expect, rtol=1e-12)
    assert t[-1] == 0.0
    t5 = fd.timesteps(sch, n, "karras", rho=5.0)
    assert not np.allclose(t5, t)


def test_karras_on_vp_is_in_sigma_over_alpha():
    sch = S.DiscreteVP.scaled_linear()
    t = fd.timesteps(sch, 8, "karras")[:-1]
    s = sch.sigma(t) / sch.alpha(t)
    u = s ** (1 / 7)
    np.testing.assert_allclose(np.diff(u), np.full(7, u[1] - u[0]), rtol=1e-7)


@pytest.mark.parametrize("sch", [S.ContinuousVP(), S.EDM(), S.VE(), S.DiscreteVP()], ids=repr)
def test_logsnr_and_uniform(sch):
    t = fd.timesteps(sch, 9, "logsnr", final="t_min")
    lam = sch.lambda_(t)
    np.testing.assert_allclose(np.diff(lam), np.full(9, lam[1] - lam[0]), rtol=1e-7)
    u = fd.timesteps(sch, 9, "uniform", final="t_min")
    np.testing.assert_allclose(u[[0, -1]], [sch.t_max, sch.t_min])
    np.testing.assert_allclose(np.diff(u), np.full(9, u[1] - u[0]))
    q = fd.timesteps(sch, 9, "quadratic", final="t_min")
    np.testing.assert_allclose(np.sqrt((q - sch.t_min) / (sch.t_max - sch.t_min)), np.linspace(1, 0, 10), atol=1e-12)


def test_final_zero_has_steps_points_then_clean_point():
    sch = S.ContinuousVP()
    t = fd.timesteps(sch, 5, "uniform")
    assert len(t) == 6 and t[-2] == sch.t_min and t[-1] == 0.0
    assert len(fd.timesteps(sch, 1)) == 2


def test_flow_shift_warps_times():
    t1 = fd.timesteps(S.RectifiedFlow(), 6, "uniform")[:-1]
    t3 = fd.timesteps(S.RectifiedFlow(shift=3.0), 6, "uniform")[:-1]
    np.testing.assert_allclose(t3, 3 * t1 / (1 + 2 * t1))


@pytest.mark.parametrize("bad,msg", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(steps=10**9), "steps"),
    (dict(spacing="cosine"), "spacing"), (dict(final="end"), "final"), (dict(spacing="leading"), "DiscreteVP"),
    (dict(spacing="karras", rho=0), "rho=0"), (dict(spacing="karras", rho=-7.0), "rho=-7.0"),
    (dict(spacing="karras", rho=float("nan")), "rho=nan"), (dict(spacing="karras", rho="7"), "rho='7'"),
    (dict(spacing="polyexponential", rho=float("inf")), "rho=inf"),
    (dict(steps_offset=-1), "steps_offset=-1"), (dict(steps_offset=1.5), "steps_offset=1.5"),
    (dict(spacing="beta", beta_dist_alpha=0.0), "beta_dist_alpha=0.0"),
    (dict(spacing="beta", beta_dist_beta=-1), "beta_dist_beta=-1"),
    (dict(spacing="laplace", laplace_beta=0), "laplace_beta=0"),
    (dict(spacing="laplace", laplace_mu=float("nan")), "laplace_mu=nan"),
    (dict(spacing="linear_quadratic", threshold_noise=1.0), "threshold_noise=1.0"),
    (dict(spacing="linear_quadratic", linear_steps=0), "linear_steps=0"),
    (dict(spacing="linear_quadratic", linear_steps=5), "linear_steps=5"),
    (dict(spacing="ays", ays_model="sd3"), "ays_model 'sd3'"),
])
def test_bad_spacing_arguments(bad, msg):
    kw = dict(steps=5)
    kw.update(bad)
    with pytest.raises(ValueError, match=msg):
        fd.timesteps(S.EDM(), **kw)


@pytest.mark.parametrize("seq", [[10.0, 20.0, 5.0], [10.0, float("nan"), 1.0], [5.0, 5.0, 1.0]])
def test_custom_timesteps_must_be_decreasing_and_finite(seq):
    with pytest.raises(ValueError, match="timesteps"):
        fd.plan("euler", S.EDM(), timesteps=seq)


def test_custom_sigmas():
    p = fd.plan("euler", S.EDM(), sigmas=[10.0, 1.0, 0.1, 0.0])
    np.testing.assert_allclose(p.sigmas, [10.0, 1.0, 0.1, 0.0])
    assert p.steps == 3 and p.final == "zero"
    q = fd.plan("euler", S.EDM(), timesteps=[10.0, 1.0])
    np.testing.assert_allclose(q.times, [10.0, 1.0, 0.0])


def test_unknown_spacing_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown spacing 'karas'; did you mean 'karras'"):
        fd.timesteps(S.EDM(), 5, "karas")
    with pytest.raises(ValueError, match=r"did you mean 'sdxl'"):
        fd.timesteps(S.EDM(), 5, "ays", ays_model="sdx")


def test_steps_offset_beyond_the_schedule():
    sch = S.DiscreteVP()
    with pytest.raises(ValueError, match=r"steps_offset=1000000 .*beyond the schedule's last timestep 999"):
        fd.timesteps(sch, 10, "leading", steps_offset=10**6)
    with pytest.raises(ValueError, match=r"use steps_offset <= 99"):
        fd.timesteps(sch, 10, "leading", steps_offset=100)
    assert fd.timesteps(sch, 10, "leading", steps_offset=99)[0] == 999.0


def test_spacing_needs_a_schedule():
    with pytest.raises(ValueError, match="schedule must be a fastdiff.schedules.Schedule"):
        fd.timesteps("EDM", 5)


@pytest.mark.parametrize("kw,msg", [
    (dict(timesteps=[]), r"timesteps= must be a 1-D sequence of 1 to 100001 values"),
    (dict(timesteps=[[10.0, 5.0]]), r"1-D sequence"),
    (dict(timesteps=np.linspace(80, 1, 100_002)), r"100001 values"),
    (dict(timesteps=["a", "b"]), r"timesteps= must be a sequence of numbers"),
    (dict(timesteps=[10.0, float("inf"), 1.0]), r"NaN or inf at index 1"),
    (dict(timesteps=[100.0, 10.0]), r"timesteps= must lie in the schedule's \[t_min, t_max\] = \[0.002, 80.0\]"),
    (dict(timesteps=[10.0, 0.001]), r"must lie in"),
    (dict(timesteps=[10.0, 10.0]), r"entry 1 \(10.0\) is not below entry 0 \(10.0\)"),
    (dict(sigmas=[10.0]), r"sigmas= must be a 1-D sequence of 2 to"),
    (dict(sigmas=[10.0, float("nan"), 0.0]), r"sigmas= contains NaN"),
    (dict(sigmas=[1.0, 2.0, 0.0]), r"sigmas= must be strictly decreasing"),
    (dict(sigmas=[1.0, -0.5]), r"sigmas= must be >= 0"),
    (dict(boundaries=[10.0]), r"boundaries= must be a 1-D sequence of 2 to"),
    (dict(boundaries=[100.0, 0.0]), r"boundaries= must lie in \[0.002, 80.0\]"),
    (dict(boundaries=[10.0, 0.001]), r"boundaries= must lie in"),
    (dict(boundaries=[10.0, float("nan")]), r"boundaries= contains NaN"),
    (dict(boundaries=[1.0, 10.0]), r"boundaries= must be strictly decreasing"),
])
def test_custom_grids_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        custom_times(S.EDM(), **kw)


def test_custom_grids_through_plan():
    with pytest.raises(ValueError, match="timesteps= must lie in"):
        fd.plan("euler", S.EDM(), timesteps=[100.0, 1.0])
    p = fd.plan("euler", S.EDM(), boundaries=[10.0, 1.0, 0.0])
    np.testing.assert_array_equal(p.times, [10.0, 1.0, 0.0])


def test_spacing_options_name_every_option_of_timesteps():
    # plan() forwards exactly these names to timesteps(); a new option must be listed to be reachable from plan()
    import inspect

    from fastdiff.timesteps import SPACING_OPTIONS, timesteps

    params = inspect.signature(timesteps).parameters
    keyword_only = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY and name != "final"]
    assert sorted(SPACING_OPTIONS) == sorted(keyword_only)
