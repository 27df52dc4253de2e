"""Probability-flow ODE solvers in k-diffusion's sigma space (Karras et al. 2022).

With y = x / alpha and s = sigma / alpha the PF-ODE of any schedule is dy/ds = (y - D) / s = eps_hat
(EDM's choice sigma(t) = t, s(t) = 1, their Sec. 3); on the EDM schedule (alpha = 1) these are EDM Algorithms 1
and 2 literally.  Coefficients are mapped back to x = alpha y.  A step that ends on the clean point is the Euler
step, which returns D.  Euler here is algebraically DDIM with eta = 0: y + (s' - s) eps_hat = D + s' eps_hat.

CFG++ (Chung et al. 2024; ComfyUI's sample_euler_cfg_pp / sample_euler_ancestral_cfg_pp) takes the slope from the
unconditional data estimate U: y' = D + s' (y - U) / s, so the written form D + s' eps_hat(U) is the variant (with
U = D outside CFG++ builds).
"""

import math

import numpy as np

from .builder import eps_hat
from .registry import ETA1, S_NOISE, Option, _int_in, _nonneg, solver


def euler_to(D, d, alpha_next, s_next):
    """x' = alpha' (y + (s' - s) d) written as alpha' (D + s' d): finite even where alpha = 0."""
    return alpha_next * (D + s_next * d)


@solver("euler", alpha_zero=True, cfgpp=True)
def euler(b, g):
    for i in b.steps(g.steps):
        X, D, U = b.call(g.t[i], uncond=True)
        b.update(x=euler_to(D, eps_hat(X, U, g.alpha[i], g.sigma[i]), g.alpha[i + 1], g.s[i + 1]))


def _churn_gamma(s_churn, s_tmin, s_tmax, steps, s):
    return min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= s <= s_tmax else 0.0


CHURN = dict(s_churn=Option(0.0, _nonneg, "s_churn must be >= 0"),
             s_tmin=Option(0.0, _nonneg, "s_tmin must be >= 0"),
             s_tmax=Option(math.inf, lambda v: _nonneg(v) or v == math.inf, "s_tmax must be >= 0"),
             s_noise=S_NOISE)


def churn(b, g, i, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's stochastic churn before step i: returns (s_hat, t_hat, alpha_hat, sigma_hat)."""
    s_cur = g.s[i]
    gamma = _churn_gamma(s_churn, s_tmin, s_tmax, g.steps, s_cur)
    if gamma == 0:
        return s_cur, g.t[i], g.alpha[i], g.sigma[i]
    # Increase noise temporarily: s_hat = (1 + gamma) s, y_hat = y + sqrt(s_hat^2 - s^2) S_noise z.
    s_hat = s_cur * (1.0 + gamma)
    t_hat, a_hat, sg_hat = g.point_at_s(s_hat)
    b.add_noise(scale=a_hat / g.alpha[i], gain=a_hat * math.sqrt(s_hat**2 - s_cur**2) * s_noise)
    return s_hat, t_hat, a_hat, sg_hat


def churned_first_stage(b, g, i, churn_opts):
    """Churn, call the model at the churned level; a step ending on the clean point is finished with Euler.

    Returns None when the step is done, else (X, D, d, s_hat, a_hat) for the solver's second stage.
    """
    s_hat, t_hat, a_hat, sg_hat = churn(b, g, i, **churn_opts)
    X, D = b.call(t_hat, a_hat, sg_hat)
    d = eps_hat(X, D, a_hat, sg_hat)
    if g.zero[i + 1]:
        b.update(x=euler_to(D, d, g.alpha[i + 1], g.s[i + 1]))
        return None
    return X, D, d, s_hat, a_hat


def slope_or_finish(b, g, i):
    """Call the model at step i's start; a step ending on the clean point is finished with D (returns None), else
    returns (X, D, d) with d the slope dy/ds = eps_hat there (from U in a CFG++ build)."""
    X, D, U = b.call(g.t[i], uncond=True)
    if g.zero[i + 1]:
        b.update(x=D)
        return None
    return X, D, eps_hat(X, U, g.alpha[i], g.sigma[i])


@solver("heun", **CHURN)
def heun(b, g, **churn_opts):
    """EDM Algorithm 2 (stochastic when s_churn > 0)."""
    y_hat, d_cur = b.slot("y_hat"), b.slot("d")
    for i in b.steps(g.steps):
        s_next, a_next = g.s[i + 1], g.alpha[i + 1]
        first = churned_first_stage(b, g, i, churn_opts)
        if first is None:
            continue
        X, D, d, s_hat, a_hat = first
        # Euler step from s_hat to s_next, then the second-order correction at s_next.
        b.update(x=euler_to(D, d, a_next, s_next), slots={y_hat: X / a_hat, d_cur: d})
        X, D = b.call(g.t[i + 1])
        d_prime = eps_hat(X, D, a_next, g.sigma[i + 1])
        b.update(x=a_next * (y_hat + (s_next - s_hat) * 0.5 * (d_cur + d_prime)))


@solver("rk4")
def rk4(b, g):
    """Classical Runge-Kutta 4 on dy/ds = eps_hat."""
    y_i, ks = b.slot("y_i"), b.slot("k1 + 2 k2 + 2 k3")
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        k1 = eps_hat(X, D, g.alpha[i], g.sigma[i])
        if g.zero[i + 1]:
            b.update(x=euler_to(D, k1, 1.0, 0.0))
            continue
        s, s_next, a, a_next = g.s[i], g.s[i + 1], g.alpha[i], g.alpha[i + 1]
        h = s_next - s
        t_mid, a_mid, sg_mid = g.point_at_s(s + h / 2)
        y = X / a
        b.update(x=a_mid * (y + (h / 2) * k1), slots={y_i: y, ks: k1})
        X, D = b.call(t_mid, a_mid, sg_mid)
        k2 = eps_hat(X, D, a_mid, sg_mid)
        b.update(x=a_mid * (y_i + (h / 2) * k2), slots={ks: ks + 2.0 * k2})
        X, D = b.call(t_mid, a_mid, sg_mid)
        k3 = eps_hat(X, D, a_mid, sg_mid)
        b.update(x=a_next * (y_i + h * k3), slots={ks: ks + 2.0 * k3})
        X, D = b.call(g.t[i + 1])
        k4 = eps_hat(X, D, a_next, g.sigma[i + 1])
        b.update(x=a_next * (y_i + (h / 6) * (ks + k4)))


def ancestral_split(s_from, s_to, eta):
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = s_to^2."""
    if s_to == 0 or eta == 0:
        return s_to, 0.0
    up = min(s_to, eta * s_to * math.sqrt(1.0 - (s_to / s_from) ** 2))  # finite limit eta s_to as s_from -> inf
    return math.sqrt(s_to**2 - up**2), up


@solver("euler_ancestral", alpha_zero=True, cfgpp=True, eta=ETA1, s_noise=S_NOISE)
def euler_ancestral(b, g, eta, s_noise):
    for i in b.steps(g.steps):
        X, D, U = b.call(g.t[i], uncond=True)
        down, up = ancestral_split(g.s[i], g.s[i + 1], eta)
        d = eps_hat(X, U, g.alpha[i], g.sigma[i])
        # Euler to sigma_down, then add noise back up to sigma_{i+1} (in y = x / alpha).
        b.update(x=euler_to(D, d, g.alpha[i + 1], down), noise=g.alpha[i + 1] * up * s_noise)


@solver("dpm_2", **CHURN)
def dpm_2(b, g, **churn_opts):
    """k-diffusion's sample_dpm_2: a midpoint (in log sigma) second-order step."""
    y_hat = b.slot("y_hat")
    for i in b.steps(g.steps):
        s_next, a_next = g.s[i + 1], g.alpha[i + 1]
        first = churned_first_stage(b, g, i, churn_opts)
        if first is None:
            continue
        X, D, d, s_hat, a_hat = first
        s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_next)))
        t_mid, a_mid, sg_mid = g.point_at_s(s_mid)
        y = X / a_hat
        b.update(x=a_mid * (y + (s_mid - s_hat) * d), slots={y_hat: y})
        X, D = b.call(t_mid, a_mid, sg_mid)
        b.update(x=a_next * (y_hat + (s_next - s_hat) * eps_hat(X, D, a_mid, sg_mid)))


def lms_coefficients(s, i, order):
    """Integrals over [s_i, s_{i+1}] of the Lagrange basis on s_i, s_{i-1}, .. (exact polynomial integration)."""
    nodes = [s[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        poly = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                poly *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        antider = poly.integ()
        coeffs.append(float(antider(s[i + 1]) - antider(s[i])))
    return coeffs


def _past_sigmas(v):
    return isinstance(v, tuple) and all(isinstance(e, float) and math.isfinite(e) and e > 0 for e in v)


@solver("lms", order=Option(4, _int_in(1, 6), "order must be an integer in 1..6"),
        past_sigmas=Option((), _past_sigmas, "past_sigmas must be a tuple of positive floats"))
def lms(b, g, order, past_sigmas):
    """k-diffusion's linear multistep (Adams-Bashforth in sigma) over the last ``order`` slopes d.

    ``past_sigmas``: the sigmas (s) before the grid's first point, oldest first, of a run started late.  diffusers'
    LMS started at a begin index takes its Lagrange nodes from them too (order min(begin + i + 1, order)) while it has
    only the slopes since the start (the missing ones weigh 0); () is k-diffusion's warm-up.
    """
    ds = b.history("d", order - 1)
    s_all, P = list(past_sigmas) + list(g.s), len(past_sigmas)
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        d = eps_hat(X, D, g.alpha[i], g.sigma[i])
        cur = min(P + i + 1, order)
        c = lms_coefficients(s_all, P + i, cur)
        y_next = X / g.alpha[i] + c[0] * d
        for j in range(1, min(i + 1, cur)):
            y_next = y_next + c[j] * ds[j]
        ds.push(d)
        b.update(x=g.alpha[i + 1] * y_next)
