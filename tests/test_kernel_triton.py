"""The triton kernel (kernels/step.py) against the torch reference: raw Philox known answers, normals, every step
flag on real plan rows, fp32 / fp16 / bf16 storage, odd shapes, CFG, per-sample rows, in place.

On a machine without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported; slow, so sizes are tiny).  With CUDA the interpreter is left off and the
``gpu``-marked class runs the same checks (plus larger sizes, graph capture and a no-host-sync check) on the GPU.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

triton = pytest.importorskip("triton")

import fastdiff as fd  # noqa: E402
from fastdiff import ops, rng  # noqa: E402
from fastdiff import schedules as S  # noqa: E402
from fastdiff.backends import triton as tb  # noqa: E402
from fastdiff.kernels import step as tk  # noqa: E402
from threshold_ref import CASES as THRESHOLD_CASES  # noqa: E402
from threshold_ref import check_thresholded_stage  # noqa: E402
from kernel_checks import DTYPES, KAT, assert_like_torch, check_nonfinite_flags  # noqa: E402
from triton_probe import philox_forward  # noqa: E402

SEEDS = [3, 2**64 - 5, (1 << 40) + 7]  # small, >= 2^63 (a negative int64 pattern), >= 2^32

PLANS = {
    "ddim_eta": lambda: fd.plan("ddim", S.DiscreteVP(), 3, eta=0.7),
    "dpmpp_2m": lambda: fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 4),
    "dpmpp_3m": lambda: fd.plan("dpmpp_3m", S.DiscreteVP(), 4),
    "heun_churn": lambda: fd.plan("heun", S.EDM(), 3, s_churn=5.0),
    "unipc3": lambda: fd.plan("unipc", S.DiscreteVP.scaled_linear(), 4, order=3),
    "pc": lambda: fd.plan("pc", S.VE(), 2, corrector_steps=1),
    "euler_ancestral": lambda: fd.plan("euler_ancestral", S.EDM(), 3),
    "flow_euler": lambda: fd.plan("flow_euler", S.RectifiedFlow(), 3, prediction="flow"),
}


def _interpreter_ready():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False, "TRITON_INTERPRET is not 1 (the CUDA class covers the kernels here)"
    if not tk.interpreting():
        return False, "triton was imported before TRITON_INTERPRET=1 was set; run this file on its own"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def ulp_distance(a, b):
    ia = torch.from_numpy(a.detach().cpu().float().numpy().view(np.int32).astype(np.int64))
    ib = torch.from_numpy(b.detach().cpu().float().numpy().view(np.int32).astype(np.int64))
    return (ia - ib).abs()


def stage_flags(plan, k):
    return dict(slot_reads=plan.slot_reads(k), slot_writes=plan.slot_writes(k), use_out=bool(plan.calls_model[k]),
                noise=bool(plan.draw[k] >= 0), langevin=bool(plan.langevin[k, 0] != 0))


def stage_args(plan, k, B, device, rows_dtype=torch.float32):
    rows = torch.as_tensor(plan.rows()[k : k + 1], dtype=rows_dtype, device=device)
    draws = torch.tensor([int(plan.draw[k])], device=device)
    return rows, draws, stage_flags(plan, k)


def call(fn, x, out, slots, rows, seeds, draws, guidance, flags, cfg=False, **kw):
    return fn(x, out, slots, rows, seeds, draws, guidance, flags["slot_reads"], flags["slot_writes"],
              flags["use_out"], cfg, flags["noise"], flags["langevin"], **kw)


def model(x, k, cfg):
    """A deterministic stand-in for the network; [uncond; cond] with cfg."""
    o = torch.tanh(x.float()) * 0.8 + 0.1 * (k + 1)
    if cfg:
        o = torch.cat([o, torch.sin(x.float()) + 0.05 * k])
    return o.to(x.dtype)


def run_plan_checks(plan, shape, dtype, device, cfg=False, seeds=SEEDS):
    """Every stage of ``plan``: kernel vs torch (same dtype) vs float64 torch from the same inputs; the kernel's
    state carries on to the next stage (so its slot writes feed later stages)."""
    B = shape[0]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * plan.init_scale).to(dtype).to(device)
    slots = torch.zeros((plan.num_slots,) + tuple(shape), dtype=dtype, device=device)
    sd = rng.seeds_tensor(seeds[:B] if B <= len(seeds) else list(range(B)), device=device)
    guidance = torch.linspace(1.0, 7.5, B, device=device) if cfg else torch.zeros(1, device=device)
    for k in range(plan.num_stages):
        out = model(x, k, cfg)
        rows, draws, flags = stage_args(plan, k, B, device)
        rows64 = rows.double().copy_(torch.as_tensor(plan.rows()[k : k + 1]))
        s_tri, s_32, s_64 = slots.clone(), slots.clone(), slots.double()
        got = call(tb.step, x, out, s_tri, rows, sd, draws, guidance, flags, cfg)
        same = call(ops.step_reference, x, out, s_32, rows, sd, draws, guidance, flags, cfg)
        ref = call(ops.step_reference, x.double(), out.double(), s_64, rows64, sd, draws, guidance.double(), flags,
                   cfg)
        assert got.dtype == dtype and got.shape == x.shape
        assert_like_torch(got, same, ref, f"{plan.solver} stage {k} x'")
        for i in range(plan.num_slots):
            if (flags["slot_writes"] >> i) & 1:
                assert_like_torch(s_tri[i], s_32[i], s_64[i], f"{plan.solver} stage {k} slot {i}")
            else:
                assert torch.equal(s_tri[i], slots[i]), f"{plan.solver} stage {k}: slot {i} changed without a write"
        x, slots = got, s_tri


# ---------------------------------------------------------------------------------------------------------------
# The checks, shared by the interpreter and the CUDA classes
# ---------------------------------------------------------------------------------------------------------------


def check_known_answers(device):
    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=device)
    words = philox_forward(ctr, key).cpu().tolist()
    assert [tuple(w) for w in words] == [e for _, _, e in KAT]


def check_raw_stream_matches_numpy(device):
    g = np.random.default_rng(0)
    ctr = g.integers(0, 2**32, size=(37, 4), dtype=np.uint64).astype(np.int64)
    key = g.integers(0, 2**32, size=(37, 2), dtype=np.uint64).astype(np.int64)
    words = philox_forward(torch.from_numpy(ctr).to(device), torch.from_numpy(key).to(device)).cpu().numpy()
    assert np.array_equal(words.astype(np.uint32), rng.philox4x32_10(ctr.astype(np.uint32), key.astype(np.uint32)))


def check_normals(device, numel):
    seeds = rng.seeds_tensor(SEEDS, device=device)
    draws = torch.tensor([0, 5, 2**32 - 1], device=device)
    z = tb.randn(seeds, draws, [3, numel], torch.float32)
    ref = rng.normals_per_sample(seeds.cpu(), draws.cpu(), numel)
    assert z.shape == (3, numel) and z.dtype == torch.float32
    # same uint32 stream; log/sin/cos from another libm: a few ulp
    assert int(ulp_distance(z, ref).max()) <= 8, "normals differ from fastdiff.rng by more than 8 ulp"
    # batch invariance, bitwise: each sample alone, and in another order
    for b in range(3):
        alone = tb.randn(seeds[b : b + 1], draws[b : b + 1], [1, numel], torch.float32)
        assert torch.equal(alone[0], z[b])
    perm = torch.tensor([2, 0, 1], device=device)
    assert torch.equal(tb.randn(seeds[perm], draws[perm], [3, numel], torch.float32), z[perm])
    # one draw for the whole batch (draws [1]) and low-precision output (cast once from fp32)
    z1 = tb.randn(seeds, draws[1:2], [3, numel], torch.bfloat16)
    z1_ref = tb.randn(seeds, draws[1:2].expand(3).contiguous(), [3, numel], torch.float32).to(torch.bfloat16)
    assert torch.equal(z1, z1_ref)


def check_randn_op(device):
    got = ops.randn((2, 3, 5), SEEDS[:2], draw=4, device=device, kernel="triton")
    ref = rng.randn((2, 3, 5), SEEDS[:2], draw=4)
    assert int(ulp_distance(got, ref).max()) <= 8


def check_add_noise(device, dtype):
    seeds = rng.seeds_tensor(SEEDS, device=device)
    x0 = torch.randn(3, 4, 11).to(dtype).to(device)
    alpha = torch.tensor([1.0, 0.5, 0.1], device=device)
    sigma = torch.tensor([0.0, 0.8, 0.99], dtype=torch.float64, device=device)  # any float dtype is accepted
    draws = torch.tensor([0, 3, 7], device=device)
    got = ops.add_noise(x0, alpha, sigma, seeds, draws, kernel="triton")
    same = ops.add_noise_reference(x0, alpha, sigma, seeds, draws)
    ref = ops.add_noise_reference(x0.double(), alpha, sigma, seeds, draws)
    assert_like_torch(got, same, ref, f"add_noise {dtype}")


def check_cfg_per_sample_guidance(device, dtype):
    run_plan_checks(PLANS["dpmpp_2m"](), (3, 2, 5, 7), dtype, device, cfg=True)


def check_per_sample_rows(device):
    """One launch serves samples at different stages of different plans (K=0 here), one of them without noise
    and one Langevin corrector sample next to one that has none (snr = 0 in its row)."""
    p1, p2, p3 = fd.plan("euler_ancestral", S.EDM(), 5), fd.plan("ddim", S.EDM(), 3, eta=0.5), PLANS["pc"]()
    k3 = int(np.flatnonzero(p3.langevin[:, 0] != 0)[0])
    picks = [(p1, 2), (p2, 1), (fd.plan("ddim", S.EDM(), 3), 1), (p3, k3)]
    B = len(picks)
    rows = torch.tensor(np.stack([p.rows()[k] for p, k in picks]), dtype=torch.float32, device=device)
    draws = torch.tensor([int(p.draw[k]) for p, k in picks], device=device)
    assert int(draws[2]) == -1  # deterministic ddim: no noise for that sample
    seeds = rng.seeds_tensor(SEEDS + [11], device=device)
    x = (torch.randn(B, 3, 7) * 10).to(device)
    out = torch.tanh(x)
    empty = torch.zeros((0, B, 3, 7), device=device)
    g = torch.zeros(1, device=device)
    for langevin in (False, True):
        flags = dict(slot_reads=0, slot_writes=0, use_out=True, noise=True, langevin=langevin)
        got = call(tb.step, x, out, empty, rows, seeds, draws, g, flags)
        same = call(ops.step_reference, x, out, empty, rows, seeds, draws, g, flags)
        ref = call(ops.step_reference, x.double(), out.double(), empty.double(), rows.double(), seeds, draws, g,
                   flags)
        assert_like_torch(got, same, ref, f"per-sample rows (langevin={langevin})")
        # batch invariance: each sample alone gives the same bits
        for b in range(B):
            alone = call(tb.step, x[b : b + 1], out[b : b + 1], empty[:, b : b + 1], rows[b : b + 1],
                         seeds[b : b + 1], draws[b : b + 1], g, flags)
            assert torch.equal(alone[0], got[b]), f"sample {b} differs alone vs in the batch (langevin={langevin})"


def check_in_place(device, dtype):
    plan = PLANS["dpmpp_3m"]()
    k = next(k for k in range(plan.num_stages) if plan.slot_reads(k) and plan.slot_writes(k))
    B, shape = 2, (2, 3, 5)
    x = torch.randn(shape).to(dtype).to(device)
    out = model(x, k, False)
    slots = torch.randn((plan.num_slots,) + shape).to(dtype).to(device)
    rows, draws, flags = stage_args(plan, k, B, device)
    seeds = rng.seeds_tensor(SEEDS[:B], device=device)
    g = torch.zeros(1, device=device)
    s_a, s_b = slots.clone(), slots.clone()
    want = call(tb.step, x, out, s_a, rows, seeds, draws, g, flags)
    xx = x.clone()
    got = call(tb.step, xx, out, s_b, rows, seeds, draws, g, flags, x_out=xx)
    assert got.data_ptr() == xx.data_ptr()
    assert torch.equal(xx, want) and torch.equal(s_a, s_b)


def check_float64_rows(device):
    """Rows may come as float64: the kernel rounds them to fp32 as the reference does, so the bits agree."""
    plan = PLANS["unipc3"]()
    k = next(k for k in range(plan.num_stages) if plan.slot_reads(k) and plan.slot_writes(k))
    x = torch.randn(2, 3, 7, device=device)
    seeds = rng.seeds_tensor(SEEDS[:2], device=device)
    slots = torch.randn((plan.num_slots, 2, 3, 7), device=device)
    res = []
    for dt in (torch.float32, torch.float64):
        rows, draws, flags = stage_args(plan, k, 2, device, rows_dtype=dt)
        s = slots.clone()
        res.append((call(tb.step, x, torch.tanh(x), s, rows, seeds, draws, torch.zeros(1, device=device), flags), s))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def check_opcheck(device):
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    k = next(k for k in range(plan.num_stages) if plan.slot_writes(k) and plan.draw[k] >= 0)
    rows, draws, flags = stage_args(plan, k, 2, device)
    x = torch.randn(2, 3, 5, device=device)
    seeds = rng.seeds_tensor(SEEDS[:2], device=device)
    slots = torch.randn((plan.num_slots, 2, 3, 5), device=device)
    args = (x, torch.tanh(x), slots, rows, seeds, draws, torch.zeros(1, device=device), flags["slot_reads"],
            flags["slot_writes"], flags["use_out"], False, flags["noise"], flags["langevin"], "triton")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)
    torch.library.opcheck(torch.ops.fastdiff.add_noise.default, (x, torch.tensor([0.9, 0.5], device=device),
                          torch.tensor([0.3, 0.8], device=device), seeds, torch.tensor([0], device=device), "triton"))
    torch.library.opcheck(torch.ops.fastdiff.randn.default, (seeds, torch.tensor([3], device=device), [2, 3, 5],
                                                             torch.float32, "triton"))


def check_thresholds_rejected(device):
    x = torch.zeros(2, 3, 4, device=device)
    args = (x, x, torch.zeros(0, 2, 3, 4, device=device), torch.zeros(1, ops.row_length(0), device=device),
            rng.seeds_tensor([1, 2], device=device), torch.zeros(1, dtype=torch.int64, device=device),
            torch.zeros(1, device=device), 0, 0, True, False, False, False)
    for bad, match in [(torch.ones(3, device=device), "float32 tensor"),
                       (torch.ones(2, dtype=torch.float64, device=device), "float32 tensor"),
                       (torch.ones(2, device="meta"), "thresholds is on meta")]:
        with pytest.raises(ValueError, match=match):  # fastdiff.ops validates before the triton kernel runs
            ops.step(*args[:7], slot_reads=0, slot_writes=0, use_out=True, cfg=False, noise=False, langevin=False,
                     kernel="triton", thresholds=bad)


def check_rejects_bad_input(device):
    x = torch.zeros(2, 3, 4, device=device)
    rows = torch.zeros(1, ops.row_length(0), device=device)
    seeds = rng.seeds_tensor([1, 2], device=device)
    d = torch.zeros(1, dtype=torch.int64, device=device)
    g = torch.zeros(1, device=device)
    empty = torch.zeros(0, 2, 3, 4, device=device)
    flags = dict(slot_reads=0, slot_writes=0, use_out=True, noise=False, langevin=False)
    with pytest.raises(ValueError, match=r"\.contiguous\(\)"):
        call(tb.step, x, x.transpose(1, 2).contiguous().transpose(1, 2), empty, rows, seeds, d, g, flags)
    with pytest.raises(ValueError, match="float64"):
        call(tb.step, x.double(), x.double(), empty.double(), rows, seeds, d, g, flags)
    with pytest.raises(ValueError, match="x_out"):
        call(tb.step, x, x, empty, rows, seeds, d, g, flags, x_out=torch.zeros(2, 3, 5, device=device))


# ---------------------------------------------------------------------------------------------------------------
# CPU: Triton's interpreter (tiny sizes)
# ---------------------------------------------------------------------------------------------------------------

_ready, _why = _interpreter_ready()


@pytest.mark.skipif(not _ready, reason=_why)
class TestInterpreter:
    device = "cpu"

    def test_available(self):
        ok, why = tb.available()
        assert ok and "interpreter" in why

    def test_philox_known_answers(self):
        check_known_answers(self.device)

    def test_raw_stream_matches_numpy(self):
        check_raw_stream_matches_numpy(self.device)

    def test_normals(self):
        check_normals(self.device, 2053)  # 3 blocks of 1024 per sample, a ragged tail of 5

    def test_randn_op(self):
        check_randn_op(self.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_add_noise(self, dtype):
        check_add_noise(self.device, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", list(PLANS))
    def test_plan_stages(self, name, dtype):
        run_plan_checks(PLANS[name](), (2, 3, 5, 7), dtype, self.device)

    @pytest.mark.parametrize("name,shape", [("dpmpp_3m", (1, 3, 9, 11)), ("euler_ancestral", (1, 4097)),
                                            ("pc", (2, 4097)), ("heun_churn", (3, 5))])
    def test_shapes(self, name, shape):
        run_plan_checks(PLANS[name](), shape, torch.float32, self.device)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_cfg_per_sample_guidance(self, dtype):
        check_cfg_per_sample_guidance(self.device, dtype)

    def test_per_sample_rows_of_different_plans(self):
        check_per_sample_rows(self.device)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_in_place(self, dtype):
        check_in_place(self.device, dtype)

    @pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_nonfinite_flags(self, dtype, noise):
        check_nonfinite_flags(tb.step, self.device, dtype, noise)

    def test_rejects_bad_input(self):
        check_rejects_bad_input(self.device)
        check_thresholds_rejected(self.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", list(THRESHOLD_CASES))
    def test_dynamic_thresholding(self, name, dtype):
        """Thresholds from ops.dynamic_threshold applied in the kernel vs Imagen's formula in float64."""
        check_thresholded_stage(tb.step, name, (3, 5, 7), dtype, self.device)

    @pytest.mark.parametrize("name,shape,cfg", [("euler_ancestral", (1, 4097), False), ("pc", (3, 5, 7), True),
                                                ("ddim", (3, 2, 9), True)])
    def test_dynamic_thresholding_shapes_cfg(self, name, shape, cfg):
        check_thresholded_stage(tb.step, name, shape, torch.float32, self.device, cfg=cfg)

    def test_float64_rows(self):
        check_float64_rows(self.device)

    def test_opcheck(self):
        """The custom ops with kernel="triton" keep their declared schema (only ``slots`` mutated, fresh outputs)."""
        check_opcheck(self.device)

    def test_ops_entry_point(self):
        """fastdiff.ops.step(kernel="triton") reaches this backend through the registry."""
        plan = PLANS["euler_ancestral"]()
        rows, draws, flags = stage_args(plan, 1, 2, "cpu")
        x, seeds = torch.randn(2, 3, 5), rng.seeds_tensor(SEEDS[:2])
        out = model(x, 1, False)
        empty = torch.zeros(0, 2, 3, 5)
        got = ops.step(x, out, empty, rows, seeds, draws, kernel="triton", **flags)
        want = ops.step(x, out, empty, rows, seeds, draws, kernel="torch", **flags)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------------


def _cuda_ready():
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if tk.interpreting():
        return False, "TRITON_INTERPRET=1: the kernels were built for the interpreter"
    return True, ""


@pytest.mark.gpu
class TestCUDA:
    device = "cuda"

    @pytest.fixture(autouse=True)
    def _need_cuda(self):
        ok, why = _cuda_ready()
        if not ok:
            pytest.skip(why)

    def test_available(self):
        assert tb.available()[0]

    def test_philox_known_answers(self):
        check_known_answers(self.device)

    def test_raw_stream_matches_numpy(self):
        check_raw_stream_matches_numpy(self.device)

    @pytest.mark.parametrize("numel", [1, 4097, 1 << 20])
    def test_normals(self, numel):
        check_normals(self.device, numel)

    def test_randn_op(self):
        check_randn_op(self.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_add_noise(self, dtype):
        check_add_noise(self.device, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", list(PLANS))
    @pytest.mark.parametrize("shape", [(1, 3, 9, 11), (2, 3, 5, 7), (1, 4097), (2, 4, 64, 64), (3, 1 << 18)],
                             ids=str)
    def test_plan_stages(self, name, dtype, shape):
        run_plan_checks(PLANS[name](), shape, dtype, self.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_cfg_per_sample_guidance(self, dtype):
        check_cfg_per_sample_guidance(self.device, dtype)

    def test_per_sample_rows_of_different_plans(self):
        check_per_sample_rows(self.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_in_place(self, dtype):
        check_in_place(self.device, dtype)

    @pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_nonfinite_flags(self, dtype, noise):
        check_nonfinite_flags(tb.step, self.device, dtype, noise)

    def test_float64_rows(self):
        check_float64_rows(self.device)

    def test_opcheck(self):
        check_opcheck(self.device)

    def test_rejects_bad_input(self):
        check_rejects_bad_input(self.device)
        check_thresholds_rejected(self.device)
        with pytest.raises(ValueError, match="CUDA tensors"):
            check_in_place("cpu", torch.float32)

    @pytest.mark.parametrize("cfg", [False, True])
    @pytest.mark.parametrize("shape", [(3, 4, 9, 11), (1, 4097), (3, 4, 64, 64)], ids=str)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", list(THRESHOLD_CASES))
    def test_dynamic_thresholding(self, name, dtype, shape, cfg):
        check_thresholded_stage(tb.step, name, shape, dtype, self.device, cfg=cfg)

    def test_graph_capture_and_no_host_sync(self):
        """A whole noisy multistep plan (autotuned first) replays from one CUDA graph, bit-identical to eager, and
        issues no host synchronization."""
        plan = PLANS["dpmpp_3m"]()
        B, shape = 2, (2, 4, 64, 64)
        seeds = rng.seeds_tensor(SEEDS[:B], device="cuda")
        rows = torch.tensor(plan.rows(), dtype=torch.float32, device="cuda")
        draws = torch.tensor(plan.draw, device="cuda")
        g = torch.zeros(1, device="cuda")
        x0 = torch.randn(shape, device="cuda")

        flags = [stage_flags(plan, k) for k in range(plan.num_stages)]

        def loop(x, slots):
            for k in range(plan.num_stages):
                x = call(tb.step, x, model(x, k, False), slots, rows[k : k + 1], seeds, draws[k : k + 1], g, flags[k])
            return x

        slots = torch.zeros((plan.num_slots,) + shape, device="cuda")
        eager = loop(x0.clone(), slots.clone())  # also tunes every stage's configuration
        xs, ss = x0.clone(), slots.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loop(xs.clone(), ss.clone())  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            y = loop(xs, ss)
        xs.copy_(x0)
        ss.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loop(x0.clone(), slots.clone())
        finally:
            torch.cuda.set_sync_debug_mode(0)
