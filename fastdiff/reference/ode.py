"""Probability-flow ODE samplers of Karras et al. 2022 (EDM) and k-diffusion, in k-diffusion's variables.

Every schedule is run as EDM's sigma(t) = t, s(t) = 1 (their Sec. 3): y = x / alpha, s = sigma / alpha, and the
PF-ODE is dy/ds = (y - D(y; s)) / s.  The network is called with the unscaled x = alpha(t) y at the schedule time
t with sigma(t) / alpha(t) = s (``schedule.t_from_sigma_ratio``).  On EDM's schedule (alpha = 1) these are the
papers' algorithms letter for letter.
"""

from __future__ import annotations

import math

from scipy import integrate


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


def _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, name):
    """EDM Algorithm 2, lines 4-6: returns (y_hat, s_hat, t_hat)."""
    g = run.grid
    s_i = g.s[i]
    y = _to_y(x, g.alpha[i], name)
    # gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax], else 0
    gamma = min(s_churn / g.steps, math.sqrt(2.0) - 1.0) if s_tmin <= s_i <= s_tmax else 0.0
    if gamma == 0 or s_noise == 0:  # no churn, or churn without noise: nothing drawn (t_hat = t_i when gamma = 0)
        if gamma == 0:
            return y, s_i, g.t[i]
        s_hat = s_i + gamma * s_i
        return y, s_hat, float(run.schedule.t_from_sigma_ratio(s_hat))
    # t_hat = t_i + gamma t_i; sample eps ~ N(0, S_noise^2 I); x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps
    s_hat = s_i + gamma * s_i
    eps = s_noise * run.noise(x)
    y_hat = y + math.sqrt(s_hat**2 - s_i**2) * eps
    return y_hat, s_hat, float(run.schedule.t_from_sigma_ratio(s_hat))


def _D(run, y, t):
    """D(x; t) at the schedule time t, the network seeing x = alpha(t) y."""
    return run.eval(float(run.schedule.alpha(t)) * y, t).x0


def heun(run, x, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Karras et al. 2022, Algorithm 2 (stochastic sampler; Algorithm 1's Heun steps when S_churn = 0)."""
    g = run.grid
    for i in range(g.steps):
        s_next, t_next = g.s[i + 1], g.t[i + 1]
        y_hat, s_hat, t_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, "heun")
        # d_i = (x_hat - D(x_hat; t_hat)) / t_hat
        d_cur = (y_hat - _D(run, y_hat, t_hat)) / s_hat
        # Euler step from t_hat to t_{i+1}
        y_next = y_hat + (s_next - s_hat) * d_cur
        if not g.clean[i + 1]:
            # second-order correction: d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}
            d_prime = (y_next - _D(run, y_next, t_next)) / s_next
            y_next = y_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = g.alpha[i + 1] * y_next
    return x


def dpm_2(run, x, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k-diffusion ``sample_dpm_2``: DPM-Solver-2 as a midpoint step in log sigma (Karras et al. 2022's churn)."""
    g = run.grid
    for i in range(g.steps):
        s_next = g.s[i + 1]
        y_hat, s_hat, t_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, "dpm_2")
        d = (y_hat - _D(run, y_hat, t_hat)) / s_hat
        if g.clean[i + 1]:
            # denoising step: Euler to sigma = 0
            y_next = y_hat + (s_next - s_hat) * d
        else:
            # sigma_mid = exp(lerp(log sigma_hat, log sigma_{i+1}, 0.5)); Euler half step to it
            s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_next)))
            y_2 = y_hat + d * (s_mid - s_hat)
            t_mid = float(run.schedule.t_from_sigma_ratio(s_mid))
            d_2 = (y_2 - _D(run, y_2, t_mid)) / s_mid
            # full step with the midpoint slope
            y_next = y_hat + d_2 * (s_next - s_hat)
        x = g.alpha[i + 1] * y_next
    return x


def rk4(run, x):
    """Classical 4th-order Runge-Kutta on the PF-ODE dy/ds = (y - D(y; s)) / s (Karras et al. 2022, eq. 3)."""
    g = run.grid

    def f(y, s, t):
        return (y - _D(run, y, t)) / s

    for i in range(g.steps):
        s_i, s_next, t_i = g.s[i], g.s[i + 1], g.t[i]
        y = _to_y(x, g.alpha[i], "rk4")
        k1 = f(y, s_i, t_i)
        if g.clean[i + 1]:
            # a step to the clean point is the Euler step, which returns D
            x = y + (s_next - s_i) * k1
            continue
        h = s_next - s_i
        s_mid = s_i + h / 2
        t_mid = float(run.schedule.t_from_sigma_ratio(s_mid))
        # k2, k3 at the midpoint, k4 at the end
        k2 = f(y + (h / 2) * k1, s_mid, t_mid)
        k3 = f(y + (h / 2) * k2, s_mid, t_mid)
        k4 = f(y + h * k3, s_next, g.t[i + 1])
        x = g.alpha[i + 1] * (y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4))
    return x


def _lms_coeff(order, s, i, j):
    """k-diffusion ``linear_multistep_coeff``: integral over [s_i, s_{i+1}] of the j-th Lagrange basis polynomial."""

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return prod

    return integrate.quad(basis, s[i], s[i + 1], epsabs=1e-14, epsrel=1e-13)[0]


def lms(run, x, order=4):
    """k-diffusion ``sample_lms``: linear multistep (Adams-Bashforth) on dy/ds = d in k-diffusion's sigma."""
    g = run.grid
    ds = []
    for i in range(g.steps):
        y = _to_y(x, g.alpha[i], "lms")
        D = run.eval(x, g.t[i]).x0
        # d = to_d(x, sigma, denoised), keep the last `order` of them
        ds.append((y - D) / g.s[i])
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coeff(cur_order, g.s, i, j) for j in range(cur_order)]
        # x = x + sum_j coeff_j d_{i-j}
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
