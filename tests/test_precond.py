"""EDM preconditioning: the properties Karras et al. designed it for, and its use through the sampler."""

import torch

import fastdiff as fd
from fastdiff.models import EDMPrecond, GaussianMixture, edm_scalings


def test_unit_variance_input_and_target():
    """For data of std sigma_data: the network input and its training target both have unit variance (EDM §5)."""
    g = torch.Generator().manual_seed(0)
    sd = 0.5
    wrapper = EDMPrecond(lambda x, c: x, sigma_data=sd)
    for sigma in (0.01, 0.3, 2.0, 40.0):
        x0 = sd * torch.randn(200_000, generator=g, dtype=torch.float64)
        n = torch.randn(200_000, generator=g, dtype=torch.float64)
        s = torch.full((200_000,), sigma, dtype=torch.float64)
        _, _, c_in, _ = edm_scalings(s, sd)
        assert abs(float((c_in * (x0 + sigma * n)).var()) - 1) < 0.02
        assert abs(float(wrapper.training_target(x0[:, None], n[:, None], s).var()) - 1) < 0.02


def test_wrapping_the_ideal_network_gives_the_exact_denoiser():
    """A raw network equal to the ideal target turns into the exact denoiser, and samples like it."""
    data = GaussianMixture([0.3], [0.5])
    sch = fd.schedules.EDM()

    def ideal_f(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = edm_scalings(sigma, 0.5)
        x = x_in / c_in[:, None]
        return (data.denoise(x, 1.0, sigma) - c_skip[:, None] * x) / c_out[:, None]

    wrapped = EDMPrecond(ideal_f, sigma_data=0.5)
    plan = fd.plan("heun", sch, 12, prediction="x0")
    x_T = 80 * torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    a = fd.sample(wrapped, plan, x_T=x_T)
    b = fd.sample(data.model(sch, "x0"), plan, x_T=x_T)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
