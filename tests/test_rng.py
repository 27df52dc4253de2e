"""Tests for fastdiff.rng: Philox4x32-10 known answers, numpy/torch agreement, noise layout and statistics; the cpu
kernels' normals built for narrower instruction sets (AVX2 without AVX-512, no AVX at all) give the same bits."""

import functools
import pathlib
import platform

import numpy as np
import pytest
import scipy.stats
import torch

from fastdiff import rng
from kernel_checks import KAT, M32  # Random123 known answers, shared with the kernel tests

# Tolerance for normals between numpy and torch float32 libm (log/sin/cos differ by an ulp or so).
NORMAL_RTOL = 1e-6
NORMAL_ATOL = 2e-6


# --------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers_numpy(ctr, key, expected):
    out = rng.philox4x32_10(np.array(ctr, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert out.dtype == np.uint32
    assert out.shape == (4,)
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers_torch(ctr, key, expected):
    out = rng.philox_uint32_torch(*ctr, *key)
    assert out.dtype == torch.int64
    assert out.shape == (4,)
    assert tuple(out.tolist()) == expected


def test_known_answers_vectorized_numpy():
    ctr = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    key = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    out = rng.philox4x32_10(ctr, key)
    assert out.shape == (3, 4)
    assert out.tolist() == [list(e) for _, _, e in KAT]


def test_numpy_broadcasting():
    ctr = np.random.default_rng(0).integers(0, 2**32, size=(5, 3, 4), dtype=np.uint32)
    key = np.array([7, 9], dtype=np.uint32)
    out = rng.philox4x32_10(ctr, key)
    assert out.shape == (5, 3, 4)
    single = rng.philox4x32_10(ctr[2, 1], key)
    np.testing.assert_array_equal(out[2, 1], single)
    # key broadcast over a leading dim
    keys = np.array([[1, 2], [3, 4]], dtype=np.uint32)[:, None, :]
    out2 = rng.philox4x32_10(ctr[0][None], keys)
    assert out2.shape == (2, 3, 4)
    np.testing.assert_array_equal(out2[1, 2], rng.philox4x32_10(ctr[0, 2], keys[1, 0]))


def _random_words(gen, n):
    """uint32 words biased towards the edges (0, 2^31 boundary, 2^32 - 1) as well as uniform."""
    edge = np.array([0, 1, 2, 0x7FFFFFFE, 0x7FFFFFFF, 0x80000000, 0x80000001, M32 - 1, M32], dtype=np.uint32)
    uniform = gen.integers(0, 2**32, size=n, dtype=np.uint32)
    high = (M32 - gen.integers(0, 1024, size=n)).astype(np.uint32)
    pool = np.concatenate([uniform, high, edge])
    return gen.choice(pool, size=n)


def test_numpy_torch_streams_equal():
    gen = np.random.default_rng(1234)
    n = 4096
    ctr = np.stack([_random_words(gen, n) for _ in range(4)], axis=-1)
    key = np.stack([_random_words(gen, n) for _ in range(2)], axis=-1)
    ref = rng.philox4x32_10(ctr, key)
    t = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    out = rng.philox_uint32_torch(t(ctr[:, 0]), t(ctr[:, 1]), t(ctr[:, 2]), t(ctr[:, 3]), t(key[:, 0]), t(key[:, 1]))
    assert out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) <= M32
    np.testing.assert_array_equal(out.numpy(), ref.astype(np.int64))


def test_torch_broadcasts_python_ints():
    blk = torch.arange(10, dtype=torch.int64)
    out = rng.philox_uint32_torch(blk, 0, 3, 1, 0xDEADBEEF, 0x12345678)
    assert out.shape == (10, 4)
    ctr = np.stack([np.arange(10), np.zeros(10), np.full(10, 3), np.ones(10)], axis=-1).astype(np.uint32)
    ref = rng.philox4x32_10(ctr, np.array([0xDEADBEEF, 0x12345678], dtype=np.uint32))
    np.testing.assert_array_equal(out.numpy(), ref.astype(np.int64))


# --------------------------------------------------------------------------- uniforms


def test_uniform_conversion_edges():
    words = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF], dtype=np.uint32)
    u = rng.uint_to_uniform_float(words)
    assert u.dtype == np.float32
    # int32 bitcast, negatives complemented: 0x80000000 -> 2^31 - 1, 0xFFFFFFFF -> 0.
    scale = np.float32(4.6566127342e-10)
    expected = np.array([0, 1, 2**31 - 1, 2**31 - 1, 1, 0], dtype=np.float32) * scale
    np.testing.assert_array_equal(u, expected)
    assert u.max() < 1.0  # the scale is chosen so the top word stays below 1
    ut = rng.uint_to_uniform_float_torch(torch.from_numpy(words.astype(np.int64)))
    assert ut.dtype == torch.float32
    np.testing.assert_array_equal(ut.numpy(), u)


def test_uniforms_range_and_torch_match():
    words = rng.philox_uint32_torch(torch.arange(1 << 14), 0, 0, 0, 42, 0)
    u = rng.uint_to_uniform_float_torch(words)
    # Triton's uint_to_uniform_float lands in [0, 1); 0 is possible, 1 is not.
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    np.testing.assert_array_equal(u.numpy(), rng.uint_to_uniform_float(words.numpy().astype(np.uint32)))


def test_box_muller_zero_uniform_is_finite():
    zero = np.zeros(2, dtype=np.float32)
    n0, n1 = rng.box_muller(zero, np.array([0.0, 0.25], dtype=np.float32))
    assert np.all(np.isfinite(n0)) and np.all(np.isfinite(n1))
    t0, t1 = rng.box_muller_torch(torch.zeros(2), torch.tensor([0.0, 0.25]))
    assert torch.isfinite(t0).all() and torch.isfinite(t1).all()
    # u1 clamps to 1e-7: r = sqrt(-2 ln 1e-7) ~ 5.68
    assert abs(float(n0[0]) - np.sqrt(-2 * np.log(1e-7))) < 1e-5


# --------------------------------------------------------------------------- randn layout


def test_randn_matches_numpy_oracle():
    shape = (3, 4, 17, 9)  # per-sample numel 612, and an odd shape
    seeds = [0, 123456789, 2**40 + 17]
    for draw, stream in [(0, 0), (5, 0), (7, 3)]:
        t = rng.randn(shape, seeds, draw=draw, stream=stream)
        n = rng.randn_numpy(shape, seeds, draw=draw, stream=stream)
        assert t.shape == shape and t.dtype == torch.float32
        assert n.shape == shape and n.dtype == np.float32
        np.testing.assert_allclose(t.numpy(), n, rtol=NORMAL_RTOL, atol=NORMAL_ATOL)


def test_layout_element_to_counter_and_lane():
    """Element e of a sample = normal (e % 4) of Philox block e // 4, as the module docstring says."""
    seed, draw, stream = 2**33 + 99, 4, 2
    x = rng.randn_numpy((1, 3, 7), [seed], draw=draw, stream=stream).reshape(-1)  # 21 elements, C order
    for e in [0, 1, 2, 3, 4, 10, 19, 20]:
        blk, lane = divmod(e, 4)
        w = rng.philox4x32_10(
            np.array([blk, 0, draw, stream], dtype=np.uint32), np.array([seed & M32, seed >> 32], dtype=np.uint32)
        )
        u = rng.uint_to_uniform_float(w)
        pair = 0 if lane < 2 else 2
        u1 = max(np.float32(u[pair]), np.float32(1e-7))
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        theta = np.float32(6.2831855) * u[pair + 1]
        ref = r * np.cos(theta) if lane % 2 == 0 else r * np.sin(theta)
        assert x[e] == ref, e


def test_element_index_is_flat_per_sample():
    # Same flat element index -> same value, whatever the per-sample shape.
    a = rng.randn((2, 6, 5), [11, 12])
    b = rng.randn((2, 30), [11, 12])
    c = rng.randn((2, 7), [11, 12])
    assert torch.equal(a.reshape(2, -1), b)
    assert torch.equal(b[:, :7], c)


def test_batch_invariance():
    seeds8 = [3, 2**63 + 5, 0, 77, 2**64 - 1, 1, 2**32 + 1, 123456789]
    shape = (4, 16, 16)
    big = rng.randn((8, *shape), seeds8, draw=2)
    for pos, seed in enumerate(seeds8):
        single = rng.randn((1, *shape), [seed], draw=2)
        assert torch.equal(single[0], big[pos])
    # a batch of 3 in a different order
    order = [6, 1, 3]
    three = rng.randn((3, *shape), [seeds8[i] for i in order], draw=2)
    for j, i in enumerate(order):
        assert torch.equal(three[j], big[i])
    # duplicates in one batch give identical samples
    dup = rng.randn((3, *shape), [77, 5, 77], draw=2)
    assert torch.equal(dup[0], dup[2])
    assert torch.equal(dup[0], big[3])


def test_draw_stream_seed_change_noise():
    base = rng.randn((1, 256), [10])
    others = [
        rng.randn((1, 256), [10], draw=1),
        rng.randn((1, 256), [10], stream=1),
        rng.randn((1, 256), [11]),
        rng.randn((1, 256), [10 + 2**32]),  # only the hi key word differs
    ]
    for o in others:
        assert not torch.equal(o, base)
        # not just different: essentially uncorrelated
        assert (o != base).float().mean() > 0.99
        assert abs(float(torch.corrcoef(torch.stack([o[0], base[0]]))[0, 1])) < 0.3


def test_dtype_cast_once_and_device_arg():
    x32 = rng.randn((2, 3, 5), [1, 2])
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        x = rng.randn((2, 3, 5), [1, 2], dtype=dt, device="cpu")
        assert x.dtype == dt
        assert torch.equal(x, x32.to(dt))


def test_seed_input_types_agree():
    ref = rng.randn((3, 40), [5, 2**62, 9])
    assert torch.equal(rng.randn((3, 40), torch.tensor([5, 2**62, 9], dtype=torch.int64)), ref)
    assert torch.equal(rng.randn((3, 40), np.array([5, 2**62, 9], dtype=np.uint64)), ref)
    assert torch.equal(rng.randn((3, 40), (np.int64(5), np.uint64(2**62), 9)), ref)


def test_64bit_seeds():
    big = [2**63 + 5, 2**64 - 1]
    t = rng.randn((2, 64), big)
    u = rng.randn((2, 64), np.array(big, dtype=np.uint64))
    assert torch.equal(t, u)
    n = rng.randn_numpy((2, 64), big)
    np.testing.assert_allclose(t.numpy(), n, rtol=NORMAL_RTOL, atol=NORMAL_ATOL)
    # hi word is used
    assert not torch.equal(rng.randn((1, 64), [1]), rng.randn((1, 64), [1 + 2**32]))
    # the key is exactly (lo, hi)
    s = 2**64 - 1
    words = rng.philox_uint32_torch(0, 0, 0, 0, s & M32, s >> 32)
    u = rng.uint_to_uniform_float_torch(words)
    n0, _ = rng.box_muller_torch(u[0:1], u[1:2])
    assert torch.equal(t[1, 0:1], n0)


def test_empty_sizes():
    assert rng.randn((0, 4), []).shape == (0, 4)
    assert rng.randn((2, 0, 3), [1, 2]).shape == (2, 0, 3)
    assert rng.randn_numpy((2, 0), [1, 2]).shape == (2, 0)
    x = rng.randn((3,), [1, 2, 3])  # one element per sample
    assert x.shape == (3,)
    assert x[0] == rng.randn((1, 5), [1])[0, 0]


# --------------------------------------------------------------------------- statistics


def test_statistics():
    n = 1 << 16
    x = rng.randn((4, n // 4), [2024, 7, 2**63 + 5, 99]).double().reshape(-1).numpy()
    se_mean = 1 / np.sqrt(n)
    se_std = 1 / np.sqrt(2 * n)
    assert abs(x.mean()) < 5 * se_mean
    assert abs(x.std() - 1) < 5 * se_std
    assert scipy.stats.kstest(x, "norm").pvalue > 1e-4
    # each of the four lanes on its own is N(0, 1) too
    for lane in range(4):
        xs = x.reshape(-1, 4)[:, lane]
        assert scipy.stats.kstest(xs, "norm").pvalue > 1e-4, lane


def test_uniform_statistics():
    words = rng.philox_uint32_torch(torch.arange(1 << 14), 0, 0, 0, 31337, 0).reshape(-1)
    u = rng.uint_to_uniform_float_torch(words).double().numpy()
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-4


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shape=(2, 4), seeds=[1]), "1 seeds for a batch of 2"),
        (dict(shape=(1, 4), seeds=[1, 2]), "2 seeds for a batch of 1"),
        (dict(shape=(1, 4), seeds=[-1]), "negative"),
        (dict(shape=(1, 4), seeds=torch.tensor([-3])), "negative"),
        (dict(shape=(1, 4), seeds=[2**64]), "64 bits"),
        (dict(shape=(), seeds=[]), "at least one dimension"),
        (dict(shape=(1, -2), seeds=[1]), "non-negative"),
        (dict(shape=(1, 4), seeds=[1.5]), "not an integer"),
        (dict(shape=(1, 4), seeds=5), "sequence"),
        (dict(shape=(1, 4), seeds=torch.tensor([[1]])), "1-D"),
        (dict(shape=(1, 4), seeds=[1], draw=-1), "draw"),
        (dict(shape=(1, 4), seeds=[1], draw=2**32), "draw"),
        (dict(shape=(1, 4), seeds=[1], stream=2**32), "stream"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rng.randn(**kwargs)
    with pytest.raises(ValueError, match=match):
        rng.randn_numpy(**kwargs)


def test_bad_philox_input():
    with pytest.raises(ValueError, match="trailing dimension of size 4"):
        rng.philox4x32_10(np.zeros(3, dtype=np.uint32), np.zeros(2, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        rng.philox4x32_10(np.array([2**32, 0, 0, 0]), np.zeros(2, dtype=np.uint32))


# --------------------------------------------------------------------------- cpu kernels per instruction set
# The cpu kernels compile with -march=native and pick the widest Philox / normals path compiled in (AVX-512, AVX2 +
# FMA, portable).  Every path must give the same bits, so a sample does not depend on the machine that drew it:
# tests/cpu_rng_probe.cpp is built again with AVX-512 off (the AVX2 path, on an AVX-512 host) and with AVX2 / FMA
# off (the scalar Philox and the portable Box-Muller with libm's fma), and compared with the native build.

_NARROW = {"avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2", "-mno-fma", "-mno-avx512f"]}


def _host_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@functools.cache
def _cpu_probe(variant: str):
    """tests/cpu_rng_probe.cpp built with the cpu backend's flags, then ``_NARROW[variant]`` ("native": none)."""
    from fastdiff.backends import cpu

    ok, why = cpu.available()
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the instruction-set variants are x86-64 ones")
    flags = _host_flags()
    if variant == "avx2" and not {"avx2", "fma"} <= flags:
        pytest.skip("the host has no AVX2 + FMA")
    if variant == "avx2" and "avx512f" not in flags:
        pytest.skip("the host has no AVX-512: the native build is the AVX2 one")
    src = pathlib.Path(__file__).with_name("cpu_rng_probe.cpp")
    suffix = "" if variant == "native" else f"_{variant}"
    return cpu.build(f"fastdiff_cpu_rng_probe{suffix}", [src], cpu.include_dirs(), f"cpu rng probe ({variant})",
                     _NARROW.get(variant, []))


# (seed, draw, first block, blocks): every uniform regime (2**16 normals), the block counter carrying into its high
# word and wrapping at 2**64 (as int64: negative), seeds / draws at their extremes, and run lengths around the
# vector widths (4 and 8 blocks) and the 64-block chunk, tails included.
_NORMAL_CASES = [(77, 3, 0, 1 << 14), (-1, 2**32 - 1, -40, 67), (-(2**63), 1, 2**32 - 9, 33), (0, 0, 0, 0)] + \
    [(12345, 7, 2**32 - 3, nb) for nb in (*range(1, 18), 31, 63, 64, 65, 129)]


@pytest.mark.parametrize("variant", ["avx2", "scalar"])
def test_cpu_normals_same_bits_per_instruction_set(variant):
    native, narrow = _cpu_probe("native"), _cpu_probe(variant)
    want_isa = {"avx2": ("avx2", "avx2"), "scalar": ("scalar", "portable")}[variant]
    assert (narrow.philox_isas()[0], narrow.normals_isas()[0]) == want_isa
    for seed, draw, blk0, nb in _NORMAL_CASES:
        want = native.normals_fast(seed, draw, blk0, nb)  # the kernels' path here
        got = narrow.normals_fast(seed, draw, blk0, nb)
        assert got.shape == (4 * nb,) and torch.equal(got.view(torch.int32), want.view(torch.int32)), \
            (variant, seed, draw, blk0, nb)


@pytest.mark.parametrize("variant", ["native", "avx2", "scalar"])
def test_cpu_philox_words_per_instruction_set(variant):
    """The words of every compiled Philox path of each build equal the numpy oracle (edge counters and keys)."""
    probe = _cpu_probe(variant)
    cases = [([M32 - 5, 0, 3, 0], [M32, M32], 21), ([M32 - 2, M32, 0, M32], [0, 1], 9), ([7, 1, M32, 5], [5, 6], 64)]
    for isa in probe.philox_isas():
        for ctr, key, nb in cases:
            blk = (np.uint64(ctr[0] | (ctr[1] << 32)) + np.arange(nb, dtype=np.uint64))  # wraps at 2**64
            c = np.stack([blk & np.uint64(M32), blk >> np.uint64(32), np.full(nb, ctr[2], np.uint64),
                          np.full(nb, ctr[3], np.uint64)], axis=1).astype(np.uint32)
            want = rng.philox4x32_10(c, np.array(key, dtype=np.uint32)).reshape(-1)
            got = np.array(probe.philox_blocks_raw(ctr, key, nb, isa), dtype=np.uint32)
            np.testing.assert_array_equal(got, want, err_msg=f"{variant} {isa} {ctr} {key} {nb}")


# --------------------------------------------------------------------------- speed / device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = rng.randn((2, 4, 32, 32), [1, 2**63 + 5])
    gpu = rng.randn((2, 4, 32, 32), [1, 2**63 + 5], device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=NORMAL_RTOL, atol=NORMAL_ATOL)
