"""Dynamic thresholding checks shared by the kernel tests (torch reference, cpu, triton, cuda): an independent float64
reference of one stage with Imagen's thresholding, written from the formulas in numpy (not through fastdiff.ops), and
inputs that put the per-sample thresholds in all three regimes (clamped to 1, interior quantile, clamped to max).

Imported as ``from threshold_ref import ...`` (tests/ is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import numpy as np
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S

RATIO, MAX_VALUE = 0.9, 3.0
# per-sample scales of D: quantile(|D|, 0.9) of a normal is ~1.64 scale -> thresholds 1 (min), ~2.5, 3 (max)
D_SCALES = (0.5, 1.5, 4.0)
SEEDS = [3, 2**64 - 5, (1 << 40) + 7, 12345]
# |kernel - ref64| <= TOL * (1 + max |ref64| of the sample): a few ulp of the storage dtype (fp32: room for the
# kernels' normals differing from fastdiff.rng's by an ulp or two)
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def imagen_threshold64(D: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Saharia et al. 2022 (Imagen), dynamic thresholding: s = the ratio-quantile of |x0| per sample, at least 1
    (and at most max_value, diffusers' sample_max_value); x0 = clip(x0, -s, s) / s."""
    B = D.shape[0]
    s = np.quantile(np.abs(D.reshape(B, -1)), ratio, axis=1)  # numpy's default: linear interpolation
    s = np.clip(s, 1.0, max_value).reshape((B,) + (1,) * (D.ndim - 1))
    return np.clip(D, -s, s) / s


def step64(x, out, slots, rows, seeds, draws, guidance, flags, cfg, ratio=None, max_value=None):
    """One stage in float64 numpy from the row layout [cx, co, g, snr, r, lsx, lsD, M (1+K) x (2+K)]:
    D = cx x + co out (CFG: out_u + w (out_c - out_u)), thresholded when ``ratio`` is given; x' = M[0].[x, D, S]
    + g z (+ eps s + sqrt(2 eps) z, eps = 2 r (snr ||z|| / ||s||)^2, s = lsx x + lsD D); S_i = M[1+i].[x, D, S].
    Returns (x', {slot index: new value})."""
    f64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    x, out, slots = f64(x), f64(out), f64(slots)
    B, K, nd = x.shape[0], slots.shape[0], x.ndim
    R = np.broadcast_to(f64(rows), (B, rows.shape[1]))

    def col(v):
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (B,)).reshape((B,) + (1,) * (nd - 1))

    regs = [x, None] + [slots[i] if (flags["slot_reads"] >> i) & 1 else None for i in range(K)]
    if flags["use_out"]:
        o = out
        if cfg:
            w = col(f64(guidance))
            o = out[:B] + w * (out[B:] - out[:B])
        D = col(R[:, 0]) * x + col(R[:, 1]) * o
        regs[1] = D if ratio is None else imagen_threshold64(D, ratio, max_value)
    M = R[:, 7:].reshape(B, 1 + K, 2 + K)

    def combo(r):
        return sum(col(M[:, r, j]) * reg for j, reg in enumerate(regs) if reg is not None) + 0.0 * x

    x_new = combo(0)
    if flags["noise"] or flags["langevin"]:
        d = draws.cpu().expand(B)
        z = rng.normals_per_sample(seeds.cpu(), d.clamp(min=0), x[0].size).double().numpy().reshape(x.shape)
        z = z * col((d >= 0).double().numpy())
        x_new = x_new + col(R[:, 2]) * z
        if flags["langevin"]:
            s = col(R[:, 5]) * x + col(R[:, 6]) * (regs[1] if regs[1] is not None else 0.0)
            norm = lambda t: np.sqrt((t.reshape(B, -1) ** 2).sum(axis=1))  # noqa: E731
            snr = R[:, 3]
            with np.errstate(divide="ignore", invalid="ignore"):
                eps = np.where(snr != 0, 2.0 * R[:, 4] * (snr * norm(z) / norm(s)) ** 2, 0.0)
            x_new = x_new + col(eps) * s + col(np.sqrt(2.0 * eps)) * z
    return x_new, {i: combo(1 + i) for i in range(K) if (flags["slot_writes"] >> i) & 1}


# (name, plan, stage): no slots, slot read + write, noise, Langevin (the thresholded D enters the score), flow
CASES = {
    "ddim": (lambda: fd.plan("ddim", S.DiscreteVP(), 4), 1),
    "dpmpp_2m": (lambda: fd.plan("dpmpp_2m", S.EDM(), 4), 2),
    "euler_ancestral": (lambda: fd.plan("euler_ancestral", S.EDM(), 4), 1),
    "pc": (lambda: fd.plan("pc", S.VE(), 3, corrector_steps=1), None),  # None: its first Langevin stage
    "flow_euler": (lambda: fd.plan("flow_euler", S.RectifiedFlow(), 3, prediction="flow"), 1),
}


def case_stage(name):
    make, k = CASES[name]
    plan = make()
    if k is None:
        k = next(k for k in range(plan.num_stages) if plan.langevin[k, 0] != 0 and plan.calls_model[k])
    flags = dict(slot_reads=plan.slot_reads(k), slot_writes=plan.slot_writes(k), use_out=bool(plan.calls_model[k]),
                 noise=bool(plan.draw[k] >= 0), langevin=bool(plan.langevin[k, 0] != 0))
    return plan, k, flags


def stage_inputs(name, shape, dtype, device, cfg=False):
    """Inputs of the case's stage whose D has the per-sample scales D_SCALES (the model output is solved for)."""
    plan, k, flags = case_stage(name)
    B = shape[0]
    g = torch.Generator().manual_seed(sum(shape) + len(name))
    rows64 = torch.tensor(plan.rows()[k : k + 1], dtype=torch.float64)
    cx, co = float(rows64[0, 0]), float(rows64[0, 1])
    assert co != 0.0
    x = torch.randn(shape, generator=g, dtype=torch.float64)  # unit scale: fp32 rounding stays near an ulp
    scale = torch.tensor([D_SCALES[b % len(D_SCALES)] for b in range(B)], dtype=torch.float64)
    D = scale.reshape((B,) + (1,) * (len(shape) - 1)) * torch.randn(shape, generator=g, dtype=torch.float64)
    out = (D - cx * x) / co
    guidance = torch.zeros(1)
    if cfg:  # out_u + w (out_c - out_u) = out
        w = torch.linspace(1.5, 7.5, B, dtype=torch.float64)
        delta = torch.randn(shape, generator=g, dtype=torch.float64)
        wb = w.reshape((B,) + (1,) * (len(shape) - 1))
        out = torch.cat([out - wb * delta, out + (1.0 - wb) * delta])
        guidance = w.float()
    slots = torch.randn((plan.num_slots,) + tuple(shape), generator=g, dtype=torch.float64)
    seeds = rng.seeds_tensor(SEEDS[:B] if B <= len(SEEDS) else list(range(1, B + 1)), device=device)
    return dict(x=x.to(dtype).to(device), out=out.to(dtype).to(device), slots=slots.to(dtype).to(device),
                rows=rows64.float().to(device), seeds=seeds,
                draws=torch.tensor([int(plan.draw[k])], dtype=torch.int64, device=device),
                guidance=guidance.to(device)), flags


def assert_stage_close(got, ref, dtype, what):
    """|got - ref| <= TOL[dtype] * (1 + max |ref| of the sample), with the worst element in the message."""
    got = got.detach().cpu().double().numpy()
    B = ref.shape[0]
    scale = 1.0 + np.abs(ref).reshape(B, -1).max(axis=1).reshape((B,) + (1,) * (ref.ndim - 1))
    err = np.abs(got - ref)
    bad = err > TOL[dtype] * scale
    if bad.any():
        i = np.unravel_index(np.argmax(err / scale), ref.shape)
        raise AssertionError(f"{what}: {int(bad.sum())}/{ref.size} elements off; worst at {i}: got {got[i]:.9g}, "
                             f"ref {ref[i]:.9g}, |err| {err[i]:.3g} > {TOL[dtype] * scale[i[0]].item():.3g}")


def check_thresholded_stage(step, name, shape, dtype, device, cfg=False):
    """The backend's ``step`` (OPS signature) with the thresholds of ``ops.dynamic_threshold`` against step64 with
    Imagen's thresholding in float64, from the same inputs; x' and every written slot; unwritten slots untouched."""
    inp, flags = stage_inputs(name, shape, dtype, device, cfg)
    thr = ops.dynamic_threshold(inp["x"], inp["out"], inp["rows"], inp["guidance"], cfg, RATIO, MAX_VALUE)
    assert thr.dtype == torch.float32 and thr.shape == (shape[0],) and thr.device == inp["x"].device
    ref, ref_slots = step64(**inp, flags=flags, cfg=cfg, ratio=RATIO, max_value=MAX_VALUE)
    plain, _ = step64(**inp, flags=flags, cfg=cfg)
    assert not np.allclose(ref, plain), f"{name}: thresholding changed nothing, the check would be vacuous"
    slots = inp["slots"].clone()
    got = step(inp["x"], inp["out"], slots, inp["rows"], inp["seeds"], inp["draws"], inp["guidance"],
               flags["slot_reads"], flags["slot_writes"], flags["use_out"], cfg, flags["noise"], flags["langevin"],
               thresholds=thr)
    what = f"{name} {dtype} {tuple(shape)} cfg={cfg}"
    assert got.dtype == dtype and got.shape == inp["x"].shape
    assert_stage_close(got, ref, dtype, what + " x'")
    for i in range(slots.shape[0]):
        if i in ref_slots:
            assert_stage_close(slots[i], ref_slots[i], dtype, what + f" slot {i}")
        else:
            assert torch.equal(slots[i], inp["slots"][i]), f"{what}: slot {i} changed without its write bit"
