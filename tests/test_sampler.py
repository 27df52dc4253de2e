"""Sampler loop on the torch backend: batch invariance, guidance, callbacks, dtypes."""

import pytest
import torch

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.models import GaussianMixture

MIX = GaussianMixture(means=[-1.0, 2.0], stds=[0.3, 0.5])


BACKENDS = [b for b in ("torch", "cpu") if fd.backends.status(b)[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "pc"])
def test_batch_invariance(solver, backend):
    """A seed gives a bitwise identical sample whatever the batch size and position."""
    sch = S.EDM() if solver != "ddpm" else S.DiscreteVP()
    if solver == "pc":
        sch = S.VE()
    plan = fd.plan(solver, sch, 6)
    model = MIX.model(sch, "epsilon")
    alone = fd.sample(model, plan, shape=(1, 4, 5), seeds=[123], backend=backend)
    for seeds in ([123, 7, 9], [5, 6, 7, 8, 9, 10, 11, 123]):
        batch = fd.sample(model, plan, shape=(len(seeds), 4, 5), seeds=seeds, backend=backend)
        assert torch.equal(batch[seeds.index(123)], alone[0])


def test_guidance_equals_hand_written_cfg():
    sch = S.DiscreteVP.scaled_linear()
    plan = fd.plan("dpmpp_2m", sch, 8)

    def model(x, t, label):
        # a conditional toy model: the label shifts the prediction
        return torch.tanh(x) * 0.5 + label[:, None, None] * (t[:, None, None] / 1000.0)

    cond, uncond = {"label": torch.tensor([1.0, -2.0])}, {"label": torch.tensor([0.0, 0.0])}
    w = 4.5
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = fd.sample(model, plan, x_T=x_T, guidance_scale=w, cond=cond, uncond=uncond)

    def guided(x, t):
        out_u, out_c = model(x, t, **uncond), model(x, t, **cond)
        return out_u + w * (out_c - out_u)

    want = fd.sample(guided, plan, x_T=x_T)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_callback_and_model_times():
    sch = S.DiscreteVP()
    plan = fd.plan("heun", sch, 4)
    seen_t, seen = [], []
    model = MIX.model(sch, "epsilon")

    def spy(x, t):
        seen_t.append(float(t[0]))
        return model(x, t)

    fd.sample(spy, plan, shape=(2, 3), seeds=[1, 2], callback=lambda k, x, D: seen.append(k))
    assert seen_t == pytest.approx(list(plan.model_times))
    assert len(seen) == plan.nfe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    plan = fd.plan("euler", S.EDM(), 4)
    x = fd.sample(MIX.model(S.EDM(), "x0"), fd.plan("euler", S.EDM(), 4, prediction="x0"),
                  x_T=80 * torch.randn(2, 3).to(dtype))
    assert x.dtype == dtype
    assert plan.prediction == "epsilon"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_object_matches_function(backend):
    sch = S.EDM()
    plan = fd.plan("euler_ancestral", sch, 5)
    model = MIX.model(sch, "epsilon")
    s = fd.Sampler(model, plan, backend=backend)
    torch.testing.assert_close(s.sample((3, 2), seeds=[1, 2, 3]),
                               fd.sample(model, plan, shape=(3, 2), seeds=[1, 2, 3], backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_sampling_matches_torch_backend(backend):
    """Guidance fused in the kernel equals the torch backend's explicit combination (fp32 tolerance)."""
    sch = S.DiscreteVP.scaled_linear()
    plan = fd.plan("dpmpp_2m", sch, 8)

    def model(x, t, label):
        return torch.tanh(x) * 0.5 + label[:, None] * (t[:, None] / 1000.0)

    kw = dict(shape=(3, 17), seeds=[1, 2, 3], guidance_scale=3.0, cond={"label": torch.tensor([1.0, -2.0, 0.5])},
              uncond={"label": torch.zeros(3)})
    ref = fd.sample(model, plan, backend="torch", **kw)
    torch.testing.assert_close(fd.sample(model, plan, backend=backend, **kw), ref, rtol=1e-5, atol=1e-5)


def test_sampler_is_thread_safe():
    """One Sampler shared by threads gives each caller the result of a serial call."""
    from concurrent.futures import ThreadPoolExecutor

    sch = S.EDM()
    sampler = fd.Sampler(MIX.model(sch, "epsilon"), fd.plan("dpmpp_2m_sde", sch, 6))
    jobs = [[i, i + 100] for i in range(8)]
    serial = [sampler.sample((2, 33), seeds=s) for s in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda s: sampler.sample((2, 33), seeds=s), jobs))
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver,schedule,prediction", [
    ("dpmpp_2m", S.DiscreteVP.scaled_linear(), "epsilon"),
    ("dpmpp_2m_sde", S.EDM(), "epsilon"),
    ("pc", S.VE(sigma_max=1000.0), "score"),  # Langevin step sizes beyond fp16 range: NaN when computed in fp16
])
def test_half_precision_sample_is_finite_and_close_to_float32(backend, dtype, solver, schedule, prediction):
    """fp16 / bf16 data: every backend computes a stage in float32 and rounds only what it stores, so the sample
    is finite and within the storage precision's rounding of the float32 sample."""
    plan = fd.plan(solver, schedule, 8, prediction=prediction)
    model = MIX.model(schedule, prediction)
    kw = dict(shape=(3, 4, 16, 17), seeds=[1, 2, 3], backend=backend)
    want = fd.sample(model, plan, **kw)
    got = fd.sample(model, plan, dtype=dtype, check_finite="off", **kw)
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} non-finite values"
    err = (got.float() - want).abs()
    unit = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7  # the storage format's relative precision
    scale = want.abs().mean().item()
    assert err.mean().item() < 16 * unit * scale, (err.mean().item(), scale)


class _TupleModel(torch.nn.Module):
    """A module returning (output, extra), as many research models do."""

    def forward(self, x, t):
        return torch.tanh(x) * (t[:, None, None] / 1000.0), {"extra": 1}


def test_model_returning_a_tuple_is_accepted():
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 5)
    net = _TupleModel()
    got = fd.sample(net, plan, shape=(2, 3, 5), seeds=[4, 5])
    want = fd.sample(lambda x, t: net(x, t)[0], plan, shape=(2, 3, 5), seeds=[4, 5])
    assert torch.equal(got, want)


def test_diffusers_unet_is_passed_as_it_is():
    """A diffusers model returns UNet2DOutput (the tensor in ``.sample``): fd.sample takes the model without a
    lambda.  Tiny random weights, no download."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    plan = fd.plan("ddim", S.DiscreteVP(), 3)
    with torch.no_grad():
        got = fd.sample(unet, plan, shape=(2, 2, 8, 8), seeds=[1, 2])
        want = fd.sample(lambda x, t: unet(x, t).sample, plan, shape=(2, 2, 8, 8), seeds=[1, 2])
        as_tuple = fd.sample(lambda x, t: unet(x, t, return_dict=False), plan, shape=(2, 2, 8, 8), seeds=[1, 2])
    assert torch.isfinite(got).all()
    assert torch.equal(got, want) and torch.equal(as_tuple, want)
