"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021, eq. 12).

Both step between consecutive boundaries t -> t' with the data estimate D; written for any pair of
boundaries (skipped steps) through alpha_{t|t'} = alpha_t / alpha_t' and sigma_{t|t'}^2 = sigma_t^2 -
alpha_{t|t'}^2 sigma_t'^2, which for consecutive DDPM timesteps are sqrt(1 - beta_t) and beta_t.
"""

import math

from .builder import eps_hat, exp_neg_h
from .registry import ETA, Option, _one_of, solver


@solver("ddpm", alpha_zero=True,
        variance=Option("fixed_small", _one_of("fixed_small", "fixed_large"),
                        "variance must be 'fixed_small' (posterior variance) or 'fixed_large' (beta_t)"))
def ddpm(b, g, variance):
    for i in b.steps(g.steps):
        a, s, a2, s2 = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        X, D = b.call(g.t[i])
        a_ts = a / a2
        var_ts = s * s - a_ts * a_ts * s2 * s2  # sigma_{t|t'}^2 (= beta_t for consecutive steps)
        # Posterior q(x_t' | x_t, x0 = D): mean and variance.
        mean = (a2 * var_ts / (s * s)) * D + (a_ts * s2 * s2 / (s * s)) * X
        if g.zero[i + 1]:
            var = 0.0  # the last step returns the posterior mean (DDPM: "z = 0 if t = 1")
        elif variance == "fixed_small":
            var = var_ts * s2 * s2 / (s * s)
        else:
            var = var_ts
        b.update(x=mean, noise=math.sqrt(max(var, 0.0)))


@solver("ddim", alpha_zero=True, eta=ETA)
def ddim(b, g, eta):
    for i in b.steps(g.steps):
        a, s, a2, s2 = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        X, D = b.call(g.t[i])
        # DDIM eq. 16 written with e^{-h} = alpha s' / (alpha' s): c = eta * s' * sqrt(1 - e^{-2h}).
        e_h = exp_neg_h(a2, s2, a, s)
        c = eta * s2 * math.sqrt(max(1.0 - e_h * e_h, 0.0))
        x_next = a2 * D + math.sqrt(max(s2 * s2 - c * c, 0.0)) * eps_hat(X, D, a, s)
        b.update(x=x_next, noise=c)
