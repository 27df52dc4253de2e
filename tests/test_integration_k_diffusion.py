"""fastdiff.integrations.k_diffusion: k-diffusion's signatures and results (shared noise_sampler), Philox by default."""

import inspect

import pytest
import torch
from peers import GaussianMixture, load_k_diffusion

from fastdiff.integrations import k_diffusion as fk

kd = load_k_diffusion()
pytestmark = pytest.mark.skipif(kd is None, reason="k-diffusion is not installed")
GM = GaussianMixture(dim=12)


def denoiser(x, sigma, **extra):
    shift = extra.get("shift", 0.0)
    return GM.denoise(x, torch.ones_like(sigma), sigma) + shift


def karras(n, dtype=torch.float64):
    return kd[0].get_sigmas_karras(n, 0.002, 80.0, rho=7.0).to(dtype)


class FixedNoise:
    """A noise_sampler replaying a fixed list; both samplers must consume it identically."""

    def __init__(self, shape, n=64, dtype=torch.float64):
        g = torch.Generator().manual_seed(7)
        self.z = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.z[len(self.calls) - 1]


CASES = [("sample_euler", {}), ("sample_heun", {}), ("sample_dpm_2", {}), ("sample_lms", {}),
         ("sample_dpmpp_2m", {}), ("sample_euler_ancestral", {"eta": 1.0}), ("sample_euler_ancestral", {"eta": 0.5}),
         ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2m_sde", {}),
         ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}), ("sample_dpmpp_3m_sde", {}),
         ("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}),
         ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.3})]


@pytest.mark.parametrize("n", [2, 5, 12])
@pytest.mark.parametrize("name,kw", CASES, ids=lambda c: c if isinstance(c, str) else ",".join(map(str, c.values())))
def test_matches_k_diffusion(name, kw, n):
    sigmas = karras(n)
    x = 80.0 * torch.randn(3, 12, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    noisy = "noise_sampler" in inspect.signature(getattr(kd[0], name)).parameters
    ours_noise, theirs_noise = FixedNoise(x.shape), FixedNoise(x.shape)
    extra = {"shift": 0.01}
    ours = getattr(fk, name)(denoiser, x, sigmas, extra_args=extra, disable=True,
                             **({"noise_sampler": ours_noise} if noisy else {}), **kw)
    theirs = getattr(kd[0], name)(denoiser, x, sigmas, extra_args=extra, disable=True,
                                  **({"noise_sampler": theirs_noise} if noisy else {}), **kw)
    assert ours_noise.calls == theirs_noise.calls  # the same noise, asked for at the same (sigma, sigma_next)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_callback_reports_each_step_like_k_diffusion():
    sigmas = karras(4)
    x = 80.0 * torch.randn(2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, theirs = [], []
    fk.sample_heun(denoiser, x, sigmas, callback=ours.append, disable=True)
    kd[0].sample_heun(denoiser, x, sigmas, callback=theirs.append, disable=True)
    assert [d["i"] for d in ours] == [d["i"] for d in theirs] == [0, 1, 2, 3]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=1e-9, atol=1e-9)
        assert float(a["sigma"]) == pytest.approx(float(b["sigma"]))


def test_default_noise_is_per_sample_philox():
    """Without a noise_sampler a seed's sample does not depend on the batch it is in."""
    sigmas = karras(6, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = 80.0 * torch.randn(4, 12, generator=g)
    both = fk.sample_euler_ancestral(denoiser, x, sigmas, seeds=[1, 2, 3, 4], disable=True)
    alone = fk.sample_euler_ancestral(denoiser, x[2:3], sigmas, seeds=[3], disable=True)
    torch.testing.assert_close(both[2:3], alone, rtol=1e-6, atol=1e-5)
    again = fk.sample_euler_ancestral(denoiser, x, sigmas, seeds=[1, 2, 3, 4], disable=True)
    assert torch.equal(both, again)


def test_one_step_sde_works_where_k_diffusion_crashes():
    sigmas = karras(1)
    x = 80.0 * torch.randn(2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fk.sample_dpmpp_2m_sde(denoiser, x, sigmas, seeds=[1, 2], disable=True)
    torch.testing.assert_close(out, denoiser(x, torch.full((2,), 80.0, dtype=torch.float64)))


# Samplers k-diffusion 0.1.1 lacks (ComfyUI's signatures): the wrapper must equal fastdiff's own run of the same plan
# (what is checked is the wrapper's plumbing: sigmas -> plan, extra_args, seeds, callback, noise_sampler).
COMFY = [("sample_heunpp2", "heunpp2", {}), ("sample_gradient_estimation", "gradient_estimation", {"ge_gamma": 2.5}),
         ("sample_er_sde", "er_sde", {"max_stage": 2}), ("sample_seeds_2", "seeds_2", {"eta": 0.8}),
         ("sample_seeds_3", "seeds_3", {}), ("sample_ipndm", "ipndm", {"max_order": 3}),
         ("sample_ipndm_v", "ipndm_v", {}), ("sample_deis", "deis", {}), ("sample_res_multistep", "res_multistep", {}),
         ("sample_res_multistep_ancestral", "res_multistep_ancestral", {"eta": 0.7}),
         ("sample_sa_solver", "sa_solver", {"eta": 0.8, "predictor_order": 2}),
         ("sample_sa_solver_pece", "sa_solver_pece", {})]


def fd_reference(solver, sigmas, x, seeds, shift, noise=None, **options):
    import fastdiff as fd
    from fastdiff.schedules import EDM

    plan = fd.plan(solver, EDM(), sigmas=[float(s) for s in sigmas], prediction="x0", **options)
    noise_fn = None if noise is None else (lambda k: noise.pop(0))
    sampler = fd.Sampler(lambda xx, t: denoiser(xx, t, shift=shift), plan, backend="torch")
    return sampler.sample(x_T=x, seeds=seeds, noise_fn=noise_fn)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("name,solver,kw", COMFY, ids=[c[0] for c in COMFY])
def test_comfy_samplers_equal_fastdiff_plan(name, solver, kw, n):
    sigmas = karras(n)
    x = 80.0 * torch.randn(3, 12, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours = getattr(fk, name)(denoiser, x, sigmas, extra_args={"shift": 0.02}, disable=True, seeds=[4, 5, 6], **kw)
    ref = fd_reference(solver, sigmas, x, [4, 5, 6], 0.02, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["sample_heunpp2", "sample_seeds_3", "sample_dpm_2_ancestral", "sample_er_sde"])
def test_callback_keys_and_steps(name):
    sigmas = karras(4)
    x = 80.0 * torch.randn(2, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    getattr(fk, name)(denoiser, x, sigmas, callback=seen.append, disable=True, seeds=[1, 2])
    assert [sorted(d) for d in seen] == [["denoised", "i", "sigma", "sigma_hat", "x"]] * 4
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert [float(d["sigma"]) for d in seen] == [float(s) for s in sigmas[:4]]
    torch.testing.assert_close(seen[0]["x"], x)
    torch.testing.assert_close(seen[0]["denoised"], denoiser(x, torch.full((2,), float(sigmas[0]), dtype=x.dtype)))


def test_seeds_noise_sampler_is_called_per_stage_like_comfyui():
    """ComfyUI's SEEDS-2 asks for (sigma, sigma_s1) then (sigma_s1, sigma_next), sigma_s1 = sigma (sigma_next /
    sigma)^r; the draws go, in order, to the plan's noisy stages."""
    sigmas, r = karras(3), 0.4
    x = 80.0 * torch.randn(2, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = FixedNoise(x.shape)
    ours = fk.sample_seeds_2(denoiser, x, sigmas, noise_sampler=noise, r=r, disable=True)
    expected = []
    for s, s_next in zip(sigmas[:2].tolist(), sigmas[1:3].tolist()):  # the last step (to 0) draws nothing
        mid = s * (s_next / s) ** r
        expected += [s, mid, mid, s_next]
    assert [v for call in noise.calls for v in call] == pytest.approx(expected, rel=1e-12)
    ref = fd_reference("seeds_2", sigmas, x, [0, 0], 0.0, noise=list(noise.z[:len(noise.calls)]), r=r)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_unsupported_options_name_the_argument():
    x, sigmas = torch.zeros(1, 12, dtype=torch.float64), karras(3)
    with pytest.raises(ValueError, match="cfg_pp"):
        fk.sample_gradient_estimation(denoiser, x, sigmas, cfg_pp=True)
    with pytest.raises(ValueError, match="noise_scaler"):
        fk.sample_er_sde(denoiser, x, sigmas, noise_scaler=lambda v: v)
    with pytest.raises(ValueError, match="tau_func"):
        fk.sample_sa_solver(denoiser, x, sigmas, tau_func=lambda s: 1.0)
    with pytest.raises(ValueError, match="deis_mode"):
        fk.sample_deis(denoiser, x, sigmas, deis_mode="rhoab")
    with pytest.raises(ValueError, match="sigma_min"):
        fk.sample_dpm_fast(denoiser, x, 0.0, 80.0, 6)


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("n", [2, 6, 10])
def test_dpm_fast_matches_k_diffusion(n, eta):
    """k-diffusion builds its log-sigma steps in torch's default dtype: float64 here on both sides."""
    x = 80.0 * torch.randn(3, 12, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours_noise, theirs_noise = FixedNoise(x.shape), FixedNoise(x.shape)
    ours_cb, theirs_cb = [], []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours = fk.sample_dpm_fast(denoiser, x, 0.002, 80.0, n, extra_args={"shift": 0.01}, disable=True, eta=eta,
                                  noise_sampler=ours_noise, callback=ours_cb.append)
        theirs = kd[0].sample_dpm_fast(denoiser, x, 0.002, 80.0, n, extra_args={"shift": 0.01}, disable=True, eta=eta,
                                       noise_sampler=theirs_noise, callback=theirs_cb.append)
    finally:
        torch.set_default_dtype(default)
    # k-diffusion asks for noise at every step and multiplies it by su = 0 where there is none (eta = 0, and the
    # last step, whose sigma_down is clamped to sigma_min); fastdiff asks only where su > 0
    assert ours_noise.calls == (theirs_noise.calls[:-1] if eta else [])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    assert [d["i"] for d in ours_cb] == [d["i"] for d in theirs_cb]
    for a, b in zip(ours_cb, theirs_cb):
        assert set(a) == set(b)
        for key in ("x", "denoised", "sigma", "t"):
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=1e-9, atol=1e-9)
