"""Heun++ (ComfyUI's ``sample_heunpp2``) and the gradient-estimation sampler (Permenter & Yuan 2024, ComfyUI's
``sample_gradient_estimation``) in k-diffusion's variables y = x / alpha, sigma = sigma / alpha (see ``ode.py``)."""

from __future__ import annotations

import math

from .ode import _boundary, _churn, _D, _to_y


def heunpp2(run, x, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun++: slopes at sigma_hat, sigma_{i+1}, sigma_{i+2} (Euler predictions) weighted by w_2 = sigma_{i+1}/(3
    sigma_0), w_3 = sigma_{i+2}/(3 sigma_0); Heun with w_2 = sigma_{i+1}/(2 sigma_0) on the second-to-last step; Euler
    on the last."""
    g = run.grid
    sigmas, n = g.s, g.steps
    for i in range(n):
        x_hat, sigma_hat, pt = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise, "heunpp2")
        out = run.eval(x_hat, *pt)
        denoised = out.x0
        if i + 1 == n:
            # Euler: y + d (sigma_{i+1} - sigma_hat) = D + sigma_{i+1} d with d = eps (finite from sigma = inf)
            x = g.alpha[i + 1] * (denoised + sigmas[i + 1] * out.eps) if not g.clean[i + 1] else denoised
            continue
        y = _to_y(x_hat, pt[1], "heunpp2")
        d = (y - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if i + 2 == n:
            y_2 = y + d * dt
            d_2 = (y_2 - _D(run, y_2, _boundary(g, i + 1))) / sigmas[i + 1]
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            y = y + (d * (1 - w2) + d_2 * w2) * dt
        else:
            y_2 = y + d * dt
            d_2 = (y_2 - _D(run, y_2, _boundary(g, i + 1))) / sigmas[i + 1]
            y_3 = y_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = (y_3 - _D(run, y_3, _boundary(g, i + 2))) / sigmas[i + 2]
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            y = y + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
        x = g.alpha[i + 1] * y
    return x


def gradient_estimation(run, x, ge_gamma=2.0):
    """x_{i+1} = x_i + d_i dt + (gamma - 1)(d_i - d_{i-1}) dt with d = (x - D) / sigma (the Euler step plus the
    gradient-estimation correction); a step to sigma = 0 returns D."""
    g = run.grid
    old_d = None
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        # d = to_d(x, sigma, denoised) = eps (also its limit where alpha = 0)
        d = out.eps
        if g.clean[i + 1]:
            x = out.x0
        else:
            dt = g.s[i + 1] - g.s[i]
            # y + d dt = D + sigma_{i+1} d
            y = out.x0 + g.s[i + 1] * d
            if i >= 1:
                y = y + (ge_gamma - 1) * (d - old_d) * dt
            x = g.alpha[i + 1] * y
        old_d = d
    return x
