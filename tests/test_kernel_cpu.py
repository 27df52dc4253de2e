"""The cpu kernels (csrc/cpu, C++/OpenMP) against the torch reference of fastdiff.ops.

Raw Philox known answers and the numpy oracle; normals against fastdiff.rng and philox.h's libm path; batch
invariance; every solver's stages (all of them, on a fitting schedule) in fp32 / fp16 / bf16 with odd shapes,
against a float64 reference with a tolerance relative to torch's own error in the same dtype; in place, CFG with
per-sample guidance, per-sample rows of two plans, Langevin, draws < 0, thread-count invariance; clear errors.
The module skips (with the reason) where the backend cannot be built.
"""

import pathlib

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S
from fastdiff.backends import cpu
from kernel_checks import (DTYPES, KAT, M32, assert_like_torch, assert_verbose_close, check_nonfinite_flags,
                           per_sample_scale)

_ok, _why = cpu.available()
if not _ok:
    pytest.skip(f"cpu backend unavailable: {_why}", allow_module_level=True)

EXT = cpu.ext()
# Test-only probes of the random numbers (raw Philox words, normals per compiled ISA), built from
# tests/cpu_rng_probe.cpp with the kernels' flags and headers.
PROBE = cpu.build("fastdiff_cpu_rng_probe", [pathlib.Path(__file__).with_name("cpu_rng_probe.cpp")],
                  cpu.include_dirs(), "cpu kernels' test probe")
STEP = cpu.OPS["step"]

SEEDS = [3, 2**64 - 5, (1 << 40) + 7, 12345]  # small, >= 2^63 (negative int64 pattern), >= 2^32
SHAPES = [(1, 4097), (3, 4, 9, 11), (2, 1, 3, 5)]
NORMAL_TOL = 4e-6  # |z_kernel - z_rng| <= NORMAL_TOL * max(1, |z|)


def _schedule_for(solver):
    if solver in ("pc", "annealed_langevin"):
        return S.VE(), "epsilon"
    if solver.startswith("flow_"):
        return S.RectifiedFlow(), "flow"
    if solver == "ddpm":
        return S.DiscreteVP(), "epsilon"
    return S.EDM(), "epsilon"


def solver_plan(solver):
    sch, pred = _schedule_for(solver)
    opts = {"corrector_steps": 2} if solver == "annealed_langevin" else {}
    if solver in ("heun", "dpm_2"):
        opts["s_churn"] = 2.0  # exercise the churn noise fused into the previous stage
    return fd.plan(solver, sch, 3, prediction=pred, **opts)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def stage_args(plan, k, B, rows_dtype=torch.float32):
    """(rows, draws, flags...) of stage k for a batch of B sharing the stage (the reference's argument order)."""
    rows = torch.as_tensor(plan.rows()[k:k + 1], dtype=rows_dtype)
    draws = torch.tensor([int(plan.draw[k])])
    return rows, draws, dict(slot_reads=plan.slot_reads(k), slot_writes=plan.slot_writes(k),
                             use_out=bool(plan.calls_model[k]), noise=bool(plan.draw[k] >= 0),
                             langevin=bool(plan.langevin[k, 0] != 0))


def call(fn, x, out, slots, rows, seeds, draws, guidance=None, cfg=False, x_out=None, **flags):
    if guidance is None:
        guidance = torch.zeros(1)
    args = (x, out, slots, rows, seeds, draws, guidance, flags["slot_reads"], flags["slot_writes"],
            flags["use_out"], cfg, flags["noise"], flags["langevin"])
    if x_out is not None:
        return fn(*args, x_out=x_out)
    return fn(*args)


def model(x, k):
    """A deterministic stand-in for the network."""
    return torch.tanh(x) + 0.1 * k


# ---------------------------------------------------------------------------------------------------------------
# Philox and normals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(PROBE.philox_raw(list(ctr), list(key))) == expected


def test_philox_matches_numpy_oracle():
    g = np.random.default_rng(1)
    ctr = g.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    key = g.integers(0, 2**32, size=(64, 2), dtype=np.uint64)
    want = rng.philox4x32_10(ctr.astype(np.uint32), key.astype(np.uint32))
    got = np.array([PROBE.philox_raw([int(v) for v in c], [int(v) for v in k]) for c, k in zip(ctr, key, strict=True)],
                   dtype=np.uint32)
    np.testing.assert_array_equal(got, want)


ISAS = PROBE.philox_isas()  # the kernels' path first ("avx512", "avx2" or "scalar"), then the others compiled in


def _oracle_blocks(ctr, key, nb):
    """fastdiff.rng's words of blocks (ctr[0] | ctr[1] << 32) + j, j < nb (64-bit wrap), with ctr[2], ctr[3]."""
    blk = (np.uint64(ctr[0] | (ctr[1] << 32)) + np.arange(nb, dtype=np.uint64)) if nb else np.zeros(0, np.uint64)
    c = np.stack([blk & np.uint64(M32), blk >> np.uint64(32), np.full(nb, ctr[2], np.uint64),
                  np.full(nb, ctr[3], np.uint64)], axis=1).astype(np.uint32)
    return rng.philox4x32_10(c, np.array(key, dtype=np.uint32)).reshape(nb, 4)


def _simd_cases():
    """(counter, key, nblocks): random words, block counters around and past 2**32 (and the 2**64 wrap), keys
    near 2**32 - 1, lengths around the vector widths (tails included)."""
    g = np.random.default_rng(7)
    cases = []
    for i in range(96):
        c = [int(v) for v in g.integers(0, 2**32, size=4, dtype=np.uint64)]
        k = [int(v) for v in g.integers(0, 2**32, size=2, dtype=np.uint64)]
        if i % 4 == 1:  # block lo just below 2**32: the carry into block hi inside a vector
            c[0] = M32 - int(g.integers(0, 40))
        if i % 4 == 2:  # block >= 2**32
            c[0], c[1] = int(g.integers(0, 64)), int(g.integers(1, 5))
        if i % 8 == 3:  # the 64-bit block counter wraps
            c[0], c[1] = M32 - int(g.integers(0, 20)), M32
        if i % 3 == 0:  # keys near 2**32 - 1 (the key schedule wraps)
            k = [M32 - int(g.integers(0, 4)), M32 - int(g.integers(0, 4))]
        cases.append((c, k, int(g.integers(0, 100))))
    cases += [([0, 0, 0, 0], [0, 0], 64), ([M32, M32, M32, M32], [M32, M32], 33), ([M32 - 16, 0, 9, 0], [5, 6], 64)]
    return cases


@pytest.mark.parametrize("isa", ISAS)
def test_philox_simd_matches_philox_h_and_rng(isa):
    """philox_simd.h's vectorized stream (every compiled ISA) equals fastdiff.rng and philox.h bit for bit."""
    for ctr, key, nb in _simd_cases():
        got = np.array(PROBE.philox_blocks_raw(ctr, key, nb, isa), dtype=np.uint32).reshape(nb, 4)
        np.testing.assert_array_equal(got, _oracle_blocks(ctr, key, nb), err_msg=f"{isa} {ctr} {key} {nb}")
        for j in {0, nb // 2, nb - 1} if nb else ():  # philox.h's scalar philox4x32_10 on the same counters
            b = (ctr[0] | (ctr[1] << 32)) + j
            want = PROBE.philox_raw([b & M32, (b >> 32) & M32, ctr[2], ctr[3]], key)
            assert tuple(int(v) for v in got[j]) == tuple(want), (isa, ctr, key, j)


def test_philox_simd_isas_and_errors():
    assert ISAS[0] in ("avx512", "avx2", "scalar") and "scalar" in ISAS
    # the kernels' path ("") is the first listed
    got = PROBE.philox_blocks_raw([5, 1, 2, 3], [4, 5], 40)
    assert got == PROBE.philox_blocks_raw([5, 1, 2, 3], [4, 5], 40, ISAS[0])
    with pytest.raises(ValueError, match="not compiled in"):
        PROBE.philox_blocks_raw([0, 0, 0, 0], [0, 0], 4, "neon")
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        PROBE.philox_blocks_raw([2**32, 0, 0, 0], [0, 0], 4)


def test_normals_fast_bits_from_simd_words():
    """The kernels' normals are a function of the SIMD words: same floats as Box-Muller on the oracle's words
    within the vectorized-libm tolerance, and identical for every chunk split (blocks past 2**32 included)."""
    seed, draw, blk0, nb = SEEDS[2], 11, 2**32 - 70, 300
    a = PROBE.normals_fast(seed, draw, blk0, nb)
    b = torch.cat([PROBE.normals_fast(seed, draw, blk0 + j, min(37, nb - j)) for j in range(0, nb, 37)])
    assert torch.equal(a, b)
    words = _oracle_blocks([blk0 & M32, blk0 >> 32, draw, 0], [seed & M32, seed >> 32], nb)
    u = rng.uint_to_uniform_float(words)
    n0, n1 = rng.box_muller(u[:, 0], u[:, 1])
    n2, n3 = rng.box_muller(u[:, 2], u[:, 3])
    want = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    np.testing.assert_allclose(a.numpy(), want, rtol=0, atol=NORMAL_TOL * max(1.0, float(np.abs(want).max())))


NORMAL_ISAS = PROBE.normals_isas()  # the kernels' path first ("avx512", "avx2", "portable"), then the others compiled


@pytest.mark.parametrize("isa", NORMAL_ISAS)
def test_normals_isas_agree_bit_for_bit(isa):
    """normals_simd.h's paths (AVX-512 / AVX2 intrinsics, g++-vectorized portable loops) are the same float32
    operations: the same bits, over every uniform regime (a million normals), odd run lengths and block counters
    past 2**32."""
    assert NORMAL_ISAS[0] in ("avx512", "avx2", "portable") and "portable" in NORMAL_ISAS
    for seed, draw, blk0, nb in [(77, 3, 0, 1 << 18), (SEEDS[1] - 2**64, 9, 2**32 - 70, 301), (SEEDS[2], 0, 5, 1),
                                 (SEEDS[3], 2**32 - 1, 2**40 + 3, 67), (0, 1, 0, 0)]:
        got = PROBE.normals_fast(seed, draw, blk0, nb, isa)
        want = PROBE.normals_fast(seed, draw, blk0, nb, "portable")
        assert got.shape == (4 * nb,) and torch.equal(got, want), (isa, seed, draw, blk0, nb)
    assert torch.equal(PROBE.normals_fast(5, 6, 7, 100), PROBE.normals_fast(5, 6, 7, 100, NORMAL_ISAS[0]))
    with pytest.raises(ValueError, match="not compiled in"):
        PROBE.normals_fast(0, 0, 0, 4, "neon")


@pytest.mark.parametrize("shape", [(4, 4097), (3, 2, 5, 7), (1, 1), (2, 3)])
def test_randn_matches_rng(shape):
    z = cpu.OPS["randn"](rng.seeds_tensor(SEEDS[:shape[0]] if shape[0] <= 4 else range(shape[0])),
                         torch.tensor([9]), shape, torch.float32)
    want = rng.randn(shape, SEEDS[:shape[0]], draw=9)
    assert z.shape == want.shape and z.dtype == torch.float32
    assert_verbose_close(z, want, NORMAL_TOL * want.abs().clamp(min=1.0), "randn vs fastdiff.rng.randn")


def test_randn_many_normals_and_libm():
    """Half a million normals (every uniform regime) against the torch oracle and philox.h's scalar libm path."""
    n = 1 << 19
    z = cpu.OPS["randn"](rng.seeds_tensor([77]), torch.tensor([3]), (1, n), torch.float32)[0]
    want = rng.randn((1, n), [77], draw=3)[0]
    assert_verbose_close(z, want, NORMAL_TOL * want.abs().clamp(min=1.0), "randn vs rng")
    libm = PROBE.normals_libm(77, 3, 0, n // 4)
    assert_verbose_close(z, libm, NORMAL_TOL * libm.abs().clamp(min=1.0), "randn vs philox.h libm normals")
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01


def test_normals_counter_high_word():
    """Blocks past 2^32 carry into the counter's second word (numpy oracle + Box-Muller)."""
    blk0, nb = 2**32 - 5, 10
    got = PROBE.normals_fast(SEEDS[1] - 2**64, 4, blk0, nb).numpy()
    blk = np.arange(blk0, blk0 + nb, dtype=np.uint64)
    ctr = np.stack([blk & np.uint64(M32), blk >> np.uint64(32), np.full(nb, 4, np.uint64), np.zeros(nb, np.uint64)],
                   axis=1).astype(np.uint32)
    seed = SEEDS[1]
    words = rng.philox4x32_10(ctr, np.array([seed & M32, seed >> 32], dtype=np.uint32))
    u = rng.uint_to_uniform_float(words)
    n0, n1 = rng.box_muller(u[:, 0], u[:, 1])
    n2, n3 = rng.box_muller(u[:, 2], u[:, 3])
    want = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=0, atol=NORMAL_TOL * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("numel", [1000, 1001, 4096, 257])
def test_randn_fp32_bits_equal_the_normals_kernel(numel):
    """fp32 randn draws whole blocks straight into the output and a sample's ragged last chunk through a
    temporary: either way every sample holds exactly the normals kernel's bits for its seed, and nothing spills
    into the next sample."""
    seeds = [SEEDS[1], SEEDS[2], 5]
    z = cpu.OPS["randn"](rng.seeds_tensor(seeds), torch.tensor([7]), (3, numel), torch.float32)
    for b, seed in enumerate(seeds):
        want = PROBE.normals_fast(seed if seed < 2**63 else seed - 2**64, 7, 0, (numel + 3) // 4)[:numel]
        assert torch.equal(z[b], want), (numel, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_randn_dtypes_cast_once(dtype):
    z = cpu.OPS["randn"](rng.seeds_tensor(SEEDS[:2]), torch.tensor([1]), (2, 3, 33), dtype)
    want = rng.randn((2, 3, 33), SEEDS[:2], draw=1)
    assert z.dtype == dtype
    f = z.float()
    # a few-ulp fp32 difference can flip the final rounding by one ulp of the storage type
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 0.0}[dtype]
    assert_verbose_close(f, want, (NORMAL_TOL + ulp) * want.abs().clamp(min=1.0), f"randn {dtype}")


def test_randn_batch_invariance_bitwise():
    """A seed's noise is the same bits whatever the batch size and the sample's position (draws per sample too)."""
    shape = (5, 7, 13)
    ref = cpu.OPS["randn"](rng.seeds_tensor([SEEDS[1]]), torch.tensor([2]), (1,) + shape, torch.float32)[0]
    for B in (1, 3, 8):
        for pos in {0, B // 2, B - 1}:
            seeds = [1000 + i for i in range(B)]
            seeds[pos] = SEEDS[1]
            z = cpu.OPS["randn"](rng.seeds_tensor(seeds), torch.tensor([2]), (B,) + shape, torch.float32)
            assert torch.equal(z[pos], ref), (B, pos)
            draws = torch.tensor([5] * B)
            draws[pos] = 2
            z = cpu.OPS["randn"](rng.seeds_tensor(seeds), draws, (B,) + shape, torch.float32)
            assert torch.equal(z[pos], ref), (B, pos, "per-sample draws")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_add_noise_matches_reference(dtype):
    seeds = rng.seeds_tensor(SEEDS[:3])
    x0 = torch.randn(3, 4, 9, 11).to(dtype)
    alpha, sigma = torch.tensor([1.0, 0.5, 0.1]), torch.tensor([0.0, 0.8, 0.99])
    draws = torch.tensor([0, 3, 1])
    got = cpu.OPS["add_noise"](x0, alpha, sigma, seeds, draws)
    same = ops.add_noise_reference(x0, alpha, sigma, seeds, draws)
    ref64 = ops.add_noise_reference(x0.double(), alpha.double(), sigma.double(), seeds, draws)
    assert got.dtype == dtype and got.shape == x0.shape
    if dtype == torch.float64:
        assert_verbose_close(got, ref64, 1e-6 * per_sample_scale(ref64), "add_noise fp64")
    else:
        assert_like_torch(got, same, ref64, f"add_noise {dtype}")


# ---------------------------------------------------------------------------------------------------------------
# step: every solver, every stage, every storage dtype
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("solver", sorted(fd.SOLVERS))
def test_step_matches_reference(solver, dtype, shape):
    """Each stage from the same inputs: kernel vs float64 reference vs torch in the same dtype."""
    plan = solver_plan(solver)
    B, K = shape[0], plan.num_slots
    seeds = rng.seeds_tensor(SEEDS[:B])
    g = torch.Generator().manual_seed(hash((solver, shape)) % 2**31)
    x = (plan.init_scale * torch.randn(shape, generator=g)).to(dtype)
    slots = torch.zeros((K,) + shape, dtype=dtype)
    for k in range(plan.num_stages):
        out = model(x, k)
        rows, draws, flags = stage_args(plan, k, B)
        rows64 = torch.as_tensor(plan.rows()[k:k + 1], dtype=torch.float64)
        slots64, slots_same = slots.double(), slots.clone()
        ref64 = call(ops.step_reference, x.double(), out.double(), slots64, rows64, seeds, draws, **flags)
        same = call(ops.step_reference, x, out, slots_same, rows, seeds, draws, **flags)
        got = call(STEP, x, out, slots, rows, seeds, draws, **flags)
        assert got.dtype == dtype and got.shape == x.shape
        what = f"{solver} stage {k}/{plan.num_stages} {dtype} {shape}"
        assert_like_torch(got, same, ref64, what + " x'")
        for i in range(K):
            if (flags["slot_writes"] >> i) & 1:
                assert_like_torch(slots[i], slots_same[i], slots64[i], what + f" slot {i}")
        if dtype == torch.float32:  # and close to torch's own fp32 result
            assert_verbose_close(got, same, 1e-5 * per_sample_scale(same), what + " vs torch fp32")
        x = got  # continue from the kernel's state: every stage sees realistic inputs


@pytest.mark.parametrize("solver", ["dpmpp_3m", "pc", "euler_ancestral"])
def test_step_float64(solver):
    plan = solver_plan(solver)
    shape = (2, 3, 17)
    seeds = rng.seeds_tensor(SEEDS[:2])
    x = plan.init_scale * torch.randn(shape, dtype=torch.float64)
    slots, slots_ref = torch.zeros((plan.num_slots,) + shape, dtype=torch.float64), None
    for k in range(plan.num_stages):
        out = model(x, k)
        rows, draws, flags = stage_args(plan, k, 2, rows_dtype=torch.float64)
        slots_ref = slots.clone()
        ref = call(ops.step_reference, x, out, slots_ref, rows, seeds, draws, **flags)
        got = call(STEP, x, out, slots, rows, seeds, draws, **flags)
        # float64 math; the noise is float32 (a few ulp of it, times the noise gain)
        assert_verbose_close(got, ref, 1e-6 * per_sample_scale(ref), f"{solver} fp64 stage {k}")
        assert_verbose_close(slots, slots_ref, 1e-12 * per_sample_scale(ref), f"{solver} fp64 slots {k}")
        x = got


# ---------------------------------------------------------------------------------------------------------------
# step: in place, CFG, per-sample rows, Langevin, draws < 0, threads
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 9, 11), (2, 4, 128, 130)], ids=["small", "multithreaded"])
def test_in_place_equals_out_of_place(shape):
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    k = 1  # reads and writes slot 0, draws noise
    rows, draws, flags = stage_args(plan, k, shape[0])
    assert flags["slot_reads"] and flags["slot_writes"] and flags["noise"]
    x = torch.randn(shape) * 10
    out = torch.randn(shape)
    slots = torch.randn((1,) + shape)
    seeds = rng.seeds_tensor(SEEDS[:shape[0]])
    s1, s2 = slots.clone(), slots.clone()
    want = call(STEP, x, out, s1, rows, seeds, draws, **flags)
    x2 = x.clone()
    got = call(STEP, x2, out, s2, rows, seeds, draws, x_out=x2, **flags)
    assert got.data_ptr() == x2.data_ptr()
    assert torch.equal(x2, want) and torch.equal(s1, s2)
    ref = call(ops.step_reference, x, out, slots.clone(), rows, seeds, draws, **flags)
    assert_verbose_close(want, ref, 1e-5 * per_sample_scale(ref), "in place vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("solver", ["heun", "rk4", "dpm_solver_3", "lms", "unipc", "pc", "dpmpp_3m_sde"])
def test_in_place_every_stage(solver, dtype):
    """x_out = x through a whole plan (slot rows that read x, several slots written per stage) is bit-identical to
    out of place: the kernel orders its stores so nothing is overwritten before it is read."""
    plan = solver_plan(solver)
    shape = (2, 3, 5, 7)
    seeds = rng.seeds_tensor(SEEDS[:2])
    x_a = (plan.init_scale * torch.randn(shape)).to(dtype)
    x_b = x_a.clone()
    s_a = torch.zeros((plan.num_slots,) + shape, dtype=dtype)
    s_b = s_a.clone()
    for k in range(plan.num_stages):
        rows, draws, flags = stage_args(plan, k, 2)
        out = model(x_a, k)
        x_a = call(STEP, x_a, out, s_a, rows, seeds, draws, **flags)
        got = call(STEP, x_b, out, s_b, rows, seeds, draws, x_out=x_b, **flags)
        assert got.data_ptr() == x_b.data_ptr()
        assert torch.equal(x_b, x_a) and torch.equal(s_b, s_a), f"{solver} stage {k}"


def test_in_place_with_cyclic_slot_reads():
    """A row that swaps two slots and reads both (and x, in place): the kernel must copy one of them first."""
    K, shape = 2, (2, 3, 50)
    M = np.zeros((1 + K, 2 + K))
    M[0] = [0.5, 0.25, 2.0, -1.0]  # x' = .5 x + .25 D + 2 S0 - S1
    M[1] = [1.0, 0.0, 0.0, 1.0]  # S0' = x + S1
    M[2] = [0.0, 0.0, 1.0, 0.0]  # S1' = S0
    rows = torch.tensor(np.concatenate([[0.9, 0.1, 0, 0, 0, 0, 0], M.ravel()])[None], dtype=torch.float32)
    x, out, slots = torch.randn(shape), torch.randn(shape), torch.randn((K,) + shape)
    flags = dict(slot_reads=3, slot_writes=3, use_out=True, noise=False, langevin=False)
    seeds, draws = rng.seeds_tensor([1, 2]), torch.tensor([-1])
    ref_slots = slots.clone()
    ref = call(ops.step_reference, x, out, ref_slots, rows, seeds, draws, **flags)
    x_in = x.clone()
    call(STEP, x_in, out, slots, rows, seeds, draws, x_out=x_in, **flags)
    assert torch.equal(x_in, ref) and torch.equal(slots, ref_slots)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_with_per_sample_guidance(dtype):
    plan = fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 5)
    k = 2
    rows, draws, flags = stage_args(plan, k, 3)
    x = torch.randn(3, 4, 9, 11).to(dtype)
    out = torch.randn(6, 4, 9, 11).to(dtype)
    w = torch.tensor([1.0, 3.0, 7.5])
    seeds = rng.seeds_tensor(SEEDS[:3])
    slots = torch.randn(1, 3, 4, 9, 11).to(dtype)
    slots64, slots_same = slots.double(), slots.clone()
    ref64 = call(ops.step_reference, x.double(), out.double(), slots64, rows.double(), seeds, draws, guidance=w,
                 cfg=True, **flags)
    same = call(ops.step_reference, x, out, slots_same, rows, seeds, draws, guidance=w, cfg=True, **flags)
    got = call(STEP, x, out, slots, rows, seeds, draws, guidance=w, cfg=True, **flags)
    assert_like_torch(got, same, ref64, f"cfg {dtype}")
    # one shared weight broadcasts like a per-sample one
    g1 = call(STEP, x, out, slots.clone(), rows, seeds, draws, guidance=torch.tensor([7.5]), cfg=True, **flags)
    g3 = call(STEP, x, out, slots.clone(), rows, seeds, draws, guidance=torch.full((3,), 7.5), cfg=True, **flags)
    assert torch.equal(g1, g3)


def test_per_sample_rows_from_two_plans():
    """One call serves samples at different stages of different plans (same slot count)."""
    p1, p2 = fd.plan("dpmpp_2m_sde", S.EDM(), 5), fd.plan("dpmpp_2m", S.DiscreteVP(), 4)
    k1, k2 = 2, 1
    assert p1.num_slots == p2.num_slots == 1
    shape = (2, 4, 9, 11)
    x, out = torch.randn(shape), torch.randn(shape)
    slots = torch.randn((1,) + shape)
    seeds = rng.seeds_tensor(SEEDS[:2])
    rows = torch.tensor(np.stack([p1.rows()[k1], p2.rows()[k2]]), dtype=torch.float32)
    draws = torch.tensor([int(p1.draw[k1]), int(p2.draw[k2])])
    assert draws[0] >= 0 > draws[1]
    flags = dict(slot_reads=p1.slot_reads(k1) | p2.slot_reads(k2), slot_writes=p1.slot_writes(k1) | p2.slot_writes(k2),
                 use_out=True, noise=True, langevin=False)
    both_slots = slots.clone()
    both = call(STEP, x, out, both_slots, rows, seeds, draws, **flags)
    for b, (p, k) in enumerate([(p1, k1), (p2, k2)]):
        r, d, f = stage_args(p, k, 1)
        s = slots[:, b:b + 1].clone()
        one = call(STEP, x[b:b + 1], out[b:b + 1], s, r, seeds[b:b + 1], d, **f)
        assert torch.equal(both[b:b + 1], one), b
        if f["slot_writes"]:
            assert torch.equal(both_slots[:, b:b + 1], s), b
    ref_slots = slots.clone()
    ref = call(ops.step_reference, x, out, ref_slots, rows, seeds, draws, **flags)
    assert_verbose_close(both, ref, 1e-5 * per_sample_scale(ref), "two plans vs reference")


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (2, 3, 100, 211)], ids=["small", "multitile"])
def test_langevin_per_sample_snr_and_negative_draws(shape):
    """pc corrector stages: per-sample reductions; a sample with snr = 0 and one with draw < 0 in the same call."""
    plan = fd.plan("pc", S.VE(), 3, corrector_steps=1)
    k = int(np.flatnonzero(plan.langevin[:, 0] != 0)[1])
    B = shape[0]
    rows = torch.tensor(np.repeat(plan.rows()[k:k + 1], B, axis=0), dtype=torch.float32)
    rows[1, 3] = 0.0  # sample 1: no corrector term
    draws = torch.full((B,), int(plan.draw[k]))
    draws[-1] = -1  # last sample: no noise at all (its z = 0, so eps = 0 too)
    x = torch.randn(shape) * 5
    out = model(x, k)
    seeds = rng.seeds_tensor(SEEDS[:B])
    flags = dict(slot_reads=0, slot_writes=0, use_out=True, noise=True, langevin=True)
    slots = torch.zeros((0,) + shape)
    got = call(STEP, x, out, slots, rows, seeds, draws, **flags)
    ref64 = call(ops.step_reference, x.double(), out.double(), slots.double(), rows.double(), seeds, draws, **flags)
    same = call(ops.step_reference, x, out, slots, rows, seeds, draws, **flags)
    assert_like_torch(got, same, ref64, "langevin")
    # the draw < 0 sample got the deterministic part only
    r = rows[-1]
    det = r[7] * x[-1] + r[8] * (r[0] * x[-1] + r[1] * out[-1])
    assert_verbose_close(got[-1], det, 1e-5 * per_sample_scale(det[None])[0], "draw < 0: no noise")


def test_draws_negative_means_no_noise():
    plan = fd.plan("euler_ancestral", S.EDM(), 4)
    k = 1
    rows, _, flags = stage_args(plan, k, 3)
    x, out = torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    seeds = rng.seeds_tensor(SEEDS[:3])
    draws = torch.tensor([int(plan.draw[k]), -1, int(plan.draw[k]) + 3])
    slots = torch.zeros(0, 3, 5, 6)
    got = call(STEP, x, out, slots, rows, seeds, draws, **flags)
    ref = call(ops.step_reference, x, out, slots, rows, seeds, draws, **flags)
    assert_verbose_close(got, ref, 1e-5 * per_sample_scale(ref), "draws < 0")
    quiet = call(STEP, x, out, slots, rows, seeds, draws, **{**flags, "noise": False})
    assert torch.equal(got[1], quiet[1]) and not torch.equal(got[0], quiet[0])


@pytest.mark.parametrize("solver", ["pc", "dpmpp_3m_sde"])
def test_thread_count_and_tiling_do_not_change_bits(solver):
    """Single- and multi-threaded runs (and the Langevin reduction order) give identical bits."""
    plan = solver_plan(solver)
    k = int(np.flatnonzero((plan.langevin[:, 0] != 0) | (plan.draw >= 0))[0])
    shape = (2, 4, 96, 97)
    rows, draws, flags = stage_args(plan, k, 2)
    x = torch.randn(shape) * 3
    out = model(x, k)
    slots = torch.randn((plan.num_slots,) + shape)
    seeds = rng.seeds_tensor(SEEDS[:2])
    old = EXT.set_parallel_min(1 << 62)  # never parallel
    try:
        s1 = slots.clone()
        one = call(STEP, x, out, s1, rows, seeds, draws, **flags)
        EXT.set_parallel_min(0)  # always parallel
        s2 = slots.clone()
        many = call(STEP, x, out, s2, rows, seeds, draws, **flags)
    finally:
        EXT.set_parallel_min(old)
    assert torch.equal(one, many) and torch.equal(s1, s2)


def test_through_fastdiff_ops():
    """fastdiff.ops.step(kernel="cpu") reaches this backend through the registry and the custom op."""
    plan = fd.plan("unipc", S.DiscreteVP.scaled_linear(), 5)
    x, slots = torch.randn(2, 4, 8, 8), torch.zeros((plan.num_slots, 2, 4, 8, 8))
    seeds = rng.seeds_tensor(SEEDS[:2])
    slots_ref = slots.clone()
    x_ref = x.clone()
    for k in range(plan.num_stages):
        rows, draws, f = stage_args(plan, k, 2)
        kw = dict(slot_reads=f["slot_reads"], slot_writes=f["slot_writes"], use_out=f["use_out"], noise=f["noise"])
        x = ops.step(x, model(x, k), slots, rows, seeds, draws, kernel="cpu", **kw)
        x_ref = ops.step(x_ref, model(x_ref, k), slots_ref, rows, seeds, draws, kernel="torch", **kw)
        assert_verbose_close(x, x_ref, 1e-5 * per_sample_scale(x_ref), f"ops.step stage {k}")


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def _good():
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    rows, draws, flags = stage_args(plan, 1, 2)
    return dict(x=torch.randn(2, 3, 5), out=torch.randn(2, 3, 5), slots=torch.zeros(1, 2, 3, 5), rows=rows,
                seeds=rng.seeds_tensor([1, 2]), draws=draws, guidance=torch.zeros(1), **flags, cfg=False)


def _run(kw):
    kw = dict(kw)
    args = [kw.pop(n) for n in ("x", "out", "slots", "rows", "seeds", "draws", "guidance", "slot_reads",
                                "slot_writes", "use_out", "cfg", "noise", "langevin")]
    return STEP(*args, **kw)


def test_good_arguments_run():
    assert _run(_good()).shape == (2, 3, 5)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(2, 5, 3).transpose(1, 2)), r"contiguous\(\)"),
    (dict(out=torch.zeros(2, 5, 3).transpose(1, 2)), "out must be contiguous"),
    (dict(slots=torch.zeros(9, 2, 3, 5), rows=torch.zeros(1, 7 + 10 * 11)), "at most 8"),
    (dict(x=torch.zeros(2, 3, 5, dtype=torch.int32)), "x must be float32"),
    (dict(x=torch.zeros(2, 3, 5, device="meta")), "CPU tensor"),
    (dict(out=torch.zeros(2, 3, 5, device="meta")), "out is on meta"),
    (dict(x_out=torch.zeros(2, 3, 4)), "x_out must be"),
])
def test_step_rejects_what_the_kernel_cannot_run(change, match):
    """The kernel's own limits (CPU tensors, storage dtypes, contiguity, 8 slots, x_out), checked by the extension."""
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        _run(kw)


@pytest.mark.parametrize("change,match", [
    (dict(out=torch.zeros(2, 3, 4)), "out has shape"),
    (dict(out=torch.zeros(2, 3, 5), cfg=True), r"out has shape .*\[uncond; cond\]"),
    (dict(out=torch.zeros(2, 3, 5, dtype=torch.float64)), "cast the model output"),
    (dict(slots=torch.zeros(1, 2, 3, 5, dtype=torch.float16)), "slots are .* keep the history slots in x's dtype"),
    (dict(slots=torch.zeros(1, 2, 3, 4)), "slots must be"),
    (dict(rows=torch.zeros(1, 5)), "rows must be"),
    (dict(rows=torch.zeros(3, 13)), "rows must be"),
    (dict(seeds=rng.seeds_tensor([1])), "seeds must be an int64 tensor with one entry per sample"),
    (dict(seeds=torch.tensor([1.0, 2.0])), "seeds must be an int64"),
    (dict(draws=torch.tensor([1.0])), "draws must be an int64"),
    (dict(draws=torch.tensor([1, 2, 3])), "draws must be an int64"),
    (dict(guidance=torch.zeros(3)), "guidance must be"),
])
def test_ops_step_validates_before_the_kernel(change, match):
    """Shapes, dtypes and lengths are checked once, by fastdiff.ops, before the cpu kernel is called."""
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        ops.step(kw.pop("x"), kw.pop("out"), kw.pop("slots"), kw.pop("rows"), kw.pop("seeds"), kw.pop("draws"),
                 kw.pop("guidance"), kernel="cpu", **kw)


def test_x_out_must_not_overlap_out():
    kw = _good()
    kw["x_out"] = kw["out"]
    with pytest.raises(ValueError, match="overlap"):
        _run(kw)


def test_randn_and_add_noise_errors():
    with pytest.raises(ValueError, match=r"one entry per sample \(\[3\]"):
        ops.randn((3, 4), rng.seeds_tensor([1, 2]), kernel="cpu")
    with pytest.raises(ValueError, match="dtype must be"):
        cpu.OPS["randn"](rng.seeds_tensor([1]), torch.tensor([0]), (1, 4), torch.int64)
    with pytest.raises(ValueError, match="alpha must be"):
        ops.add_noise(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2), rng.seeds_tensor([1, 2]), kernel="cpu")


def test_empty_batch():
    z = cpu.OPS["randn"](torch.zeros(0, dtype=torch.int64), torch.tensor([0]), (0, 3), torch.float32)
    assert z.shape == (0, 3)
    plan = fd.plan("ddim", S.EDM(), 3)
    rows, draws, flags = stage_args(plan, 0, 0)
    x = torch.zeros(0, 4)
    assert call(STEP, x, x, torch.zeros(0, 0, 4), rows, torch.zeros(0, dtype=torch.int64), draws,
                **flags).shape == (0, 4)


@pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_nonfinite_flags(dtype, noise):
    """The kernel flags exactly the samples whose stored x' has NaN / Inf (fp16 overflow included), OR-ed."""
    check_nonfinite_flags(cpu.step, "cpu", dtype, noise)


@pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
def test_large_fp32_x_out_streams(noise):
    """fp32 x' of 8M+ elements goes out with streaming stores: the same bits as one sample per call (below that
    size), the reference's bits without noise, and the non-finite flags; sample 1 starts 12 bytes past a 16-byte
    boundary (it does not stream) and the tails are not multiples of 4."""
    B, N = 2, (1 << 22) + 3
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn((B, N), generator=g), torch.randn((B, N), generator=g)
    out[0, N // 2] = float("nan")
    rows = torch.tensor([[0.0, 1.0, 0.25 if noise else 0.0, 0, 0, 0, 0, 2.0, 0.5]])
    args = (torch.zeros((0, B, N)), rows, torch.tensor([5, 6]), torch.tensor([1]), torch.zeros(1), 0, 0, True, False,
            noise, False)
    flags = torch.zeros(B, dtype=torch.int32)
    got = STEP(x, out, *args, x_out=torch.empty_like(x), nonfinite=flags)
    assert flags.tolist() == [1, 0]
    assert got[0].isnan().sum() == 1 and got[0, N // 2].isnan()
    for b in range(B):
        one = STEP(x[b:b + 1], out[b:b + 1], args[0][:, b:b + 1], rows, args[2][b:b + 1], *args[3:])[0]
        assert torch.equal(got[b].nan_to_num(), one.nan_to_num()), b
    if not noise:
        want = ops.step_reference(x, out, *args)
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_nonfinite_flags_across_tiles_and_threads():
    """A NaN in the last tile of a sample big enough to run on several threads flags that sample only."""
    B, N = 3, 3 * 4096 + 5
    x = torch.randn(B, N)
    out = torch.randn(B, N)
    out[2, N - 1] = float("nan")
    rows = torch.tensor([[0.0, 1.0, 0, 0, 0, 0, 0, 0.5, 0.5]])
    flags = torch.zeros(B, dtype=torch.int32)
    old = cpu.ext().set_parallel_min(1)
    try:
        cpu.step(x, out, torch.zeros(0, B, N), rows, torch.arange(B), torch.tensor([0]), torch.zeros(1), 0, 0, True,
                 False, False, False, nonfinite=flags)
    finally:
        cpu.ext().set_parallel_min(old)
    assert flags.tolist() == [0, 0, 1]


def test_randn_into_out_buffer():
    seeds = rng.seeds_tensor([5, 2**64 - 3])
    buf = torch.empty(2, 3, 5)
    got = ops.randn((2, 3, 5), seeds, 0, backend="cpu", out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, ops.randn((2, 3, 5), seeds, 0, backend="cpu"))
    torch.testing.assert_close(got, ops.randn((2, 3, 5), seeds, 0, backend="torch"))  # the oracle, to a few ulp
