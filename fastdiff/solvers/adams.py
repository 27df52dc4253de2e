"""Adams-Bashforth multistep solvers on the noise estimate: iPNDM, iPNDM-v, DEIS (tAB) and PNDM / PLMS.

All keep the last few noise estimates eps_hat = (x - alpha D) / sigma (k-diffusion's dy/ds with y = x / alpha,
s = sigma / alpha) in a history ring and combine them with Adams-Bashforth weights:

- ``ipndm`` (Zhang & Chen 2023, improved PNDM): fixed-step AB weights of order min(max_order, i + 1) on dy/ds,
  y' = y + (s' - s) sum_j c_j d_{i-j}, whatever the step sizes (as ComfyUI's sample_ipndm).
- ``ipndm_v``: the variable-step weights of ComfyUI's sample_ipndm_v, kept as practitioners get them: exact
  variable-step AB at order 2; at order 3 AB3 on equal steps but not the variable-step AB3 weights elsewhere; the
  order-4 weights are (57, -65, 43, -11) / 24 on equal steps (AB4: (55, -59, 37, -9) / 24) and sum to 1 only where
  the last steps are in geometric progression (log-SNR-uniform grids), so with the default max_order=4 the step is
  inconsistent on other grids.  The exact variable-step Adams-Bashforth in sigma is ``lms``.
- ``deis`` (Zhang & Chen 2023, DEIS "tAB"): the noise estimate is extrapolated by a polynomial in DEIS' VP time tau
  and integrated exactly in s: y' = y + sum_j C_j d_{i-j}, C_j = int_{s_i}^{s_{i+1}} L_j(tau(s)) ds, L_j the
  Lagrange basis on tau_i, tau_{i-1}, ...  tau(s) is the time of the VP-SDE fitted to s = 0.002 at tau = 1e-3 and
  s = 80 at tau = 1 (ComfyUI's deis.py), whatever the model's schedule.
- ``deis_logrho`` (diffusers' DEISMultistepScheduler): the noise estimate extrapolated by a polynomial in
  log rho (rho = sigma / alpha = k-diffusion's sigma) and integrated exactly in rho, orders 1-3, warm-up
  min(order, i + 1); ``lower_order_final`` lowers the last two steps to orders 1 and 2 (diffusers does so below 15
  steps of its whole schedule, which the caller decides).
- ``pndm`` / ``plms`` (Liu et al. 2022): the pseudo transfer phi (DDIM's step from s to t with a given eps) applied
  with the 4-step AB combination of eps; ``pndm`` warms up with three pseudo Runge-Kutta steps (4 calls each,
  at t, the time midpoint twice, and the step's end), ``plms`` with diffusers' skip_prk_steps scheme (a repeated
  call at the first step's end averages the two eps, then AB2, AB3).

A step that ends on the clean point returns D, except for PNDM / PLMS whose transfer is finite there (diffusers
applies the AB combination on that step too).
"""

import math

import numpy as np

from .builder import eps_hat
from .ode import slope_or_finish
from .registry import LOWER_ORDER_FINAL, Option, _int_in, solver

# Fixed-step Adams-Bashforth weights on [d_i, d_{i-1}, ...] by order.
AB_WEIGHTS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}

MAX_ORDER4 = Option(4, _int_in(1, 4), "max_order must be an integer in 1..4")


def _sigma_space_multistep(b, g, max_order, weights):
    """y' = y + sum_j w_j d_{i-j} over the last ``max_order`` slopes; ``weights(i, o)`` gives the o weights of
    step i (already multiplied by the step size); a step to the clean point returns D."""
    ds = b.history("d", max_order - 1)  # ds[j]: d of step i - j
    for i in b.steps(g.steps):
        first = slope_or_finish(b, g, i)
        if first is None:
            continue
        X, D, d = first
        o = min(max_order, i + 1)
        w = weights(i, o)
        y_next = X / g.alpha[i] + w[0] * d
        for j in range(1, o):
            y_next = y_next + w[j] * ds[j]
        ds.push(d)
        b.update(x=g.alpha[i + 1] * y_next)


@solver("ipndm", max_order=MAX_ORDER4)
def ipndm(b, g, max_order):
    """iPNDM: fixed-step Adams-Bashforth of order min(max_order, i + 1) in k-diffusion's sigma."""
    _sigma_space_multistep(b, g, max_order, lambda i, o: [(g.s[i + 1] - g.s[i]) * c for c in AB_WEIGHTS[o]])


def ipndm_v_weights(s, i, o):
    """ComfyUI's sample_ipndm_v weights of step i (order o) on [d_i, d_{i-1}, ...], without the step size."""
    h = s[i + 1] - s[i]
    if o == 1:
        return [1.0]
    h1 = s[i] - s[i - 1]
    if o == 2:
        return [1.0 + h / (2.0 * h1), -h / (2.0 * h1)]
    h2 = s[i - 1] - s[i - 2]
    t1 = (1.0 - h * h / (3.0 * h1 * (h1 + h2))) / 2.0
    if o == 3:
        return [1.0 + h / (2.0 * h1) + t1, -h / (2.0 * h1) - (1.0 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = s[i - 2] - s[i - 3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = (((1.0 - h / (3.0 * (h + h1))) / 2.0 + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2)))
          * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    return [1.0 + h / (2.0 * h1) + t1 + t2,
            -h / (2.0 * h1) - (1.0 + h1 / h2) * t1 - (1.0 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1.0 + h2 / h3)) * t2,
            -t2 * q * h1 / h2]


@solver("ipndm_v", max_order=MAX_ORDER4)
def ipndm_v(b, g, max_order):
    """iPNDM with ComfyUI's variable-step weights (sample_ipndm_v)."""
    _sigma_space_multistep(b, g, max_order,
                           lambda i, o: [(g.s[i + 1] - g.s[i]) * c for c in ipndm_v_weights(g.s, i, o)])


# ---- DEIS (tAB) -------------------------------------------------------------------------------------------------

def deis_vp_coefficients(eps_s=1e-3, sigma_min=0.002, sigma_max=80.0):
    """(beta_d, beta_min) of the VP-SDE with s(eps_s) = sigma_min and s(1) = sigma_max, s(tau)^2 =
    exp(beta_d tau^2 / 2 + beta_min tau) - 1 (DEIS' time for EDM sigmas, as ComfyUI's deis.py fits it)."""
    beta_d = 2.0 * (math.log1p(sigma_min**2) / eps_s - math.log1p(sigma_max**2)) / (eps_s - 1.0)
    beta_min = math.log1p(sigma_max**2) - 0.5 * beta_d
    return beta_d, beta_min


def deis_tau(s):
    """DEIS' VP time of k-diffusion sigma s (array-friendly)."""
    beta_d, beta_min = deis_vp_coefficients()
    return (np.sqrt(beta_min**2 + 2.0 * beta_d * np.log1p(np.square(s))) - beta_min) / beta_d


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(20)


def _quadrature_points(a, c):
    """Gauss-Legendre nodes and weights for int_a^c ds (0 < c < a or 0 < a < c), composite over pieces whose ends
    differ by a factor <= 2: tau(s) has complex branch points near s = 0 (|s| ~ 1e-3), so one rule over an
    interval reaching down to s ~ 0.01 converges slowly."""
    lo, hi = min(a, c), max(a, c)
    edges = np.geomspace(lo, hi, max(1, math.ceil(math.log2(hi / lo))) + 1)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
    u = (mid[:, None] + half[:, None] * _GL_NODES).ravel()
    w = (half[:, None] * _GL_WEIGHTS).ravel()
    return u, (w if c > a else -w)


def deis_weights(s, i, o):
    """C_j = int_{s_i}^{s_{i+1}} L_j(tau(s)) ds for j < o (Gauss-Legendre in s; tau(s) is analytic for s > 0)."""
    u, w = _quadrature_points(s[i], s[i + 1])
    tau_u = deis_tau(u)
    nodes = [float(deis_tau(s[i - k])) for k in range(o)]
    out = []
    for j in range(o):
        basis = np.ones_like(u)
        for k in range(o):
            if k != j:
                basis *= (tau_u - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float(np.dot(w, basis)))
    return out


@solver("deis", max_order=Option(3, _int_in(1, 4), "max_order must be an integer in 1..4"))
def deis(b, g, max_order):
    """DEIS tAB of order min(max_order, i + 1) (ComfyUI's sample_deis, deis_mode='tab')."""
    _sigma_space_multistep(b, g, max_order, lambda i, o: deis_weights(g.s, i, o))


# ---- DEIS (log-rho, diffusers' form) ------------------------------------------------------------------------------

def deis_logrho_weights(rho, i, o):
    """C_j = int_{rho_i}^{rho_{i+1}} L_j(log r) dr for j < o, L_j the Lagrange basis on log rho_i, log rho_{i-1},
    ... (closed forms: int l dr = r (l - 1), int l^2 dr = r (l^2 - 2 l + 2) with l = log r)."""
    lg = [math.log(rho[i - k]) for k in range(o)]

    def antiderivative(r, j):  # int prod_{k != j} (log r - lg_k) / (lg_j - lg_k) dr
        if r == 0.0:
            return 0.0
        l = math.log(r)
        others = [lg[k] for k in range(o) if k != j]
        den = math.prod(lg[j] - c for c in others)
        if o == 1:
            return r
        if o == 2:
            return r * (l - 1.0 - others[0]) / den
        c, d = others  # (l - c)(l - d) = l^2 - (c + d) l + c d
        return r * ((l * l - 2.0 * l + 2.0) - (c + d) * (l - 1.0) + c * d) / den

    return [antiderivative(rho[i + 1], j) - antiderivative(rho[i], j) for j in range(o)]


@solver("deis_logrho", order=Option(2, _int_in(1, 3), "order must be 1, 2 or 3"),
        lower_order_final=LOWER_ORDER_FINAL)
def deis_logrho(b, g, order, lower_order_final):
    """diffusers' DEIS multistep (log-rho): x' = alpha' (x / alpha + sum_j C_j eps_{i-j})."""
    eps = b.history("eps", order - 1)
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        e = eps_hat(X, D, g.alpha[i], g.sigma[i])
        o = min(order, i + 1)
        if lower_order_final:
            o = min(o, g.steps - i)
        w = deis_logrho_weights(g.s, i, o)
        y_next = X / g.alpha[i] + w[0] * e
        for j in range(1, o):
            y_next = y_next + w[j] * eps[j]
        eps.push(e)
        b.update(x=g.alpha[i + 1] * y_next)


# ---- PNDM / PLMS ------------------------------------------------------------------------------------------------

def transfer(x, e, a_s, sg_s, a_t, sg_t):
    """PNDM's transfer phi(x, eps, s -> t) = (alpha_t / alpha_s) x + (sigma_t - alpha_t sigma_s / alpha_s) eps
    (DDIM's deterministic step; diffusers' _get_prev_sample in an algebraically equal form)."""
    return (a_t / a_s) * x + (sg_t - a_t * sg_s / a_s) * e


def _plms_step(b, g, i, X, e, ets):
    """AB combination of order min(4, pushed + 1) of eps, transferred from boundary i to i + 1."""
    o = min(4, ets.pushed + 1)
    w = AB_WEIGHTS[o]
    e_ab = w[0] * e
    for j in range(1, o):
        e_ab = e_ab + w[j] * ets[j]
    ets.push(e)
    b.update(x=transfer(X, e_ab, g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]))


@solver("plms")
def plms(b, g):
    """PLMS with diffusers' skip_prk_steps warm-up: NFE = steps + 1 (steps >= 2)."""
    ets = b.history("eps", 3)
    x_s = b.slot("x_s")
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        e = eps_hat(X, D, g.alpha[i], g.sigma[i])
        if i > 0 or g.steps == 1:
            _plms_step(b, g, i, X, e, ets)
            continue
        # first step: transfer with eps_0, call again at its end and redo it with the mean of both eps
        a_s, sg_s, a_t, sg_t = g.alpha[0], g.sigma[0], g.alpha[1], g.sigma[1]
        ets.push(e)
        b.update(x=transfer(X, e, a_s, sg_s, a_t, sg_t), slots={x_s: X})
        X, D = b.call(g.t[1])
        e1 = eps_hat(X, D, a_t, sg_t)
        b.update(x=transfer(x_s, 0.5 * (e1 + ets[1]), a_s, sg_s, a_t, sg_t))


@solver("pndm")
def pndm(b, g):
    """PNDM: three pseudo Runge-Kutta steps (4 NFE each; not on a step to the clean point), then PLMS."""
    ets = b.history("eps", 3)
    x_s, acc = b.slot("x_s"), b.slot("eps_rk")
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        a_s, sg_s = g.alpha[i], g.sigma[i]
        e = eps_hat(X, D, a_s, sg_s)
        if i >= 3 or g.zero[i + 1]:
            _plms_step(b, g, i, X, e, ets)
            continue
        a_t, sg_t = g.alpha[i + 1], g.sigma[i + 1]
        t_mid = 0.5 * (g.t[i] + g.t[i + 1])
        a_m, sg_m = g.at(t_mid)
        # e1 at x; e2 at phi(x, e1, t -> mid); e3 at phi(x, e2, t -> mid); e4 at phi(x, e3, t -> t')
        ets.push(e)
        b.update(x=transfer(X, e, a_s, sg_s, a_m, sg_m), slots={x_s: X, acc: e / 6.0})
        X, D = b.call(t_mid)
        e2 = eps_hat(X, D, a_m, sg_m)
        b.update(x=transfer(x_s, e2, a_s, sg_s, a_m, sg_m), slots={acc: acc + e2 / 3.0})
        X, D = b.call(t_mid)
        e3 = eps_hat(X, D, a_m, sg_m)
        b.update(x=transfer(x_s, e3, a_s, sg_s, a_t, sg_t), slots={acc: acc + e3 / 3.0})
        X, D = b.call(g.t[i + 1])
        e4 = eps_hat(X, D, a_t, sg_t)
        # e' = (e1 + 2 e2 + 2 e3 + e4) / 6
        b.update(x=transfer(x_s, acc + e4 / 6.0, a_s, sg_s, a_t, sg_t))
