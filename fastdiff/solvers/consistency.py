"""Latent consistency model sampling (Luo et al. 2023, LCM, Algorithm 1; diffusers' LCMScheduler).

Each step maps x_t to the consistency estimate c_skip(t) x_t + c_out(t) D with the boundary-condition scalings of
Song et al. 2023 at the scaled model time tau * timestep_scaling (sigma_data = 0.5), then re-noises it to the next
boundary: x' = alpha' (c_skip x + c_out D) + sigma' z.  A step to the clean point returns the estimate itself.
"""

import math

from .registry import Option, _positive, solver

SIGMA_DATA = 0.5


def boundary_scalings(tau: float, timestep_scaling: float):
    """(c_skip, c_out) at model time tau."""
    s = tau * timestep_scaling
    c_skip = SIGMA_DATA**2 / (s * s + SIGMA_DATA**2)
    c_out = s / math.sqrt(s * s + SIGMA_DATA**2)
    return c_skip, c_out


@solver("lcm", alpha_zero=True, timestep_scaling=Option(10.0, _positive, "timestep_scaling must be a finite number > 0"))
def lcm(b, g, timestep_scaling):
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        c_skip, c_out = boundary_scalings(float(g.schedule.model_time(g.t[i])), timestep_scaling)
        b.update(x=g.alpha[i + 1] * (c_skip * X + c_out * D), noise=g.sigma[i + 1])
