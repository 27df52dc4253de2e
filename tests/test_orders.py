"""Exact oracle: on Gaussian data the PF-ODE has a closed solution, so each deterministic solver's
global error must fall at its nominal order.  Slope of log error vs log steps, fitted over 16..128 steps on a
uniform-logSNR grid (where the asymptotic regime starts early), within 0.3 of the order."""

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff.models import GaussianMixture

DATA = GaussianMixture(means=[0.7], stds=[0.5])
STEPS = [16, 32, 64, 128]

ORDERS = {
    "euler": 1, "ddim": 1, "dpm_solver_1": 1,
    "heun": 2, "dpm_solver_2": 2, "dpmpp_2m": 2,
    "dpm_solver_3": 3,
    "rk4": 4,
}
SCHEDULES = {"EDM": fd.schedules.EDM(), "ContinuousVP": fd.schedules.ContinuousVP()}


def global_error(solver, schedule, steps, spacing="logsnr", prediction="epsilon"):
    plan = fd.plan(solver, schedule, steps, prediction=prediction, spacing=spacing, final="t_min")
    a_T, s_T = plan.alphas[0], plan.sigmas[0]
    std_T = np.sqrt(a_T**2 * DATA.stds[0].item() ** 2 + s_T**2)
    # x_T spread over +-3 std of the true marginal at t_max
    x_T = a_T * DATA.means[0] + std_T * torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    x = fd.sample(DATA.model(schedule, prediction), plan, x_T=x_T, backend="torch")
    exact = DATA.pf_ode_solution(x_T, a_T, s_T, plan.alphas[-1], plan.sigmas[-1])
    return (x - exact).abs().max().item()


def fitted_order(errors):
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]


@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=str)
@pytest.mark.parametrize("solver", list(ORDERS))
def test_convergence_order(solver, schedule):
    errors = [global_error(solver, SCHEDULES[schedule], n) for n in STEPS]
    order = fitted_order(errors)
    assert abs(order - ORDERS[solver]) <= 0.3, f"{solver} on {schedule}: errors {errors}, fitted order {order:.2f}"


@pytest.mark.parametrize("solver,order", [("flow_euler", 1), ("flow_heun", 2)])
def test_flow_solver_order(solver, order):
    schedule = fd.schedules.RectifiedFlow()
    errors = [global_error(solver, schedule, n, spacing="uniform", prediction="flow") for n in STEPS]
    assert abs(fitted_order(errors) - order) <= 0.3, errors


@pytest.mark.parametrize("prediction", ["x0", "v", "score", "flow"])
def test_order_independent_of_prediction(prediction):
    """The parameterization changes only the affine conversion to D, not the solver's error."""
    base = [global_error("heun", SCHEDULES["ContinuousVP"], n) for n in STEPS[:2]]
    other = [global_error("heun", SCHEDULES["ContinuousVP"], n, prediction=prediction) for n in STEPS[:2]]
    np.testing.assert_allclose(other, base, rtol=1e-6)


def test_final_zero_reaches_the_clean_point():
    """With final='zero' the last step lands on sigma = 0: error vs the exact x0-map is small and finite."""
    schedule = fd.schedules.EDM()
    plan = fd.plan("heun", schedule, 64, prediction="epsilon")
    assert plan.sigmas[-1] == 0.0 and plan.alphas[-1] == 1.0
    x_T = 80.0 * torch.linspace(-2, 2, 11, dtype=torch.float64)[:, None]
    x = fd.sample(DATA.model(schedule, "epsilon"), plan, x_T=x_T)
    exact = DATA.pf_ode_solution(x_T, 1.0, 80.0, 1.0, 0.0)
    # relative to the spread of x_T (160): the last Euler step from sigma_min = 0.002 to 0 adds O(sigma_min^2)
    assert (x - exact).abs().max().item() < 1e-4 * x_T.abs().max().item() * 2
