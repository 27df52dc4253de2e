"""Adams-Bashforth samplers on the noise estimate, written as their sources run them: iPNDM and iPNDM-v (Zhang &
Chen 2023; ComfyUI's sample_ipndm / sample_ipndm_v), DEIS tAB (Zhang & Chen 2023; ComfyUI's sample_deis with
deis_mode='tab') and PNDM / PLMS (Liu et al. 2022; diffusers' PNDMScheduler).

k-diffusion's variables: y = x / alpha, s = sigma / alpha, d = (y - D) / s.  PNDM / PLMS run in the unscaled x with
the transfer written as DDIM's step (eq. (9) of the paper is its VP form).
"""

from __future__ import annotations

import math

from .ode import _to_y


def _ab_sampler(run, x, max_order, weights, name):
    """A buffer of the last max_order - 1 slopes d; the step to the clean point returns D."""
    g = run.grid
    buffer = []
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0  # denoising step
            continue
        y = _to_y(x, g.alpha[i], name)
        d = (y - out.x0) / g.s[i]
        order = min(max_order, i + 1)
        c = weights(g.s, i, order)
        # x_next = x_cur + sum_j c_j d_{i-j}
        y = y + c[0] * d + sum(c[j] * buffer[-j] for j in range(1, order))
        buffer.append(d)
        buffer = buffer[-(max_order - 1):] if max_order > 1 else []
        x = g.alpha[i + 1] * y
    return x


def ipndm(run, x, max_order=4):
    """Fixed-step Adams-Bashforth weights times the step in sigma, orders 1..4 as the buffer fills."""
    ab = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    den = {1: 1, 2: 2, 3: 12, 4: 24}

    def weights(s, i, order):
        return [(s[i + 1] - s[i]) * a / den[order] for a in ab[order]]

    return _ab_sampler(run, x, max_order, weights, "ipndm")


def _ipndm_v_coeffs(s, i, order):
    """sample_ipndm_v's coefficients (h_n = s_{i+1} - s_i, h_{n-k} the earlier steps)."""
    hn = s[i + 1] - s[i]
    if order == 1:
        return [1.0]
    hn1 = s[i] - s[i - 1]
    base1, base2 = (2 + hn / hn1) / 2, -(hn / hn1) / 2
    if order == 2:
        return [base1, base2]
    hn2 = s[i - 1] - s[i - 2]
    temp1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
    if order == 3:
        return [base1 + temp1, base2 - (1 + hn1 / hn2) * temp1, temp1 * hn1 / hn2]
    hn3 = s[i - 2] - s[i - 3]
    temp2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))) \
        * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
    ratio = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
    return [base1 + temp1 + temp2,
            base2 - (1 + hn1 / hn2) * temp1 - (1 + hn1 / hn2 + ratio) * temp2,
            temp1 * hn1 / hn2 + (hn1 / hn2 + ratio * (1 + hn2 / hn3)) * temp2,
            -temp2 * ratio * hn1 / hn2]


def ipndm_v(run, x, max_order=4):
    """Variable-step iPNDM: the step in sigma times sample_ipndm_v's coefficients."""
    return _ab_sampler(run, x, max_order, lambda s, i, o: [(s[i + 1] - s[i]) * c for c in _ipndm_v_coeffs(s, i, o)],
                       "ipndm_v")


# ---- DEIS tAB --------------------------------------------------------------------------------------------------


def _deis_vp(eps_s=1e-3, sigma_min=0.002, sigma_max=80.0):
    """DEIS' VP-SDE for EDM sigmas: alpha-bar(tau) = exp(-beta_d tau^2 / 2 - beta_min tau) with sigma(eps_s) =
    sigma_min, sigma(1) = sigma_max (sigma^2 = 1 / alpha-bar - 1)."""
    lmax, lmin = math.log(sigma_max**2 + 1), math.log(sigma_min**2 + 1)
    beta_d = 2 * (lmin / eps_s - lmax) / (eps_s - 1)
    return beta_d, lmax - 0.5 * beta_d


def _deis_coeffs(s, i, order):
    """C_j = int_{tau_i}^{tau_{i+1}} d sigma / d tau * prod_{k != j} (tau - tau_{i-k}) / (tau_{i-j} - tau_{i-k}) dtau,
    with d sigma / d tau = -1/2 (d log alpha-bar / d tau) / sqrt(alpha-bar (1 - alpha-bar)) (DEIS eq. for the
    EDM ODE in sigma); adaptive quadrature."""
    from scipy import integrate  # lazily: only the DEIS reference needs it

    beta_d, beta_min = _deis_vp()

    def tau_of(sigma):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(sigma**2 + 1)) - beta_min) / beta_d

    def dsigma_dtau(tau):
        abar = math.exp(-0.5 * beta_d * tau * tau - beta_min * tau)
        return 0.5 * (beta_d * tau + beta_min) / math.sqrt(abar * (1 - abar))

    taus = [tau_of(s[i - k]) for k in range(order)]
    out = []
    for j in range(order):
        def f(tau, j=j):
            p = dsigma_dtau(tau)
            for k in range(order):
                if k != j:
                    p *= (tau - taus[k]) / (taus[j] - taus[k])
            return p

        out.append(integrate.quad(f, tau_of(s[i]), tau_of(s[i + 1]), epsabs=0.0, epsrel=1e-13, limit=200)[0])
    return out


def deis(run, x, max_order=3):
    """DEIS tAB: x_next = x_cur + sum_j C_j d_{i-j} (order min(max_order, i + 1); Euler to the clean point)."""
    return _ab_sampler(run, x, max_order, _deis_coeffs, "deis")


def _deis_logrho_coeffs(s, i, order):
    """C_j = int_{rho_i}^{rho_{i+1}} prod_{k != j} (log r - log rho_{i-k}) / (log rho_{i-j} - log rho_{i-k}) dr
    (diffusers' DEISMultistepScheduler, rho = k-diffusion's sigma); adaptive quadrature in r."""
    from scipy import integrate

    logs = [math.log(s[i - k]) for k in range(order)]
    out = []
    for j in range(order):
        def f(r, j=j):
            p = 1.0
            for k in range(order):
                if k != j:
                    p *= (math.log(r) - logs[k]) / (logs[j] - logs[k])
            return p

        out.append(integrate.quad(f, s[i], s[i + 1], epsabs=0.0, epsrel=1e-13, limit=200)[0])
    return out


def deis_logrho(run, x, order=2, lower_order_final=True):
    """diffusers' DEIS (log-rho): y' = y + sum_j C_j eps_{i-j} in y = x / alpha, eps the noise estimate; orders
    min(order, i + 1), and with ``lower_order_final`` at most 1 and 2 on the last two steps."""
    g = run.grid
    buffer = []
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        y = _to_y(x, g.alpha[i], "deis_logrho")
        eps = (y - out.x0) / g.s[i]  # (x - alpha x0) / sigma
        o = min(order, i + 1, g.steps - i) if lower_order_final else min(order, i + 1)
        c = _deis_logrho_coeffs(g.s, i, o)
        y = y + c[0] * eps + sum(c[j] * buffer[-j] for j in range(1, o))
        buffer = (buffer + [eps])[-2:]
        x = g.alpha[i + 1] * y
    return x


# ---- PNDM / PLMS -------------------------------------------------------------------------------------------------


def _prev_sample(x, eps, pt, pt_prev):
    """PNDM's transfer phi (Liu et al. 2022, eq. (9)) in DDIM's form: x0 = (x - sigma eps) / alpha, then
    x_prev = alpha_prev x0 + sigma_prev eps; pt = (alpha, sigma) at t, pt_prev at the target."""
    (a, sg), (a_prev, sg_prev) = pt, pt_prev
    return a_prev * (x - sg * eps) / a + sg_prev * eps


def _ab_eps(ets):
    """The linear multistep combination of the last (up to four) eps, newest last."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24


def _pt(g, i):
    if g.alpha[i] == 0:
        raise ValueError("reference pndm / plms: alpha = 0 at a step start; the transfer divides by it")
    return g.alpha[i], g.sigma[i]


def plms(run, x):
    """diffusers' PNDMScheduler with skip_prk_steps: the first step is redone with the mean of eps at both ends."""
    g = run.grid
    ets = []
    for i in range(g.steps):
        eps = run.eval(x, g.t[i]).eps
        ets = (ets + [eps])[-4:]
        if i == 0 and g.steps > 1:
            x_prev = _prev_sample(x, eps, _pt(g, 0), _pt(g, 1))
            eps_1 = run.eval(x_prev, g.t[1]).eps
            x = _prev_sample(x, (eps_1 + eps) / 2, _pt(g, 0), _pt(g, 1))
            continue
        x = _prev_sample(x, _ab_eps(ets), _pt(g, i), _pt(g, i + 1))
    return x


def pndm(run, x):
    """Liu et al. 2022, Algorithm 2: pseudo Runge-Kutta for the first three steps, then pseudo linear multistep."""
    g, sch = run.grid, run.schedule
    ets = []
    for i in range(g.steps):
        eps_1 = run.eval(x, g.t[i]).eps
        ets = (ets + [eps_1])[-4:]
        if i >= 3 or g.clean[i + 1]:
            x = _prev_sample(x, _ab_eps(ets), _pt(g, i), _pt(g, i + 1))
            continue
        t_mid = (g.t[i] + g.t[i + 1]) / 2
        a, a_mid, a_next = _pt(g, i), (float(sch.alpha(t_mid)), float(sch.sigma(t_mid))), _pt(g, i + 1)
        # e1 = eps(x_t, t); x1 = phi(x_t, e1, t, t - delta/2); e2 = eps(x1, t - delta/2); x2 = phi(x_t, e2, ...)
        # e3 = eps(x2, t - delta/2); x3 = phi(x_t, e3, t, t - delta); e4 = eps(x3, t - delta)
        eps_2 = run.eval(_prev_sample(x, eps_1, a, a_mid), t_mid).eps
        eps_3 = run.eval(_prev_sample(x, eps_2, a, a_mid), t_mid).eps
        eps_4 = run.eval(_prev_sample(x, eps_3, a, a_next), g.t[i + 1]).eps
        # e' = (e1 + 2 e2 + 2 e3 + e4) / 6; x_{t - delta} = phi(x_t, e', t, t - delta)
        x = _prev_sample(x, (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6, a, a_next)
    return x
