"""Latent consistency model multistep sampling (Luo et al. 2023, Algorithm 1), with the boundary-condition scalings
c_skip(t) = sigma_data^2 / ((t k)^2 + sigma_data^2), c_out(t) = t k / sqrt((t k)^2 + sigma_data^2) of Song et al.
2023 at the model time t scaled by k = timestep_scaling (sigma_data = 0.5)."""

from __future__ import annotations

import math


def lcm(run, x, timestep_scaling=10.0):
    g = run.grid
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        tk = float(g.schedule.model_time(g.t[i])) * timestep_scaling
        c_skip = 0.25 / (tk * tk + 0.25)
        c_out = tk / math.sqrt(tk * tk + 0.25)
        # the consistency function f(x_t, t) = c_skip x_t + c_out x0_theta; then x_{t'} = alpha' f + sigma' z
        f = c_skip * x + c_out * out.x0
        if g.clean[i + 1]:
            x = f
        else:
            x = g.alpha[i + 1] * f + g.sigma[i + 1] * run.noise(x)
    return x
