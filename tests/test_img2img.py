"""img2img: per-sample strength, diffusers' step rule, batch invariance, exact start distribution."""

import pytest
import torch

import fastdiff as fd
from fastdiff import rng
from fastdiff.models import GaussianMixture

SCH = fd.schedules.DiscreteVP.scaled_linear()
MIX = GaussianMixture([-1.0, 1.5], [0.3, 0.4])
MODEL = MIX.model(SCH, "epsilon")


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if fd.backends.status(b)[0]])
def test_per_sample_strength_equals_each_alone(backend):
    plan = fd.plan("dpmpp_2m_sde", SCH, 10)
    sampler = fd.Sampler(MODEL, plan, backend=backend)
    init = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    strengths, seeds = [0.0, 0.3, 0.75, 1.0], [5, 6, 7, 8]
    both = sampler.img2img(init, strengths, seeds)
    for b in range(4):
        alone = sampler.img2img(init[b : b + 1], strengths[b], seeds[b : b + 1])
        assert torch.equal(both[b : b + 1], alone)
    assert torch.equal(both[0], init[0])  # strength 0 returns the image


def test_start_follows_diffusers_rule_and_forward_process():
    """strength 0.3 of 10 steps: skip 7 steps, start at boundary 7 from alpha x0 + sigma z (Philox draw 0)."""
    plan = fd.plan("ddim", SCH, 10)
    init = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []

    def spy(x, t):
        seen.append((float(t[0]), x.clone()))
        return MODEL(x, t)

    fd.Sampler(spy, plan, backend="torch").img2img(init, 0.3, [1, 2])
    assert [t for t, _ in seen] == pytest.approx(list(plan.times[7:-1]))
    a, s = SCH.alpha(plan.times[7]), SCH.sigma(plan.times[7])
    z = rng.randn((2, 6), [1, 2], draw=0, dtype=torch.float64)
    torch.testing.assert_close(seen[0][1], a * init + s * z)


def test_bad_strength():
    sampler = fd.Sampler(MODEL, fd.plan("ddim", SCH, 4))
    with pytest.raises(ValueError, match="strength"):
        sampler.img2img(torch.zeros(2, 3), [0.5], [1, 2])
    with pytest.raises(ValueError, match="strength"):
        sampler.img2img(torch.zeros(2, 3), 1.5, [1, 2])
    with pytest.raises(ValueError, match="seeds"):
        sampler.img2img(torch.zeros(2, 3), 0.5, None)
