"""DDPM ancestral sampling and DDIM, written between any two boundaries t -> t' (skipped steps).

For a pair t > t' of a Gaussian path x_t = alpha_t x0 + sigma_t eps the transition x_t | x_t' has
alpha_{t|t'} = alpha_t / alpha_t' and variance beta := sigma_t^2 - alpha_{t|t'}^2 sigma_t'^2; for consecutive DDPM
timesteps these are sqrt(1 - beta_t) and beta_t (Kingma et al. 2021, eq. 22-23).
"""

from __future__ import annotations

import math


def ddpm(run, x, variance="fixed_small"):
    """Ho et al. 2020, Algorithm 2 (sampling), generalized to any pair of boundaries t -> t'."""
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"ddpm: variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    g = run.grid
    for i in range(g.steps):
        a_t, s_t, a_p, s_p = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        out = run.eval(x, g.t[i])
        # alpha_{t|t'} and beta_t of the transition t' -> t
        a_tp = a_t / a_p
        beta = s_t**2 - a_tp**2 * s_p**2
        if a_tp > 0:
            # mean: 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta)
            mean = (x - (beta / s_t) * out.eps) / a_tp
        else:
            # alpha_t = 0 (flow t = 1, zero terminal SNR): the same posterior mean in Ho et al.'s eq. 7 form,
            # mu~(x_t, x0) = alpha_t' beta / sigma_t^2 x0 + alpha_{t|t'} sigma_t'^2 / sigma_t^2 x_t
            mean = (a_p * beta / s_t**2) * out.x0 + (a_tp * s_p**2 / s_t**2) * x
        # sigma_t^2 = beta~_t (posterior variance) or beta_t; z = 0 on the step to the clean point ("if t > 1")
        var = beta * s_p**2 / s_t**2 if variance == "fixed_small" else beta
        if g.clean[i + 1] or var <= 0:
            x = mean
        else:
            x = mean + math.sqrt(var) * run.noise(x)
    return x


def ddim(run, x, eta=0.0):
    """Song et al. 2021 (DDIM), eq. 12 with sigma_t(eta) of eq. 16 written for a general alpha_t, sigma_t.

    eq. 12: x_t' = alpha_t' x0 + sqrt(sigma_t'^2 - c^2) eps + c z, and eq. 16 reads (with VP's sigma^2 = 1 - alpha^2)
    c = eta sqrt((1 - a_t') / (1 - a_t)) sqrt(1 - a_t / a_t')  [a = alpha_bar = alpha^2]
      = eta (sigma_t' / sigma_t) sqrt(sigma_t^2 - alpha_t^2 sigma_t'^2 / alpha_t'^2)
      = eta sigma_t' sqrt(1 - (alpha_t sigma_t' / (alpha_t' sigma_t))^2),
    the last form being the one for any schedule (the posterior std of q(x_t' | x_t, x0) times eta).
    """
    g = run.grid
    for i in range(g.steps):
        a_t, s_t, a_p, s_p = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        out = run.eval(x, g.t[i])
        # sigma_t(eta), the std of the fresh noise
        c = eta * s_p * math.sqrt(max(1.0 - (a_t * s_p / (a_p * s_t)) ** 2, 0.0))
        # eq. 12: "predicted x0", "direction pointing to x_t", random noise
        x_new = a_p * out.x0 + math.sqrt(max(s_p**2 - c**2, 0.0)) * out.eps
        x = x_new + c * run.noise(x) if c > 0 else x_new
    return x
