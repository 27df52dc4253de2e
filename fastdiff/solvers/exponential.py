"""Exponential integrators of ComfyUI's menu: RES multistep (Zhang et al. 2023) and DPM-Solver-fast (Lu et al.
2022a, k-diffusion's sample_dpm_fast).

Both work in k-diffusion's variables y = x / alpha, s = sigma / alpha with lambda = -log s (half the log-SNR).

- ``res_multistep``: the second-order multistep RES step in data prediction, y' = e^{-h} y + h (b1 D_i + b2 D_{i-1}),
  b2 = phi_2(-h) / c2, b1 = phi_1(-h) - b2, c2 = (lambda_{i-1} - lambda_i) / h; the first step and a step to
  sigma_down = 0 are Euler (= DDIM).  ``res_multistep_ancestral`` steps to k-diffusion's sigma_down and adds
  sigma_up noise; as in ComfyUI, c2 then measures the previous node from the previous step's sigma_down.
- ``dpm_fast``: ``steps`` model calls spent as DPM-Solver-3 steps (and one final DPM-Solver-2 or -1 step) of equal
  length in lambda between the grid's first point and its last noisy point; with ``final='zero'`` the last of
  those calls is the denoising step to the clean point, so the DPM-Solver part gets steps - 1 calls.  Only the
  grid's ends are used (k-diffusion's sample_dpm_fast(sigma_min, sigma_max, n)).  With eta > 0 each step lands on
  max(sigma_down, sigma_end) and adds the difference as noise.
"""

import math

import numpy as np

from .builder import Grid, eps_hat
from .dpm_solver import _dpm_solver_step
from .ode import ancestral_split, euler_to
from .registry import ETA, ETA1, S_NOISE, solver


def _phi1(z):
    return math.expm1(z) / z


def _phi2(z):
    return (_phi1(z) - 1.0) / z


def _res_multistep(b, g, eta, s_noise):
    """RES multistep; its CFG++ variant (ComfyUI's res_multistep with cfg_pp) renoises from y + D - U, weights U in
    place of D and keeps the previous U (with U = D outside CFG++ builds these are the plain steps)."""
    D_prev = b.slot("D_prev")
    prev_down = None  # sigma_down of the previous step
    for i in b.steps(g.steps):
        s_i, a_next = g.s[i], g.alpha[i + 1]
        down, up = ancestral_split(s_i, g.s[i + 1], eta)
        X, D, U = b.call(g.t[i], uncond=True)
        noise = a_next * up * s_noise if g.s[i + 1] > 0 else 0.0
        if down == 0 or prev_down is None:
            b.update(x=euler_to(D, eps_hat(X, U, g.alpha[i], g.sigma[i]), a_next, down), slots={D_prev: U},
                     noise=noise)
        else:
            h = math.log(s_i / down)
            # c2 = (lambda(sigma_{i-1}) - lambda(previous sigma_down)) / h, lambda = -log sigma; it is -inf (b2 = 0)
            # where the previous D is infinitely far: sigma_down = 0 or sigma_{i-1} = inf (alpha = 0)
            far = prev_down == 0 or not math.isfinite(g.s[i - 1])
            b2 = 0.0 if far else _phi2(-h) * h / math.log(prev_down / g.s[i - 1])
            b1 = _phi1(-h) - b2
            if b.cfgpp:
                y_next = (down / s_i) * (X / g.alpha[i] + (D - U)) + h * (b1 * U + b2 * D_prev)
            else:
                y_next = (down / s_i) * (X / g.alpha[i]) + h * (b1 * D + b2 * D_prev)
            b.update(x=a_next * y_next, slots={D_prev: U}, noise=noise)
        prev_down = down


@solver("res_multistep", alpha_zero=True, cfgpp=True)
def res_multistep(b, g):
    """RES second-order multistep (ComfyUI's sample_res_multistep); on any grid it equals DPM-Solver++(2M) in its
    heun form without lower_order_final."""
    _res_multistep(b, g, 0.0, 1.0)


@solver("res_multistep_ancestral", alpha_zero=True, cfgpp=True, eta=ETA1, s_noise=S_NOISE)
def res_multistep_ancestral(b, g, eta, s_noise):
    """RES multistep with ancestral noise (ComfyUI's sample_res_multistep_ancestral)."""
    _res_multistep(b, g, eta, s_noise)


def dpm_fast_orders(nfe):
    """k-diffusion's order list: floor(nfe / 3) + 1 steps of order 3, the last one or two lower; sums to nfe."""
    m = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (m - 2) + [2, 1]
    return [3] * (m - 1) + [nfe % 3]


@solver("dpm_fast", eta=ETA, s_noise=S_NOISE)
def dpm_fast(b, g, eta, s_noise):
    """DPM-Solver-fast (k-diffusion's sample_dpm_fast): ``steps`` NFE, see the module docstring."""
    end = g.steps - 1 if g.zero[-1] else g.steps  # index of the last noisy boundary; its calls: end
    orders = dpm_fast_orders(end) if end > 0 else []
    # boundaries equally spaced in lambda, with the grid's exact ends
    s = np.exp(-np.linspace(g.lam[0], g.lam[end], len(orders) + 1))
    s[0], s[-1] = g.s[0], g.s[end]
    times = [g.t[0]] + [g.t_of_s(v) for v in s[1:-1]] + [g.t[end]]
    x_s, eps_s = (b.slot("x_s"), b.slot("eps_s")) if max(orders, default=1) > 1 else (None, None)
    for k in b.steps(len(orders) + int(g.zero[-1])):
        if k == len(orders):  # the denoising step to the clean point
            X, D = b.call(g.t[end])
            b.update(x=D)
            continue
        down, up = ancestral_split(s[k], s[k + 1], eta)
        target = max(down, s[-1])  # k-diffusion: t_next_ = min(t_end, t(sigma_down)), t = -log sigma
        step = Grid(g.schedule, [times[k], times[k + 1] if target == s[k + 1] else g.t_of_s(target)], "t_min")
        _dpm_solver_step(b, step, 0, orders[k], x_s, eps_s)
        su = math.sqrt(max(s[k + 1] ** 2 - target**2, 0.0))
        if su > 0:
            # y' = y(target) + su z: x from alpha(target) to alpha at the boundary, then the noise
            a_next = g.at(times[k + 1])[0]
            b.add_noise(scale=a_next / step.alpha[1], gain=a_next * su * s_noise)
