"""Stochastic exponential integrators with intermediate stages, as k-diffusion / ComfyUI run them:
DPM-Solver++ SDE (``sample_dpmpp_sde``), SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023, ComfyUI's ``sample_seeds_2`` /
``sample_seeds_3``) and the ER-SDE solver (Cui et al. 2025, ComfyUI's ``sample_er_sde``).

Noise is built the way the algorithms define it: DPM-Solver++ SDE's two draws of a step are normalized increments
of one Brownian motion in the sampler's sigma tau (k-diffusion's sigma / alpha; a flow's own sigma in ComfyUI) over
[tau_1, tau] and [tau', tau] (formed here from independent increments over [tau_1, tau] and [tau', tau_1]); SEEDS
carries the noise of a stage into the next one with the Ornstein-Uhlenbeck decay e^{(r_a - r_b) h eta}.
"""

from __future__ import annotations

import math

import numpy as np

from .ode import _to_y, ancestral_step, point_at_s


def dpmpp_sde(run, x, eta=1.0, s_noise=1.0, r=0.5):
    """k-diffusion ``sample_dpmpp_sde`` in y = x / alpha, sigma = sigma / alpha, t = -log sigma; the noise is the
    Brownian tree's in tau = sigma / alpha (ComfyUI on a flow: the flow's sigma)."""
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        sigma, sigma_next = g.s[i], g.s[i + 1]
        denoised = run.eval(x, g.t[i]).x0
        if sigma_next == 0:
            # Euler method: y + d (0 - sigma) = denoised (also the limit from sigma = inf)
            x = denoised
            continue
        y = _to_y(x, g.alpha[i], "dpmpp_sde")
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sigma_s = math.exp(-s)
        t_s, a_s, sg_s = point_at_s(sch, sigma_s)
        if sch.kind == "flow":
            tau, tau_s, tau_next = g.sigma[i], sg_s, g.sigma[i + 1]
        else:
            tau, tau_s, tau_next = sigma, sigma_s, sigma_next
        noisy = eta > 0 and s_noise > 0
        if noisy:
            # the Brownian tree's increments W(tau_s) - W(tau) and W(tau_next) - W(tau), from independent
            # increments over [tau_s, tau] and [tau_next, tau_s]
            dW_1 = math.sqrt(tau - tau_s) * run.noise(x)
        # step 1
        sd, su = ancestral_step(sigma, sigma_s, eta)
        s_ = -math.log(sd)
        y_2 = (math.exp(-s_) / math.exp(-t)) * y - math.expm1(t - s_) * denoised
        if noisy:
            y_2 = y_2 + (dW_1 / math.sqrt(tau - tau_s)) * s_noise * su
        denoised_2 = run.eval(a_s * y_2, t_s, a_s, sg_s).x0
        # step 2
        sd, su = ancestral_step(sigma, sigma_next, eta)
        t_next_ = -math.log(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        y = (math.exp(-t_next_) / math.exp(-t)) * y - math.expm1(t - t_next_) * denoised_d
        if noisy:
            dW_2 = dW_1 + math.sqrt(tau_s - tau_next) * run.noise(x)
            y = y + (dW_2 / math.sqrt(tau - tau_next)) * s_noise * su
        x = g.alpha[i + 1] * y
    return x


def _continue_noise(run, x, sde_noise, seg):
    """The noise carried from the previous stage, e^{seg} sde_noise, plus the fresh part sqrt(1 - e^{2 seg}) z
    (seg = (r_a - r_b) h eta <= 0; no draw when it is 0)."""
    fresh = math.sqrt(-math.expm1(2 * seg))
    return sde_noise * math.exp(seg) + (fresh * run.noise(x) if fresh > 0 else 0.0)


def _check_alpha(alpha, name):
    if alpha == 0:
        raise ValueError(f"reference {name}: alpha = 0 at a step start (lambda = -inf); no finite step from there")


def _point(run, lam):
    """(t, alpha, sigma) at half-log-SNR lam (sigma / alpha = e^{-lam})."""
    return point_at_s(run.schedule, math.exp(-lam))


def _seeds_steps(run, x, eta, s_noise, r, finish):
    """The SEEDS step loop: D at x; unless the step ends at the clean point (then x = D), stage 1
    x_2 = sigma_1/sigma_s e^{-r h eta} x - alpha_1 (e^{-r h_eta} - 1) D (+ sigma_1 s_noise sqrt(1 - e^{-2 r h eta}) z)
    at lambda_s + r h, D_2 there, and ``finish(i, x, D, D_2, h, h_eta, sde_noise)`` -> the next x (the rest of the
    step; sde_noise is stage 1's unscaled noise, None when no noise is injected)."""
    g = run.grid
    for i in range(g.steps):
        denoised = run.eval(x, g.t[i]).x0
        if g.clean[i + 1]:
            x = denoised
            continue
        _check_alpha(g.alpha[i], "seeds")
        h = g.lam[i + 1] - g.lam[i]
        h_eta = h * (eta + 1)
        t_1, a_1, sg_1 = (g.t[i + 1], g.alpha[i + 1], g.sigma[i + 1]) if r == 1 else _point(run, g.lam[i] + r * h)
        x_2 = sg_1 / g.sigma[i] * math.exp(-r * h * eta) * x - a_1 * math.expm1(-r * h_eta) * denoised
        sde_noise = None
        if eta > 0 and s_noise > 0:
            sde_noise = math.sqrt(-math.expm1(-2 * r * h * eta)) * run.noise(x)
            x_2 = x_2 + sde_noise * sg_1 * s_noise
        denoised_2 = run.eval(x_2, t_1, a_1, sg_1).x0
        x = finish(i, x, denoised, denoised_2, h, h_eta, sde_noise)
    return x


def _seeds_last_stage(run, i, x, weight, mix, r_last, h, eta, s_noise, sde_noise):
    """The end of SEEDS step i: sigma_t/sigma_s e^{-h eta} x - alpha_t weight mix (mix: the data estimates' blend),
    plus the noise of the last stage (at lambda_s + r_last h) carried on and its fresh part."""
    g = run.grid
    sg_s, a_t, sg_t = g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
    x = sg_t / sg_s * math.exp(-h * eta) * x - a_t * weight * mix
    if sde_noise is not None:
        sde_noise = _continue_noise(run, x, sde_noise, (r_last - 1) * h * eta)
        x = x + sde_noise * sg_t * s_noise
    return x


def seeds_2(run, x, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """SEEDS-2: data-prediction exponential integrator with stage lambda_s + r h, h_eta = h (1 + eta)."""

    def step_2(i, x, denoised, denoised_2, h, h_eta, sde_noise):
        if solver_type == "phi_1":
            weight, mix = math.expm1(-h_eta), denoised + (denoised_2 - denoised) / (2 * r)
        else:
            b2 = ((math.expm1(-h_eta) + h_eta) / -h_eta) / r
            b1 = math.expm1(-h_eta) - b2
            weight, mix = 1.0, b1 * denoised + b2 * denoised_2
        return _seeds_last_stage(run, i, x, weight, mix, r, h, eta, s_noise, sde_noise)

    return _seeds_steps(run, x, eta, s_noise, r, step_2)


def seeds_3(run, x, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: stages at lambda_s + r_1 h and lambda_s + r_2 h."""
    g = run.grid

    def phi_1(v):  # v phi_1(v)
        return math.expm1(v)

    def phi_2(v):  # v phi_2(v)
        return (math.expm1(v) - v) / v

    def steps_2_3(i, x, denoised, denoised_2, h, h_eta, sde_noise):
        sg_s = g.sigma[i]
        t_2, a_2, sg_2 = (g.t[i + 1], g.alpha[i + 1], g.sigma[i + 1]) if r_2 == 1 else _point(run, g.lam[i] + r_2 * h)
        # step 2
        a3_2 = r_2 / r_1 * phi_2(-r_2 * h_eta)
        a3_1 = phi_1(-r_2 * h_eta) - a3_2
        x_3 = sg_2 / sg_s * math.exp(-r_2 * h * eta) * x - a_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if sde_noise is not None:
            sde_noise = _continue_noise(run, x, sde_noise, (r_1 - r_2) * h * eta)
            x_3 = x_3 + sde_noise * sg_2 * s_noise
        denoised_3 = run.eval(x_3, t_2, a_2, sg_2).x0
        # step 3
        b3 = phi_2(-h_eta) / r_2
        b1 = phi_1(-h_eta) - b3
        return _seeds_last_stage(run, i, x, 1.0, b1 * denoised + b3 * denoised_3, r_2, h, eta, s_noise, sde_noise)

    return _seeds_steps(run, x, eta, s_noise, r_1, steps_2_3)


def _f(v):
    """ER-SDE's default noise scale function f(x) = x (e^{x^0.3} + 10), vectorized."""
    return v * (np.exp(v**0.3) + 10.0)


def _integrals(lam_s, lam_t, points):
    """int_{lam_t}^{lam_s} 1/f and int (l - lam_s)/f: the left Riemann sum on ``points`` points (ComfyUI), or
    scipy's adaptive quadrature for ``points=None``."""
    if points is None:
        from scipy import integrate

        i1 = integrate.quad(lambda v: 1 / _f(v), lam_t, lam_s, epsabs=0, epsrel=1e-13)[0]
        i2 = integrate.quad(lambda v: (v - lam_s) / _f(v), lam_t, lam_s, epsabs=0, epsrel=1e-13)[0]
        return i1, i2
    width = (lam_s - lam_t) / points
    nodes = lam_t + width * np.arange(points, dtype=np.float64)
    return float(np.sum(1 / _f(nodes)) * width), float(np.sum((nodes - lam_s) / _f(nodes)) * width)


def er_sde(run, x, s_noise=1.0, max_stage=3, integration_points=200):
    """ER-SDE-Solver-3 (Cui et al. 2025, VP, data prediction) in lambda = sigma / alpha with the noise scale f:

    x_t = (alpha_t/alpha_s)(f(l_t)/f(l_s)) x_s + alpha_t (1 - f(l_t)/f(l_s)) D_s
          + alpha_t (l_t - l_s + f(l_t) int_{l_t}^{l_s} 1/f) D'_s
          + alpha_t ((l_t - l_s)^2 / 2 + f(l_t) int_{l_t}^{l_s} (l - l_s)/f) D''_s
          + alpha_t sqrt(l_t^2 - l_s^2 f(l_t)^2 / f(l_s)^2) z,
    with D' and D'' divided differences of the previous data estimates in lambda (the solver's stages 2-3)."""
    g = run.grid
    lam = g.s
    Ds, dDs = [], []  # previous data estimates; previous first divided differences
    for i in range(g.steps):
        denoised = run.eval(x, g.t[i]).x0
        stage = min(max_stage, i + 1)
        if g.clean[i + 1]:
            x = denoised
            continue
        l_s, l_t = lam[i], lam[i + 1]
        a_s, a_t = g.alpha[i], g.alpha[i + 1]
        _check_alpha(a_s, "er_sde")
        ratio = float(_f(np.float64(l_t)) / _f(np.float64(l_s)))
        f_t = float(_f(np.float64(l_t)))
        x_next = a_t / a_s * ratio * x + a_t * (1 - ratio) * denoised
        if stage >= 2:
            i1, i2 = _integrals(l_s, l_t, integration_points)
            dD = (denoised - Ds[-1]) / (l_s - lam[i - 1])
            x_next = x_next + a_t * ((l_t - l_s) + i1 * f_t) * dD
            if stage >= 3:
                ddD = (dD - dDs[-1]) / ((l_s - lam[i - 2]) / 2)
                x_next = x_next + a_t * ((l_t - l_s) ** 2 / 2 + i2 * f_t) * ddD
            dDs.append(dD)
        var = l_t**2 - l_s**2 * ratio**2
        if s_noise > 0 and var > 0:
            x_next = x_next + a_t * math.sqrt(var) * s_noise * run.noise(x)
        Ds.append(denoised)
        x = x_next
    return x
