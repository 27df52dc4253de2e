"""fastdiff::step / add_noise / randn on the torch kernel: the flat-row contract equals the Plan's stage semantics,
ops pass torch.library.opcheck, compile without graph breaks, and serve per-sample rows of different plans."""

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S

SHAPE = (3, 2, 5, 7)  # odd sizes on purpose
PLANS = [
    fd.plan("dpmpp_3m", S.DiscreteVP(), 6),
    fd.plan("heun", S.EDM(), 4, s_churn=5.0),
    fd.plan("pc", S.VE(), 3, corrector_steps=2),
    fd.plan("unipc", S.DiscreteVP.scaled_linear(), 5, order=3),
    fd.plan("euler_ancestral", S.EDM(), 4),
    fd.plan("dpm_solver_3", S.ContinuousVP(), 3, final="t_min"),
    fd.plan("flow_heun", S.RectifiedFlow(), 4, prediction="flow"),
]


def stage_call(plan, k, x, out, slots, seeds, kernel="torch", **kw):
    rows = torch.as_tensor(plan.rows()[k : k + 1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    draws = torch.tensor([int(plan.draw[k])])
    return ops.step(x, out, slots, rows, seeds, draws, slot_reads=plan.slot_reads(k), slot_writes=plan.slot_writes(k),
                    use_out=bool(plan.calls_model[k]), noise=bool(plan.draw[k] >= 0),
                    langevin=bool(plan.langevin[k, 0] != 0), kernel=kernel, **kw)


def readable_stage(plan, k, x, out, slots, z):
    """Stage k of ``plan`` written from its structured arrays (not the flat rows): D = cx x + co out, x' = M[0] .
    [x, D, S] + g z, S_i' = M[1+i] . [x, D, S] for written i, Song et al.'s Langevin step.  Updates ``slots``."""
    cx, co = plan.conv[k]
    M = plan.update[k]
    D = cx * x + co * out if plan.calls_model[k] else torch.zeros_like(x)
    regs = [x, D] + [s if s is not None else torch.zeros_like(x) for s in slots]
    x_new = sum(float(c) * r for c, r in zip(M[0], regs))
    if plan.noise_gain[k] != 0.0:
        x_new = x_new + float(plan.noise_gain[k]) * z
    snr, r, lsx, lsD = (float(v) for v in plan.langevin[k])
    if snr != 0.0:  # Song et al. 2021, Algorithm 4, per sample: eps = 2 r (snr ||z|| / ||s||)^2
        s = lsx * x + lsD * D
        norm = lambda t: t.reshape(t.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))  # noqa: E731
        eps = 2.0 * r * (snr * norm(z) / norm(s)) ** 2
        x_new = x_new + eps * s + torch.sqrt(2.0 * eps) * z
    new = {i: sum(float(c) * rg for c, rg in zip(M[1 + i], regs)) for i in range(plan.num_slots) if plan.writes[k, i]}
    for i, v in new.items():
        slots[i] = v
    return x_new


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.solver)
def test_flat_rows_equal_plan_stages(plan):
    """Run every stage twice: written from the Plan's structured arrays and through the op on flat rows (float64)."""
    g = torch.Generator().manual_seed(0)
    seeds_list = [3, 1 << 40, 2**64 - 5]
    seeds = rng.seeds_tensor(seeds_list)
    x_a = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x_b = x_a.clone()
    slots_a = [None] * plan.num_slots
    slots_b = torch.zeros((plan.num_slots,) + SHAPE, dtype=torch.float64)
    for k in range(plan.num_stages):
        out = torch.tanh(x_a) + 0.1 * k  # any deterministic "model"
        z = rng.randn(SHAPE, seeds_list, draw=int(plan.draw[k]), dtype=torch.float64) if plan.draw[k] >= 0 else None
        x_a = readable_stage(plan, k, x_a, out, slots_a, z)
        x_b = stage_call(plan, k, x_b, out, slots_b, seeds)
        torch.testing.assert_close(x_b, x_a, rtol=1e-12, atol=1e-12)
        for i, s in enumerate(slots_a):
            if s is not None and plan.writes[k, i]:
                torch.testing.assert_close(slots_b[i], s, rtol=1e-12, atol=1e-12)


def test_guidance_inside_the_step():
    plan = fd.plan("ddim", S.DiscreteVP(), 4)
    x = torch.randn(SHAPE)
    out = torch.randn((2 * SHAPE[0],) + SHAPE[1:])
    w = torch.tensor([1.0, 3.0, 7.5])  # per-sample guidance
    slots = torch.zeros((0,) + SHAPE)
    seeds = rng.seeds_tensor([1, 2, 3])
    got = stage_call(plan, 1, x, out, slots, seeds, guidance=w, cfg=True)
    mixed = out[:3] + w[:, None, None, None] * (out[3:] - out[:3])
    want = stage_call(plan, 1, x, mixed, slots, seeds)
    torch.testing.assert_close(got, want)


def test_per_sample_rows_from_different_plans():
    """One launch serves samples at different stages of different plans (serving, img2img)."""
    p1, p2 = fd.plan("euler_ancestral", S.EDM(), 5), fd.plan("ddim", S.EDM(), 3, eta=0.5)
    k1, k2 = 2, 1
    x = torch.randn(2, 4, 9)
    out = torch.randn(2, 4, 9)
    seeds = rng.seeds_tensor([10, 20])
    rows = torch.tensor(np.stack([p1.rows()[k1], p2.rows()[k2]]), dtype=torch.float32)
    draws = torch.tensor([p1.draw[k1], p2.draw[k2]])
    both = ops.step(x, out, torch.zeros(0, 2, 4, 9), rows, seeds, draws, use_out=True, noise=True)
    a = stage_call(p1, k1, x[:1], out[:1], torch.zeros(0, 1, 4, 9), seeds[:1])
    b = stage_call(p2, k2, x[1:], out[1:], torch.zeros(0, 1, 4, 9), seeds[1:])
    torch.testing.assert_close(both, torch.cat([a, b]), rtol=0, atol=0)


def _sample_args():
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    x = torch.randn(2, 3, 5)
    return plan, x, torch.randn(2, 3, 5), torch.zeros(1, 2, 3, 5), rng.seeds_tensor([1, 2])


def test_opcheck():
    plan, x, out, slots, seeds = _sample_args()
    rows = torch.tensor(plan.rows()[1:2], dtype=torch.float32)
    args = (x, out, slots, rows, seeds, torch.tensor([2]), torch.zeros(1), 1, 1, True, False, True, False, "torch")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)
    torch.library.opcheck(torch.ops.fastdiff.add_noise.default,
                          (x, torch.tensor([0.9, 0.5]), torch.tensor([0.3, 0.8]), seeds, torch.tensor([0]), "torch"))
    torch.library.opcheck(torch.ops.fastdiff.randn.default, (seeds, torch.tensor([3]), [2, 3, 5], torch.float32,
                                                             "torch"))


def test_compiled_loop_has_no_graph_break():
    plan, x, out, slots, seeds = _sample_args()
    rows = torch.tensor(plan.rows(), dtype=torch.float32)
    draws = torch.tensor(plan.draw)
    flags = [(plan.slot_reads(k), plan.slot_writes(k), bool(plan.draw[k] >= 0)) for k in range(plan.num_stages)]

    def loop(x, slots):
        for k in range(plan.num_stages):
            model_out = torch.tanh(x)
            x = ops.step(x, model_out, slots, rows[k : k + 1], seeds, draws[k : k + 1], slot_reads=flags[k][0],
                         slot_writes=flags[k][1], noise=flags[k][2])
        return x

    eager = loop(x.clone(), slots.clone())
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x.clone(), slots.clone())
    torch.testing.assert_close(compiled, eager)


def test_add_noise_and_randn():
    seeds = rng.seeds_tensor([7, 8, 9])
    x0 = torch.randn(3, 4, 6)
    alpha, sigma = torch.tensor([1.0, 0.5, 0.1]), torch.tensor([0.0, 0.8, 0.99])
    xt = ops.add_noise(x0, alpha, sigma, seeds)
    z = rng.randn((3, 4, 6), [7, 8, 9], draw=0)
    torch.testing.assert_close(xt, alpha[:, None, None] * x0 + sigma[:, None, None] * z)
    assert torch.equal(ops.randn((3, 4, 6), [7, 8, 9], draw=5), rng.randn((3, 4, 6), [7, 8, 9], draw=5))


@pytest.mark.parametrize("change,match", [
    (dict(out=torch.zeros(2, 3, 4)), "out has shape"),
    (dict(out=torch.zeros(2, 3, 5, dtype=torch.float64)), "cast the model output"),
    (dict(seeds=torch.tensor([1])), "seeds must be an int64 tensor with one entry per sample"),
    (dict(rows=torch.zeros(1, 5)), "rows must be"),
    (dict(draws=torch.tensor([1.0])), "draws must be an int64"),
    (dict(slots=torch.zeros(1, 2, 3, 4)), "slots must be"),
    (dict(x=torch.zeros(2, 5, 3).transpose(1, 2), out=torch.zeros(2, 3, 5)), "contiguous"),
    (dict(kernel="tpu"), "unknown backend 'tpu'"),
    (dict(kernel="trition"), "did you mean 'triton'"),
])
def test_step_rejects_bad_input(change, match):
    plan, x, out, slots, seeds = _sample_args()
    args = dict(x=x, out=out, slots=slots, rows=torch.tensor(plan.rows()[1:2], dtype=torch.float32), seeds=seeds,
                draws=torch.tensor([2]))
    kernel = change.pop("kernel", "torch")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.step(**args, kernel=kernel)


def test_checks_still_run_after_a_layout_passed():
    """ops.step skips the checks for an argument layout it has seen pass; any change of layout is checked again."""
    plan, x, out, slots, seeds = _sample_args()
    args = dict(x=x, out=out, slots=slots, rows=torch.tensor(plan.rows()[1:2], dtype=torch.float32), seeds=seeds,
                draws=torch.tensor([2]))
    ops.step(**args)
    ops.step(**args)  # the same layout again: no check, same call
    for change, match in [(dict(x=torch.zeros(2, 5, 3).transpose(1, 2)), "contiguous"),
                          (dict(out=torch.zeros(2, 3, 5, dtype=torch.float64)), "cast the model output"),
                          (dict(seeds=torch.tensor([1, 2], dtype=torch.int32)), "seeds must be an int64"),
                          (dict(draws=torch.tensor([1, 2, 3])), "draws must be an int64"),
                          (dict(rows=torch.zeros(1, 5)), "rows must be")]:
        with pytest.raises(ValueError, match=match):
            ops.step(**dict(args, **change))
    with pytest.raises(ValueError, match="one entry per sample"):
        ops.step(**args, thresholds=torch.ones(3))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        ops.step(**dict(args, x=[[0.0] * 5] * 3))


def test_explicit_unit_noise_replaces_the_philox_draw():
    """z= (k-diffusion's noise_sampler through the sampler) enters exactly where the Philox draw does: x' + g z."""
    plan, k = fd.plan("euler_ancestral", S.EDM(), 4), 1
    seeds_list = [3, 9, 2**63 + 1]
    seeds = rng.seeds_tensor(seeds_list)
    x, out = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    slots = torch.zeros((0,) + SHAPE, dtype=torch.float64)
    philox = rng.randn(SHAPE, seeds_list, draw=int(plan.draw[k]), dtype=torch.float64)
    drawn = stage_call(plan, k, x, out, slots, seeds)
    torch.testing.assert_close(stage_call(plan, k, x, out, slots, seeds, z=philox), drawn, rtol=1e-12, atol=1e-12)
    other = torch.randn(SHAPE, dtype=torch.float64)
    g = float(plan.noise_gain[k])
    assert g != 0.0
    torch.testing.assert_close(stage_call(plan, k, x, out, slots, seeds, z=other), drawn + g * (other - philox),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_reference_nonfinite_flags(dtype, noise):
    """The torch oracle flags the samples whose stored x' has NaN / Inf, as the kernels do."""
    from kernel_checks import check_nonfinite_flags

    check_nonfinite_flags(ops.step_reference, "cpu", dtype, noise)


def test_step_x_out_and_nonfinite_arguments():
    """ops.step writes x' into x_out (in place too) and checks both new arguments."""
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 4)
    x, out = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    rows = torch.tensor(plan.rows()[1:2], dtype=torch.float32)
    seeds, draws = rng.seeds_tensor([1, 2]), torch.tensor([int(plan.draw[1])])
    kw = dict(slot_reads=plan.slot_reads(1), slot_writes=plan.slot_writes(1), noise=False)
    slots = torch.randn(plan.num_slots, 2, 3, 5)
    want = ops.step(x, out, slots.clone(), rows, seeds, draws, **kw)
    buf = torch.empty_like(x)
    got = ops.step(x, out, slots.clone(), rows, seeds, draws, x_out=buf, **kw)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
    xi = x.clone()
    assert torch.equal(ops.step(xi, out, slots.clone(), rows, seeds, draws, x_out=xi, **kw), want)
    with pytest.raises(ValueError, match="x_out must be x itself"):
        ops.step(x, out, slots.clone(), rows, seeds, draws, x_out=out, **kw)
    with pytest.raises(ValueError, match="x_out must be a contiguous"):
        ops.step(x, out, slots.clone(), rows, seeds, draws, x_out=torch.empty(2, 3, 5, dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match="nonfinite must be a contiguous int32 tensor"):
        ops.step(x, out, slots.clone(), rows, seeds, draws, nonfinite=torch.zeros(3, dtype=torch.int32), **kw)
