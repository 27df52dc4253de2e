"""Ancestral samplers: k-diffusion's DPM-2 ancestral, ComfyUI's rectified-flow ancestral Euler, and TCD's strategic
stochastic sampling (Zheng et al. 2024, Sec. 4.3 / diffusers' TCDScheduler).

Each is written in the variables of its source: k-diffusion's y = x / alpha and sigma = sigma / alpha; the schedule's
path x_t = alpha_t x0 + sigma_t eps; TCD's x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps generalized to alpha_s, sigma_s.
"""

from __future__ import annotations

import math

import torch

from ..schedules import DiscreteVP
from .ode import _D, _to_y, ancestral_step, point_at_s


def dpm_2_ancestral(run, x, eta=1.0, s_noise=1.0):
    """k-diffusion ``sample_dpm_2_ancestral``: DPM-Solver-2 to sigma_down (midpoint in log sigma), then noise
    sigma_up; a step with sigma_down = 0 is the Euler step and adds no noise (k-diffusion 0.1.1, ComfyUI)."""
    g = run.grid
    for i in range(g.steps):
        s_i = g.s[i]
        denoised = run.eval(x, g.t[i]).x0
        sigma_down, sigma_up = ancestral_step(s_i, g.s[i + 1], eta)
        y = _to_y(x, g.alpha[i], "dpm_2_ancestral")
        # d = to_d(x, sigma, denoised)
        d = (y - denoised) / s_i
        if sigma_down == 0:
            y = y + d * (sigma_down - s_i)
        else:
            # sigma_mid = exp(lerp(log sigma, log sigma_down, 0.5))
            sigma_mid = math.exp(math.log(s_i) + 0.5 * (math.log(sigma_down) - math.log(s_i)))
            y_2 = y + d * (sigma_mid - s_i)
            d_2 = (y_2 - _D(run, y_2, point_at_s(run.schedule, sigma_mid))) / sigma_mid
            y = y + d_2 * (sigma_down - s_i)
            if sigma_up * s_noise > 0:
                y = y + run.noise(x) * s_noise * sigma_up
        x = g.alpha[i + 1] * y
    return x


def flow_euler_ancestral(run, x, eta=1.0, s_noise=1.0):
    """ComfyUI ``sample_euler_ancestral_RF`` with its sigma read as the schedule's time t (equal on rectified flow):
    t_down = t_{i+1} (1 + (t_{i+1}/t_i - 1) eta), Euler to it, then
    x = (alpha' / alpha_down) x + sqrt(sigma'^2 - sigma_down^2 alpha'^2 / alpha_down^2) z."""
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0
            continue
        downstep_ratio = 1 + (g.t[i + 1] / g.t[i] - 1) * eta
        t_down = g.t[i + 1] * downstep_ratio
        alpha_next, sigma_next = g.alpha[i + 1], g.sigma[i + 1]
        if t_down == g.t[i + 1]:  # eta = 0
            alpha_down, sigma_down = alpha_next, sigma_next
        else:
            alpha_down, sigma_down = float(sch.alpha(t_down)), float(sch.sigma(t_down))
        # Euler on the probability-flow path to t_down: the path's point given (x0, eps)
        x = alpha_down * out.x0 + sigma_down * out.eps
        # (sigma_next^2 - sigma_down^2 alpha_next^2 / alpha_down^2)^(1/2), as sigma_next sqrt(1 - q^2)
        q = (sigma_down * alpha_next) / (alpha_down * sigma_next)
        renoise = sigma_next * max(1 - q * q, 0.0) ** 0.5
        x = (alpha_next / alpha_down) * x
        if renoise * s_noise > 0:
            x = x + run.noise(x) * s_noise * renoise
    return x


def tcd(run, x, gamma=0.3, float32_floor=False):
    """TCD strategic stochastic sampling: x0, eps at t; x_s = alpha_s x0 + sigma_s eps at s = floor((1 - gamma) t')
    (where t' is an integer timestep of a DiscreteVP, else (1 - gamma) t'); then the forward process from s to t':
    x_t' = (alpha_t' / alpha_s) x_s + sqrt(sigma_t'^2 - alpha_t'^2 sigma_s^2 / alpha_s^2) z.  The last step
    returns x_s (no noise), a step to the clean point the data estimate.  ``float32_floor``: (1 - gamma) t' is a
    float32 product (diffusers' torch arithmetic) before the floor."""
    g, sch = run.grid, run.schedule
    for i in range(g.steps):
        out = run.eval(x, g.t[i])
        if g.clean[i + 1]:
            x = out.x0
            continue
        s = (1 - gamma) * g.t[i + 1]
        if isinstance(sch, DiscreteVP) and float(g.t[i + 1]).is_integer():
            if float32_floor:
                f32 = torch.float32
                s = (torch.tensor(1 - gamma, dtype=f32) * torch.tensor(g.t[i + 1], dtype=f32)).item()
            s = math.floor(s)
        if s == g.t[i + 1]:  # gamma = 0 (or s = t' = 0): x_s is the DDIM step to t'
            a_s, sg_s = g.alpha[i + 1], g.sigma[i + 1]
        else:
            a_s, sg_s = float(sch.alpha(s)), float(sch.sigma(s))
        x_s = a_s * out.x0 + sg_s * out.eps
        if i == g.steps - 1:
            x = x_s
            continue
        a_t, sg_t = g.alpha[i + 1], g.sigma[i + 1]
        # sqrt(sigma_t'^2 - alpha_t'^2 sigma_s^2 / alpha_s^2) = sigma_t' sqrt(1 - q^2)
        q = (a_t * sg_s) / (a_s * sg_t)
        std = sg_t * math.sqrt(max(1 - q * q, 0.0))
        x = (a_t / a_s) * x_s
        if std > 0:
            x = x + std * run.noise(x)
    return x
