"""Ancestral samplers: a deterministic step to a lower noise level, then fresh noise back up to the next boundary.

- ``dpm_2_ancestral``: k-diffusion's / ComfyUI's DPM-2 midpoint step to sigma_down, in k-diffusion's sigma space
  (y = x / alpha, s = sigma / alpha, like ``ode.py``).
- ``flow_euler_ancestral``: ComfyUI's ancestral Euler for rectified-flow models (its ``sample_euler_ancestral`` on a
  CONST model): the Euler (DDIM) step to t_down = t' (1 + (t' / t - 1) eta), then the state is rescaled to alpha'
  and noised to sigma'.  Written in the schedule's time, it runs on every schedule.
- ``tcd``: Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, diffusers'
  TCDScheduler): the data and noise estimates give x at s = (1 - gamma) t', which is noised forward to t'.
"""

import math

import numpy as np

from ..schedules import DiscreteVP
from .builder import OutOfRange, eps_hat
from .ode import ancestral_split, euler_to
from .registry import ETA1, S_NOISE, Option, _flag, _nonneg, _real, solver


@solver("dpm_2_ancestral", eta=ETA1, s_noise=S_NOISE)
def dpm_2_ancestral(b, g, eta, s_noise):
    """k-diffusion's sample_dpm_2_ancestral: DPM-2 to sigma_down (midpoint in log sigma), then noise sigma_up.

    As in k-diffusion 0.1.1 and ComfyUI, a step whose sigma_down is 0 is the Euler step to the data estimate and
    adds no noise (with eta <= 1 only the step to the clean point; eta > 1 can reach it earlier).
    """
    y_hat = b.slot("y_hat")
    for i in b.steps(g.steps):
        s, a_next = g.s[i], g.alpha[i + 1]
        if g.alpha[i] == 0:  # (eta >= 1 would step to D without noise there: a collapsed sample, not a sampler)
            raise OutOfRange("it starts a step at sigma / alpha = inf")
        down, up = ancestral_split(s, g.s[i + 1], eta)
        X, D = b.call(g.t[i])
        d = eps_hat(X, D, g.alpha[i], g.sigma[i])
        if down == 0:
            b.update(x=euler_to(D, d, a_next, 0.0))
            continue
        s_mid = math.exp(0.5 * (math.log(s) + math.log(down)))
        t_mid, a_mid, sg_mid = g.point_at_s(s_mid)
        y = X / g.alpha[i]
        b.update(x=a_mid * (y + (s_mid - s) * d), slots={y_hat: y})
        X, D = b.call(t_mid, a_mid, sg_mid)
        b.update(x=a_next * (y_hat + (down - s) * eps_hat(X, D, a_mid, sg_mid)), noise=a_next * up * s_noise)


@solver("flow_euler_ancestral", alpha_zero=True,
        eta=Option(1.0, lambda v: _nonneg(v) and v <= 1.0, "eta must be a number in [0, 1]"), s_noise=S_NOISE)
def flow_euler_ancestral(b, g, eta, s_noise):
    """ComfyUI's sample_euler_ancestral_RF, in the schedule's time t (= sigma on rectified flow, where this is
    ComfyUI's sampler exactly): t_down = t' (1 + (t' / t - 1) eta), the Euler (DDIM) step to t_down, then
    x' = (alpha' / alpha_down) x_down + sqrt(sigma'^2 - (alpha' sigma_down / alpha_down)^2) z.  eta = 0 is flow Euler
    (DDIM); a step to the clean point returns D."""
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        t, t_next, a_next, sg_next = g.t[i], g.t[i + 1], g.alpha[i + 1], g.sigma[i + 1]
        t_down = t_next * (1.0 + (t_next / t - 1.0) * eta)
        a_down, sg_down = (a_next, sg_next) if t_down == t_next else g.at(t_down)  # eta = 0: exactly no noise
        # Euler (DDIM) to t_down; on rectified flow ComfyUI's (sigma_down / sigma) x + (1 - sigma_down / sigma) D
        x_down = a_down * D + sg_down * eps_hat(X, D, g.alpha[i], g.sigma[i])
        # rescale to alpha' and add noise up to sigma': sigma'^2 = (alpha' sigma_down / alpha_down)^2 + renoise^2
        renoise = sg_next * math.sqrt(max(1.0 - ((a_next * sg_down) / (a_down * sg_next)) ** 2, 0.0))
        b.update(x=(a_next / a_down) * x_down, noise=renoise * s_noise)


@solver("tcd", alpha_zero=True,
        gamma=Option(0.3, lambda v: _real(v) and 0.0 <= v <= 1.0, "gamma must be a number in [0, 1]"),
        float32_floor=Option(False, _flag, "float32_floor must be True or False"))
def tcd(b, g, gamma, float32_floor):
    """TCD's strategic stochastic sampling (diffusers' TCDScheduler, whose ``eta`` is the paper's gamma).

    x_s = alpha_s D + sigma_s eps_hat at s = (1 - gamma) t' (floored where t' is an integer timestep of a DiscreteVP
    schedule, as diffusers does), then x' = (alpha' / alpha_s) x_s + sqrt(sigma'^2 - (alpha' sigma_s / alpha_s)^2) z.
    The last step returns x_s without noise (diffusers); a step to the clean point returns D.  gamma = 0 is DDIM.
    ``float32_floor``: the product (1 - gamma) t' in float32 before the floor, as diffusers' torch code forms it
    (it lands on the integer above where the float64 product is just below one).
    """
    discrete = isinstance(g.schedule, DiscreteVP)
    for i in b.steps(g.steps):
        X, D = b.call(g.t[i])
        if g.zero[i + 1]:
            b.update(x=D)
            continue
        t_s = (1.0 - gamma) * g.t[i + 1]
        if discrete and float(g.t[i + 1]).is_integer():  # diffusers' integer timesteps
            if float32_floor:
                t_s = float(np.float32(1.0 - gamma) * np.float32(g.t[i + 1]))
            t_s = float(math.floor(t_s))
        a_s, sg_s = (g.alpha[i + 1], g.sigma[i + 1]) if t_s == g.t[i + 1] else g.at(t_s)  # gamma = 0: DDIM
        x_s = a_s * D + sg_s * eps_hat(X, D, g.alpha[i], g.sigma[i])
        if i == g.steps - 1:
            b.update(x=x_s)
            continue
        a_next, sg_next = g.alpha[i + 1], g.sigma[i + 1]
        gain = sg_next * math.sqrt(max(1.0 - ((a_next * sg_s) / (a_s * sg_next)) ** 2, 0.0))
        b.update(x=(a_next / a_s) * x_s, noise=gain)
