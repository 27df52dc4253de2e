"""fastdiff.integrations.diffusers: drop-in schedulers equal diffusers' own.

Each case runs diffusers' standard loop twice on the same fixed nonlinear model (the exact Gaussian-mixture denoiser
of ``peers.py`` as a function of the model's (x, t)), once with the stock scheduler and once with fastdiff's class of
the same name built by ``from_config`` of the stock one's config, and compares the samples to fp32 tolerance.
Stochastic schedulers get the same ``torch.Generator`` seed on both sides: the drop-in draws diffusers' noise
exactly when a generator is given.  Mismatches that are diffusers bugs are strict xfails with the diagnosis.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from peers import FP32_RTOL, GaussianMixture, assert_close, prediction_output

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword",
                                        "ignore::FutureWarning", "ignore::UserWarning")
import fastdiff.integrations.diffusers as fdd  # noqa: E402

GM = GaussianMixture(dim=32)
SHAPE = (3, 2, 4, 4)
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
PRED = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def _levels(scheduler, t):
    """(alpha, sigma) the model assumes at diffusers' timestep t (a fixed function of t on both sides)."""
    t = float(t)
    if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        s = t / scheduler.config.num_train_timesteps
        return 1.0 - s, s
    ab = scheduler.alphas_cumprod.double().numpy()
    lo = int(np.floor(t))
    if t == lo:  # integer timesteps: the table itself (alpha = 0 at zero terminal SNR)
        return float(np.sqrt(ab[lo])), float(np.sqrt(1.0 - ab[lo]))
    hi = min(lo + 1, len(ab) - 1)
    w = t - lo
    # log(sigma / alpha) interpolated linearly in t, as diffusers' _sigma_to_t inverts
    ls = (1 - w) * 0.5 * np.log((1 - ab[lo]) / ab[lo]) + w * 0.5 * np.log((1 - ab[hi]) / ab[hi])
    s = float(np.exp(ls))
    return 1.0 / np.sqrt(1 + s * s), s / np.sqrt(1 + s * s)


def model_fn(scheduler, x_in, t):
    pred = PRED[getattr(scheduler.config, "prediction_type", "flow_prediction")]
    a, s = _levels(scheduler, t)
    out = prediction_output(GM, x_in.double(), a, s, pred)
    return out.to(x_in.dtype)


def run_loop(scheduler, n, x_T, seed=7, step_kwargs=None, set_kwargs=None):
    scheduler.set_timesteps(n, **(set_kwargs or {}))
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none (1)
    g = torch.Generator().manual_seed(seed)
    accepts = scheduler.step.__code__.co_varnames
    for t in scheduler.timesteps:
        scale = getattr(scheduler, "scale_model_input", None)  # flow matching has none
        out = model_fn(scheduler, scale(x, t) if scale else x, t)
        kw = dict(step_kwargs or {})
        if "generator" in accepts:
            kw["generator"] = g
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


def x_start():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))


def both(name, config, n, step_kwargs=None, set_kwargs=None):
    stock = getattr(diffusers, name)(**config)
    ours = getattr(fdd, name).from_config(stock.config)
    assert type(ours).__name__ == name and isinstance(ours, getattr(diffusers, name))
    x_T = x_start()
    ref = run_loop(stock, n, x_T, step_kwargs=step_kwargs, set_kwargs=set_kwargs)
    got = run_loop(ours, n, x_T, step_kwargs=step_kwargs, set_kwargs=set_kwargs)
    return got, ref


DDPM_FINAL_NOISE = ("diffusers bug: DDPM fixed_large adds noise of variance 1 - alpha_bar_t on the final step (to "
                    "alpha_bar = 1); Ho et al. set z = 0 there and fastdiff returns the posterior mean")
SDE_3M = ("diffusers bug: sde-dpmsolver++ order 3 uses alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2) for D2 where the "
          "Taylor coefficient is ... + 1/2 (see test_peers_diffusers.SDE_3M)")
UNIPC_BH1_NAN = "diffusers bug: UniPC bh1 with final_sigmas_type='zero' returns NaN (-inf * 0 on the last step)"

CASES = [
    # (class, config, steps, step kwargs, set_timesteps kwargs, xfail reason)
    ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing"), (1, 4, 10), None, None, None),
    ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="leading", steps_offset=1,
                           set_alpha_to_one=False), (4, 10), None, None, None),
    ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction"),
     (3, 7), None, None, None),  # N % n != 0: diffusers' fixed stride
    ("DDIMScheduler", dict(LINEAR, clip_sample=False, timestep_spacing="linspace"), (5,), {"eta": 1.0}, None, None),
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.8), (5,),
     {"eta": 0.5}, None, None),
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.8), (5,),
     {"use_clipped_model_output": True}, None, None),
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing", thresholding=True, sample_max_value=1.2,
                           prediction_type="sample"), (4,), None, None, None),
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False,
                           prediction_type="v_prediction"), (4, 10), None, None, None),
    ("DDPMScheduler", dict(SD, clip_sample=False), (5, 20), None, None, None),
    ("DDPMScheduler", dict(SD, clip_sample=True, variance_type="fixed_small_log", timestep_spacing="trailing"),
     (5,), None, None, None),
    ("DDPMScheduler", dict(LINEAR, clip_sample=False, variance_type="fixed_large", timestep_spacing="leading"),
     (5,), None, None, None),
    ("DDPMScheduler", dict(LINEAR, clip_sample=False, variance_type="fixed_large", timestep_spacing="trailing"),
     (5,), None, None, DDPM_FINAL_NOISE),
    ("DDPMScheduler", dict(SD, clip_sample=False, thresholding=True, prediction_type="v_prediction"), (6,), None,
     None, None),
    ("EulerDiscreteScheduler", dict(SD), (1, 5, 12), None, None, None),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction",
                                    final_sigmas_type="sigma_min"), (5,), None, None, None),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), (6,), None, None, None),
    ("EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1),
     (6,), None, None, None),
    ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True, prediction_type="sample"), (6,), None, None, None),
    ("EulerDiscreteScheduler", dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                    timestep_spacing="trailing"), (5,), None, None, None),
    ("EulerAncestralDiscreteScheduler", dict(SD), (1, 5, 12), None, None, None),
    ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"),
     (6,), None, None, None),
    ("HeunDiscreteScheduler", dict(SD), (1, 4, 9), None, None, None),
    ("HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), (5,), None, None,
     None),
    ("DPMSolverMultistepScheduler", dict(SD), (1, 5, 10, 20), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, solver_type="heun", lower_order_final=False,
                                         final_sigmas_type="sigma_min"), (8,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, euler_at_final=True, final_sigmas_type="sigma_min",
                                         timestep_spacing="trailing"), (6,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, prediction_type="v_prediction"), (4, 12), None, None,
     None),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=1), (6,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=1, algorithm_type="dpmsolver",
                                         final_sigmas_type="sigma_min"), (6,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True, thresholding=True, prediction_type="sample",
                                         sample_max_value=1.5), (7,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, use_lu_lambdas=True), (7,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), (5, 12),
     None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", solver_order=3, solver_type="heun",
                                         final_sigmas_type="sigma_min", prediction_type="v_prediction"), (8,), None,
     None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), (6,),
     None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver", solver_type="heun", solver_order=1,
                                         final_sigmas_type="sigma_min"), (5,), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), (5, 10), None, None, None),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3), (8,), None, None,
     SDE_3M),
    ("DPMSolverMultistepScheduler", dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                         timestep_spacing="trailing"), (6,), None, None, None),
    ("DPMSolverSinglestepScheduler", dict(SD), (1, 5, 8), None, None, None),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3, solver_type="heun"), (6, 7, 10), None, None, None),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3, final_sigmas_type="sigma_min"), (9,), None, None,
     None),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="dpmsolver", solver_order=3,
                                          final_sigmas_type="sigma_min"), (7,), None, None, None),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=2, lower_order_final=False, use_karras_sigmas=True),
     (6,), None, None, None),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=2), (6,), None, None,
     None),
    ("UniPCMultistepScheduler", dict(SD), (1, 5, 10), None, None, None),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, timestep_spacing="trailing",
                                     prediction_type="v_prediction", disable_corrector=[1]), (6,), None, None, None),
    ("UniPCMultistepScheduler", dict(SD, solver_type="bh1", final_sigmas_type="sigma_min", timestep_spacing="trailing"),
     (6,), None, None, None),
    ("UniPCMultistepScheduler", dict(SD, solver_order=1, use_karras_sigmas=True), (6,), None, None, None),
    ("UniPCMultistepScheduler", dict(SD, solver_type="bh1"), (5,), None, None, UNIPC_BH1_NAN),
    ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000), (1, 5, 12), None, None, None),
    ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0), (6,), None, None, None),
    ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, use_dynamic_shifting=True,
                                             use_karras_sigmas=True), (6,), None, {"mu": 0.8}, None),
    ("LCMScheduler", dict(SD), (1, 4, 8), None, None, None),
    ("LCMScheduler", dict(SD, prediction_type="v_prediction", clip_sample=True, timestep_scaling=5.0), (4,), None,
     None, None),
]


def _params():
    for cls, cfg, steps, skw, tkw, xf in CASES:
        opts = ",".join(f"{k}={v}" for k, v in cfg.items() if k not in SD or cfg[k] != SD.get(k))
        for n in steps:
            marks = [pytest.mark.xfail(strict=True, reason=xf)] if xf else []
            yield pytest.param(cls, cfg, n, skw, tkw, marks=marks, id=f"{cls}-{opts}-{skw or ''}-n{n}")


@pytest.mark.parametrize("name,config,n,step_kwargs,set_kwargs", list(_params()))
def test_dropin_matches_diffusers(name, config, n, step_kwargs, set_kwargs, record_property):
    got, ref = both(name, config, n, step_kwargs, set_kwargs)
    assert_close(f"{name} n={n}", got, ref, FP32_RTOL, record_property)


# ---------------------------------------------------------------------------------------------------------------
# A real diffusers pipeline (small random UNet2DModel, no hub): our scheduler's images equal the stock one's
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return unet.eval()


@pytest.mark.parametrize("name,config,n", [
    ("DDPMScheduler", dict(SD, clip_sample=True), 6),  # stochastic: the pipeline's generator drives both
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing"), 5),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), 6),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3), 6),
    ("LCMScheduler", dict(SD), 4),
])
def test_pipeline_output_equals_stock(tiny_unet, name, config, n):
    stock = getattr(diffusers, name)(**config)
    ours = getattr(fdd, name).from_config(stock.config)
    images = []
    for scheduler in (stock, ours):
        pipe = diffusers.DDPMPipeline(unet=tiny_unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(batch_size=2, num_inference_steps=n, generator=torch.Generator().manual_seed(11),
                       output_type="np")
        images.append(torch.as_tensor(out.images))
    assert images[0].shape == (2, 8, 8, 3)
    assert_close(f"DDPMPipeline with {name}", images[1], images[0], 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# What diffusers does not have: per-sample steps, stateless runs, Philox noise per sample
# ---------------------------------------------------------------------------------------------------------------


def _sample_alone(scheduler, x_T, seeds, n, start=0):
    """Standard loop with fastdiff's Philox noise (no generator) for ``seeds``."""
    scheduler.set_timesteps(n)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        out = model_fn(scheduler, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, seeds=seeds).prev_sample
    return x


@pytest.mark.parametrize("name,config", [
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    ("DDPMScheduler", dict(SD, clip_sample=False)),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++")),
    ("LCMScheduler", dict(SD)),
])
def test_philox_noise_is_per_sample(name, config):
    """Without a generator the noise is fastdiff's Philox draw of each sample's seed: batch invariant."""
    s = getattr(fdd, name)(**config)
    x_T = x_start()
    batch = _sample_alone(s, x_T, [5, 6, 7], 6)
    alone = _sample_alone(s, x_T[1:2], [6], 6)
    assert torch.equal(batch[1:2], alone)
    other = _sample_alone(s, x_T, [5, 60, 7], 6)
    assert not torch.allclose(other[1], batch[1]) and torch.equal(other[0], batch[0])


def _per_sample_run(s, x_T, n, offsets, use_index):
    """Sample b starts ``offsets[b]`` steps late (from its own x_T); one step call per tick for the whole batch."""
    s.set_timesteps(n)
    ts = s.timesteps
    B = x_T.shape[0]
    state = s.new_state()
    x = x_T * getattr(s, "init_noise_sigma", 1.0)
    done = [None] * B
    total = len(ts) + max(offsets)
    for tick in range(total):
        idx = [tick - o for o in offsets]
        active = [b for b in range(B) if 0 <= idx[b] < len(ts)]
        if not active:
            continue
        # every sample steps in this call; the ones not started / finished take a harmless step we discard
        k = torch.tensor([min(max(i, 0), len(ts) - 1) for i in idx])
        t = ts[k]
        xin = s.scale_model_input(x, t, step_index=k) if use_index else s.scale_model_input(x, t)
        out = torch.cat([model_fn(s, xin[b:b + 1], t[b]) for b in range(B)])
        kw = dict(step_index=k, state=state) if use_index else {}
        new = s.step(out, t, x, seeds=list(range(B)), **kw).prev_sample
        for b in active:
            x[b] = new[b]
            if idx[b] == len(ts) - 1:
                done[b] = x[b].clone()
    return torch.stack(done)


@pytest.mark.parametrize("name,config,use_index", [
    ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing"), False),
    ("EulerDiscreteScheduler", dict(SD), False),
    ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000), False),
    ("DPMSolverMultistepScheduler", dict(SD), True),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3), True),
    ("HeunDiscreteScheduler", dict(SD), True),
])
def test_per_sample_timesteps_equal_each_sample_alone(name, config, use_index):
    """One step call serves samples at different steps (``timestep`` [B], or ``step_index`` [B] with a state
    holding per-sample history); each sample equals its own run."""
    s = getattr(fdd, name)(**config)
    x_T = x_start()
    got = _per_sample_run(s, x_T.clone(), 5, [0, 2, 1], use_index)
    for b in range(3):
        alone = _sample_alone(getattr(fdd, name)(**config), x_T[b:b + 1], [b], 5)
        assert torch.allclose(got[b:b + 1], alone, rtol=1e-5, atol=1e-5), (b, (got[b] - alone[0]).abs().max())


def assert_threads_equal_sequential(run, n):
    """``run(b, results)`` for b < n, once one after another and once on n threads at a time: equal bit for bit."""
    seq, par = {}, {}
    for b in range(n):
        run(b, seq)
    threads = [threading.Thread(target=run, args=(b, par)) for b in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for b in range(n):
        assert torch.equal(seq[b], par[b])


def test_stateless_runs_share_one_scheduler_across_threads():
    s = fdd.DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++")
    s.set_timesteps(8)
    x_T = x_start()

    def run(b, results):
        st = s.new_state()
        x = x_T[b:b + 1].clone()
        for t in s.timesteps:
            out = model_fn(s, x, t)
            x = s.step(out, t, x, seeds=[b], state=st).prev_sample
        results[b] = x

    assert_threads_equal_sequential(run, 3)
    assert s.step_index is None  # the scheduler's own counter was never touched


@pytest.mark.parametrize("name,config", [
    ("DDIMScheduler", dict(SD)), ("DDPMScheduler", dict(SD)), ("LCMScheduler", dict(SD)),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True)), ("DPMSolverMultistepScheduler", dict(SD)),
    ("UniPCMultistepScheduler", dict(SD)), ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000)),
])
def test_add_noise_matches_diffusers(name, config):
    stock, ours = getattr(diffusers, name)(**config), getattr(fdd, name)(**config)
    for s in (stock, ours):
        s.set_timesteps(10)
    x0, noise = x_start(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    t = stock.timesteps[torch.tensor([0, 4, 9])]
    if name.startswith("FlowMatch"):
        ref, got = stock.scale_noise(x0, t, noise), ours.scale_noise(x0, t, noise)
    else:
        ref, got = stock.add_noise(x0, noise, t), ours.add_noise(x0, noise, t)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_options_and_bad_calls_raise_clearly():
    with pytest.raises(NotImplementedError, match="learned_range"):
        fdd.DDPMScheduler(variance_type="learned_range").set_timesteps(5)
    with pytest.raises(NotImplementedError, match="predict_x0"):
        fdd.UniPCMultistepScheduler(predict_x0=False).set_timesteps(5)
    with pytest.raises(NotImplementedError, match="sde-dpmsolver"):
        fdd.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                        final_sigmas_type="sigma_min").set_timesteps(5)
    x = x_start()
    with pytest.raises(ValueError, match="set_timesteps"):  # diffusers' DDIM has no schedule before it either
        fdd.DDIMScheduler(**SD).step(x, 999, x)
    s = fdd.EulerDiscreteScheduler(**SD)
    s.set_timesteps(4)
    t = s.timesteps[0]
    with pytest.raises(NotImplementedError, match="s_churn"):
        s.step(x, t, x, s_churn=1.0)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :1], t, x)
    a = fdd.EulerAncestralDiscreteScheduler(**SD)
    a.set_timesteps(4)
    with pytest.raises(ValueError, match="one entry per sample"):
        a.step(x, a.timesteps[0], x, seeds=[1, 2])
    d = fdd.DDPMScheduler(**SD)
    d.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of"):  # diffusers' DDPM cannot step from it either
        d.step(x, 998, x)
    m = fdd.DPMSolverMultistepScheduler(**SD)
    m.set_timesteps(4)
    st = m.new_state()
    m.set_timesteps(5)
    with pytest.raises(ValueError, match="earlier set_timesteps"):
        m.step(x, m.timesteps[0], x, state=st)
    h = fdd.HeunDiscreteScheduler(**SD)
    h.set_timesteps(3)
    with pytest.raises(ValueError, match="step_index"):
        h.step(x, h.timesteps[[0, 1, 2]], x)


def test_config_round_trips_with_the_stock_classes():
    ours = fdd.DPMSolverMultistepScheduler(**SD, solver_order=3, use_karras_sigmas=True)
    stock = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    back = fdd.DPMSolverMultistepScheduler.from_config(stock.config)
    assert dict(back.config) == dict(ours.config) and type(back) is fdd.DPMSolverMultistepScheduler


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,config", [("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++")),
                                         ("EulerAncestralDiscreteScheduler", dict(SD)),
                                         ("DDIMScheduler", dict(SD, clip_sample=False))])
def test_step_has_no_host_sync_and_captures_in_a_cuda_graph(name, config):
    s = getattr(fdd, name)(**config)
    s.set_timesteps(6, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    out = torch.randn_like(x)
    ts = s.timesteps.to("cuda")
    s.step(out, ts[0], x, state=s.new_state())  # warm-up: rows on the device, the kernel compiled
    torch.cuda.synchronize()
    st = s.new_state()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts[:3]:
            x = s.step(out, t, s.scale_model_input(x, t, state=st), state=st).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    st = s.new_state(begin_index=1)
    s.step(out, ts[1], x, state=st)  # allocate the state's slots outside the capture
    st.step_index = 1
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = s.step(out, ts[1], x, state=st, step_index=1).prev_sample
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
