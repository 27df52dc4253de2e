"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models"), in the
form of ComfyUI's sample_sa_solver / sample_sa_solver_pece.

k-diffusion's variables y = x / alpha, s = sigma / alpha, lambda = -log s.  The SDE with stochasticity tau in data
prediction is solved by an exponential integrator whose D is a Lagrange polynomial in lambda through earlier model
outputs:

    y_t = (s_t / s_s) e^{-tau^2 h} y_s + sum_j b_j D_j + s_t sqrt(1 - e^{-2 tau^2 h}) s_noise z,
    b_j = int_{lambda_s}^{lambda_t} (1 + tau^2) e^{(1 + tau^2)(lambda - lambda_t)} L_j(lambda) dlambda.

Each step calls the model at the predicted state, then the corrector redoes the previous step with that output as
one more node (an implicit Adams step, the predictor's noise reused), and the predictor steps on from the corrected
state.  ``sa_solver_pece`` calls the model again at the corrected state and uses that output instead.  tau = eta
where s lies in the window [s(end percent), s(start percent)] and 0 elsewhere; a percent p is the schedule time
t_max - p (t_max - t_min) (ComfyUI's rule for discrete and flow models; its EDM models take log sigma instead).
With a final clean point the orders are lowered towards the end (predictor <= steps - 1 - i, corrector <=
steps - i), and the last step returns D.
"""

import math

import numpy as np

from .registry import S_NOISE, Option, _flag, _int_in, _nonneg, _real, solver

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(10)


def sa_weights(nodes, lam_s, lam_t, tau):
    """b_j = int_{lam_s}^{lam_t} c e^{c (lam - lam_t)} L_j(lam) dlam, c = 1 + tau^2, L_j the Lagrange basis on
    ``nodes``: composite Gauss-Legendre over pieces of length <= 1 / c (resolves the exponential to rounding)."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    pieces = max(1, math.ceil(c * h))
    edges = np.linspace(lam_s, lam_t, pieces + 1)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
    u = (mid[:, None] + half[:, None] * _GL_NODES).ravel()
    w = (half[:, None] * _GL_WEIGHTS).ravel() * c * np.exp(c * (u - lam_t))
    out = []
    for j in range(len(nodes)):
        basis = np.ones_like(u)
        for k in range(len(nodes)):
            if k != j:
                basis *= (u - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float(np.dot(w, basis)))
    return out


def simple_order2_weights(lam_prev, lam_s, lam_t, tau, corrector):
    """ComfyUI's simple order-2 weights (the paper's Appendix D), ordered as the nodes (older, newer)."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    total = -math.expm1(-c * h)
    if corrector:
        newer = 0.5 * c * h
        return [total - newer, newer]
    older = 0.5 * c * h * h / (lam_prev - lam_s)
    return [older, total - older]


def _tau_window(g, eta, start_percent, end_percent):
    sch = g.schedule
    t_max, t_min = float(sch.t_max), float(sch.t_min)

    def s_at(p):
        t = t_max - p * (t_max - t_min)
        return float(sch.sigma(t)) / float(sch.alpha(t))

    s_hi, s_lo = s_at(start_percent), s_at(end_percent)
    return lambda s: eta if eta > 0 and s_hi >= s >= s_lo else 0.0


def _sa_solver(b, g, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
               simple_order_2, pece):
    tau_of = _tau_window(g, eta, sde_start_percent, sde_end_percent)
    n_hist = max(predictor_order, corrector_order)
    Ds = b.history("D", n_hist - 1)  # Ds[j]: the model output used at step i - j
    y_prev = b.slot("y_corrected")  # the corrected state at the previous boundary, in y = x / alpha
    y_mean = b.slot("y_pred_mean")  # the prediction without its noise: the corrector adds the same noise back
    lower = bool(g.zero[-1])
    tau_prev, prev_noisy = 0.0, False

    def weights(i_new, order, lam_s, lam_t, tau, corrector):
        nodes = [g.lam[i_new - k] for k in range(order - 1, -1, -1)]  # oldest first, as the weights come back
        if simple_order_2 and order == 2:
            w = simple_order2_weights(nodes[0], lam_s, lam_t, tau, corrector)
        else:
            w = sa_weights(nodes, lam_s, lam_t, tau)
        return w[::-1]  # newest first

    for i in b.steps(g.steps):
        a_i, s_i = g.alpha[i], g.s[i]
        X, D = b.call(g.t[i])
        avail = min(i + 1, n_hist)
        p_used = min(predictor_order, avail)
        c_used = 0 if i == 0 or (g.zero[i + 1] and not pece) else min(corrector_order, avail)
        if lower:
            p_used, c_used = min(p_used, g.steps - 1 - i), min(c_used, g.steps - i)
        hist = [D] + [Ds[j] for j in range(1, avail)]  # newest first

        # Corrector: redo step i - 1 -> i from the corrected y with the new output as one more node.
        y_c = X / a_i
        if c_used > 0:
            h_prev = g.lam[i] - g.lam[i - 1]
            w = weights(i, c_used, g.lam[i - 1], g.lam[i], tau_prev, True)
            y_c = (s_i / g.s[i - 1]) * math.exp(-tau_prev**2 * h_prev) * y_prev
            for k in range(c_used):
                y_c = y_c + w[k] * hist[k]
            if prev_noisy:  # the predictor's noise: the prediction minus its mean
                y_c = y_c + (X / a_i - y_mean)
            if pece:  # evaluate at the corrected state; its output replaces this step's
                b.update(x=a_i * y_c)
                X, D = b.call(g.t[i])
                hist[0], y_c = D, X / a_i

        # Predictor: step i -> i + 1 from the corrected state.
        Ds.push(hist[0])
        if g.zero[i + 1]:
            b.update(x=hist[0])
            continue
        tau = tau_of(g.s[i + 1])
        h = g.lam[i + 1] - g.lam[i]
        y_next = (g.s[i + 1] / s_i) * math.exp(-tau * tau * h) * y_c
        if p_used > 0:
            w = weights(i, p_used, g.lam[i], g.lam[i + 1], tau, False)
            for k in range(p_used):
                y_next = y_next + w[k] * hist[k]
        noise = g.s[i + 1] * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) * s_noise if tau > 0 else 0.0
        b.update(x=g.alpha[i + 1] * y_next, slots={y_prev: y_c, y_mean: y_next}, noise=g.alpha[i + 1] * noise)
        tau_prev, prev_noisy = tau, noise > 0


def _percent(v):
    return _real(v) and 0.0 <= v <= 1.0


SA_OPTIONS = dict(
    eta=Option(1.0, _nonneg, "eta (tau inside the window) must be a finite number >= 0; 0 gives the ODE"),
    sde_start_percent=Option(0.2, _percent, "sde_start_percent must be in [0, 1]"),
    sde_end_percent=Option(0.8, _percent, "sde_end_percent must be in [0, 1]"),
    s_noise=S_NOISE,
    predictor_order=Option(3, _int_in(1, 6), "predictor_order must be an integer in 1..6"),
    corrector_order=Option(4, _int_in(0, 6), "corrector_order must be an integer in 0..6"),
    simple_order_2=Option(False, _flag, "simple_order_2 must be True or False"),
)


@solver("sa_solver", **SA_OPTIONS)
def sa_solver(b, g, **opts):
    """SA-Solver predictor-corrector (ComfyUI's sample_sa_solver): one model call per step."""
    _sa_solver(b, g, pece=False, **opts)


@solver("sa_solver_pece", **SA_OPTIONS)
def sa_solver_pece(b, g, **opts):
    """SA-Solver predict-evaluate-correct-evaluate (ComfyUI's sample_sa_solver_pece): two model calls per step
    after the first."""
    _sa_solver(b, g, pece=True, **opts)
