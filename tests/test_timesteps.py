"""Spacings against their definitions (Lin et al. 2023 Table 2; Karras et al. 2022 eq. 5; DPM-Solver logSNR)."""

import numpy as np
import pytest

import fastdiff as fd
from fastdiff import schedules as S


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
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(spacing="cosine"), "spacing"),
    (dict(final="end"), "final"), (dict(spacing="leading"), "DiscreteVP"),
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
