"""Bad input to sample / Sampler / img2img / ops fails before any work with a ValueError that names the argument
and the fix (FloatingPointError for NaN); inputs that only look unusual (numpy / 0-d tensor numbers) work."""

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S
from fastdiff.models import GaussianMixture

EDM = S.EDM()
MODEL = GaussianMixture([0.0], [1.0]).model(EDM, "epsilon")
PLAN = fd.plan("euler", EDM, 3)
Y = torch.zeros(2)


def cond_model(x, t, y):
    return MODEL(x, t) + 0.0 * y[:, None]


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape=(1, 3), seeds=5), r"seeds must be a list with one integer per sample.*seeds=\[5\]"),
    (dict(shape=(2, 3), seeds=[1, -1]), r"seeds\[1\] = -1 is negative.*\[0, 2\*\*64\)"),
    (dict(shape=(2, 3), seeds=[1, 2**64]), r"seeds\[1\].*does not fit in 64 bits"),
    (dict(shape=(2, 3), seeds=[1, 1.5]), r"seeds\[1\] = 1.5 is not an integer"),
    (dict(shape=(2, 3), seeds=[1, 2, 3]), "seeds has 3 entries but the batch has 2 samples"),
    (dict(shape=3, seeds=[1, 2, 3]), r"shape must be a tuple of sizes with the batch first.*got int 3"),
    (dict(shape=(0, 3), seeds=[]), r"batch of 0 samples: shape\[0\] must be at least 1"),
    (dict(x_T=torch.zeros(0, 3)), "x_T must have a batch dimension with at least one sample"),
    (dict(x_T=torch.zeros(2, 3), shape=(2, 4)), r"x_T has shape \(2, 3\) but shape=\(2, 4\)"),
    (dict(x_T=torch.zeros(2, 3), noise=torch.zeros(2, 3)), "x_T= .* or noise= .*not both"),
    (dict(x_T=torch.zeros(2, 3), dtype=torch.float16), r"dtype=torch.float16 but x_T is torch.float32"),
    (dict(shape=(2, 3), seeds=[1, 2], dtype=torch.int64), "dtype must be torch.float32, .* got torch.int64"),
    (dict(shape=(2, 3), seeds=[1, 2], dtype="float16"), "dtype must be torch.float32"),
    (dict(x_T=torch.zeros(2, 3, dtype=torch.int64)), "x_T must be a floating-point torch.Tensor"),
    (dict(x_T=torch.zeros(2, 3, dtype=torch.complex64)), "x_T must be a floating-point torch.Tensor"),
    (dict(shape=(2, 3), seeds=[1, 2], backend="trition"), "unknown backend 'trition'; did you mean 'triton'"),
    (dict(shape=(2, 3), seeds=[1, 2], check_finite=True), "check_finite must be"),
    (dict(shape=(2, 3), seeds=[1, 2], callback="print"), "callback must be a function"),
])
def test_sample_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.sample(MODEL, PLAN, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available here.*use device='cpu'"):
        fd.sample(MODEL, PLAN, shape=(2, 3), seeds=[1, 2], device="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(cond=Y), "cond must be a dict of keyword arguments for the model.*got a torch.float32 tensor"),
    (dict(cond=[Y]), "cond must be a dict of keyword arguments.*got list"),
    (dict(cond={"y": Y}, guidance_scale=3.0), "guidance_scale needs uncond="),
    (dict(cond={"y": Y}, uncond={"y": Y}), "uncond= is only used with classifier-free guidance: give guidance_scale"),
    (dict(cond={"y": Y}, uncond={"y": Y}, guidance_scale="abc"), "guidance_scale must be a finite number.*'abc'"),
    (dict(cond={"y": Y}, uncond={"y": Y}, guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(cond={"y": Y}, uncond={"y": Y}, guidance_scale=True), "guidance_scale must be a finite number"),
    (dict(cond={"y": Y}, uncond={"z": Y}, guidance_scale=2.0), "cond and uncond must have the same keys"),
    (dict(cond={"y": torch.zeros(3)}), r"cond\['y'\] must be a tensor with 2 rows"),
])
def test_conditioning_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.sample(cond_model, PLAN, shape=(2, 3), seeds=[1, 2], **kwargs)


def test_guidance_scale_as_a_0d_tensor_or_numpy_number_works():
    kw = dict(shape=(2, 3), seeds=[1, 2], cond={"y": Y}, uncond={"y": Y + 1})
    want = fd.sample(cond_model, PLAN, guidance_scale=2.5, **kw)
    assert torch.equal(fd.sample(cond_model, PLAN, guidance_scale=torch.tensor(2.5), **kw), want)
    assert torch.equal(fd.sample(cond_model, PLAN, guidance_scale=np.float32(2.5), **kw), want)


@pytest.mark.parametrize("model,cond,match", [
    (lambda x: x, None, r"takes 1 positional argument.*model\(x, t, \*\*cond\)"),
    (lambda x, t: x, {"y": Y}, r"unexpected keyword argument 'y'.*model\(x, t, \*\*cond\).*'y' \(from cond\)"),
])
def test_model_with_another_calling_convention(model, cond, match):
    with pytest.raises(ValueError, match=match) as info:
        fd.sample(model, PLAN, shape=(2, 3), seeds=[1, 2], cond=cond)
    assert isinstance(info.value.__cause__, TypeError)  # the model's own error stays in the traceback


def test_type_error_inside_the_model_later_is_not_relabelled():
    calls = []

    def model(x, t):
        calls.append(1)
        if len(calls) > 1:
            raise TypeError("a bug in the model")
        return x

    with pytest.raises(TypeError, match="a bug in the model"):
        fd.sample(model, PLAN, shape=(2, 3), seeds=[1, 2])


def _halves_model(x, t, y):
    """Finite outputs whose guided combination overflows float32: out_u = -3e38, out_c = 3e38."""
    return torch.where(y[:, None] > 0, 3e38, -3e38).expand_as(x).contiguous()


def test_nan_from_guidance_is_not_blamed_on_the_model():
    kw = dict(x_T=torch.ones(2, 3), cond={"y": torch.ones(2)}, uncond={"y": -torch.ones(2)}, guidance_scale=2.0)
    with pytest.raises(FloatingPointError, match="after stage 0.*both halves of the model output are finite.*guided "
                                                 "combination.*lower guidance_scale"):
        fd.sample(_halves_model, PLAN, check_finite="step", **kw)
    with pytest.raises(FloatingPointError, match="guidance combination"):
        fd.sample(_halves_model, PLAN, **kw)


def test_nan_from_the_model_is_blamed_on_the_model():
    with pytest.raises(FloatingPointError, match="after stage 0.*the model output has NaN"):
        fd.sample(lambda x, t: torch.full_like(x, float("nan")), PLAN, x_T=torch.ones(2, 3), check_finite="step")


@pytest.mark.parametrize("strength", [np.float32(0.5), torch.tensor(0.5), np.float64(0.5), 0.5, [0.5, 0.5],
                                      torch.tensor([0.5, 0.5]), np.array([0.5, 0.5])])
def test_img2img_takes_any_number_type(strength):
    init = torch.linspace(-1, 1, 6).reshape(2, 3)
    want = fd.Sampler(MODEL, PLAN).img2img(init, 0.5, [1, 2])
    assert torch.equal(fd.Sampler(MODEL, PLAN).img2img(init, strength, [1, 2]), want)


@pytest.mark.parametrize("strength,seeds,match", [
    ("x", [1, 2], "strength must be one number or 2 numbers in"),
    (1.5, [1, 2], "strength must be one number or 2 numbers in"),
    ([0.5], [1, 2], "strength must be one number or 2 numbers in"),
    (0.5, 7, r"seeds=\[7\]"),
    (0.5, None, "img2img needs seeds="),
])
def test_img2img_rejects(strength, seeds, match):
    with pytest.raises(ValueError, match=match):
        fd.Sampler(MODEL, PLAN).img2img(torch.zeros(2, 3), strength, seeds)


def test_sampler_options_rejected():
    with pytest.raises(ValueError, match="plan must be a fastdiff Plan"):
        fd.Sampler(MODEL, "euler")
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        fd.Sampler(MODEL, PLAN, max_graphs=0)
    with pytest.raises(ValueError, match="did you mean 'cuda'"):
        fd.Sampler(MODEL, PLAN, backend="cdua")


# -- ops ----------------------------------------------------------------------------------------------------------


def _step_args(B=2, n=3):
    return (torch.zeros(B, n), torch.zeros(B, n), torch.zeros(0, B, n), torch.zeros(1, ops.row_length(0)),
            rng.seeds_tensor(list(range(B))), torch.tensor([1]))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.randn((2, 3), [1, 2**64]), r"seeds\[1\].*does not fit in 64 bits"),
    (lambda: ops.randn((2, 3), [1, -2]), r"seeds\[1\] = -2 is negative"),
    (lambda: ops.randn((2, 3), 5), r"single int 5: write seeds=\[5\]"),
    (lambda: ops.randn((2, 3), [1]), "seeds has 1 entries but the batch has 2"),
    (lambda: ops.randn(3, [1]), "shape must be a sequence of sizes with the batch first"),
    (lambda: ops.randn((2, 0), [1, 2]), "positive integer sizes"),
    (lambda: ops.randn((1, 3), [1], dtype=torch.int32), "dtype must be one of"),
    (lambda: ops.randn((1, 3), [1], draw=-1), r"draw must lie in \[0, 2\*\*32\)"),
    (lambda: ops.randn((1, 3), torch.tensor([1]), device="meta"), "seeds is on cpu but device=meta"),
    (lambda: ops.randn((1, 3), [1], backend="gpu"), "unknown backend 'gpu'"),
    (lambda: ops.add_noise(torch.zeros(2, 3), torch.zeros(3), 1.0, [1, 2]), r"alpha must be .*\[B or 1\] = \[2 or 1\]"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, torch.zeros(2, dtype=torch.int64), [1, 2]), "sigma must be"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, torch.zeros(2, device="meta"), [1, 2]), "sigma is on meta"),
    (lambda: ops.add_noise(torch.zeros(2, 3, dtype=torch.int32), 1.0, 1.0, [1, 2]), "x0 is torch.int32"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, 1.0, 5), r"seeds=\[5\]"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, 1.0, [1, 2], draws=2**32), r"\[0, 2\*\*32\)"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, 1.0, torch.zeros(3, dtype=torch.int64)),
     "seeds must be an int64 tensor with one entry per sample"),
    (lambda: ops.add_noise(torch.zeros(2, 3), 1.0, 1.0, [1, 2], backend="cdua"), "did you mean 'cuda'"),
    (lambda: ops.step(*_step_args(), backend="cpu", z=torch.zeros(2, 3)), "z= .* torch backend only"),
    (lambda: ops.step(*_step_args(), z=torch.zeros(2, 4)), r"z has shape \(2, 4\), expected \(2, 3\)"),
    (lambda: ops.step(*_step_args(), backend="cpu", kernel="torch"), "kernel= is the old name of backend="),
    (lambda: ops.step(*_step_args(), slot_writes=1), "slot_writes is the bitmask 1 but there are 0 slots"),
    (lambda: ops.step(*_step_args()[:-1], [1]), "draws must be an int64"),
    (lambda: ops.step(*_step_args(), use_out=False, cfg=True), "cfg=True needs use_out=True"),
])
def test_ops_reject(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ops_take_backend_and_the_old_kernel_keyword():
    x0, seeds = torch.randn(2, 3), [4, 5]
    a = ops.add_noise(x0, 0.5, 0.8, seeds, backend="torch")
    assert torch.equal(a, ops.add_noise(x0, 0.5, 0.8, seeds, kernel="torch"))
    assert torch.equal(a, ops.add_noise(x0, torch.tensor(0.5), torch.tensor([0.8, 0.8]), rng.seeds_tensor(seeds)))
    want = 0.5 * x0 + 0.8 * rng.randn((2, 3), seeds, draw=0)
    torch.testing.assert_close(a, want)
    assert torch.equal(ops.randn((2, 3), seeds, 3, kernel="torch"), rng.randn((2, 3), seeds, draw=3))


@pytest.mark.parametrize("seeds,match", [(5, "not a single int"), (None, "sequence of integers"),
                                         (["a"], r"seeds\[0\] = 'a' is not an integer")])
def test_seeds_tensor_rejects(seeds, match):
    with pytest.raises(ValueError, match=match):
        rng.seeds_tensor(seeds)
