"""Imagen dynamic thresholding (Saharia et al. 2022; diffusers' ``_threshold_sample``): the reduction pass
``ops.dynamic_threshold`` / ``ops.threshold_of``, the step's ``thresholds`` argument on the torch and cpu kernels
against a float64 reference written from the formulas (tests/threshold_ref.py; the triton and cuda kernels run the
same check in their own test files), the sampler option against a hand-written DDIM loop, and bad input."""

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S
from fastdiff.backends import cpu
from threshold_ref import CASES, MAX_VALUE, RATIO, check_thresholded_stage, imagen_threshold64, stage_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 4, 9, 11), (1, 4097), (2, 5)]
CPU_OK = cpu.available()[0]


# ---------------------------------------------------------------------------------------------------------------
# The reduction pass
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 201, 16384])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_threshold_of_is_the_quantile(n, ratio):
    """Against numpy's float64 quantile (the formula) and, bit for bit, torch.quantile (diffusers' call)."""
    g = torch.Generator().manual_seed(n)
    D = torch.randn(3, n, generator=g) * torch.tensor([[0.3], [2.0], [9.0]])
    got = ops.threshold_of(D, ratio, 5.0)
    want = np.clip(np.quantile(np.abs(D.double().numpy()), ratio, axis=1), 1.0, 5.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-7, atol=0)
    assert torch.equal(got, torch.quantile(D.abs(), ratio, dim=1).clamp(1.0, 5.0))
    got64 = ops.threshold_of(D.double(), ratio, 5.0)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-15, atol=0)


def test_threshold_of_large_samples_and_low_precision():
    """More than torch.quantile's 2**24 elements per call, and fp16 / bf16 estimates (computed in fp32)."""
    D = torch.randn(2, (1 << 23) + 5, generator=torch.Generator().manual_seed(0)) * 3
    got = ops.threshold_of(D, 0.995, 100.0)
    want = np.quantile(np.abs(D.double().numpy()), 0.995, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    for dt in (torch.float16, torch.bfloat16):
        h = D[:, :5000].to(dt)
        t = ops.threshold_of(h, 0.9, 100.0)
        assert t.dtype == torch.float32
        np.testing.assert_allclose(t.numpy(), np.quantile(np.abs(h.double().numpy()), 0.9, axis=1), rtol=1e-6)


def test_matches_diffusers_threshold_sample():
    """clamp(D, -s, s) / s with s from threshold_of is diffusers' DDPMScheduler._threshold_sample."""
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.97, sample_max_value=2.5)
    D = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.5, 1.2, 2.0, 6.0]
                                                                                           ).reshape(4, 1, 1, 1)
    want = sch._threshold_sample(D.clone())
    got = ops.apply_threshold(D, ops.threshold_of(D, 0.97, 2.5))
    assert torch.equal(got, want)


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_dynamic_threshold_forms_D_like_the_step(dtype, cfg):
    """The reduction pass forms D = cx x + co out (guided) from the step's own inputs: float64 formula check."""
    inp, _ = stage_inputs("dpmpp_2m", (3, 4, 9, 11), dtype, "cpu", cfg)
    got = ops.dynamic_threshold(inp["x"], inp["out"], inp["rows"], inp["guidance"], cfg, RATIO, MAX_VALUE)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (3,)
    x, out = inp["x"].double().numpy(), inp["out"].double().numpy()
    cx, co = inp["rows"].double().numpy()[0, :2]
    if cfg:
        w = inp["guidance"].double().numpy().reshape(3, 1, 1, 1)
        out = out[:3] + w * (out[3:] - out[:3])
    D = cx * x + co * out
    want = np.clip(np.quantile(np.abs(D.reshape(3, -1)), RATIO, axis=1), 1.0, MAX_VALUE)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6 if dtype != torch.float64 else 1e-14)
    assert got.min() == 1.0 and got.max() == MAX_VALUE and ((got > 1) & (got < MAX_VALUE)).any()  # all regimes


# ---------------------------------------------------------------------------------------------------------------
# The step's thresholds on the torch reference and the cpu kernel
# ---------------------------------------------------------------------------------------------------------------


def _torch_step(*args, thresholds):
    return ops.step_reference(*args, thresholds=thresholds)


def _ops_step(kernel):
    def step(x, out, slots, rows, seeds, draws, guidance, reads, writes, use_out, cfg, noise, langevin, thresholds):
        return ops.step(x, out, slots, rows, seeds, draws, guidance, slot_reads=reads, slot_writes=writes,
                        use_out=use_out, cfg=cfg, noise=noise, langevin=langevin, kernel=kernel, thresholds=thresholds)

    return step


BACKEND_STEPS = {"torch": _torch_step, "ops-torch": _ops_step("torch")}
if CPU_OK:
    BACKEND_STEPS.update({"cpu": cpu.OPS["step"], "ops-cpu": _ops_step("cpu")})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", list(BACKEND_STEPS))
def test_thresholded_step(backend, name, dtype, shape):
    check_thresholded_stage(BACKEND_STEPS[backend], name, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ddim", "euler_ancestral", "pc"])
@pytest.mark.parametrize("backend", list(BACKEND_STEPS))
def test_thresholded_step_cfg(backend, name, dtype):
    check_thresholded_stage(BACKEND_STEPS[backend], name, (3, 4, 9, 11), dtype, "cpu", cfg=True)


@pytest.mark.skipif(not CPU_OK, reason="cpu backend unavailable")
def test_cpu_kernel_float64_and_in_place():
    """float64 storage takes float64 thresholds; an in-place update equals the out-of-place one."""
    inp, f = stage_inputs("dpmpp_2m", (3, 4, 9, 11), torch.float64, "cpu")
    thr = ops.dynamic_threshold(inp["x"], inp["out"], inp["rows"], ratio=RATIO, max_value=MAX_VALUE)
    args = (inp["x"], inp["out"], inp["slots"].clone(), inp["rows"], inp["seeds"], inp["draws"], inp["guidance"],
            f["slot_reads"], f["slot_writes"], f["use_out"], False, f["noise"], f["langevin"])
    got = cpu.OPS["step"](*args, thresholds=thr)
    want = ops.step_reference(*args[:2], inp["slots"].clone(), *args[3:], thresholds=thr)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-13)
    inp32, _ = stage_inputs("euler_ancestral", (2, 4097), torch.float32, "cpu")
    thr = ops.dynamic_threshold(inp32["x"], inp32["out"], inp32["rows"], ratio=RATIO, max_value=MAX_VALUE)
    a32 = (inp32["out"], inp32["slots"], inp32["rows"], inp32["seeds"], inp32["draws"], inp32["guidance"], 0, 0, True,
           False, True, False)
    want = cpu.OPS["step"](inp32["x"], *a32, thresholds=thr)
    x = inp32["x"].clone()
    got = cpu.OPS["step"](x, *a32, x_out=x, thresholds=thr)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, want)


def test_nan_stays_nan():
    """clamp(NaN) is NaN, as torch.clamp: a NaN model output is not hidden by the thresholding."""
    inp, f = stage_inputs("ddim", (2, 5), torch.float32, "cpu")
    inp["out"][0, 2] = float("nan")
    thr = torch.tensor([1.5, 2.0])
    for name, step in BACKEND_STEPS.items():
        got = step(inp["x"], inp["out"], inp["slots"], inp["rows"], inp["seeds"], inp["draws"], inp["guidance"],
                   f["slot_reads"], f["slot_writes"], f["use_out"], False, f["noise"], f["langevin"], thresholds=thr)
        assert torch.isnan(got[0, 2]) and torch.isfinite(got[1]).all() and int(torch.isnan(got).sum()) == 1, name


# ---------------------------------------------------------------------------------------------------------------
# torch.library: schema, fake impl, compile
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck_with_thresholds():
    inp, f = stage_inputs("euler_ancestral", (2, 3, 5), torch.float32, "cpu")
    thr = ops.dynamic_threshold(inp["x"], inp["out"], inp["rows"], ratio=RATIO, max_value=MAX_VALUE)
    for kernel in ["torch"] + (["cpu"] if CPU_OK else []):
        args = (inp["x"], inp["out"], inp["slots"], inp["rows"], inp["seeds"], inp["draws"], inp["guidance"],
                f["slot_reads"], f["slot_writes"], f["use_out"], False, f["noise"], f["langevin"], kernel, thr)
        torch.library.opcheck(torch.ops.fastdiff.step.default, args)


def test_compiled_loop_with_thresholding_has_no_graph_break():
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 5)
    rows = torch.tensor(plan.rows(), dtype=torch.float32)
    draws = torch.tensor(plan.draw)
    seeds = rng.seeds_tensor([1, 2])
    x0 = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    masks = [(plan.slot_reads(k), plan.slot_writes(k)) for k in range(plan.num_stages)]

    def loop(x, slots):
        for k in range(plan.num_stages):
            out = torch.tanh(x) * 2.0
            thr = ops.dynamic_threshold(x, out, rows[k : k + 1], ratio=0.8, max_value=2.0)
            x = ops.step(x, out, slots, rows[k : k + 1], seeds, draws[k : k + 1], slot_reads=masks[k][0],
                         slot_writes=masks[k][1], noise=False, thresholds=thr)
        return x

    eager = loop(x0.clone(), torch.zeros(plan.num_slots, 2, 3, 5))
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x0.clone(), torch.zeros(plan.num_slots, 2, 3, 5))
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------------------------
# The sampler option
# ---------------------------------------------------------------------------------------------------------------

BETAS = np.linspace(1e-4, 0.02, 1000)
TIMESTEPS = [999, 799, 599, 399, 199, 49]


def eps_model(x, t):
    """A deterministic stand-in for an epsilon network whose x0 estimates leave [-1, 1]."""
    return 0.9 * torch.tanh(x * (1.0 + t.reshape((-1,) + (1,) * (x.dim() - 1)) / 1000.0)) - 0.2


def ddim_thresholded_by_hand(x, ratio, max_value, threshold=True):
    """DDIM (eta = 0) on the linear-beta DiscreteVP, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in plain torch:
    x0 from epsilon, Imagen's thresholding of x0, epsilon re-derived from the thresholded x0 (guided-diffusion's
    DDIM), then the DDIM update; the last step lands on the clean point and returns x0."""
    abar = torch.tensor(np.cumprod(1.0 - BETAS), dtype=torch.float64)
    B = x.shape[0]
    for i, t in enumerate(TIMESTEPS):
        a, s = abar[t].sqrt(), (1.0 - abar[t]).sqrt()
        eps = eps_model(x, torch.full((B,), float(t), dtype=x.dtype))
        x0 = (x - s * eps) / a
        if threshold:
            q = torch.quantile(x0.reshape(B, -1).abs().double(), ratio, dim=1).clamp(1.0, max_value)
            q = q.to(x.dtype).reshape((B,) + (1,) * (x.dim() - 1))
            x0 = torch.clamp(x0, -q, q) / q
        eps = (x - a * x0) / s
        if i + 1 == len(TIMESTEPS):
            return x0
        a_next, s_next = abar[TIMESTEPS[i + 1]].sqrt(), (1.0 - abar[TIMESTEPS[i + 1]]).sqrt()
        x = a_next * x0 + s_next * eps


def test_ddim_with_thresholding_equals_hand_written_loop():
    plan = fd.plan("ddim", S.DiscreteVP(betas=BETAS), timesteps=TIMESTEPS)
    x_T = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = ddim_thresholded_by_hand(x_T, 0.9, 1.8)
    assert not torch.allclose(want, ddim_thresholded_by_hand(x_T, 0.9, 1.8, threshold=False))  # it matters
    assert want.abs().max() <= 1.0 + 1e-12
    got = fd.sample(eps_model, plan, x_T=x_T, backend="torch", dynamic_threshold=0.9, sample_max_value=1.8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    sampler = fd.Sampler(eps_model, plan, backend="torch", dynamic_threshold=0.9, sample_max_value=1.8)
    torch.testing.assert_close(sampler.sample(x_T=x_T), want, rtol=1e-10, atol=1e-10)
    if CPU_OK:  # the cpu kernel with the reduction pass, in fp32
        got32 = fd.sample(eps_model, plan, x_T=x_T.float(), backend="cpu", dynamic_threshold=0.9, sample_max_value=1.8)
        torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if CPU_OK else []))
def test_thresholded_sampling_with_guidance_and_callback(backend):
    """CFG + thresholding: the kernel path (reduction pass + thresholds) equals the torch path; the callback sees
    the thresholded D; stochastic plans keep batch invariance."""
    plan = fd.plan("dpmpp_2m_sde", S.DiscreteVP(), 6)

    def model(x, t, label):
        return 0.9 * torch.tanh(2 * x) + label.reshape((-1,) + (1,) * (x.dim() - 1)) * 0.3

    kw = dict(shape=(3, 2, 9), seeds=[5, 6, 7], guidance_scale=4.0, cond={"label": torch.tensor([1.0, -1.0, 0.5])},
              uncond={"label": torch.zeros(3)}, dynamic_threshold=0.95, sample_max_value=1.5)
    Ds = []
    got = fd.sample(model, plan, backend=backend, callback=lambda k, x, D: Ds.append(D), **kw)
    ref = fd.sample(model, plan, backend="torch", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(Ds) == plan.nfe and all(float(D.abs().max()) <= 1.0 + 1e-6 for D in Ds)
    alone = fd.sample(model, plan, backend=backend, **dict(kw, shape=(1, 2, 9), seeds=[6],
                                                           cond={"label": torch.tensor([-1.0])},
                                                           uncond={"label": torch.zeros(1)}))
    assert torch.equal(alone[0], got[1])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (torch.ones(4), "one entry per sample"),
    (torch.ones(3, 1), "one entry per sample"),
    (torch.ones(3, dtype=torch.float64), "torch.float32"),
    (torch.ones(3, dtype=torch.float16), "torch.float32"),
    (torch.ones(3, dtype=torch.int64), "torch.float32"),
    (torch.ones(3, device="meta"), "thresholds is on meta"),
    ([1.0, 1.0, 1.0], "must be a torch.float32 tensor"),
])
@pytest.mark.parametrize("kernel", ["torch"] + (["cpu"] if CPU_OK else []))
def test_step_rejects_bad_thresholds(kernel, bad, match):
    inp, f = stage_inputs("ddim", (3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        ops.step(inp["x"], inp["out"], inp["slots"], inp["rows"], inp["seeds"], inp["draws"], thresholds=bad,
                 kernel=kernel, noise=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dynamic_threshold=True), "quantile ratio"),
    (dict(dynamic_threshold="0.9"), "quantile ratio"),
    (dict(dynamic_threshold=1.5), r"in \[0, 1\]"),
    (dict(dynamic_threshold=0.9, sample_max_value=0.5), "sample_max_value must be >= 1"),
    (dict(dynamic_threshold=0.9, sample_max_value=float("nan")), "sample_max_value must be >= 1"),
])
def test_sampler_rejects_bad_options(kwargs, match):
    plan = fd.plan("ddim", S.DiscreteVP(), 3)
    with pytest.raises(ValueError, match=match):
        fd.Sampler(eps_model, plan, **kwargs)
    with pytest.raises(ValueError, match=match):
        fd.sample(eps_model, plan, x_T=torch.zeros(1, 3), **kwargs)


def test_dynamic_threshold_rejects_bad_input():
    x = torch.zeros(2, 3)
    rows = torch.zeros(1, ops.row_length(0))
    with pytest.raises(ValueError, match="out has shape"):
        ops.dynamic_threshold(x, torch.zeros(2, 3), rows, cfg=True)
    with pytest.raises(ValueError, match="guidance must be"):
        ops.dynamic_threshold(x, torch.zeros(4, 3), rows, cfg=True)
    with pytest.raises(ValueError, match="rows must be"):
        ops.dynamic_threshold(x, x, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="quantile in"):
        ops.dynamic_threshold(x, x, rows, ratio=-0.1)
    with pytest.raises(ValueError, match="on meta"):
        ops.dynamic_threshold(x, torch.zeros(2, 3, device="meta"), rows)
