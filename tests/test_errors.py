"""Bad input fails early with a ValueError that says what is allowed (or FloatingPointError for NaN)."""

import pytest
import torch

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.models import GaussianMixture

EDM = S.EDM()


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="dpm_solver_9"), "unknown solver.*choose one of.*ddim"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=-3), "steps must be an integer >= 1"),
    (dict(prediction="sample"), "unknown prediction.*epsilon"),
    (dict(solver="ddim", eta=-0.1), "eta must be a finite number >= 0"),
    (dict(solver="euler_ancestral", eta=-1.0), "eta must be"),
    (dict(solver="ddim", etaa=0.5), "no option.*etaa.*eta=0.0"),
    (dict(solver="dpmpp_2m", solver_type="rk"), "solver_type must be 'midpoint' or 'heun'"),
    (dict(solver="pc", snr=0.0), "snr must be > 0"),
    (dict(solver="pc", corrector_steps=0), "corrector_steps"),
    (dict(solver="heun", s_churn=-1.0), "s_churn"),
    (dict(solver="unipc", order=7), "order must be"),
    (dict(timesteps=[5.0, 10.0, 1.0]), "strictly decreasing"),
    (dict(timesteps=[5.0, float("nan"), 1.0]), "NaN"),
    (dict(sigmas=[5.0, 1.0, -1.0]), "strictly decreasing|>= 0"),
    (dict(spacing="bogus"), "unknown spacing"),
])
def test_plan_rejects(kwargs, match):
    args = dict(solver="euler", schedule=EDM, steps=5)
    args.update(kwargs)
    if "timesteps" in kwargs or "sigmas" in kwargs:
        args.pop("steps")
    with pytest.raises(ValueError, match=match):
        fd.plan(**args)


def test_solver_that_cannot_take_a_prediction():
    # rectified flow starts at alpha = 0 where an epsilon or score model has no data estimate
    with pytest.raises(ValueError, match="cannot be converted.*alpha=0"):
        fd.plan("flow_euler", S.RectifiedFlow(), 4, prediction="epsilon")
    with pytest.raises(ValueError, match="alpha"):
        fd.plan("heun", S.RectifiedFlow(), 4, prediction="flow")  # sigma space is infinite at t = 1
    fd.plan("flow_euler", S.RectifiedFlow(), 4, prediction="flow")  # fine


MODEL = GaussianMixture([0.0], [1.0]).model(EDM, "epsilon")
PLAN = fd.plan("euler", EDM, 3)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(shape=(2, 3), seeds=[1]), ValueError, "seeds has 1 entries but the batch has 2"),
    (dict(), ValueError, "give x_T=, noise= or shape="),
    (dict(shape=(2, 3)), ValueError, "seeds= is needed"),
    (dict(shape=(2, 3), seeds=[1, 2], backend="tpu"), ValueError, "unknown backend"),
    (dict(x_T=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "floating-point"),
    (dict(shape=(2, 3), seeds=[1, 2], check_finite="sometimes"), ValueError, "check_finite"),
])
def test_sample_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fd.sample(MODEL, PLAN, **kwargs)


def test_stochastic_plan_needs_seeds():
    plan = fd.plan("euler_ancestral", EDM, 3)
    with pytest.raises(ValueError, match="draws noise: pass seeds="):
        fd.sample(MODEL, plan, x_T=torch.zeros(2, 3))


def test_wrong_model_output_shape():
    with pytest.raises(ValueError, match=r"model returned \(2, 4\), expected a tensor of shape \(2, 3\)"):
        fd.sample(lambda x, t: torch.zeros(2, 4), PLAN, x_T=torch.zeros(2, 3))


def test_nan_from_model():
    def bad(x, t):
        return torch.full_like(x, float("nan")) if t[0] < 1.0 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        fd.sample(bad, PLAN, x_T=torch.ones(2, 3))
    with pytest.raises(FloatingPointError, match="after stage 2"):
        fd.sample(bad, PLAN, x_T=torch.ones(2, 3), check_finite="step")


def test_cond_on_wrong_device_or_rows():
    with pytest.raises(ValueError, match="one per sample"):
        fd.sample(lambda x, t, c: x, PLAN, x_T=torch.ones(2, 3), cond={"c": torch.zeros(3)})
