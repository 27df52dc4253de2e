"""Test-only Triton kernel: the raw words of ``tl.philox`` (which kernels/step.py draws its noise from), for the
Random123 known answers and the numpy oracle.  Import it after TRITON_INTERPRET is settled (tests/test_kernel_triton.py
does), like any Triton kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _philox_kernel(ctr_ptr, key_ptr, out_ptr, n, BLOCK_SIZE: tl.constexpr):
    """Raw Philox4x32-10 through tl.philox: counters int64 [n, 4], keys int64 [n, 2] (uint32 values) -> [n, 4]."""
    i = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    m = i < n
    c0 = tl.load(ctr_ptr + 4 * i, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + 2 * i, mask=m, other=0).to(tl.uint64)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=m, other=0).to(tl.uint64)
    w0, w1, w2, w3 = tl.philox((k1 << 32) | k0, c0, c1, c2, c3)
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=m)


def philox_forward(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw tl.philox words for known-answer tests: counter int64 [n, 4], key int64 [n, 2] -> int64 [n, 4]."""
    counter, key = counter.contiguous(), key.contiguous()
    n = counter.shape[0]
    out = torch.empty((n, 4), dtype=torch.int64, device=counter.device)
    if n:
        block = 64
        _philox_kernel[(triton.cdiv(n, block),)](counter, key, out, n, BLOCK_SIZE=block)
    return out
