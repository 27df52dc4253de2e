"""RES multistep (Zhang et al. 2023, "Improved order analysis and design of exponential integrator for diffusion
models"; ComfyUI's res_multistep) and DPM-Solver-fast (Lu et al. 2022a, Sec. 3.4; k-diffusion's sample_dpm_fast),
in k-diffusion's variables y = x / alpha, sigma = s = sigma / alpha, t = -log sigma.
"""

from __future__ import annotations

import math

import numpy as np

from .ode import _to_y, ancestral_step, point_at_s


def _res(run, x, eta, s_noise, name):
    g = run.grid
    old_denoised, old_sigma_down = None, None
    for i in range(g.steps):
        sigma, sigma_next = g.s[i], g.s[i + 1]
        out = run.eval(x, g.t[i])
        denoised = out.x0
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if g.alpha[i] == 0 and old_denoised is None:
            # sigma = inf: the Euler step's limit is denoised + sigma_down eps (y - sigma d = denoised, d = eps)
            y = denoised + sigma_down * out.eps
        elif sigma_down == 0 or old_denoised is None:
            # Euler: y + d (sigma_down - sigma), d = (y - denoised) / sigma
            y = _to_y(x, g.alpha[i], name)
            y = y + (y - denoised) / sigma * (sigma_down - sigma)
        else:
            # t = -log sigma; h = t_next - t; c2 = (t_prev - t_old) / h
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            t_prev, t_old = -math.log(g.s[i - 1]), -math.log(old_sigma_down) if old_sigma_down > 0 else math.inf
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2  # c2 = -inf (sigma_{i-1} = inf): b2 = 0
            y = math.exp(-h) * _to_y(x, g.alpha[i], name) + h * (b1 * denoised + b2 * old_denoised)
        if sigma_next > 0 and sigma_up * s_noise > 0:
            y = y + run.noise(x) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
        x = g.alpha[i + 1] * y
    return x


def res_multistep(run, x):
    """ComfyUI's sample_res_multistep (eta = 0)."""
    return _res(run, x, 0.0, 1.0, "res_multistep")


def res_multistep_ancestral(run, x, eta=1.0, s_noise=1.0):
    """ComfyUI's sample_res_multistep_ancestral."""
    return _res(run, x, eta, s_noise, "res_multistep_ancestral")


def dpm_fast(run, x, eta=0.0, s_noise=1.0):
    """k-diffusion's DPMSolver.dpm_solver_fast from the grid's first point to its last noisy one, with
    nfe = the model calls left for it; a grid that ends on the clean point spends one call on the denoising step."""
    g, sch = run.grid, run.schedule
    end = g.steps - 1 if g.clean[-1] else g.steps
    y = _to_y(x, g.alpha[0], "dpm_fast") if end > 0 else None

    def eps(y, t):
        """(y - D) / sigma at the level sigma = e^{-t}, the network seeing x = alpha y."""
        sigma = math.exp(-t)
        pt = point_at_s(sch, sigma)
        return (y - run.eval(pt[1] * y, pt[0], pt[1], pt[2]).x0) / sigma

    nfe = end
    if nfe > 0:
        t_start, t_end = -math.log(g.s[0]), -math.log(g.s[end])
        m = nfe // 3 + 1
        ts = np.linspace(t_start, t_end, m + 1)
        ts[0], ts[-1] = t_start, t_end
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            sigma_next = math.exp(-t_next) if i + 1 < len(orders) else g.s[end]
            sigma_t = math.exp(-t) if i > 0 else g.s[0]
            if eta:
                sd, _ = ancestral_step(sigma_t, sigma_next, eta)
                t_next_ = min(t_end, -math.log(sd))
                su = math.sqrt(max(sigma_next**2 - math.exp(-2 * t_next_), 0.0))
            else:
                t_next_, su = t_next, 0.0
            h = t_next_ - t
            e = eps(y, t)
            if order == 1:
                # DPM-Solver-1: x - sigma(t_next) expm1(h) eps
                y = y - math.exp(-t_next_) * math.expm1(h) * e
            elif order == 2:
                # r1 = 1/2: u1 = x - sigma(s1) expm1(r1 h) eps; x - sigma(t') expm1(h) eps - sigma(t')/(2 r1) ...
                s1 = t + h / 2
                u1 = y - math.exp(-s1) * math.expm1(h / 2) * e
                e1 = eps(u1, s1)
                y = y - math.exp(-t_next_) * math.expm1(h) * e - math.exp(-t_next_) * math.expm1(h) * (e1 - e)
            else:
                r1, r2 = 1 / 3, 2 / 3
                s1, s2 = t + r1 * h, t + r2 * h
                u1 = y - math.exp(-s1) * math.expm1(r1 * h) * e
                e1 = eps(u1, s1)
                u2 = (y - math.exp(-s2) * math.expm1(r2 * h) * e
                      - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e))
                e2 = eps(u2, s2)
                y = (y - math.exp(-t_next_) * math.expm1(h) * e
                     - math.exp(-t_next_) / r2 * (math.expm1(h) / h - 1) * (e2 - e))
            if su * s_noise > 0:
                y = y + su * s_noise * run.noise(y)
    x = g.alpha[end] * y if end > 0 else x
    return run.eval(x, g.t[end]).x0 if g.clean[-1] else x
