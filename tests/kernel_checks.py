"""Shared by the kernel tests (test_kernel_cpu / _triton / _cuda, test_rng): the Random123 known answers, the
dtypes and per-dtype slack, and the comparisons every kernel is held to.

Imported as ``from kernel_checks import ...`` (tests/ is on sys.path while pytest collects, as for ``peers``).
"""

from __future__ import annotations

import numpy as np
import torch

M32 = 0xFFFFFFFF
KAT = [  # Random123 kat_vectors, philox4x32_10: (counter, key, expected)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# tiny in |kernel - ref64| <= 2 |torch_same_dtype - ref64| + tiny * (1 + max |ref64| of the sample): about an ulp
# of the storage dtype at the sample's scale (fp32: a few ulp, room for a kernel's log / sin / cos differing from
# torch's by an ulp or two, carried to the state's scale by the noise gain).
TINY = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_verbose_close(got, ref, allowed, what):
    """|got - ref| <= allowed elementwise; NaN and +-Inf only where ``ref`` has the same; on failure say how many
    elements, where the worst is and by how much."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    allowed = torch.as_tensor(allowed, dtype=torch.float64).cpu().expand_as(ref)
    nan_g, nan_r = torch.isnan(got), torch.isnan(ref)
    if not torch.equal(nan_g, nan_r):
        i = int(torch.nonzero((nan_g != nan_r).flatten())[0])
        raise AssertionError(f"{what}: NaN mismatch at {int((nan_g != nan_r).sum())} elements, first at "
                             f"{np.unravel_index(i, tuple(ref.shape))}: got {got.flatten()[i].item()}, "
                             f"ref {ref.flatten()[i].item()}")
    inf_g, inf_r = torch.isinf(got), torch.isinf(ref)
    inf_mismatch = (inf_g != inf_r) | (inf_r & (got != ref))
    assert not inf_mismatch.any(), f"{what}: Inf mismatch at {int(inf_mismatch.sum())} elements"
    err = torch.where(torch.isfinite(ref), (got - ref).abs(), torch.zeros_like(ref))
    bad = err > allowed
    if bad.any():
        i = int(torch.argmax((err - allowed).flatten()))
        idx = np.unravel_index(i, tuple(ref.shape))
        raise AssertionError(f"{what}: {int(bad.sum())}/{ref.numel()} elements off; worst at {idx}: got "
                             f"{got.flatten()[i].item():.9g}, ref {ref.flatten()[i].item():.9g}, |err| "
                             f"{err.flatten()[i].item():.3g} > allowed {allowed.flatten()[i].item():.3g}")


def per_sample_scale(ref):
    """1 + max |ref| over each sample (non-finite values ignored), broadcast to ref's shape."""
    ref = ref.detach().double().cpu()
    m = ref.abs().nan_to_num(0.0, posinf=0.0).reshape(ref.shape[0], -1).amax(dim=1) if ref.numel() \
        else ref.new_zeros(0)
    return (1.0 + m).reshape((-1,) + (1,) * (ref.dim() - 1))


def assert_like_torch(got, torch_same, ref64, what):
    """The flash-attention rule: the kernel is at most twice as far from float64 as torch in the same dtype, plus
    about an ulp of that dtype (``TINY``) at the sample's scale."""
    assert got.dtype == torch_same.dtype and got.shape == ref64.shape, what
    ref64 = ref64.detach().double().cpu()
    allowed = (2 * (torch_same.detach().double().cpu() - ref64).abs().nan_to_num(0.0)
               + TINY[got.dtype] * per_sample_scale(ref64))
    assert_verbose_close(got, ref64, allowed, what)


def check_nonfinite_flags(step, device, dtype, noise: bool):
    """``step`` (a backend's step, contract signature) raises the per-sample ``nonfinite`` flag exactly for the
    samples whose stored x' has NaN / Inf, ORs into flags already set, and leaves x' as without flags.

    Row (K = 0): D = out, x' = 2 x + 0.5 D (+ 0.25 z with noise).  Sample 0 is clean but pre-flagged (the flag must
    stay set); sample 1 has a NaN in out; sample 2 an Inf in x; sample 3 holds 40000 in x, so x' = 80000 overflows
    float16 storage only; sample 4 is clean.  Odd sizes: the scalar tails run too."""
    B, shape = 5, (5, 3, 7)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    out[1, 2, 6] = float("nan")
    x[2, 0, 3] = float("inf")
    x[3, 1, 1] = 40000.0
    x, out = x.to(dtype).to(device), out.to(dtype).to(device)
    rows = torch.tensor([[0.0, 1.0, 0.25 if noise else 0.0, 0, 0, 0, 0, 2.0, 0.5]], dtype=torch.float32,
                        device=device)
    slots = torch.zeros((0,) + shape, dtype=dtype, device=device)
    seeds = torch.arange(1, B + 1, dtype=torch.int64, device=device)
    draws = torch.tensor([1], dtype=torch.int64, device=device)
    guidance = torch.zeros(1, dtype=torch.float32, device=device)
    args = (x, out, slots, rows, seeds, draws, guidance, 0, 0, True, False, noise, False)
    plain = step(*args)
    flags = torch.tensor([1, 0, 0, 0, 0], dtype=torch.int32, device=device)
    got = step(*args, nonfinite=flags)
    want = [1, 1, 1, 1 if dtype == torch.float16 else 0, 0]
    assert flags.cpu().tolist() == want, f"{dtype} noise={noise}: flags {flags.cpu().tolist()}, want {want}"
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())
    # independent of the kernel: the stored x' of a flagged sample is non-finite, of the others finite
    finite = torch.isfinite(got.float()).reshape(B, -1).all(1).cpu().tolist()
    assert [not f for f in finite][1:] == [bool(v) for v in want[1:]]
