"""SA-Solver (Xue et al. 2023, Stochastic Adams Solver; ComfyUI's sample_sa_solver / sample_sa_solver_pece), in
k-diffusion's variables y = x / alpha, sigma = s = sigma / alpha, lambda = -log sigma (so alpha_t of the VE form is 1).

The b coefficients follow the paper's eqs. (15) and (18): the integrals of e^{(1 + tau^2)(lambda - lambda_t)} lambda^p
are closed forms (integration by parts) and the Lagrange integrals come from solving the transposed Vandermonde
system, as the paper's code does.
"""

from __future__ import annotations

import math

import numpy as np

from .ode import _to_y


def _exp_moments(lam_s, lam_t, order, tau):
    """(1 + tau^2) int_{lam_s}^{lam_t} e^{(1 + tau^2)(lam - lam_t)} lam^p dlam for p < order, in lam - lam_t (so the
    moments stay small): I_p = u^p e^{c u} |_{-h}^{0} - p / c I_{p-1} (times c), I_0 = 1 - e^{-c h}."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    moments = []
    for p in range(order):
        boundary = (1.0 if p == 0 else 0.0) - (-h) ** p * math.exp(-c * h)
        moments.append(boundary - (p / c) * moments[p - 1] if p > 0 else boundary)
    return moments


def _b_coeffs(lambdas, lam_s, lam_t, tau, simple_order_2, corrector):
    """b_j for the nodes ``lambdas`` (oldest first)."""
    n = len(lambdas)
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    if simple_order_2 and n == 2:  # the paper's Appendix D
        if corrector:
            b1 = 0.5 * c * h
            return [-math.expm1(-h * c) - b1, b1]
        b2 = 0.5 * c * h * h / (lambdas[-2] - lam_s)
        return [b2, -math.expm1(-h * c) - b2]
    # sum_j b_j (lambda_j - lam_t)^p = moment_p for p < n
    nodes = np.array(lambdas, dtype=np.float64) - lam_t
    V = np.vander(nodes, n, increasing=True).T
    return list(np.linalg.solve(V, np.array(_exp_moments(lam_s, lam_t, n, tau))))


def _sa(run, x, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
        simple_order_2, use_pece, name):
    g, sch = run.grid, run.schedule
    t_max, t_min = float(sch.t_max), float(sch.t_min)

    def percent_to_sigma(p):
        t = t_max - p * (t_max - t_min)
        return float(sch.sigma(t)) / float(sch.alpha(t))

    start_sigma, end_sigma = percent_to_sigma(sde_start_percent), percent_to_sigma(sde_end_percent)

    def tau_func(sigma):
        return eta if eta > 0 and start_sigma >= sigma >= end_sigma else 0.0

    sigmas, lambdas = g.s, [-math.log(v) if v > 0 else math.inf for v in g.s]
    n = g.steps
    max_used_order = max(predictor_order, corrector_order)
    x_pred = _to_y(x, g.alpha[0], name)
    xc = x_pred
    h, tau_t, noise = 0.0, 0.0, 0.0
    pred_list = []
    lower_order_to_end = g.clean[-1]
    for i in range(n):
        denoised = run.eval(g.alpha[i] * x_pred, g.t[i]).x0
        pred_list = (pred_list + [denoised])[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        corrector_order_used = 0 if i == 0 or (g.clean[i + 1] and not use_pece) else min(corrector_order,
                                                                                        len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, n - 1 - i)
            corrector_order_used = min(corrector_order_used, n - i)
        # corrector
        if corrector_order_used == 0:
            xc = x_pred
        else:
            b = _b_coeffs(lambdas[i - corrector_order_used + 1:i + 1], lambdas[i - 1], lambdas[i], tau_t,
                          simple_order_2, True)
            res = sum(bj * d for bj, d in zip(b, pred_list[-corrector_order_used:]))
            xc = sigmas[i] / sigmas[i - 1] * math.exp(-(tau_t**2) * h) * xc + res
            if tau_t > 0 and s_noise > 0:
                xc = xc + noise  # the noise of the previous predictor step
            if use_pece:
                pred_list[-1] = run.eval(g.alpha[i] * xc, g.t[i]).x0
        # predictor
        if g.clean[i + 1]:
            x_pred = pred_list[-1]
            continue
        tau_t = tau_func(sigmas[i + 1])
        b = _b_coeffs(lambdas[i - predictor_order_used + 1:i + 1], lambdas[i], lambdas[i + 1], tau_t,
                      simple_order_2, False)
        res = sum(bj * d for bj, d in zip(b, pred_list[-predictor_order_used:]))
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-(tau_t**2) * h) * xc + res
        if tau_t > 0 and s_noise > 0:
            noise = run.noise(x_pred) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_t**2 * h)) * s_noise
            x_pred = x_pred + noise
    return g.alpha[-1] * x_pred  # (alpha = 1 at the clean point)


def sa_solver(run, x, eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, s_noise=1.0, predictor_order=3,
              corrector_order=4, simple_order_2=False):
    return _sa(run, x, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
               simple_order_2, False, "sa_solver")


def sa_solver_pece(run, x, eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, s_noise=1.0, predictor_order=3,
                   corrector_order=4, simple_order_2=False):
    return _sa(run, x, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
               simple_order_2, True, "sa_solver_pece")
