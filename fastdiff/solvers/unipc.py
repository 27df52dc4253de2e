"""UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector, data prediction, B(h) = h (bh1) or
e^h - 1 (bh2).

At step i the model is evaluated at the predicted x_i; UniC first corrects x_i with that evaluation (using the
previous sample x_{i-1} and earlier D's), then UniP steps from the corrected x_i with the same evaluation.
Both are affine in the registers, so they compose into one row.  Order bookkeeping follows diffusers'
UniPCMultistepScheduler: warm-up min(order, i + 1), ``lower_order_final`` min(order, steps - i), and the
corrector at step i uses the order of predictor i - 1.  Slots: the last ``order`` D's and x_{i-1}.
"""

import math

import numpy as np

from .registry import LOWER_ORDER_FINAL, Option, _int_in, _one_of, solver


def _unipc_rhs(rks, h, order, bh):
    """R (order x order, rows rks^(k-1)) and b (h phi_{k+1}(h) k! / B(h)) of UniPC's linear conditions."""
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = hh if bh == "bh1" else math.expm1(hh)
    R, rhs, fact = [], [], 1
    for k in range(1, order + 1):
        R.append(np.asarray(rks, dtype=np.float64) ** (k - 1))
        rhs.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return np.array(R), np.array(rhs), h_phi_1, B_h


def _multistep_terms(g, Ds, i, i_s0, h, p, m0):
    """rks and D1s = (D_{s0-k} - m0) / r_k for k = 1..p-1 (the history of UniP/UniC); at step i, D_j = Ds[i - j]."""
    rks, D1s = [], []
    for k in range(1, p):
        rk = (g.lam[i_s0 - k] - g.lam[i_s0]) / h
        rks.append(rk)
        D1s.append((Ds[i - i_s0 + k] - m0) / rk)
    return rks + [1.0], D1s


@solver("unipc", alpha_zero=True,
        order=Option(2, _int_in(1, 4), "order must be 1, 2, 3 or 4"),
        solver_type=Option("bh2", _one_of("bh1", "bh2"), "solver_type must be 'bh1' or 'bh2'"),
        lower_order_final=LOWER_ORDER_FINAL,
        disable_corrector=Option((), lambda v: isinstance(v, tuple), "disable_corrector must be a tuple of steps"))
def unipc(b, g, order, solver_type, lower_order_final, disable_corrector):
    Ds = b.history("D", order)  # Ds[j]: D of step i - j
    x_prev = b.slot("x_prev")  # the corrected x_{i-1}

    orders = []
    for i in range(g.steps):
        p = min(order, g.steps - i) if lower_order_final else order
        orders.append(min(p, i + 1))
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        x_c = X
        if i > 0 and (i - 1) not in disable_corrector:
            # UniC: correct x_i (predicted from x_{i-1}) with the model output at x_i.
            p = orders[i - 1]
            h = g.lam[i] - g.lam[i - 1]
            m0 = Ds[1]
            rks, D1s = _multistep_terms(g, Ds, i, i - 1, h, p, m0)
            R, rhs, h_phi_1, B_h = _unipc_rhs(rks, h, p, solver_type)
            rhos_c = [0.5] if p == 1 else np.linalg.solve(R, rhs)
            a_t, s_t = g.alpha[i], g.sigma[i]
            x_c = (s_t / g.sigma[i - 1]) * x_prev - (a_t * h_phi_1) * m0
            corr = (rhos_c[-1]) * (D - m0)
            for rho, d1 in zip(rhos_c[:-1], D1s):
                corr = corr + rho * d1
            x_c = x_c - (a_t * B_h) * corr
        Ds.push(D)
        slots = {x_prev: x_c}
        p = orders[i]
        a_t, s_t = g.alpha[i + 1], g.sigma[i + 1]
        if g.zero[i + 1]:
            b.update(x=D, slots=slots)
            continue
        # UniP from the corrected x_i.
        h = g.lam[i + 1] - g.lam[i]
        rks, D1s = _multistep_terms(g, Ds, i, i, h, p, D)
        R, rhs, h_phi_1, B_h = _unipc_rhs(rks, h, p, solver_type)
        x_next = (s_t / g.sigma[i]) * x_c - (a_t * h_phi_1) * D
        if D1s:
            rhos_p = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], rhs[:-1])
            pred = None
            for rho, d1 in zip(rhos_p, D1s):
                pred = rho * d1 if pred is None else pred + rho * d1
            x_next = x_next - (a_t * B_h) * pred
        b.update(x=x_next, slots=slots)
