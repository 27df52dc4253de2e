"""Probability-flow ODE samplers of Karras et al. 2022 (EDM) and k-diffusion, in k-diffusion's variables.

Every schedule is run as EDM's sigma(t) = t, s(t) = 1 (their Sec. 3): y = x / alpha, s = sigma / alpha, and the
PF-ODE is dy/ds = (y - D(y; s)) / s.  The network is called with the unscaled x = alpha(t) y at the schedule time
t with sigma(t) / alpha(t) = s (``schedule.t_from_sigma_ratio``; above a DiscreteVP table's top see ``point_at_s``).
On EDM's schedule (alpha = 1) these are the papers' algorithms letter for letter.
"""

from __future__ import annotations

import math

from ..schedules import DiscreteVP


def _to_y(x, alpha, name):
    if alpha == 0:
        raise ValueError(f"reference {name}: alpha = 0 at a step start (s = sigma/alpha = inf); "
                         "this solver has no finite step from there")
    return x / alpha


def euler(run, x):
    """Karras et al. 2022, Algorithm 1 (deterministic sampling with Euler steps)."""
    g = run.grid
    for i in range(g.steps):
        s_i, s_next = g.s[i], g.s[i + 1]
        D = run.eval(x, g.t[i]).x0
        if g.alpha[i] > 0:
            y = x / g.alpha[i]
            # d_i = (x_i - D(x_i; t_i)) / t_i
            d = (y - D) / s_i
            # x_{i+1} = x_i + (t_{i+1} - t_i) d_i
            y_next = y + (s_next - s_i) * d
        else:
            # s_i = inf (alpha = 0): y is infinite but y - s_i d = D and d = eps, so the step is D + s_{i+1} eps
            d = (x - g.alpha[i] * D) / g.sigma[i]
            y_next = D + s_next * d
        x = g.alpha[i + 1] * y_next
    return x


def point_at_s(schedule, s):
    """(t, alpha, sigma) of the noise level sigma / alpha = s.

    Inside the schedule's range t = ``t_from_sigma_ratio(s)``.  Above the top of a DiscreteVP table (EDM churn at
    the first step) the time is clamped to t_max, so the network is conditioned on its largest timestep as
    k-diffusion's and diffusers' discrete wrappers do, while the state keeps the requested level:
    alpha = 1/sqrt(1 + s^2), sigma = s alpha (VP); alpha = 1, sigma = s (VE).
    """
    t = float(schedule.t_from_sigma_ratio(s))
    a, sg = float(schedule.alpha(t)), float(schedule.sigma(t))
    if abs(sg / a - s) <= 1e-9 * s:
        return t, a, sg
    if isinstance(schedule, DiscreteVP):
        a = 1.0 / math.sqrt(1.0 + s * s)
        return t, a, s * a
    if schedule.kind == "ve":
        return t, 1.0, s
    raise ValueError(f"reference: noise level sigma/alpha = {s:g} lies outside {schedule!r}'s range")


def _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, name):
    """EDM Algorithm 2, lines 4-6: returns (x_hat, s_hat, (t_hat, alpha_hat, sigma_hat)), x_hat unscaled."""
    g = run.grid
    s_i = g.s[i]
    # gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax], else 0
    gamma = min(s_churn / g.steps, math.sqrt(2.0) - 1.0) if s_tmin <= s_i <= s_tmax else 0.0
    if gamma == 0:
        return x, s_i, _boundary(g, i)
    # t_hat = t_i + gamma t_i
    s_hat = s_i + gamma * s_i
    pt = point_at_s(run.schedule, s_hat)
    y_hat = _to_y(x, g.alpha[i], name)
    if s_noise != 0:  # (no draw for a churn without noise)
        # sample eps ~ N(0, S_noise^2 I); x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps
        eps = s_noise * run.noise(x)
        y_hat = y_hat + math.sqrt(s_hat**2 - s_i**2) * eps
    return pt[1] * y_hat, s_hat, pt


def _D(run, y, pt):
    """D(x; s) at the point pt = (t, alpha, sigma) of the level s = sigma / alpha, the network seeing x = alpha y."""
    t, a, sg = pt
    return run.eval(a * y, t, a, sg).x0


def _boundary(g, i):
    return g.t[i], g.alpha[i], g.sigma[i]


def _start(run, x_hat, pt, i, name):
    """(y_hat, D(x_hat; t_hat)); y_hat is None where alpha = 0, which only a step to the clean point survives."""
    t_hat, alpha_hat, sigma_hat = pt
    D = run.eval(x_hat, t_hat, alpha_hat, sigma_hat).x0
    if alpha_hat == 0 and not run.grid.clean[i + 1]:
        _to_y(x_hat, alpha_hat, name)  # raises
    return (x_hat / alpha_hat if alpha_hat else None), D


def heun(run, x, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Karras et al. 2022, Algorithm 2 (stochastic sampler; Algorithm 1's Heun steps when S_churn = 0)."""
    g = run.grid
    for i in range(g.steps):
        s_next = g.s[i + 1]
        x_hat, s_hat, pt_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, "heun")
        y_hat, D = _start(run, x_hat, pt_hat, i, "heun")
        if y_hat is None:  # s_hat = inf (alpha = 0) to s = 0: the Euler step's limit is D
            x = D
            continue
        # d_i = (x_hat - D(x_hat; t_hat)) / t_hat
        d_cur = (y_hat - D) / s_hat
        # Euler step from t_hat to t_{i+1}
        y_next = y_hat + (s_next - s_hat) * d_cur
        if not g.clean[i + 1]:
            # second-order correction: d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}
            d_prime = (y_next - _D(run, y_next, _boundary(g, i + 1))) / s_next
            y_next = y_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = g.alpha[i + 1] * y_next
    return x


def dpm_2(run, x, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k-diffusion ``sample_dpm_2``: DPM-Solver-2 as a midpoint step in log sigma (Karras et al. 2022's churn)."""
    g = run.grid
    for i in range(g.steps):
        s_next = g.s[i + 1]
        x_hat, s_hat, pt_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, "dpm_2")
        y_hat, D = _start(run, x_hat, pt_hat, i, "dpm_2")
        if y_hat is None:
            x = D
            continue
        d = (y_hat - D) / s_hat
        if g.clean[i + 1]:
            # denoising step: Euler to sigma = 0
            y_next = y_hat + (s_next - s_hat) * d
        else:
            # sigma_mid = exp(lerp(log sigma_hat, log sigma_{i+1}, 0.5)); Euler half step to it
            s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_next)))
            y_2 = y_hat + d * (s_mid - s_hat)
            d_2 = (y_2 - _D(run, y_2, point_at_s(run.schedule, s_mid))) / s_mid
            # full step with the midpoint slope
            y_next = y_hat + d_2 * (s_next - s_hat)
        x = g.alpha[i + 1] * y_next
    return x


def rk4(run, x):
    """Classical 4th-order Runge-Kutta on the PF-ODE dy/ds = (y - D(y; s)) / s (Karras et al. 2022, eq. 3)."""
    g = run.grid

    def f(y, s, pt):
        return (y - _D(run, y, pt)) / s

    for i in range(g.steps):
        s_i, s_next = g.s[i], g.s[i + 1]
        y, D = _start(run, x, _boundary(g, i), i, "rk4")
        if y is None:  # from s = inf to the clean point: D
            x = D
            continue
        k1 = (y - D) / s_i
        if g.clean[i + 1]:
            # a step to the clean point is the Euler step, which returns D
            x = y + (s_next - s_i) * k1
            continue
        h = s_next - s_i
        pt_mid = point_at_s(run.schedule, s_i + h / 2)
        # k2, k3 at the midpoint s_i + h/2, k4 at s_{i+1}
        k2 = f(y + (h / 2) * k1, s_i + h / 2, pt_mid)
        k3 = f(y + (h / 2) * k2, s_i + h / 2, pt_mid)
        k4 = f(y + h * k3, s_next, _boundary(g, i + 1))
        x = g.alpha[i + 1] * (y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4))
    return x


def _lms_coeff(order, s, i, j):
    """k-diffusion ``linear_multistep_coeff``: integral over [s_i, s_{i+1}] of the j-th Lagrange basis polynomial."""
    from scipy import integrate  # lazily: scipy is only needed here

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return prod

    return integrate.quad(basis, s[i], s[i + 1], epsabs=1e-14, epsrel=1e-13)[0]


def lms(run, x, order=4, past_sigmas=()):
    """k-diffusion ``sample_lms``: linear multistep (Adams-Bashforth) on dy/ds = d in k-diffusion's sigma.

    ``past_sigmas`` (oldest first): sigmas before the grid of a run started late, as diffusers' LMSDiscreteScheduler
    after ``set_begin_index(b)``: step i integrates the Lagrange basis over min(b + i + 1, order) nodes reaching back
    into them, applied to the slopes it has (those since the start)."""
    g = run.grid
    s_all, P = list(past_sigmas) + list(g.s), len(past_sigmas)
    ds = []
    for i in range(g.steps):
        y = _to_y(x, g.alpha[i], "lms")
        D = run.eval(x, g.t[i]).x0
        # d = to_d(x, sigma, denoised), keep the last `order` of them
        ds.append((y - D) / g.s[i])
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(P + i + 1, order)
        coeffs = [_lms_coeff(cur_order, s_all, P + i, j) for j in range(cur_order)]
        # x = x + sum_j coeff_j d_{i-j} (zip stops at the slopes there are)
        y_next = y + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = g.alpha[i + 1] * y_next
    return x


def ancestral_step(s_from, s_to, eta):
    """k-diffusion ``get_ancestral_step``: (sigma_down, sigma_up), sigma_down^2 + sigma_up^2 = sigma_to^2.

    sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)), written with the
    ratio sigma_to / sigma_from so that sigma_from = inf (alpha = 0) gives its limit.
    """
    if not eta:
        return s_to, 0.0
    q = s_to / s_from
    sigma_up = min(s_to, eta * s_to * math.sqrt(max(1.0 - q * q, 0.0)))
    return math.sqrt(max(s_to**2 - sigma_up**2, 0.0)), sigma_up


def euler_ancestral(run, x, eta=1.0, s_noise=1.0):
    """k-diffusion ``sample_euler_ancestral``: Euler step to sigma_down, then fresh noise up to sigma_{i+1}."""
    g = run.grid
    for i in range(g.steps):
        s_i = g.s[i]
        D = run.eval(x, g.t[i]).x0
        sigma_down, sigma_up = ancestral_step(s_i, g.s[i + 1], eta)
        if g.alpha[i] > 0:
            y = x / g.alpha[i]
            # d = to_d(x, sigma, denoised); x = x + d (sigma_down - sigma)
            d = (y - D) / s_i
            y_next = y + d * (sigma_down - s_i)
        else:
            # s_i = inf: y - s_i d = D with d = eps (see euler)
            y_next = D + sigma_down * ((x - g.alpha[i] * D) / g.sigma[i])
        # x = x + noise * s_noise * sigma_up
        if sigma_up * s_noise > 0:
            y_next = y_next + (s_noise * sigma_up) * run.noise(x)
        x = g.alpha[i + 1] * y_next
    return x
