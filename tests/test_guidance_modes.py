"""Guidance modes: diffusers' guidance_rescale (Lin et al. 2023) and CFG++ (Chung et al. 2024), both fused in the step.

- guidance_rescale: the factors against diffusers' own ``rescale_noise_cfg`` run side by side; ``fd.sample`` with it
  against a hand loop that combines the outputs with diffusers' function and runs the plain (unguided) step.
- CFG++: every solver's CFG++ plan against the float64 reference written from ComfyUI's *_cfg_pp samplers
  (``fastdiff.reference.sample_cfgpp``) on a pair of exact Gaussian-mixture models (cond / uncond with different
  means), to 1e-10; a CFG++ plan without guidance is the plain solver.
- kernels (cpu; Triton under TRITON_INTERPRET=1 with tiny shapes) == the torch backend for both features.
- bad input.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import fastdiff as fd  # noqa: E402
import fastdiff.reference as ref  # noqa: E402
from fastdiff import ops, rng  # noqa: E402
from fastdiff import schedules as S  # noqa: E402
from fastdiff.guidance import rescale_factors  # noqa: E402
from fastdiff.models import GaussianMixture  # noqa: E402
from kernel_checks import DTYPES, assert_like_torch  # noqa: E402

SHAPE = (3, 2, 3, 5)
SEEDS = [3, 11, 12345]
W = 1.7  # a CFG++-sized guidance weight

_n = int(np.prod(SHAPE[1:]))
COND = GaussianMixture(np.stack([np.linspace(-1.0, 1.0, _n), 0.5 + 0.8 * np.cos(np.arange(_n))]).reshape(2, *SHAPE[1:]),
                       [0.3, 0.6], [0.3, 0.7])
UNCOND = GaussianMixture(np.stack([np.full(_n, 0.4), -0.3 + 0.5 * np.sin(np.arange(_n))]).reshape(2, *SHAPE[1:]),
                         [0.5, 0.4], [0.6, 0.4])

SCHEDULES = {  # (schedule, prediction): epsilon on VP, x0 on EDM, v on continuous VP
    "scaled_linear": (S.DiscreteVP.scaled_linear(), "epsilon"),
    "EDM": (S.EDM(), "x0"),
    "ContinuousVP": (S.ContinuousVP(), "v"),
}
CFGPP_OPTIONS = {  # solver -> extra plan / reference options of the test
    "euler": {}, "euler_ancestral": {"eta": 0.6}, "dpmpp_2m": {"lower_order_final": False},
    "dpmpp_2s_ancestral": {}, "res_multistep": {}, "res_multistep_ancestral": {}, "gradient_estimation": {},
}


def guided_model(schedule, prediction, cond=COND, uncond=UNCOND):
    """model(x, t, label) -> the cond model's output where label is 1, the uncond model's where it is 0."""
    mc, mu = cond.model(schedule, prediction), uncond.model(schedule, prediction)

    def model(x, t, label):
        pick = label.reshape((-1,) + (1,) * (x.dim() - 1)).bool()
        return torch.where(pick, mc(x, t), mu(x, t))

    return model


def labels(B):
    return {"label": torch.ones(B)}, {"label": torch.zeros(B)}


# ---------------------------------------------------------------------------------------------------------------
# guidance_rescale
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 7), (3, 2, 5, 3), (2, 4, 9)])
@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rescale_factors_match_diffusers(shape, phi, dtype):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(7)
    out = (torch.randn((2 * shape[0],) + shape[1:], generator=g, dtype=torch.float64) * 1.3 + 0.2).to(dtype)
    w = torch.tensor([6.5], dtype=dtype)
    B = shape[0]
    guided = out[:B] + w * (out[B:] - out[:B])
    want = rescale_noise_cfg(guided, out[B:], guidance_rescale=phi)
    m = rescale_factors(out, w, phi)
    assert m.dtype == dtype and m.shape == (B,)
    got = m.reshape((-1,) + (1,) * (len(shape) - 1)) * guided
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _hand_loop(plan, model, x, seeds, w, phi):
    """The plan's stages with the guided output formed by diffusers' rescale_noise_cfg, then the unguided step."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    B = x.shape[0]
    rows = torch.tensor(plan.rows())
    slots = torch.zeros((plan.num_slots,) + tuple(x.shape), dtype=x.dtype)
    seeds_t = rng.seeds_tensor(seeds)
    c, u = labels(B)
    j = 0
    for k, f in enumerate(plan.stage_flags):
        out = x
        if f.use_out:
            t = torch.full((2 * B,), float(plan.model_times[j]), dtype=torch.float64)
            j += 1
            o = model(torch.cat([x, x]), t, torch.cat([u["label"], c["label"]]))
            out_u, out_c = o[:B], o[B:]
            out = rescale_noise_cfg(out_u + w * (out_c - out_u), out_c, guidance_rescale=phi)
        x = ops.step(x, out, slots, rows[k:k + 1], seeds_t, torch.tensor([int(plan.draw[k])]), slot_reads=f.slot_reads,
                     slot_writes=f.slot_writes, use_out=f.use_out, noise=f.noise, langevin=f.langevin)
    return x


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral"])
def test_sample_with_guidance_rescale_equals_hand_loop_with_diffusers(solver):
    schedule, prediction = S.DiscreteVP.scaled_linear(), "epsilon"
    plan = fd.plan(solver, schedule, 5, prediction)
    model = guided_model(schedule, prediction)
    x_T = plan.init_scale * rng.randn(SHAPE, SEEDS, draw=0, dtype=torch.float64)
    c, u = labels(SHAPE[0])
    got = fd.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch", guidance_scale=5.0, cond=c, uncond=u,
                    guidance_rescale=0.7)
    want = _hand_loop(plan, model, x_T, SEEDS, 5.0, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = fd.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch", guidance_scale=5.0, cond=c, uncond=u)
    assert (got - plain).abs().max() > 1e-3  # the rescale does something here


def test_guidance_rescale_zero_is_plain_cfg():
    schedule, prediction = S.EDM(), "x0"
    plan = fd.plan("euler", schedule, 4, prediction)
    model = guided_model(schedule, prediction)
    c, u = labels(SHAPE[0])
    kw = dict(shape=SHAPE, seeds=SEEDS, backend="torch", guidance_scale=3.0, cond=c, uncond=u, dtype=torch.float64)
    torch.testing.assert_close(fd.sample(model, plan, guidance_rescale=0.0, **kw), fd.sample(model, plan, **kw),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# CFG++: plan == reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("sname", list(SCHEDULES))
@pytest.mark.parametrize("solver", list(CFGPP_OPTIONS))
def test_cfgpp_plan_matches_reference(solver, sname, steps):
    schedule, prediction = SCHEDULES[sname]
    opts = CFGPP_OPTIONS[solver]
    plan = fd.plan(solver, schedule, steps, prediction, guidance="cfg++", **opts)
    assert plan.uncond_column
    model = guided_model(schedule, prediction)
    x_T = plan.init_scale * rng.randn(SHAPE, SEEDS, draw=0, dtype=torch.float64)
    c, u = labels(SHAPE[0])
    x_fd = fd.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch", guidance_scale=W, cond=c, uncond=u)
    noises = [rng.randn(SHAPE, SEEDS, draw=k, dtype=torch.float64) for k in range(1, plan.num_draws)]
    x_ref = ref.sample_cfgpp(COND.model(schedule, prediction), UNCOND.model(schedule, prediction), W, solver,
                             schedule, steps, x_T, noises=noises, prediction=prediction, **opts)
    scale = 1.0 + x_ref.abs().max()
    assert (x_fd - x_ref).abs().max() <= 1e-10 * scale
    # CFG++ is not CFG: the plain solver with the same guidance lands elsewhere (a step or two may both end
    # near D: a step to the clean point returns D in both, and EDM's first ancestral step goes almost to it)
    plain = fd.plan(solver, schedule, steps, prediction, **opts)
    if steps == 7:
        x_cfg = fd.sample(model, plain, x_T=x_T, seeds=SEEDS, backend="torch", guidance_scale=W, cond=c, uncond=u)
        assert (x_cfg - x_fd).abs().max() > 1e-6


@pytest.mark.parametrize("solver", ["dpmpp_2m", "res_multistep"])
def test_cfgpp_dpmpp_2m_default_orders_match_reference(solver):
    """fastdiff's default lower_order_final (diffusers' rule) gives CFG++ the same cool-down as the plain solver."""
    schedule, prediction = S.DiscreteVP.scaled_linear(), "epsilon"
    plan = fd.plan(solver, schedule, 6, prediction, guidance="cfg++")
    model = guided_model(schedule, prediction)
    x_T = rng.randn(SHAPE, SEEDS, draw=0, dtype=torch.float64)
    c, u = labels(SHAPE[0])
    x_fd = fd.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch", guidance_scale=W, cond=c, uncond=u)
    x_ref = ref.sample_cfgpp(COND.model(schedule, prediction), UNCOND.model(schedule, prediction), W, solver,
                             schedule, 6, x_T, prediction=prediction)
    assert (x_fd - x_ref).abs().max() <= 1e-10 * (1.0 + x_ref.abs().max())


@pytest.mark.parametrize("solver", list(CFGPP_OPTIONS))
def test_cfgpp_plan_without_guidance_is_the_plain_solver(solver):
    schedule, prediction = S.DiscreteVP.scaled_linear(), "epsilon"
    opts = CFGPP_OPTIONS[solver]
    model = COND.model(schedule, prediction)
    kw = dict(shape=SHAPE, seeds=SEEDS, backend="torch", dtype=torch.float64)
    x_pp = fd.sample(model, fd.plan(solver, schedule, 5, prediction, guidance="cfg++", **opts), **kw)
    x = fd.sample(model, fd.plan(solver, schedule, 5, prediction, **opts), **kw)
    torch.testing.assert_close(x_pp, x, rtol=1e-12, atol=1e-12)


def test_plain_plans_have_no_uncond_column():
    p = fd.plan("euler", S.EDM(), 3)
    assert not p.uncond_column and p.rows().shape[1] == ops.row_length(0)
    q = fd.plan("euler", S.EDM(), 3, guidance="cfg++")
    assert q.rows().shape[1] == ops.row_length(0, uncond=True) and dict(q.options)["guidance"] == "cfg++"


# ---------------------------------------------------------------------------------------------------------------
# Kernels == torch backend
# ---------------------------------------------------------------------------------------------------------------


def _stage_inputs(dtype, K, uncond, B=3, shape=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B,) + shape, generator=g).to(dtype)
    out = torch.randn((2 * B,) + shape, generator=g).to(dtype)
    slots = torch.randn((K, B) + shape, generator=g).to(dtype)
    rows = torch.randn((B, ops.row_length(K, uncond)), generator=g, dtype=torch.float64)
    rows[:, 3:7] = 0.0  # no Langevin term
    w = torch.tensor([4.5, -0.5, 1.5])
    m = rescale_factors(out, w, 0.7)
    return x, out, slots, rows, w, m


def _check_kernel(backend, dtype, K, uncond, rescale, cfg=True, thresholds=False, device="cpu"):
    x, out, slots, rows, w, m = (t.to(device) for t in _stage_inputs(dtype, K, uncond))
    B = x.shape[0]
    if not cfg:
        out = out[:B].contiguous()
    seeds = rng.seeds_tensor([5, 2**63 + 1, 99], device=device)
    draws = torch.tensor([2, -1, 4], device=device)
    writes = (1 << K) - 1
    thr = torch.tensor([1.2, 1.0, 2.5], device=device) if thresholds else None
    kw = dict(slot_writes=writes, cfg=cfg, cfg_rescale=m if (rescale and cfg) else None, uncond=uncond, thresholds=thr)
    s_same, s_64 = slots.clone(), slots.double()
    same = ops.step(x, out, s_same, rows.float(), seeds, draws, w, backend="torch", **kw)
    kw64 = dict(kw, cfg_rescale=None if kw["cfg_rescale"] is None else kw["cfg_rescale"].double(),
                thresholds=None if thr is None else thr.double())
    ref64 = ops.step(x.double(), out.double(), s_64, rows, seeds, draws, w.double(), backend="torch", **kw64)
    s_got = slots.clone()
    got = ops.step(x, out, s_got, rows.float(), seeds, draws, w, backend=backend, **kw)
    assert_like_torch(got, same, ref64, f"{backend} x'")
    assert_like_torch(s_got, s_same, s_64, f"{backend} slots")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,uncond,rescale", [(0, False, True), (1, True, False), (2, True, True), (0, True, True)])
def test_cpu_kernel_matches_torch(dtype, K, uncond, rescale):
    _check_kernel("cpu", dtype, K, uncond, rescale)


def test_cpu_kernel_uncond_without_cfg_and_with_thresholds():
    _check_kernel("cpu", torch.float32, 1, True, False, cfg=False)
    _check_kernel("cpu", torch.float32, 1, True, False, cfg=False, thresholds=True)
    _check_kernel("cpu", torch.float32, 2, True, True, thresholds=True)


def _triton_ready():
    try:
        from fastdiff.kernels import step as tk
    except ImportError as e:
        return False, f"triton is not importable: {e}"
    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET") != "1" or not tk.interpreting():
        return False, "triton was imported before TRITON_INTERPRET=1 was set; run this file on its own"
    return True, ""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,uncond,rescale", [(1, True, True), (0, False, True)])
def test_triton_kernel_matches_torch(dtype, K, uncond, rescale):
    ok, why = _triton_ready()
    if not ok:
        pytest.skip(why)
    _check_kernel("triton", dtype, K, uncond, rescale, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda kernel needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,uncond,rescale", [(0, False, True), (1, True, False), (2, True, True)])
def test_cuda_kernel_matches_torch(dtype, K, uncond, rescale):
    _check_kernel("cuda", dtype, K, uncond, rescale, device="cuda")
    _check_kernel("cuda", dtype, K, uncond, rescale, thresholds=True, device="cuda")


def test_cfgpp_sample_on_cpu_kernel_matches_torch():
    schedule, prediction = S.DiscreteVP.scaled_linear(), "epsilon"
    plan = fd.plan("dpmpp_2m", schedule, 4, prediction, guidance="cfg++")
    model = guided_model(schedule, prediction)
    c, u = labels(SHAPE[0])
    kw = dict(shape=SHAPE, seeds=SEEDS, guidance_scale=W, cond=c, uncond=u, guidance_rescale=0.5)
    got = fd.sample(model, plan, backend="cpu", **kw)
    want = fd.sample(model, plan, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_cfgpp_with_a_solver_without_variant_names_those_with_one():
    with pytest.raises(ValueError, match="no CFG.. variant.*dpmpp_2m.*euler.*gradient_estimation"):
        fd.plan("heun", S.EDM(), 4, guidance="cfg++")
    with pytest.raises(ValueError, match="did you mean"):
        fd.plan("euler", S.EDM(), 4, guidance="cfgpp")


@pytest.mark.parametrize("phi", [-0.1, 1.5, float("nan"), "0.7", True])
def test_guidance_rescale_outside_unit_interval(phi):
    model = COND.model(S.EDM(), "x0")
    plan = fd.plan("euler", S.EDM(), 2, "x0")
    with pytest.raises(ValueError, match="guidance_rescale must be a number in \\[0, 1\\]"):
        fd.Sampler(model, plan, guidance_scale=2.0, guidance_rescale=phi)
    with pytest.raises(ValueError, match="guidance_rescale"):
        fd.sample(model, plan, shape=SHAPE, seeds=SEEDS, guidance_rescale=phi)


def test_guidance_rescale_without_guidance():
    model = COND.model(S.EDM(), "x0")
    plan = fd.plan("euler", S.EDM(), 2, "x0")
    with pytest.raises(ValueError, match="guidance_rescale=0.7 rescales classifier-free guidance: give guidance_scale"):
        fd.sample(model, plan, shape=SHAPE, seeds=SEEDS, guidance_rescale=0.7)


def test_step_checks_the_new_arguments():
    x, out, slots, rows, w, m = _stage_inputs(torch.float32, 0, False)
    seeds, draws = rng.seeds_tensor([1, 2, 3]), torch.tensor([-1])
    with pytest.raises(ValueError, match="cfg_rescale .* without guidance"):
        ops.step(x, out[:3], slots, rows.float(), seeds, draws, w, cfg=False, cfg_rescale=m)
    with pytest.raises(ValueError, match="cfg_rescale must be a torch.float32 tensor with one factor per sample"):
        ops.step(x, out, slots, rows.float(), seeds, draws, w, cfg=True, cfg_rescale=m[:2])
    with pytest.raises(ValueError, match="U column of CFG\\+\\+ rows"):
        ops.step(x, out, slots, rows.float(), seeds, draws, w, cfg=True, uncond=True)


def test_batcher_refuses_cfgpp_plans():
    from fastdiff.serving.batcher import ContinuousBatcher

    model = COND.model(S.EDM(), "x0")
    b = ContinuousBatcher(model)
    try:
        with pytest.raises(ValueError, match="does not run CFG\\+\\+ plans"):
            b.submit(fd.plan("euler", S.EDM(), 3, "x0", guidance="cfg++"), 1, SHAPE[1:])
    finally:
        b.close()
